"""What an MTP engine that drafts nothing (pinned k = 0) adds to each engine step over the plain engine, on vLLM
CPU: the EngineCore process's busy loop under cProfile, plain vs MTP, functions ranked by the difference of
their cumulative time per engine step.

    python benchmarks/mtp_step_overhead.py --view v3 --json benchmarks/results/mtp/step_overhead_v3.json

Each engine (offline `vllm.LLM`, float32, eager, the default multiprocess engine; MTP: cap K = 3,
`PinnedDraftScheduler` pinned at k = 0 and the drafter-skipping worker, as `benchmarks/mtp.py`) generates
`--prompts` x `--tokens` greedy tokens one prompt at a time; the EngineCore process profiles its busy loop (a
patch of `EngineCoreProc.run_busy_loop` installed when the spawned process imports this file) and writes the
stats when the engine shuts down. Wall time per token is reported beside it (profiling slows both engines).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROFILE_ENV = "FRONTIER_BENCH_CORE_PROFILE"   # set in the engine's environment: where EngineCore writes its stats

if os.environ.get(PROFILE_ENV):   # in every process of the engine (spawn re-imports this module)
    import cProfile

    import vllm.v1.engine.core as _core

    _busy_loop = _core.EngineCoreProc.run_busy_loop

    def _profiled_busy_loop(self):
        prof = cProfile.Profile()
        prof.enable()
        try:
            return _busy_loop(self)
        finally:
            prof.disable()
            prof.dump_stats(os.environ[PROFILE_ENV])

    _core.EngineCoreProc.run_busy_loop = _profiled_busy_loop


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import executor_backend, worker_cls

    kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, max_num_seqs=16,
              compilation_config={"custom_ops": ["-rotary_embedding"]})
    if spec["mtp"]:
        kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": 3},
                  scheduler_cls="vllm_frontier.spec_decode.scheduler.PinnedDraftScheduler", worker_cls=worker_cls(),
                  distributed_executor_backend=executor_backend("mp"))
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(["def main(argv):\n"], SamplingParams(max_tokens=4), use_tqdm=False)
    t = time.perf_counter()
    for i in range(spec["prompts"]):
        llm.generate([f"def f{i}(x):\n"], params, use_tqdm=False)
    Path(out_path).write_text(json.dumps({"seconds": time.perf_counter() - t}))


def run(model: str, mtp: bool, env_extra: dict, args, tmp: Path) -> tuple[dict, pstats.Stats]:
    name = "mtp_k0" if mtp else "plain"
    spec, out, stats = tmp / f"{name}.json", tmp / f"{name}.out", tmp / f"{name}.pstats"
    pin = tmp / "pin"
    pin.write_text("0")
    spec.write_text(json.dumps({"model": model, "mtp": mtp, "tokens": args.tokens, "prompts": args.prompts}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    env.update(env_extra, FRONTIER_MTP_PIN_FILE=str(pin), VLLM_ENABLE_V1_MULTIPROCESSING="1")
    env[PROFILE_ENV] = str(stats)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec), str(out)], env=env, capture_output=True,
                          text=True, timeout=args.timeout)
    if proc.returncode != 0 or not stats.is_file():
        raise RuntimeError(f"{name} engine failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()), pstats.Stats(str(stats))


def per_step(stats: pstats.Stats, steps: float) -> dict[str, tuple[int, float]]:
    """function -> (calls, cumulative ms per engine step)."""
    out = {}
    for (f, line, fn), (_, n, _, ct, _) in stats.stats.items():
        key = f"{f.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{line}:{fn}"
        out[key] = (n, ct * 1e3 / steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--view", default="v3", choices=["v3", "v32"], help="embedded model view (v32 runs --plugin dsa)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--top", type=int, default=25, help="functions kept, by the difference of time per step")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    if args.tokens < 2 or args.prompts < 1 or args.top < 1:
        p.error("--tokens >= 2, --prompts >= 1 and --top >= 1 are required")
    from harness import Report

    from vllm_frontier.models.embedded import embedded_model_path

    model = str(embedded_model_path(args.view))
    env = {"FRONTIER_DSA": "1"} if args.view == "v32" else {}
    report = Report(args.json, meta={"view": args.view, "tokens": args.tokens, "prompts": args.prompts,
                                     "loadavg_start": os.getloadavg()})
    with report.section("overhead") as rec, tempfile.TemporaryDirectory() as td:
        steps = args.tokens * args.prompts   # decode steps, one request at a time (+ the warm-up's few)
        (plain_t, plain_s), (mtp_t, mtp_s) = (run(model, m, env, args, Path(td)) for m in (False, True))
        a, b = per_step(plain_s, steps), per_step(mtp_s, steps)
        loop = next((k for k in a if k.endswith(":run_busy_loop")), None)
        rec["ms_per_token"] = {"plain": plain_t["seconds"] * 1e3 / steps, "mtp_k0": mtp_t["seconds"] * 1e3 / steps}
        rec["busy_loop_ms_per_step"] = {"plain": a.get(loop, (0, 0))[1], "mtp_k0": b.get(loop, (0, 0))[1]}
        rows = sorted(set(a) | set(b), key=lambda k: -(b.get(k, (0, 0.0))[1] - a.get(k, (0, 0.0))[1]))
        rec["added_ms_per_step"] = [
            {"function": k, "plain_ms": round(a.get(k, (0, 0.0))[1], 4), "mtp_k0_ms": round(b.get(k, (0, 0.0))[1], 4),
             "added_ms": round(b.get(k, (0, 0.0))[1] - a.get(k, (0, 0.0))[1], 4),
             "calls_plain": a.get(k, (0, 0))[0], "calls_mtp_k0": b.get(k, (0, 0))[0]}
            for k in rows[: args.top]]
        print(json.dumps(rec["ms_per_token"]), json.dumps(rec["busy_loop_ms_per_step"]))
        for r in rec["added_ms_per_step"]:
            print(f"{r['added_ms']:8.4f} ms  {r['function']}")
    report.data["meta"]["loadavg_end"] = os.getloadavg()
    report.write()
    return 0 if report.data["sections"]["overhead"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
