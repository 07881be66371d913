"""The one prepared GPU check (H100 / H200, at most 8 minutes): every kernel against its torch reference, then the
performance table against the targets. Needs torch and triton only (no vLLM; only this checkout travels).

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json         # on the GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json  # CPU: tiny shapes, Triton interpreter

Parts, each a subprocess with its own time limit, results merged into one JSON:
  kernels   benchmarks/kernels_gpu.py: MLA dense / sparse decode (bf16 and FP8 cache), sparse prefill, latent and
            indexer cache writes, indexer logits and top-k, each checked, then timed (copy bandwidth measured).
  fp4       benchmarks/fp4.py --gpu: both W4A16 GEMMs (pairs layout; decode layout permuted at load), NVFP4 and
            MXFP4, checked, then vs the bf16 matmul at M = 1, 4, 16, N, K in {4096, 7168}, with GB/s vs the roofline.
  sm80_path the sm_80 / sm_86 code path (FP8 decoded by bit arithmetic, that target's tiles) compiled for this GPU
            and checked against the references: the path Ampere runs, verified on the hardware at hand.
  table     dense decode GB/s and its fraction of the copy bandwidth (target >= 0.8), FP8-cache decode speedup over
            the bf16 cache (target >= 1.4x), sparse decode TFLOPS (target >= 250), W4A16 speedups (decode kernel at
            M = 1: target >= 2.5x of bf16 on every shape and format); each with
            met / not met (null when a part did not produce the number).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TARGETS = {"dense_decode_fraction_of_copy_bandwidth": 0.8, "fp8_decode_speedup_vs_bf16": 1.4,
           "sparse_decode_tflops": 250.0, "w4a16_decode_speedup_vs_bf16_M1_min": 2.5}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all parts (8 min max)")
    p.add_argument("--sm80-part", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _run_part(name: str, cmd: list[str], out: Path, timeout: float, dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if dry:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 10))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-500:]
    rec = {"returncode": rc, "seconds": round(time.monotonic() - t0, 1)}
    if out.exists():
        rec["result"] = json.loads(out.read_text())
    else:
        rec["log_tail"] = tail
    print(f"{name}: rc={rc} in {rec['seconds']} s", flush=True)
    return rec


def _get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _all_ok(d) -> bool | None:
    """True when every agreement record ({"ok": ...}) and boolean check under d passed; None when none found."""
    found = []

    def walk(x, key=""):
        if isinstance(x, dict):
            if "ok" in x and isinstance(x["ok"], bool):
                found.append(x["ok"])
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, bool) and (key.endswith("_equal") or key in ("agree", "all_ok")):
            found.append(x)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)

    walk(d)
    return all(found) if found else None


def _sig(x: float) -> float:
    """Four significant digits (a ratio far below 1, as under the interpreter, must not round to 0)."""
    return float(f"{x:.4g}")


def table(parts: dict) -> dict:
    k = _get(parts, "kernels", "result", "sections") or {}
    f = _get(parts, "fp4", "result") or {}
    dense = _get(k, "dense_decode_bf16", "triton_best") or {}
    decode = {f"{name[5:]}_M{r['M']}": _sig(r["decode_speedup_default"])
              for name, sec in (f.get("sections") or {}).items() if name.startswith("gemm_")
              for r in sec.get("rows", [])}
    values = {
        "copy_bandwidth_gbps": _get(k, "copy_bandwidth", "gbps"),
        "dense_decode_bf16_gbps": dense.get("gbps"),
        "dense_decode_fraction_of_copy_bandwidth": _get(k, "dense_decode_bf16", "fraction_of_copy_bandwidth"),
        "dense_decode_fp8_gbps": _get(k, "dense_decode_fp8", "triton_best", "gbps"),
        "fp8_decode_speedup_vs_bf16": _get(k, "dense_decode_fp8", "speedup_vs_bf16"),
        "sparse_decode_tflops": _get(k, "sparse_decode_bf16", "triton_best", "tflops"),
        "sparse_decode_fp8_tflops": _get(k, "sparse_decode_fp8", "triton_best", "tflops"),
        "sparse_prefill_tflops": _get(k, "sparse_prefill_bf16", "triton_best", "tflops"),
        "w4a16_speedup_vs_bf16": {
            f"{name[5:]}_M{r['M']}": _sig(r["speedup_default"])
            for name, sec in (f.get("sections") or {}).items() if name.startswith("gemm_")
            for r in sec.get("rows", [])} or None,
        "w4a16_decode_speedup_vs_bf16": decode or None,
        "w4a16_decode_roofline_fraction": {
            f"{name[5:]}_M{r['M']}": round(r["decode_roofline_fraction_default"], 3)
            for name, sec in (f.get("sections") or {}).items() if name.startswith("gemm_")
            for r in sec.get("rows", [])} or None,
        "w4a16_decode_speedup_vs_bf16_M1_min": min(
            (v for k, v in decode.items() if k.endswith("_M1")), default=None),
    }
    met = {name: (None if values[name] is None else values[name] >= goal) for name, goal in TARGETS.items()}
    correct = {"kernels": _all_ok(_get(k, "correctness")), "fp4": _get(f, "sections", "agreement", "ok"),
               "sm80_path": _get(parts, "sm80_path", "result", "all_ok")}
    return {"values": values, "targets": TARGETS, "met": met, "correct": correct}


def sm80_part(out: str, dry: bool) -> None:
    """The sm_80 code path (bit-arithmetic FP8 decode, that target's tiles) against the references, here."""
    import torch

    sys.path.insert(0, str(BENCH))
    import harness
    from vllm_frontier.kernels import _common, flash_mla_with_kvcache, indexer_paged_logits, write_latent_cache
    from vllm_frontier.kernels import quantize_fp8_e4m3, write_indexer_k_cache

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    b, h, blk, seq = (2, 16, 16, 80) if dry else (8, 128, 64, 3000)
    res: dict = {"device": dev}
    nb = b * (-(-seq // blk)) + 1
    # one token per block (a [slots, 1, row] cache, the block table lists each position's slot): shuffled rows
    slots = torch.randperm(nb * blk, device=dev, generator=g)[: b * seq]
    sl = torch.full((b,), seq, dtype=torch.int32, device=dev)
    bt1 = slots.reshape(b, seq).int()
    for fp8 in (False, True):
        cache = torch.zeros(nb * blk, 1, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else dt, device=dev)
        write_latent_cache(torch.randn(b * seq, 512, device=dev, generator=g).to(dt),
                           torch.randn(b * seq, 64, device=dev, generator=g).to(dt), cache, slots, fp8=fp8)
        q = torch.randn(b, 1, h, 576, device=dev, generator=g).to(dt)
        idx = torch.randint(-1, seq, (b, 1, min(2048, seq)), device=dev, generator=g).int()
        for sparse in (False, True):
            kw = dict(is_fp8_kvcache=fp8, softmax_scale=576**-0.5, indices=idx if sparse else None)
            ref = flash_mla_with_kvcache(q, cache, bt1, sl, backend="torch", **kw)[0]
            with _common.assume_target((8, 0)):
                got = flash_mla_with_kvcache(q, cache, bt1, sl, backend="triton", **kw)[0]
            res[f"mla_{'sparse' if sparse else 'dense'}_{'fp8' if fp8 else 'float'}"] = harness.compare(
                got, ref, 3e-2 if dt == torch.bfloat16 else 3e-3)
    kc = torch.zeros(nb, 64, 132, dtype=torch.uint8, device=dev)
    ks = torch.randperm(nb * 64, device=dev, generator=g)[: b * seq]
    write_indexer_k_cache(torch.randn(b * seq, 128, device=dev, generator=g).to(dt), kc, ks)
    ibt = torch.arange(nb, device=dev).int()[None, :].expand(b, nb).contiguous()
    qv, qs = quantize_fp8_e4m3(torch.randn(b, 1, 64, 128, device=dev, generator=g), 128)
    w = torch.randn(b, 1, 64, device=dev, generator=g) * qs[..., 0]
    ctx = torch.full((b,), min(seq, nb * 64), dtype=torch.int32, device=dev)
    ref = indexer_paged_logits(qv, w, kc, ibt, ctx, int(ctx.max()), backend="torch")
    with _common.assume_target((8, 0)):
        got = indexer_paged_logits(qv, w, kc, ibt, ctx, int(ctx.max()), backend="triton")
    res["indexer_logits"] = harness.compare(got, ref, 1e-3, 1e-4)
    res["all_ok"] = all(v["ok"] for v in res.values() if isinstance(v, dict))
    Path(out).write_text(json.dumps(res, indent=1))


def main(argv=None) -> int:
    a = _parse(argv)
    if a.sm80_part:
        sm80_part(a.out, a.dry_run)
        return 0
    t0 = time.monotonic()
    left = lambda: a.budget_s - (time.monotonic() - t0)  # noqa: E731
    py = sys.executable
    parts: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        smoke = ["--smoke"] if a.dry_run else []
        parts["sm80_path"] = _run_part("sm80_path", [py, __file__, "--sm80-part", "--out", str(tmp / "sm80.json")]
                                       + (["--dry-run"] if a.dry_run else []), tmp / "sm80.json", 90, a.dry_run)
        parts["kernels"] = _run_part("kernels", [py, str(BENCH / "kernels_gpu.py"), "--out", str(tmp / "k.json"),
                                                 "--budget-s", str(max(60, left() - 170))] + smoke,
                                     tmp / "k.json", left() - 110, a.dry_run)
        parts["fp4"] = _run_part("fp4", [py, str(BENCH / "fp4.py"), "--gpu", "--out", str(tmp / "f.json"),
                                         "--budget-s", str(max(30, left() - 40))] + smoke,
                                 tmp / "f.json", left() - 10, a.dry_run)
    sys.path.insert(0, str(BENCH))
    import harness

    doc = {"header": harness.header(), "command": " ".join([Path(py).name] + sys.argv), "dry_run": a.dry_run,
           "seconds": round(time.monotonic() - t0, 1), "table": table(parts), "parts": parts}
    text = json.dumps(harness._finite(doc), indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(json.dumps(doc["table"], indent=1))
    ok = all(v is not False for v in doc["table"]["correct"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
