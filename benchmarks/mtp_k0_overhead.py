"""What an MTP engine pinned at k = 0 adds to each engine step over the plain engine, timed layer by layer inside
the engines (no profiler): our worker and scheduler layers' own time per step, and vLLM's model runner and
scheduler time beneath them, on vLLM CPU.

    python benchmarks/mtp_k0_overhead.py --views v3,v32 --json benchmarks/results/mtp/k0_overhead.json

Why beside `benchmarks/mtp.py`: on this VM the speed of a whole engine drifts by 5-40 % between runs a few
seconds apart, so end-to-end ratios of two engines carry a few percent of noise even as medians of bracketed
runs; a per-step median of one layer's own time is stable to a few microseconds. Each engine (offline
`vllm.LLM`, float32, eager; MTP: cap K = 3, pinned at k = 0, the drafter-skipping worker) runs in its own
subprocess with the timed classes of `mtp_k0_timers.py`, generates `--tokens` greedy tokens per prompt (batch
1: `--batch1-prompts` prompts one after the other; batch B: B prompts at once) `--runs` times per batch size;
the engines alternate `--repeats` times. Reported per (view, batch): each timer's median per step (median over
runs), our layers' own time (worker: its `execute_model` + `sample_tokens` minus the runner's, which includes
`keep_plain_step`; scheduler: its `schedule` + `update_from_output` minus vLLM's), the difference MTP - plain,
and that difference as a fraction of the plain engine's step (worker + scheduler time per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, embedded_views, engine_script_args, git_commit, run_worker  # noqa: E402

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n\"\"\"Utils",
           "with open(path) as f:\n", "try:\n    import json\n", "def __init__(self, name):\n", "return [x for x in"]


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import executor_backend
    from vllm_frontier.spec_decode.scheduler import write_pin

    kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=max(spec["batches"]), compilation_config={"custom_ops": ["-rotary_embedding"]})
    if spec["mtp"]:
        write_pin(spec["pin"], spec["mtp_pin"])
        kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": 3},
                  scheduler_cls="mtp_k0_timers.MTPTimedScheduler", worker_cls="mtp_k0_timers.MTPTimedWorker",
                  distributed_executor_backend=executor_backend("mp"))
    else:
        kw.update(scheduler_cls="mtp_k0_timers.PlainTimedScheduler", worker_cls="mtp_k0_timers.PlainTimedWorker")
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    timers = Path(spec["timers"])
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    llm.collective_rpc("k0_timers")
    timers.unlink(missing_ok=True)
    out = []
    for batch in spec["batches"]:
        groups = [[p] for p in PROMPTS[:spec["batch1_prompts"]]] if batch == 1 else [
            (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]]
        for run in range(spec["runs"]):
            for group in groups:
                llm.generate(group, params, use_tqdm=False)
            worker = llm.collective_rpc("k0_timers")[0]
            lines = timers.read_text().splitlines() if timers.is_file() else []
            timers.unlink(missing_ok=True)
            sched = [json.loads(x) for x in lines]   # one line per idle point (per prompt group)
            merged = {k: statistics.median(s[k] for s in sched if k in s) for k in (sched[0] if sched else {})}
            out.append({"batch": batch, "run": run, **worker, **merged})
    Path(out_path).write_text(json.dumps(out))


def run_engine(model: str, mtp: bool, args, env_extra: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "mtp": mtp, "mtp_pin": args.mtp_pin, "tokens": args.tokens, "runs": args.runs,
                "batches": args.batches, "batch1_prompts": args.batch1_prompts, "pin": f"{tmp}/pin",
                "timers": f"{tmp}/timers.jsonl"}
        env = env_extra | {"FRONTIER_MTP_PIN_FILE": spec["pin"], "FRONTIER_BENCH_K0_TIMERS": spec["timers"]}
        if args.pin_check_every is not None:
            env["FRONTIER_BENCH_PIN_CHECK_EVERY"] = str(args.pin_check_every)
        # the engine imports mtp_k0_timers from this folder (run_worker puts it on PYTHONPATH)
        return run_worker(__file__, spec, tmp, env, args.timeout)


TIMERS = ("worker_execute", "worker_sample", "runner_execute", "runner_sample", "keep_plain_step",
          "scheduler_schedule", "scheduler_update", "vllm_schedule", "vllm_update")


def summarize(rows: list[dict]) -> dict:
    """Per timer, the median over runs of the per-run medians (us per step), and the derived own times."""
    med = {k: statistics.median(r[k] for r in rows if k in r) for k in TIMERS if any(k in r for r in rows)}
    med["worker_own"] = (med["worker_execute"] - med["runner_execute"]) + (med["worker_sample"] - med["runner_sample"])
    med["scheduler_own"] = ((med["scheduler_schedule"] - med["vllm_schedule"])
                            + (med["scheduler_update"] - med["vllm_update"]))
    med["step"] = med["worker_execute"] + med["worker_sample"] + med["scheduler_schedule"] + med["scheduler_update"]
    return {k: round(v, 1) for k, v in med.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default="v3,v32", help="embedded model views (default v3,v32)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="runs per batch size in each engine (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="plain/MTP engine pairs per view (default 2)")
    p.add_argument("--batch1-prompts", type=int, default=3)
    p.add_argument("--mtp-pin", default="0", choices=["0", "adaptive"],
                   help="the MTP engine pinned at k = 0 (default) or under the adaptive rule (its own time per "
                        "step; the steps it drafts, probes, move the worker's medians little)")
    p.add_argument("--pin-check-every", type=float, default=None,
                   help="seconds between the MTP scheduler's reads of its pin file while busy (default: the "
                        "scheduler's 0.5 s; 0: every step, to show what a file read per step costs)")
    args = engine_script_args(p, argv, _worker, 1800.0)
    if args is None:   # a `run_worker` subprocess: its engine ran
        return 0
    views = embedded_views(p, args.views)
    if args.tokens < 2 or args.runs < 1 or args.repeats < 1 or not args.batches or min(args.batches) < 1:
        p.error("--tokens >= 2, --runs >= 1, --repeats >= 1 and batch sizes >= 1 are required")
    if not 1 <= args.batch1_prompts <= len(PROMPTS):
        p.error(f"--batch1-prompts must be in [1, {len(PROMPTS)}]")
    from vllm_frontier.models.embedded import embedded_model_path

    report = Report(args.json, meta={"commit": git_commit(), "views": views, "batches": args.batches,
                                     "tokens": args.tokens, "runs": args.runs, "repeats": args.repeats,
                                     "batch1_prompts": args.batch1_prompts, "pin_check_every": args.pin_check_every,
                                     "mtp_pin": args.mtp_pin,
                                     "loadavg_start": os.getloadavg()})
    for view in views:
        model = str(embedded_model_path(view))
        env = {"FRONTIER_DSA": "1"} if view == "v32" else {}
        with report.section(view) as rec:
            runs = {"plain": [], "mtp": []}
            for rep in range(args.repeats):
                for name in (("plain", "mtp") if rep % 2 == 0 else ("mtp", "plain")):
                    runs[name] += run_engine(model, name == "mtp", args, env)
            rec["env"] = env
            rec["results"] = {}
            for batch in args.batches:
                plain = summarize([r for r in runs["plain"] if r["batch"] == batch])
                mtp = summarize([r for r in runs["mtp"] if r["batch"] == batch])
                added = (mtp["worker_own"] - plain["worker_own"]) + (mtp["scheduler_own"] - plain["scheduler_own"])
                rec["results"][f"batch_{batch}"] = {
                    "plain_us": plain, "mtp_k0_us": mtp,
                    "added_us_per_step": round(added, 1),
                    "added_fraction_of_plain_step": round(added / plain["step"], 4),
                    "k0_vs_plain_if_only_that": round(plain["step"] / (plain["step"] + added), 4),
                    "runner_execute_mtp_over_plain": round(mtp["runner_execute"] / plain["runner_execute"], 4),
                }
            rec["loadavg_end"] = os.getloadavg()
    report.write()
    for view in views:
        sec = report.data["sections"][view]
        print(view, sec["status"], json.dumps({b: {k: v for k, v in r.items() if not k.endswith("_us")}
                                               for b, r in sec.get("results", {}).items()}))
    return 0 if all(report.data["sections"][v]["status"] == "ok" for v in views) else 1


if __name__ == "__main__":
    sys.exit(main())
