"""GPU check of vllm_frontier.kernels: correctness at DeepSeek sizes, then timings against the roofline.

Run on a CUDA machine (needs torch, triton, numpy; not vLLM):
    python benchmarks/kernels_gpu.py --out $OUT/kernels_gpu.json
Self-test on CPU (Triton interpreter, tiny shapes):
    python benchmarks/kernels_gpu.py --smoke --out /tmp/kernels_smoke.json

Formulas (per timed call):
  dense decode bytes  = B*seq*row_bytes (KV, 1152 bf16 / 656 FP8) + B*s_q*h*(576+512)*2 (q, out)
  attention FLOPs     = 2 * B * s_q * h * keys * (576 + 512)     (QK^T over 576 dims, PV over 512)
  indexer bytes       = B * ctx * (D + 4) (FP8 K rows + scales) + B * ctx * 4 (fp32 logits written)
Every kernel's output is checked against the torch reference before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "kernels_gpu.json") if os.environ.get("OUT") else None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="skip the remaining timing sections after this many seconds (not applied with --smoke)")
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


ARGS = _parse()
if ARGS.smoke:
    import torch as _t

    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import harness  # noqa: E402
from vllm_frontier.kernels import (  # noqa: E402
    KernelConfig,
    flash_mla_sparse_fwd,
    flash_mla_with_kvcache,
    get_mla_metadata,
    indexer_paged_logits,
    indexer_ragged_logits,
    quantize_fp8_e4m3,
    request_positions_to_slots,
    topk_indices,
    write_indexer_k_cache,
    write_latent_cache,
)

# Every call below runs the Triton kernel unless it passes backend="torch" (the reference); on CPU the
# default dispatch would pick the reference, so the smoke run forces Triton (interpreter) explicitly.
def _triton(fn):
    return functools.partial(fn, backend="triton")


flash_mla_sparse_fwd = _triton(flash_mla_sparse_fwd)
flash_mla_with_kvcache = _triton(flash_mla_with_kvcache)
indexer_paged_logits = _triton(indexer_paged_logits)
indexer_ragged_logits = _triton(indexer_ragged_logits)
topk_indices = _triton(topk_indices)
write_indexer_k_cache = _triton(write_indexer_k_cache)
write_latent_cache = _triton(write_latent_cache)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# Under the interpreter bf16 arithmetic is broken: the smoke run uses fp16 (same code paths).
DT = torch.bfloat16 if CUDA else torch.float16
ITERS = 1 if ARGS.smoke else ARGS.iters
WARM = 0 if ARGS.smoke else 3

if ARGS.smoke:
    S = dict(h=16, seq=80, block=16, b=2, b_dense=2, topk=48, b_sparse=2, ctxs=[80], b_idx=2, idx_h=16,
             pre_sq=4, pre_kv=80, pre_topk=32, corr_seqlens=[1, 37, 0], copy_bytes=1 << 20)
    CONFIGS = [KernelConfig(16, 64, 4, 1)]
else:
    S = dict(h=128, seq=4096, block=64, b=128, b_dense=128, topk=2048, b_sparse=128, ctxs=[8192, 32768], b_idx=128,
             idx_h=64, pre_sq=1024, pre_kv=8192, pre_topk=2048, corr_seqlens=[1, 700, 4096, 0, 2500],
             copy_bytes=1 << 30)
    # The launcher's config for this GPU first (kernels.mla_attention.gpu_config: no spills on sm_80 / sm_90),
    # then 64-row tiles (one Hopper wgmma tile of heads; they spill ~270-540 bytes/thread on sm_90); the sweep
    # keeps the fastest config that agrees. Each config is one more Triton compile (~5-15 s for this kernel).
    from vllm_frontier.kernels.mla_attention import default_config as _mla_default  # noqa: E402

    CONFIGS = [KernelConfig(64, 32, 8, 1), KernelConfig(64, 64, 8, 1)]
    if torch.cuda.is_available():
        CONFIGS = [_mla_default(torch.device("cuda"), 128)] + [c for c in CONFIGS if c != _mla_default(
            torch.device("cuda"), 128)]

# bf16 tolerance: p and the output are rounded to bf16 (2^-8 relative) on unit-variance values
ATOL = 3e-2 if DT == torch.bfloat16 else 3e-3


def paged_cache(seqlens, block, fp8, gen_seed=0):
    """Random latent rows written through a shuffled block table -> (cache, block_table, seqlens)."""
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    used = [-(-n // block) for n in seqlens]
    nb = sum(used) + 1
    perm = torch.randperm(nb, device=DEV, generator=g).int()
    bt = torch.full((len(seqlens), max(used + [1])), 10**8, dtype=torch.int32, device=DEV)
    k = 0
    for r, u in enumerate(used):
        bt[r, :u] = perm[k : k + u]
        k += u
    row = 656 if fp8 else 576
    cache = torch.zeros(nb, block, row, dtype=torch.uint8 if fp8 else DT, device=DEV)
    sl = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
    # slot of every (request, position): vectorized over positions
    L = max(seqlens + [1])
    pos = torch.arange(L, device=DEV)[None, :].expand(len(seqlens), L)
    valid = pos < sl[:, None].long()
    cols = (pos // block).clamp(max=bt.shape[1] - 1)
    slots = torch.gather(bt.long(), 1, cols) * block + pos % block
    slots = slots[valid]
    T = slots.numel()
    kv_c = torch.randn(T, 512, device=DEV, generator=g).to(DT)
    k_pe = torch.randn(T, 64, device=DEV, generator=g).to(DT)
    write_latent_cache(kv_c, k_pe, cache, slots, fp8=fp8)
    return cache, bt, sl


def rand(*shape, seed=0, dtype=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, generator=g).to(dtype or DT)


def best_of(rec, name, run, check, configs, flops=None, nbytes=None):
    """Check each kernel config against the reference, time the agreeing ones, keep the fastest."""
    rec[name] = []
    best = None
    for i, cfg in enumerate(configs):
        e = {"config": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg)}
        if i > 0 and not ARGS.smoke and REPORT is not None and REPORT.elapsed() > ARGS.budget_s:
            e["skipped"] = f"time budget {ARGS.budget_s}s spent"
            rec[name].append(e)
            continue
        try:
            out = run(cfg)
            e["agree"] = check(out)
            if e["agree"]["ok"]:
                t = harness.time_fn(lambda: run(cfg), WARM, ITERS)
                e.update(t)
                if flops:
                    e["tflops"] = flops / (t["ms_median"] * 1e-3) / 1e12
                if nbytes:
                    e["gbps"] = nbytes / (t["ms_median"] * 1e-3) / 1e9
                if best is None or t["ms_median"] < best["ms_median"]:
                    best = e
        except Exception as ex:  # one failing config (e.g. out of shared memory) must not end the run
            e["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        rec[name].append(e)
    rec[name + "_best"] = best
    return best


REPORT = None


def main():
    global REPORT
    rep = REPORT = harness.Report(ARGS.out, meta={"smoke": ARGS.smoke, "shapes": S, "dtype": str(DT),
                                         "command": " ".join([Path(sys.executable).name] + sys.argv)})
    h, blk = S["h"], S["block"]

    # ------------------------------------------------------------------ correctness (DeepSeek sizes)
    with rep.section("correctness") as rec:
        seqlens = S["corr_seqlens"]
        b = len(seqlens)
        for fp8 in (False, True):
            cache, bt, sl = paged_cache(seqlens, blk, fp8, 1)
            tag = "fp8" if fp8 else "bf16" if DT == torch.bfloat16 else "fp16"
            for s_q in (1, 2):
                q = rand(b, s_q, h, 576, seed=2)
                kw = dict(is_fp8_kvcache=fp8, softmax_scale=576**-0.5, causal=s_q > 1)
                o, l = flash_mla_with_kvcache(q, cache, bt, sl, **kw)
                ro, rl = flash_mla_with_kvcache(q, cache, bt, sl, backend="torch", **kw)
                rec[f"dense_{tag}_sq{s_q}"] = {"out": harness.compare(o, ro, ATOL), "lse": harness.compare(l, rl, 1e-2)}
            topk = min(S["topk"], max(seqlens))
            g = torch.Generator(device=DEV).manual_seed(3)
            pos = torch.randint(-1, max(seqlens) + 8, (b, 2, topk), device=DEV, generator=g).int()
            idx = request_positions_to_slots(pos, bt, blk, sl)  # FlashMLA's indices: physical cache slots
            q = rand(b, 2, h, 576, seed=4)
            kw = dict(is_fp8_kvcache=fp8, softmax_scale=576**-0.5, indices=idx)
            o, l = flash_mla_with_kvcache(q, cache, None, None, **kw)
            ro, rl = flash_mla_with_kvcache(q, cache, None, None, backend="torch", **kw)
            rec[f"sparse_decode_{tag}"] = {"out": harness.compare(o, ro, ATOL), "lse": harness.compare(l, rl, 1e-2)}
            # sparse prefill over a ragged KV (the first request's rows)
            n_kv = S["pre_kv"] if ARGS.smoke else 4096
            kv = torch.zeros(n_kv, 1, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else DT, device=DEV)
            write_latent_cache(rand(n_kv, 512, seed=5), rand(n_kv, 64, seed=6), kv, torch.arange(n_kv, device=DEV), fp8=fp8)
            sq = S["pre_sq"] if ARGS.smoke else 128
            pidx = torch.randint(-1, n_kv, (sq, 1, min(S["pre_topk"], n_kv)), device=DEV, generator=g).int()
            qp = rand(sq, h, 576, seed=7)
            o, m, l = flash_mla_sparse_fwd(qp, kv, pidx, 576**-0.5)
            ro, rm, rl = flash_mla_sparse_fwd(qp, kv, pidx, 576**-0.5, backend="torch")
            rec[f"sparse_prefill_{tag}"] = {"out": harness.compare(o, ro, ATOL), "max_logits": harness.compare(m, rm, 1e-2),
                                            "lse": harness.compare(l, rl, 1e-2)}
        # cache writers: bytes identical to the reference
        n = 300
        slots = torch.randperm(4 * 64 * 2, device=DEV)[:n]
        slots[::5] = -1
        for fp8 in (False, True):
            a = torch.zeros(8, 64, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else DT, device=DEV)
            c = a.clone()
            kv_c, k_pe = rand(n, 512, seed=8), rand(n, 64, seed=9)
            write_latent_cache(kv_c, k_pe, a, slots, fp8=fp8)
            write_latent_cache(kv_c, k_pe, c, slots, fp8=fp8, backend="torch")
            rec[f"latent_write_{'fp8' if fp8 else 'float'}_bytes_equal"] = bool(torch.equal(a.view(torch.uint8), c.view(torch.uint8)))
        a = torch.zeros(8, 64, 132, dtype=torch.uint8, device=DEV)
        c = a.clone()
        kk = rand(n, 128, seed=10)
        write_indexer_k_cache(kk, a, slots)
        write_indexer_k_cache(kk, c, slots, backend="torch")
        rec["indexer_write_bytes_equal"] = bool(torch.equal(a, c))
        # indexer logits + top-k
        ctx = S["ctxs"][0]
        icache, ibt, isl = indexer_problem(4, ctx)
        q8, w = indexer_q(4, 2)
        lg = indexer_paged_logits(q8, w, icache, ibt, isl, ctx)
        rlg = indexer_paged_logits(q8, w, icache, ibt, isl, ctx, backend="torch")
        rec["indexer_paged_logits"] = harness.compare(lg, rlg, 1e-3, 1e-4)
        tk = topk_indices(rlg.reshape(-1, ctx), S["topk"], isl.repeat_interleave(2))
        rtk = topk_indices(rlg.reshape(-1, ctx), S["topk"], isl.repeat_interleave(2), backend="torch")
        rec["topk_equal"] = bool(torch.equal(tk, rtk))
        oks = [v["ok"] for v in _leaves(rec)] + [v for k, v in rec.items() if isinstance(v, bool)]
        rec["all_ok"] = all(oks)

    # ------------------------------------------------------------------ timings
    with rep.section("copy_bandwidth") as rec:
        rec.update(harness.copy_bandwidth(S["copy_bytes"], DEV))
    copy_gbps = rep.data["sections"]["copy_bandwidth"].get("gbps")

    def timed(name, fn):
        if not ARGS.smoke and rep.elapsed() > ARGS.budget_s:
            rep.data["sections"][name] = {"status": "skipped", "reason": f"time budget {ARGS.budget_s}s spent"}
            return
        with rep.section(name) as rec:
            fn(rec)

    def dense(rec, fp8):
        b, seq = S["b_dense"], S["seq"]
        cache, bt, sl = paged_cache([seq] * b, blk, fp8, 11)
        q = rand(b, 1, h, 576, seed=12)
        ref = flash_mla_with_kvcache(q, cache, bt, sl, is_fp8_kvcache=fp8, backend="torch")[0]
        row = 656 if fp8 else 1152
        nbytes = b * seq * row + b * h * (576 + 512) * 2
        flops = 2 * b * h * seq * (576 + 512)
        rec.update(shape={"b": b, "s_q": 1, "h": h, "seq": seq, "block": blk}, bytes=nbytes, flops=flops)

        def run(cfg):
            sched, _ = get_mla_metadata(config=cfg)
            o = flash_mla_with_kvcache(q, cache, bt, sl, tile_scheduler_metadata=sched, is_fp8_kvcache=fp8)[0]
            rec.setdefault("num_splits", {})[str(vars(cfg))] = sched.num_splits  # fixed by the first call
            return o

        best = best_of(rec, "triton", run, lambda o: harness.compare(o, ref, ATOL), CONFIGS, flops, nbytes)
        if best and copy_gbps:
            rec["fraction_of_copy_bandwidth"] = best["gbps"] / copy_gbps
        t = harness.time_fn(lambda: flash_mla_with_kvcache(q, cache, bt, sl, is_fp8_kvcache=fp8, backend="torch"),
                            1 if not ARGS.smoke else 0, max(1, ITERS // 3))
        rec["torch_reference"] = {**t, "gbps": nbytes / (t["ms_median"] * 1e-3) / 1e9}

    timed("dense_decode_bf16", lambda rec: dense(rec, False))
    timed("dense_decode_fp8", lambda rec: dense(rec, True))
    try:
        b16 = rep.data["sections"]["dense_decode_bf16"]["triton_best"]["ms_median"]
        f8 = rep.data["sections"]["dense_decode_fp8"]["triton_best"]["ms_median"]
        rep.data["sections"]["dense_decode_fp8"]["speedup_vs_bf16"] = b16 / f8
    except (KeyError, TypeError):
        pass

    def sparse(rec, fp8):
        b, topk, s_q = S["b_sparse"], S["topk"], 2
        seq = max(S["seq"], topk)
        cache, bt, sl = paged_cache([seq] * b, blk, fp8, 13)
        q = rand(b, s_q, h, 576, seed=14)
        g = torch.Generator(device=DEV).manual_seed(15)
        idx = torch.argsort(torch.rand(b * s_q, seq, device=DEV, generator=g), dim=-1)[:, :topk]
        idx = idx.sort(dim=-1).values.int().reshape(b, s_q, topk)
        idx = request_positions_to_slots(idx, bt, blk)  # FlashMLA's indices: physical cache slots
        ref = flash_mla_with_kvcache(q, cache, None, None, is_fp8_kvcache=fp8, indices=idx, backend="torch")[0]
        flops = 2 * b * s_q * h * topk * (576 + 512)
        nbytes = b * s_q * topk * (656 if fp8 else 1152)
        rec.update(shape={"b": b, "s_q": s_q, "h": h, "topk": topk, "seq": seq}, flops=flops, bytes_gathered=nbytes)

        def run(cfg):
            sched, _ = get_mla_metadata(config=cfg)
            return flash_mla_with_kvcache(q, cache, None, None, tile_scheduler_metadata=sched, is_fp8_kvcache=fp8,
                                          indices=idx)[0]

        best_of(rec, "triton", run, lambda o: harness.compare(o, ref, ATOL), CONFIGS, flops, nbytes)
        t = harness.time_fn(lambda: flash_mla_with_kvcache(q, cache, None, None, is_fp8_kvcache=fp8, indices=idx,
                                                           backend="torch"), 1 if not ARGS.smoke else 0, max(1, ITERS // 3))
        rec["torch_reference"] = {**t, "tflops": flops / (t["ms_median"] * 1e-3) / 1e12}

    timed("sparse_decode_bf16", lambda rec: sparse(rec, False))

    def sparse_prefill(rec):
        sq, n_kv, topk = S["pre_sq"], S["pre_kv"], S["pre_topk"]
        kv = torch.zeros(n_kv, 1, 576, dtype=DT, device=DEV)
        write_latent_cache(rand(n_kv, 512, seed=16), rand(n_kv, 64, seed=17), kv, torch.arange(n_kv, device=DEV), fp8=False)
        q = rand(sq, h, 576, seed=18)
        g = torch.Generator(device=DEV).manual_seed(19)
        idx = torch.argsort(torch.rand(sq, n_kv, device=DEV, generator=g), dim=-1)[:, :topk].int()[:, None, :]
        ref = flash_mla_sparse_fwd(q, kv, idx, 576**-0.5, backend="torch")[0]
        flops = 2 * sq * h * topk * (576 + 512)
        rec.update(shape={"s_q": sq, "h": h, "s_kv": n_kv, "topk": topk}, flops=flops)
        best_of(rec, "triton", lambda cfg: flash_mla_sparse_fwd(q, kv, idx, 576**-0.5, config=cfg)[0],
                lambda o: harness.compare(o, ref, ATOL), CONFIGS[:1], flops)


    def indexer(rec):
        b, k = S["b_idx"], S["topk"]
        for ctx in S["ctxs"]:
            cache, bt, sl = indexer_problem(b, ctx)
            q8, w = indexer_q(b, 1)
            lg = indexer_paged_logits(q8, w, cache, bt, sl, ctx)
            ref_b = min(b, 8)  # the reference on a slice (it materializes fp32 K)
            rlg = indexer_paged_logits(q8[:ref_b], w[:ref_b], cache, bt[:ref_b], sl[:ref_b], ctx, backend="torch")
            e = {"ctx": ctx, "b": b, "agree_logits": harness.compare(lg[:ref_b], rlg, 1e-3, 1e-4)}
            tk = topk_indices(lg[:, 0], k, sl)
            e["topk_equal_reference"] = bool(torch.equal(tk[:ref_b], topk_indices(lg[:ref_b, 0], k, sl[:ref_b], backend="torch")))
            nbytes = b * ctx * (128 + 4) + b * ctx * 4
            t1 = harness.time_fn(lambda: indexer_paged_logits(q8, w, cache, bt, sl, ctx), WARM, ITERS)
            t2 = harness.time_fn(lambda: topk_indices(lg[:, 0], k, sl), WARM, ITERS)
            e["logits"] = {**t1, "gbps": nbytes / (t1["ms_median"] * 1e-3) / 1e9}
            e["topk"] = t2
            tot = t1["ms_median"] + t2["ms_median"]
            e["queries_per_s"] = b / (tot * 1e-3)
            e["key_tokens_per_s"] = b * ctx / (tot * 1e-3)
            tr = harness.time_fn(lambda: torch.topk(lg[:, 0], k, dim=-1), WARM, ITERS)
            e["torch_topk_unstable_baseline"] = tr
            tref = harness.time_fn(
                lambda: topk_indices(indexer_paged_logits(q8[:ref_b], w[:ref_b], cache, bt[:ref_b], sl[:ref_b], ctx,
                                                          backend="torch")[:, 0], k, sl[:ref_b], backend="torch"),
                0 if ARGS.smoke else 1, max(1, ITERS // 5))
            e["torch_reference_logits_topk"] = {**tref, "b": ref_b, "queries_per_s": ref_b / (tref["ms_median"] * 1e-3)}
            rec[f"ctx_{ctx}"] = e

    timed("indexer_decode", indexer)
    timed("sparse_decode_fp8", lambda rec: sparse(rec, True))
    timed("sparse_prefill_bf16", sparse_prefill)

    def indexer_prefill(rec):
        T, Skv = S["pre_sq"], S["pre_kv"]
        k = rand(Skv, 128, seed=20)
        kv, ks = quantize_fp8_e4m3(k, 128)
        q = rand(T, S["idx_h"], 128, seed=21)
        qv, qs = quantize_fp8_e4m3(q, 128)
        w = rand(T, S["idx_h"], seed=22, dtype=torch.float32) * qs[..., 0]
        ke = torch.arange(Skv - T + 1, Skv + 1, dtype=torch.int32, device=DEV)  # the last T tokens, causal
        kst = torch.zeros_like(ke)
        lg = indexer_ragged_logits(qv, w, kv, ks[:, 0], kst, ke)
        rl = indexer_ragged_logits(qv[:16], w[:16], kv, ks[:, 0], kst[:16], ke[:16], backend="torch")
        rec["agree"] = harness.compare(lg[:16], rl, 1e-3, 1e-4)
        t1 = harness.time_fn(lambda: indexer_ragged_logits(qv, w, kv, ks[:, 0], kst, ke), WARM, ITERS)
        t2 = harness.time_fn(lambda: topk_indices(lg, S["topk"], ke - kst, kst), WARM, ITERS)
        flops = 2 * T * S["idx_h"] * 128 * Skv
        rec.update(shape={"T": T, "S": Skv, "H": S["idx_h"]}, logits=t1, topk=t2,
                   logits_tflops=flops / (t1["ms_median"] * 1e-3) / 1e12)

    timed("indexer_prefill", indexer_prefill)
    rep.data["total_seconds"] = round(rep.elapsed(), 1)
    rep.write()
    print(f"wrote {ARGS.out}" if ARGS.out else "no --out given (set $OUT or pass --out)")
    return rep


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            if "ok" in v:
                yield v
            else:
                yield from _leaves(v)


def indexer_problem(b, ctx):
    """A paged FP8 indexer K cache (block 64, shuffled blocks) holding ``ctx`` keys per request."""
    bs = 64
    nbr = -(-ctx // bs)
    cache = torch.zeros(b * nbr, bs, 132, dtype=torch.uint8, device=DEV)
    bt = torch.randperm(b * nbr, device=DEV).int().reshape(b, nbr)
    slots = (bt.long()[:, :, None] * bs + torch.arange(bs, device=DEV)).reshape(b, -1)[:, :ctx].reshape(-1)
    kk = torch.randn(b * ctx, 128, device=DEV, dtype=DT)
    write_indexer_k_cache(kk, cache, slots)
    return cache, bt, torch.full((b,), ctx, dtype=torch.int32, device=DEV)


def indexer_q(b, n):
    q = rand(b, n, S["idx_h"], 128, seed=30)
    qv, qs = quantize_fp8_e4m3(q, 128)
    w = rand(b, n, S["idx_h"], seed=31, dtype=torch.float32) * qs[..., 0]
    return qv, w


if __name__ == "__main__":
    main()
