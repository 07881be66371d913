"""Attention cost of dense MLA vs DSA (indexer + top-k + sparse MLA) as the context grows, side by side.

    python benchmarks/dsa_scaling.py --out benchmarks/results/dsa_scaling/dsa_scaling_cpu.json  # CPU: torch path
    python benchmarks/dsa_scaling.py --out $OUT/dsa_scaling_gpu.json                   # GPU: Triton kernels

Per context length L (one layer, the backends' real kernel calls from `vllm_frontier.kernels`):
  decode step : b requests, 1 new token each, attending to L cached tokens.
      dense = flash_mla_with_kvcache(q, cache)                      (reads all L latent rows)
      DSA   = indexer_paged_logits + topk_indices + flash_mla_with_kvcache(indices=top-k)
  prefill     : the last chunk of a chunked prefill, s_q new tokens at the end of an L-token context,
      dense = causal flash_mla_with_kvcache over L; DSA = indexer logits + top-k + sparse attention.
The crossover is the smallest measured L where DSA is cheaper. On the CPU the torch path runs (what vLLM
CPU serves with); on a GPU the Triton kernels. Head counts default to DeepSeek's on GPU (128 heads, 64
indexer heads) and to fewer on CPU (stated in the JSON) so the sweep finishes in minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from vllm_frontier.kernels import (  # noqa: E402
    flash_mla_with_kvcache,
    indexer_paged_logits,
    request_positions_to_slots,
    topk_indices,
    write_indexer_k_cache,
    write_latent_cache,
)

BLOCK = 64
IDX_DIM = 128


def _args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "dsa_scaling.json") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out)
    p.add_argument("--contexts", type=int, nargs="+",
                   default=[256, 512, 1024, 2048, 4096, 8192] + ([16384, 32768] if gpu else []))
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64 if gpu else 4)
    p.add_argument("--heads", type=int, default=128 if gpu else 16)
    p.add_argument("--index-heads", type=int, default=64 if gpu else 16)
    p.add_argument("--prefill-chunk", type=int, default=512 if gpu else 64)
    p.add_argument("--iters", type=int, default=10 if gpu else 3)
    p.add_argument("--plot", default=None, help="PNG path (default: beside --out)")
    return p.parse_args()


def _setup(b: int, L: int, dtype, dev, gen):
    """Filled latent + indexer caches for b requests of L tokens (shuffled block tables)."""
    nblk = (L + BLOCK - 1) // BLOCK
    perm = torch.randperm(b * nblk, generator=gen).to(dev)
    bt = perm.view(b, nblk).to(torch.int32)
    cache = torch.zeros(b * nblk, BLOCK, 576, dtype=dtype, device=dev)
    kcache = torch.zeros(b * nblk, BLOCK, IDX_DIM + 4, dtype=torch.uint8, device=dev)
    pos = torch.arange(L, device=dev)
    slots = (bt.long()[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1)
    T = b * L
    write_latent_cache(torch.randn(T, 512, device=dev, dtype=dtype), torch.randn(T, 64, device=dev, dtype=dtype),
                       cache, slots, fp8=False)
    write_indexer_k_cache(torch.randn(T, IDX_DIM, device=dev, dtype=dtype), kcache, slots)
    return cache, kcache, bt


def _dsa_call(q, iq, w, cache, kcache, bt, seqlens, L, topk, causal_rows):
    """Indexer scores + stable top-k + sparse attention, for rows whose visible lengths are `seqlens`."""
    logits = indexer_paged_logits(iq, w, kcache, bt, seqlens, L, causal=False)
    idx = topk_indices(logits[:, 0], topk, lengths=seqlens)
    slots = request_positions_to_slots(idx, bt, cache.shape[1], seqlens)
    return flash_mla_with_kvcache(q, cache, None, None, indices=slots.unsqueeze(1))


def main() -> int:
    a = _args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    meta = {"command": " ".join(sys.argv), "device": str(dev), "dtype": str(dtype), "topk": a.topk,
            "batch": a.batch, "heads": a.heads, "index_heads": a.index_heads, "prefill_chunk": a.prefill_chunk,
            "block": BLOCK, "path": "triton" if dev.type == "cuda" else "torch reference (vLLM CPU path)"}
    report = harness.Report(a.out, meta)
    rows = []
    for L in a.contexts:
        with report.section(f"L={L}") as rec:
            b = a.batch
            cache, kcache, bt = _setup(b, L, dtype, dev, gen)
            seq = torch.full((b,), L, dtype=torch.int32, device=dev)
            q = torch.randn(b, 1, a.heads, 576, device=dev, dtype=dtype)
            iq = torch.randn(b, 1, a.index_heads, IDX_DIM, device=dev, dtype=dtype)
            w = torch.rand(b, 1, a.index_heads, device=dev)
            dense = harness.time_fn(lambda: flash_mla_with_kvcache(q, cache, bt, seq), iters=a.iters)
            dsa = harness.time_fn(lambda: _dsa_call(q, iq, w, cache, kcache, bt, seq, L, a.topk, None), iters=a.iters)
            rec["decode"] = {"dense_ms": dense["ms_median"], "dsa_ms": dsa["ms_median"],
                             "dsa_over_dense": dsa["ms_median"] / dense["ms_median"]}
            # prefill: last chunk of s new tokens in request 0; one kernel row per token (as the backends do)
            s = min(a.prefill_chunk, L)
            vis = torch.arange(L - s + 1, L + 1, dtype=torch.int32, device=dev)
            btr = bt[:1].expand(s, -1).contiguous()
            qp = torch.randn(s, 1, a.heads, 576, device=dev, dtype=dtype)
            iqp = torch.randn(s, 1, a.index_heads, IDX_DIM, device=dev, dtype=dtype)
            wp = torch.rand(s, 1, a.index_heads, device=dev)
            pd = harness.time_fn(lambda: flash_mla_with_kvcache(qp, cache, btr, vis), iters=a.iters)
            ps = harness.time_fn(lambda: _dsa_call(qp, iqp, wp, cache, kcache, btr, vis, L, a.topk, None),
                                 iters=a.iters)
            rec["prefill_chunk"] = {"tokens": s, "dense_ms": pd["ms_median"], "dsa_ms": ps["ms_median"],
                                    "dsa_over_dense": ps["ms_median"] / pd["ms_median"]}
            rows.append((L, rec["decode"], rec["prefill_chunk"]))
            del cache, kcache
    summary = {}
    for kind in ("decode", "prefill_chunk"):
        idx = 1 if kind == "decode" else 2
        cheaper = [r[0] for r in rows if r[idx]["dsa_ms"] < r[idx]["dense_ms"]]
        summary[kind] = {"crossover_context": min(cheaper) if cheaper else None,
                         "ratio_at_largest": rows[-1][idx]["dsa_over_dense"] if rows else None}
    report.data["summary"] = summary
    report.write()
    print(summary)
    _plot(a, rows)
    return 0


def _plot(a, rows) -> None:
    target = a.plot or (str(Path(a.out).with_suffix(".png")) if a.out else None)
    if not target or not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, idx, title in ((axes[0], 1, "decode step"), (axes[1], 2, "prefill chunk")):
        Ls = [r[0] for r in rows]
        ax.plot(Ls, [r[idx]["dense_ms"] for r in rows], "o-", label="dense MLA")
        ax.plot(Ls, [r[idx]["dsa_ms"] for r in rows], "s-", label=f"DSA (top-k {a.topk}, incl. indexer)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel("ms per layer")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    print("wrote", target)


if __name__ == "__main__":
    sys.exit(main())
