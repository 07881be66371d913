"""Python function calls per engine step: plain engine vs MTP engine pinned at k = 0 vs MTP engine under the
adaptive rule, on vLLM CPU. A count of work that this VM's drift does not move (wall times drift 30 % and more
between runs; call counts are exact), to tell what the MTP engine's own layers add to a step from what the
end-to-end benchmark (`benchmarks/mtp.py`) measures.

    python benchmarks/mtp_step_calls.py --views v3 --batches 1,16 --json benchmarks/results/mtp/step_calls.json

Each engine (offline `vllm.LLM`, float32, eager, everything in this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`
and the "uni" executor, so the scheduler, the worker and the model runner are all profiled; MTP: cap K = 3,
`PinnedDraftScheduler` with the pin carried by the requests, the drafter-skipping worker) runs in its own
subprocess, warms up (`--warmup` generate calls per batch size), then generates `--tokens` greedy tokens per
prompt (batch 1: one prompt; batch B: B prompts at once) `--runs` times under cProfile. Reported per (view,
batch, engine): calls per engine step, and per MTP engine the functions whose calls per step differ most from
the plain engine's. The "uni" executor asks the worker for drafts after every step (the multiprocess executor
of `spec_decode.executor` skips that after a k = 0 step), so the MTP rows count a few calls that a served
engine does not make.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, embedded_views, engine_script_args, run_worker  # noqa: E402

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n"]
ENGINES = {"plain": None, "mtp_k0": "0", "mtp_adaptive": "adaptive"}


def _worker(spec_path: str, out_path: str) -> None:
    import cProfile
    import os
    import pstats

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import worker_cls
    from vllm_frontier.spec_decode.scheduler import REQUEST_PIN_KEY

    pin = spec["pin"]
    kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=max(spec["batches"]), compilation_config={"custom_ops": ["-rotary_embedding"]},
              distributed_executor_backend="uni")
    if pin is not None:
        kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": 3}, worker_cls=worker_cls(),
                  scheduler_cls="vllm_frontier.spec_decode.scheduler.PinnedDraftScheduler")
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True,
                            extra_args={REQUEST_PIN_KEY: pin} if pin is not None else None)
    out = {}
    for batch in spec["batches"]:
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        for _ in range(spec["warmup"]):   # warm-up (and the rule's first steps)
            llm.generate(prompts, params, use_tqdm=False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(spec["runs"]):
            llm.generate(prompts, params, use_tqdm=False)
        prof.disable()
        steps = spec["runs"] * spec["tokens"]   # one engine step per generated token (k = 0: no drafts accepted)
        per_fn: dict[str, float] = {}
        for (file, line, name), (_, ncalls, *_rest) in pstats.Stats(prof).stats.items():
            key = f"{file.split('site-packages/')[-1].split('/vllm_frontier/')[-1]}:{line}:{name}"
            per_fn[key] = per_fn.get(key, 0) + ncalls / steps
        out[f"batch_{batch}"] = {"calls_per_step": round(sum(per_fn.values()), 1), "per_function": per_fn}
    Path(out_path).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default="v3", help="embedded model views, comma-separated (v3, v32; default v3)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed generate calls per batch size before the profiled ones (the adaptive rule's first "
                        "steps: it probes until it has measured its step costs; default 1)")
    p.add_argument("--top", type=int, default=12, help="functions listed per MTP engine (default 12)")
    args = engine_script_args(p, argv, _worker, 1200.0)
    if args is None:   # a `run_worker` subprocess: its engine ran
        return 0
    views = embedded_views(p, args.views)
    if args.tokens < 2 or args.runs < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 1:
        p.error("--tokens >= 2, --runs >= 1, --warmup >= 0 and batch sizes >= 1 are required")
    from vllm_frontier.models.embedded import embedded_model_path

    report = Report(args.json, meta={"views": views, "batches": args.batches, "tokens": args.tokens,
                                     "runs": args.runs, "warmup": args.warmup})
    for view in views:
        env = {"FRONTIER_DSA": "1"} if view == "v32" else {}
        with report.section(view) as rec:
            got = {}
            for name, pin in ENGINES.items():
                with tempfile.TemporaryDirectory() as tmp:
                    spec = {"model": str(embedded_model_path(view)), "pin": pin, "batches": args.batches,
                            "tokens": args.tokens, "runs": args.runs, "warmup": args.warmup}
                    got[name] = run_worker(__file__, spec, tmp, env, args.timeout)
            results = {}
            for batch in args.batches:
                key = f"batch_{batch}"
                plain = got["plain"][key]
                row = {name: got[name][key]["calls_per_step"] for name in ENGINES}
                for name in ("mtp_k0", "mtp_adaptive"):
                    fns = got[name][key]["per_function"]
                    diff = {f: fns.get(f, 0.0) - plain["per_function"].get(f, 0.0)
                            for f in set(fns) | set(plain["per_function"])}
                    top = sorted(diff, key=lambda f: -abs(diff[f]))[:args.top]
                    row[f"{name}_added_per_step"] = round(row[name] - row["plain"], 1)
                    row[f"{name}_top_differences"] = {f: round(diff[f], 2) for f in top}
                results[key] = row
            rec["results"] = results
    report.write()
    for view in views:
        sec = report.data["sections"][view]
        print(view, sec["status"], json.dumps({b: {k: v for k, v in r.items() if "top" not in k}
                                               for b, r in sec.get("results", {}).items()}))
    return 0 if all(report.data["sections"][v]["status"] == "ok" for v in views) else 1


if __name__ == "__main__":
    sys.exit(main())
