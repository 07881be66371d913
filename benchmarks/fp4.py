"""FP4 (NVFP4 / MXFP4) weight-only quantization: storage, quality, memory, and the GPU GEMM speed.

CPU sections (need vLLM):
    python benchmarks/fp4.py [--model DIR] --out benchmarks/results/fp4/cpu_embedded_quality.json
  weight_bytes  bytes of the weights `frontier_fp4` quantizes, bf16 vs FP4 (codes + block scales + global scale),
                computed from the checkpoint with the same quantizer the vLLM method uses.
  quality       held-out perplexity through vLLM prompt logprobs (bf16 vs `--quantization frontier_fp4` with
                FRONTIER_FP4=nvfp4|mxfp4, one engine at a time) and greedy-continuation agreement.
  memory        summed RSS of the engine's processes (API/main, EngineCore, worker) after load, per mode.
  --model defaults to the embedded trained model (view "v3") when it exists, else a tiny random model.
GPU section (torch + triton + numpy only, no vLLM):
    python benchmarks/fp4.py --gpu --out $OUT/fp4_gpu.json
  Both Triton W4A16 GEMMs vs the bf16 torch.matmul at decode shapes (M in 1, 4, 16; N, K in {4096, 7168}),
  after checking agreement with the torch reference (M = 1, 3, 4, 16 for the decode kernel): the pairs-layout
  kernel (`w4a16_gemm`) and the decode kernel on weights permuted at load (`w4a16_decode_gemm`).
  Speedup = bf16 ms / FP4 ms. Timed as CUDA graphs of 24 calls cycling through weight copies larger than L2
  (launch overhead and L2 reuse excluded; eager single-weight timings also recorded).
  Bytes per call: bf16 2*N*K; FP4 the bytes each kernel reads for the weight (codes + block scales; the decode
  layout's K padding included) (+ x and y, negligible at M <= 16). GB/s = bytes / time. Roofline: the weight
  bytes at the measured device-to-device copy bandwidth (read + write bytes / time), `roofline_fraction` =
  roofline ms / measured ms.
Self-test of the GPU section on CPU (Triton interpreter, tiny shapes, timings meaningless): --smoke.

CPU decode speed and memory (needs vLLM), on the size presets of `vllm-frontier tiny-model` (made on first use):
    python benchmarks/fp4.py --decode --out benchmarks/results/fp4/cpu_decode.json
  Per model (mid MoE, dense-heavy), engines one at a time in the order bf16, fp4, fp4, bf16 (--rounds 2; ABBA
  so drift under a shared machine's load hits both sides alike): decode tokens/s at batch 1 and 8 (from
  generate() of 1 and 1 + D new tokens: (D * B) / (t(1 + D) - t(1)), median of --reps), the engine-core
  process's resident memory after load (VmRSS) and its peak during load (VmHWM), and engine start time.
  Resident weights of the FP4 engine are derived from process memory: bf16 weight bytes - (RSS_bf16 - RSS_fp4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "fp4_gpu.json") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out, help="JSON output path (default $OUT/fp4_gpu.json when $OUT is set)")
    p.add_argument("--gpu", action="store_true", help="GPU section only: Triton GEMM vs bf16 matmul")
    p.add_argument("--smoke", action="store_true", help="GPU section on tiny shapes under TRITON_INTERPRET=1")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: embedded v3 model, else tiny)")
    p.add_argument("--modes", default="nvfp4,mxfp4")
    p.add_argument("--windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--budget-s", type=float, default=100.0, help="GPU: skip remaining timings after this")
    p.add_argument("--decode", action="store_true", help="CPU decode speed + memory, FP4 vs bf16 (size presets)")
    p.add_argument("--presets", default="mid,dense", help="--decode: tiny-model size presets to run")
    p.add_argument("--fp4-mode", default="nvfp4", help="--decode: FP4 format compared with bf16")
    p.add_argument("--rounds", type=int, default=2, help="--decode: 1 = bf16, fp4; 2 = bf16, fp4, fp4, bf16")
    p.add_argument("--decode-tokens", type=int, default=32, help="--decode: new tokens D per timed generate")
    p.add_argument("--reps", type=int, default=3, help="--decode: timed repetitions per batch size")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="--decode: enforce_eager (default; --no-eager: vLLM's CPU default, dynamo + inductor)")
    p.add_argument("--model-cache", default=None, help="--decode: where preset models are made (default: tmp)")
    p.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--decode-worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================================ GPU section
def gpu_section(args) -> int:
    if args.smoke and not __import__("torch").cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import harness
    from vllm_frontier.quantization.fp4_formats import FP4Tensor, bits_per_value, quantize
    from vllm_frontier.quantization.w4a16_decode_gemm import (
        DecodeConfig,
        default_decode_config,
        permute_fp4,
        ref_w4a16_decode_gemm,
        w4a16_decode_gemm,
    )
    from vllm_frontier.quantization.w4a16_gemm import (
        GemmConfig,
        default_config,
        ref_w4a16_gemm,
        ref_w4a16_grouped_gemm,
        w4a16_gemm,
        w4a16_grouped_gemm,
    )

    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    act = torch.bfloat16 if on_gpu else torch.float16  # the interpreter's bf16 arithmetic is broken
    report = harness.Report(args.out, meta={"script": "benchmarks/fp4.py --gpu" + (" --smoke" if args.smoke else ""),
                                            "act_dtype": str(act)})
    sizes = [(256, 256)] if args.smoke else [(4096, 4096), (7168, 7168), (4096, 7168), (7168, 4096)]
    ms = [1, 16] if args.smoke else [1, 4, 16]
    # the pairs kernel's sweep: the three best of the 10-config sweep on an H100 (fp4_gpu_h100.json), to leave
    # the time budget to the decode kernel's sweep
    sweep = [] if args.smoke else [GemmConfig(16, bn, bk, sk, w, st) for bn, bk, sk, w, st in [
        (64, 128, 4, 4, 4), (32, 256, 2, 4, 3), (64, 256, 2, 4, 3)]]
    # the decode kernel's sweep: (block_m, block_n, split_k, num_warps, num_stages); BLOCK_K is the layout's 256
    decode_sweep = [DecodeConfig(16, 32, 1, 2, 3)] if args.smoke else [
        DecodeConfig(16, bn, sk, w, st) for bn, sk, w, st in [
            (32, 1, 2, 4), (32, 2, 2, 4), (32, 4, 2, 4), (16, 1, 1, 4), (16, 2, 1, 4), (64, 1, 4, 4), (64, 2, 4, 4),
            (64, 4, 4, 3), (32, 1, 1, 4), (32, 2, 1, 3), (128, 2, 8, 3)]]
    iters = 3 if args.smoke else 50
    copy = harness.copy_bandwidth(2**28 if on_gpu else 2**20, dev)
    report.data["copy_bandwidth"] = copy

    def timed(fn):
        """Per-call ms of fn(i) (i selects the weight copy). On a GPU: a CUDA graph of 24 back-to-back calls, replayed (decode runs under CUDA graphs
        in vLLM; this also keeps Python launch overhead out of both sides). Else plain wall-clock timing."""
        if not on_gpu:
            return harness.time_fn(lambda: fn(0), warmup=1, iters=iters)["ms_median"]
        reps = 24
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(3):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fn(i)
        return harness.time_fn(graph.replay, warmup=3, iters=iters)["ms_median"] / reps

    weights = {}
    with report.section("agreement") as rec:
        g = torch.Generator(device="cpu").manual_seed(0)
        for fmt in ("nvfp4", "mxfp4"):
            for N, K in sizes[:2]:
                w = torch.randn(N, K, generator=g) * 0.02
                q = quantize(w.to(dev), fmt)
                weights[(fmt, N, K)] = q
                x = torch.randn(16, K, generator=g).to(dev, act)
                got = w4a16_gemm(x, q)
                want = ref_w4a16_gemm(x.float(), q)
                # the kernel rounds x-dtype products into an fp32 accumulator; the reference is fp32 throughout,
                # cast once: allow 2 ulps of the activation dtype relative to the output's scale
                eps = torch.finfo(act).eps
                scale = want.abs().max().item()
                rec[f"{fmt}_N{N}_K{K}"] = harness.compare(got, want.to(act), atol=2 * eps * scale, rtol=2 * eps)
                if sweep:
                    rec[f"{fmt}_N{N}_K{K}_sweep_ok"] = all(
                        harness.compare(w4a16_gemm(x, q, c), want.to(act), atol=2 * eps * scale, rtol=2 * eps)["ok"]
                        for c in sweep)
                # the decode kernel on the permuted layout: decode sizes (and 3, not a power of two), every sweep
                # config; its reference is the canonical weight's, so a wrong permutation cannot agree with itself
                d = permute_fp4(q)
                weights[("decode", fmt, N, K)] = d
                for M in (1, 3, 4, 16):
                    want_m, x_m = want[:M].to(act), x[:M]
                    s_m = want[:M].abs().max().item()
                    rec[f"decode_{fmt}_N{N}_K{K}_M{M}"] = harness.compare(
                        w4a16_decode_gemm(x_m, d), want_m, atol=2 * eps * s_m, rtol=2 * eps)
                rec[f"decode_{fmt}_N{N}_K{K}_sweep_ok"] = all(
                    harness.compare(w4a16_decode_gemm(x, d, c), want.to(act), atol=2 * eps * scale, rtol=2 * eps)["ok"]
                    for c in decode_sweep)
            # grouped kernel: 8 experts, uneven rows (one empty)
            E, N, K = 8, 256 if args.smoke else 2048, 256 if args.smoke else 7168
            qe = quantize((torch.randn(E, N, K, generator=g) * 0.02).to(dev), fmt)
            offs = torch.tensor([0, 3, 3, 10, 11, 30, 31, 40, 48], dtype=torch.int32, device=dev)
            xe = torch.randn(48, K, generator=g).to(dev, act)
            want = ref_w4a16_grouped_gemm(xe.float(), qe, offs).to(act)
            scale = want.float().abs().max().item()
            rec[f"{fmt}_grouped_E{E}_N{N}_K{K}"] = harness.compare(
                w4a16_grouped_gemm(xe, qe, offs), want, atol=2 * torch.finfo(act).eps * scale,
                rtol=2 * torch.finfo(act).eps)
        rec["ok"] = all(v["ok"] if isinstance(v, dict) else v for k, v in rec.items() if k != "ok")

    for N, K in sizes:
        for fmt in ("nvfp4", "mxfp4"):
            name = f"gemm_{fmt}_N{N}_K{K}"
            if report.elapsed() > args.budget_s:
                report.data["sections"][name] = {"status": "skipped", "reason": f"budget {args.budget_s}s"}
                continue
            with report.section(name) as rec:
                g = torch.Generator(device="cpu").manual_seed(N + K)
                w = (torch.randn(N, K, generator=g) * 0.02).to(dev)
                q = weights.get((fmt, N, K)) or quantize(w, fmt)
                w16 = w.to(act)
                fp4_bytes = q.nbytes()
                rec["bits_per_value"] = bits_per_value(fmt)
                rec["weight_bytes"] = {"bf16": 2 * N * K, "fp4": fp4_bytes, "ratio": 2 * N * K / fp4_bytes}
                # Decode reads each layer's weight once per step, from HBM: cycle through copies that together
                # exceed the L2 cache (50 MB on H100) so neither side is timed from L2.
                n_copies = max(2, math.ceil(256 * 2**20 / (2 * N * K))) if on_gpu else 1
                w16s = [w16] + [w16.clone() for _ in range(n_copies - 1)]
                qs = [q] + [FP4Tensor(q.fmt, q.packed.clone(), q.scales.clone(), q.global_scale.clone())
                            for _ in range(n_copies - 1)]
                d = weights.get(("decode", fmt, N, K)) or permute_fp4(q)
                ds = [d] + [dataclasses.replace(d, words=d.words.clone(), scales=d.scales.clone())
                            for _ in range(n_copies - 1)]
                rec["weight_bytes"]["fp4_decode_layout"] = d.nbytes()
                roofline_ms = d.nbytes() / (copy["gbps"] * 1e9) * 1e3
                rec["decode_roofline_ms"] = roofline_ms
                rec["weight_copies_cycled"] = n_copies
                del w
                rows = []
                for M in ms:
                    x = torch.randn(M, K, device=dev, dtype=act)
                    t_ref = timed(lambda i: torch.matmul(x, w16s[i % n_copies].T))
                    cfg = default_config(M, N, K, q.group_size, x.device)
                    t_def = timed(lambda i: w4a16_gemm(x, qs[i % n_copies], cfg))
                    best_cfg, best = cfg, t_def
                    for c in sweep:
                        t = timed(lambda i: w4a16_gemm(x, qs[i % n_copies], c))
                        if t < best:
                            best_cfg, best = c, t
                    dcfg = default_decode_config(M, N, K, x.device, d.kb)
                    t_dec = timed(lambda i: w4a16_decode_gemm(x, ds[i % n_copies], dcfg))
                    dbest_cfg, dbest = dcfg, t_dec
                    for c in decode_sweep:
                        t = timed(lambda i: w4a16_decode_gemm(x, ds[i % n_copies], c))
                        if t < dbest:
                            dbest_cfg, dbest = c, t
                    eager = {}
                    if on_gpu:  # launch overhead included, for reference
                        eager = {"bf16_eager_ms": harness.time_fn(lambda: torch.matmul(x, w16.T), 5, iters)["ms_median"],
                                 "fp4_default_eager_ms": harness.time_fn(lambda: w4a16_gemm(x, q, cfg), 5,
                                                                         iters)["ms_median"],
                                 "decode_default_eager_ms": harness.time_fn(lambda: w4a16_decode_gemm(x, d, dcfg), 5,
                                                                            iters)["ms_median"]}
                    row = {
                        "M": M, "bf16_ms": t_ref, "fp4_default_ms": t_def, "fp4_best_ms": best,
                        "default_config": cfg.as_dict(), "best_config": best_cfg.as_dict(),
                        "speedup_default": t_ref / t_def, "speedup_best": t_ref / best,
                        "bf16_gbps": 2 * N * K / (t_ref * 1e-3) / 1e9,
                        "fp4_best_gbps": fp4_bytes / (best * 1e-3) / 1e9,
                        "decode_default_ms": t_dec, "decode_best_ms": dbest,
                        "decode_default_config": dcfg.as_dict(), "decode_best_config": dbest_cfg.as_dict(),
                        "decode_speedup_default": t_ref / t_dec, "decode_speedup_best": t_ref / dbest,
                        "decode_default_gbps": d.nbytes() / (t_dec * 1e-3) / 1e9,
                        "decode_best_gbps": d.nbytes() / (dbest * 1e-3) / 1e9,
                        "decode_roofline_fraction_default": roofline_ms / t_dec, **eager,
                    }
                    rows.append(row)
                    print(f"  {fmt} N={N} K={K} M={M}: bf16 {row['bf16_ms']:.4f} ms, pairs kernel "
                          f"{row['fp4_default_ms']:.4f} ms (x{row['speedup_default']:.2f}), decode kernel "
                          f"{t_dec:.4f} ms (x{row['decode_speedup_default']:.2f}, "
                          f"{row['decode_default_gbps']:.0f} GB/s, {row['decode_roofline_fraction_default']:.2f} of "
                          f"roofline), decode best {dbest:.4f} ms (x{row['decode_speedup_best']:.2f})", flush=True)
                rec["rows"] = rows
                rec["target_speedup"] = 2.5
                rec["meets_target_default"] = all(r["speedup_default"] >= 2.5 for r in rows)
                rec["decode_meets_target_at_M1"] = all(r["decode_speedup_default"] >= 2.5 for r in rows if r["M"] == 1)
    report.write()
    return 0


# ============================================================================================ CPU sections
def _default_model() -> Path:
    try:
        from vllm_frontier.models.embedded import embedded_model_path

        return embedded_model_path("v3")
    except (ImportError, FileNotFoundError, ValueError):
        from vllm_frontier.models.tiny_factory import make_tiny_model

        out = Path(tempfile.gettempdir()) / "frontier-fp4-bench-tiny-v3"
        if not (out / "config.json").is_file():
            make_tiny_model("deepseek_v3", out, dtype="bfloat16")
        return out


def _heldout_windows(model: Path, n: int, length: int) -> tuple[list[list[int]], str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    try:
        from vllm_frontier.models.corpus import read_split

        texts, source = read_split("heldout"), "corpus heldout split (CPython stdlib files)"
    except Exception:  # corpus listing absent: fall back to stdlib files the tiny tokenizer never saw
        import inspect
        import json as _j

        texts, source = [inspect.getsource(_j), inspect.getsource(argparse)], "json + argparse module source"
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
        if len(ids) >= n * length:
            break
    windows = [ids[i * length:(i + 1) * length] for i in range(n) if len(ids) >= (i + 1) * length]
    return windows, source


def _tree_rss(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    total = 0
    for proc in [p, *p.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _worker(request_path: str, result_path: str) -> None:
    """One engine: load (with or without frontier_fp4), record RSS, score windows, greedy continuations."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(request_path))
    kw = dict(model=req["model"], dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=8, seed=0)
    if req["quantization"]:
        kw["quantization"] = req["quantization"]
    llm = LLM(**kw)
    rss = _tree_rss(os.getpid())
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in req["windows"]], sp, use_tqdm=False)
    lps = [[o.prompt_logprobs[i + 1][w[i + 1]].logprob for i in range(len(w) - 1)]
           for w, o in zip(req["windows"], outs)]
    gen = llm.generate([TokensPrompt(prompt_token_ids=w[:32]) for w in req["windows"]],
                       SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    res = {"rss_bytes": rss, "logprobs": lps, "greedy": [list(o.outputs[0].token_ids) for o in gen]}
    llm.llm_engine.engine_core.shutdown()
    json.dump(res, open(result_path, "w"))


def _run_engine(model: Path, windows, mode: str | None, timeout: float = 1200.0) -> dict:
    import harness

    with tempfile.TemporaryDirectory(prefix="frontier-fp4-") as td:
        rq, rs, lg = (os.path.join(td, n) for n in ("req.json", "res.json", "engine.log"))
        json.dump({"model": str(model), "windows": windows, "quantization": "frontier_fp4" if mode else None},
                  open(rq, "w"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if mode:
            env["FRONTIER_FP4"] = mode
        returncode, logtxt = harness.run_process_group([sys.executable, __file__, "--worker", rq, rs], env, timeout,
                                                       log=lg)
        if returncode != 0 or not os.path.exists(rs):
            raise RuntimeError(f"engine ({mode or 'bf16'}) failed, exit {returncode}:\n" + logtxt[-3000:])
        return json.load(open(rs))


def _quantized_weight_names(cfg: dict, names: list[str]) -> list[str]:
    """Checkpoint tensors that frontier_fp4 quantizes: linear and expert weights inside decoder layers
    (not embeddings, lm_head, norms, the router gate)."""
    out = []
    for n in names:
        if not (n.startswith("model.layers.") and n.endswith(".weight")):
            continue
        if any(s in n for s in ("norm", ".mlp.gate.weight", "embed_tokens", "shared_head.head", "enorm", "hnorm")):
            continue
        out.append(n)
    return out


def weight_bytes_section(rec: dict, model: Path, modes: list[str]) -> None:
    import torch
    from safetensors import safe_open

    from vllm_frontier.quantization.fp4_formats import GROUP_SIZE, dequantize, quantize

    cfg = json.load(open(model / "config.json"))
    files = sorted(model.glob("*.safetensors"))
    total_bf16 = 0
    per_mode = {m: {"fp4_bytes": 0, "bf16_bytes_quantized": 0, "left_bf16": [], "sq_err": 0.0, "sq_norm": 0.0}
                for m in modes}
    for f in files:
        with safe_open(str(f), "pt") as st:
            names = list(st.keys())
            qnames = set(_quantized_weight_names(cfg, names))
            for n in names:
                t = st.get_tensor(n)
                total_bf16 += t.numel() * 2
                if n not in qnames or t.dim() != 2:
                    continue
                for m in modes:
                    d = per_mode[m]
                    if t.shape[-1] % GROUP_SIZE[m]:
                        d["left_bf16"].append(n)
                        continue
                    q = quantize(t.float(), m)
                    d["fp4_bytes"] += q.nbytes()
                    d["bf16_bytes_quantized"] += t.numel() * 2
                    w = t.float()
                    d["sq_err"] += (dequantize(q) - w).pow(2).sum().item()
                    d["sq_norm"] += w.pow(2).sum().item()
    rec["model"] = str(model)
    rec["checkpoint_bytes_as_bf16"] = total_bf16
    for m, d in per_mode.items():
        rec[m] = {
            "bf16_bytes_of_quantized_layers": d["bf16_bytes_quantized"],
            "fp4_bytes_of_quantized_layers": d["fp4_bytes"],
            "ratio": d["bf16_bytes_quantized"] / d["fp4_bytes"] if d["fp4_bytes"] else None,
            "effective_bits_per_value": 16 * d["fp4_bytes"] / d["bf16_bytes_quantized"] if d["fp4_bytes"] else None,
            "model_bytes_after": total_bf16 - d["bf16_bytes_quantized"] + d["fp4_bytes"],
            "relative_rms_weight_error": math.sqrt(d["sq_err"] / d["sq_norm"]) if d["sq_norm"] else None,
            "left_bf16": d["left_bf16"],
        }
        rec[m]["meets_3_5x"] = bool(rec[m]["ratio"] and rec[m]["ratio"] >= 3.5)


def cpu_sections(args) -> int:
    import harness

    model = Path(args.model) if args.model else _default_model()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    report = harness.Report(args.out, meta={"script": "benchmarks/fp4.py", "model": str(model), "modes": modes})
    with report.section("weight_bytes") as rec:
        weight_bytes_section(rec, model, modes)
    windows, source = _heldout_windows(model, args.windows, args.window_len)
    results = {}
    for mode in [None, *modes]:
        name = mode or "bf16"
        with report.section(f"engine_{name}") as rec:
            r = _run_engine(model, windows, mode)
            results[name] = r
            nll = [-x for w in r["logprobs"] for x in w]
            rec["tokens_scored"] = len(nll)
            rec["perplexity"] = math.exp(sum(nll) / len(nll))
            rec["rss_gib"] = r["rss_bytes"] / 2**30
    with report.section("quality") as rec:
        rec["heldout_source"] = source
        rec["windows"], rec["window_len"] = len(windows), args.window_len
        base = results["bf16"]
        ppl0 = report.data["sections"]["engine_bf16"]["perplexity"]
        for mode in modes:
            if mode not in results:
                continue
            r = results[mode]
            ppl = report.data["sections"][f"engine_{mode}"]["perplexity"]
            agree = [sum(a == b for a, b in zip(g0, g1)) / len(g0) for g0, g1 in zip(base["greedy"], r["greedy"])]
            first_div = [next((i for i, (a, b) in enumerate(zip(g0, g1)) if a != b), len(g0))
                         for g0, g1 in zip(base["greedy"], r["greedy"])]
            dl = [abs(a - b) for w0, w1 in zip(base["logprobs"], r["logprobs"]) for a, b in zip(w0, w1)]
            rec[mode] = {
                "mean_abs_logprob_delta": sum(dl) / len(dl), "max_abs_logprob_delta": max(dl),
                "perplexity": ppl, "perplexity_bf16": ppl0, "perplexity_delta_pct": 100 * (ppl / ppl0 - 1),
                "greedy_token_agreement": sum(agree) / len(agree),
                "greedy_mean_tokens_before_divergence": sum(first_div) / len(first_div),
                "rss_gib": report.data["sections"][f"engine_{mode}"]["rss_gib"],
                "rss_gib_bf16": report.data["sections"]["engine_bf16"]["rss_gib"],
            }
        if "nvfp4" in rec:
            rec["nvfp4_meets_3pct_target"] = rec["nvfp4"]["perplexity_delta_pct"] <= 3.0
            rec["nvfp4_meets_1pct_target"] = rec["nvfp4"]["perplexity_delta_pct"] <= 1.0
    report.write()
    return 0


# ============================================================================================ CPU decode
def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) of a process in bytes."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _engine_core_pid(parent: int) -> int:
    """The EngineCore child process (it runs the worker and holds the model); the parent when there is none."""
    import psutil

    kids = psutil.Process(parent).children(recursive=True)  # vLLM renames it (VLLM::EngineCore): take the largest
    best, rss = parent, 0
    for c in kids:
        try:
            r = c.memory_info().rss
        except psutil.Error:
            continue
        if r > rss:
            best, rss = c.pid, r
    return best


def _decode_worker(request_path: str, result_path: str) -> None:
    """One engine: start, memory after load, decode tokens/s at each batch size."""
    import statistics
    import time

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(request_path))
    kw = dict(model=req["model"], dtype="bfloat16", max_model_len=512, enforce_eager=req["eager"],
              max_num_seqs=max(req["batches"]), seed=0)
    if req["quantization"]:
        kw["quantization"] = req["quantization"]
    t0 = time.monotonic()
    llm = LLM(**kw)
    start_s = time.monotonic() - t0
    core = _engine_core_pid(os.getpid())
    mem = {"engine_core": _proc_status(core), "main": _proc_status(os.getpid()), "separate_core": core != os.getpid()}
    D = req["decode_tokens"]
    res = {"start_s": start_s, "memory": mem, "decode": {}}
    for B in req["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=[(7 * b + 11 * i) % 400 + 20 for i in range(16)]) for b in range(B)]

        def gen(n):
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            assert all(len(o.outputs[0].token_ids) == n for o in outs)
            return dt

        gen(1 + D)  # warm-up
        rates = []
        for _ in range(req["reps"]):
            t1 = gen(1)
            tn = gen(1 + D)
            rates.append(D * B / max(tn - t1, 1e-9))
        res["decode"][str(B)] = {"tokens_per_s_median": statistics.median(rates), "tokens_per_s": rates}
    llm.llm_engine.engine_core.shutdown()
    json.dump(res, open(result_path, "w"))


def _run_decode_engine(model: Path, mode: str | None, args, timeout: float = 1800.0) -> dict:
    import harness

    with tempfile.TemporaryDirectory(prefix="frontier-fp4-dec-") as td:
        rq, rs, lg = (os.path.join(td, n) for n in ("req.json", "res.json", "engine.log"))
        json.dump({"model": str(model), "quantization": "frontier_fp4" if mode else None, "batches": [1, 8],
                   "decode_tokens": args.decode_tokens, "reps": args.reps, "eager": args.eager}, open(rq, "w"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if mode:
            env["FRONTIER_FP4"] = mode
        returncode, logtxt = harness.run_process_group([sys.executable, __file__, "--decode-worker", rq, rs], env,
                                                       timeout, log=lg)
        if returncode != 0 or not os.path.exists(rs):
            raise RuntimeError(f"engine ({mode or 'bf16'}) failed, exit {returncode}:\n" + logtxt[-3000:])
        r = json.load(open(rs))
        r["kernel_log"] = [ln[-300:] for ln in logtxt.splitlines() if "frontier_fp4:" in ln or "FP4 kernel" in ln][:5]
        return r


def decode_sections(args) -> int:
    import statistics

    import harness
    from vllm_frontier.models.tiny_factory import make_tiny_model, param_count, preset_config
    from vllm_frontier.quantization.fp4_cpu import kernel_status

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    cache = Path(args.model_cache or tempfile.gettempdir())
    report = harness.Report(args.out, meta={
        "script": "benchmarks/fp4.py --decode", "argv": sys.argv[1:], "presets": presets, "fp4_mode": args.fp4_mode,
        "rounds": args.rounds, "eager": args.eager, "uptime_before": os.popen("uptime").read().strip(),
        "cpu_kernel": list(kernel_status()), "commit": os.popen(f"git -C {ROOT} rev-parse HEAD").read().strip()})
    order = [None, args.fp4_mode] + ([args.fp4_mode, None] if args.rounds >= 2 else [])
    for preset in presets:
        with report.section(f"decode_{preset}") as rec:
            cfg = preset_config(preset)
            model = cache / f"frontier-fp4-bench-{preset}"
            if not (model / "config.json").is_file():
                make_tiny_model("deepseek_v3", model, preset=preset)
            params = param_count(cfg, include_mtp=False)
            rec.update(model=str(model), params_main_model=params, bf16_weight_bytes=2 * params, runs=[])
            for mode in order:
                r = _run_decode_engine(model, mode, args)
                r["mode"] = mode or "bf16"
                r["uptime_after"] = os.popen("uptime").read().strip()
                rec["runs"].append(r)
                print(f"  {preset} {r['mode']}: " + ", ".join(
                    f"B={b} {d['tokens_per_s_median']:.2f} tok/s" for b, d in r["decode"].items())
                    + f", core RSS {r['memory']['engine_core']['VmRSS'] / 2**30:.2f} GiB, peak "
                    f"{r['memory']['engine_core']['VmHWM'] / 2**30:.2f} GiB, start {r['start_s']:.0f} s", flush=True)
                report.write()
            fp4, bf = args.fp4_mode, "bf16"

            def agg(mode, f):
                return statistics.median([f(r) for r in rec["runs"] if r["mode"] == mode])

            summary = {}
            for b in ("1", "8"):
                tb = agg(bf, lambda r: r["decode"][b]["tokens_per_s_median"])
                tf = agg(fp4, lambda r: r["decode"][b]["tokens_per_s_median"])
                summary[f"batch{b}"] = {"bf16_tokens_per_s": tb, "fp4_tokens_per_s": tf, "speedup": tf / tb}
            rss_b = agg(bf, lambda r: r["memory"]["engine_core"]["VmRSS"])
            rss_f = agg(fp4, lambda r: r["memory"]["engine_core"]["VmRSS"])
            hwm_b = agg(bf, lambda r: r["memory"]["engine_core"]["VmHWM"])
            hwm_f = agg(fp4, lambda r: r["memory"]["engine_core"]["VmHWM"])
            fp4_weights = 2 * params - (rss_b - rss_f)
            summary["memory"] = {
                "core_rss_gib": {"bf16": rss_b / 2**30, "fp4": rss_f / 2**30},
                "core_peak_rss_during_load_gib": {"bf16": hwm_b / 2**30, "fp4": hwm_f / 2**30},
                "fp4_peak_not_above_bf16": hwm_f <= hwm_b,
                "weights_resident_gib_from_rss": {"bf16": 2 * params / 2**30, "fp4": fp4_weights / 2**30},
                "weights_ratio_from_rss": 2 * params / fp4_weights if fp4_weights > 0 else None,
            }
            summary["start_s"] = {"bf16": agg(bf, lambda r: r["start_s"]), "fp4": agg(fp4, lambda r: r["start_s"])}
            target = 1.0 if preset == "dense" else 0.8
            summary["batch1_target"] = target
            summary["meets_batch1_target"] = summary["batch1"]["speedup"] >= target
            rec["summary"] = summary
    report.data["meta"]["uptime_after"] = os.popen("uptime").read().strip()
    report.write()
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    if args.decode_worker:
        _decode_worker(*args.decode_worker)
        return 0
    if args.decode:
        return decode_sections(args)
    if args.gpu or args.smoke:
        return gpu_section(args)
    return cpu_sections(args)


if __name__ == "__main__":
    sys.exit(main())
