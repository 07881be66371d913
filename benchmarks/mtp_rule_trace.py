"""What the adaptive MTP rule sees, run by run: one MTP engine under `AdaptiveDraftScheduler` (no pins), its
counters read from `FRONTIER_MTP_STATS` after every run. Shows why it drafts or not: steps per k, the timed
cells (median step time per batch-size bucket and k), the unpaired ratio of their medians (what the rule used
before the paired ratios), the paired ratios it uses now, and its table.

    python benchmarks/mtp_rule_trace.py --view v32 --runs 40 --json benchmarks/results/mtp/rule_trace_v32.json

One offline `vllm.LLM` (float32, eager, the multiprocess engine as served; MTP cap K = 3, the drafter-skipping
worker) in a subprocess; each run generates `--tokens` greedy tokens for `--batch1-prompts` prompts one after
the other (batch 1), or for 16 prompts at once when `--alternate` puts a batch-16 run after each batch-1 run;
`--batches 4,8` runs those batch sizes in turn instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, embedded_views, engine_script_args, run_worker  # noqa: E402

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n\"\"\"Utils"]


def _worker(spec_path: str, out_path: str) -> None:
    import os

    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import executor_backend, worker_cls

    stats_path = Path(os.environ["FRONTIER_MTP_STATS"])
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, max_num_seqs=16,
              compilation_config={"custom_ops": ["-rotary_embedding"]},
              speculative_config={"method": "mtp", "num_speculative_tokens": 3},
              scheduler_cls="vllm_frontier.spec_decode.scheduler.AdaptiveDraftScheduler", worker_cls=worker_cls(),
              distributed_executor_backend=executor_backend("mp"))
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    rows, last = [], None
    batches = spec["batches"] or ([1, 16] if spec["alternate"] else [1])
    for r in range(spec["runs"]):
        batch = batches[r % len(batches)]
        groups = ([[p] for p in PROMPTS[:spec["batch1_prompts"]]] if batch == 1
                  else [(PROMPTS * (batch // len(PROMPTS) + 1))[:batch]])
        for group in groups:
            llm.generate(group, params, use_tqdm=False)
        s = json.loads(stats_path.read_text())
        hist = s["k_histogram"]
        cells = s["step_time_cells"]
        unpaired = {b: {k: round(v[0] / c["0"][0], 3) for k, v in c.items() if k != "0"}
                    for b, c in cells.items() if "0" in c}
        rows.append({"run": r, "batch": batch, "steps_by_k": [a - b for a, b in zip(hist, last or [0] * len(hist))],
                     "step_time_cells": cells, "unpaired_ratios": unpaired,
                     "paired_ratio_cells": s.get("paired_ratio_cells"),
                     "measured_cost_ratios": s["measured_cost_ratios"],
                     "acceptance_estimate": s["window_acceptance_estimate"], "k_table_head": s["k_table_head"][:17]})
        last = hist
        print(json.dumps({k: rows[-1][k] for k in ("run", "batch", "steps_by_k", "unpaired_ratios",
                                                   "paired_ratio_cells")}), flush=True)
    Path(out_path).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--view", default="v32", help="embedded model view: v3 or v32 (default v32)")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch1-prompts", type=int, default=3)
    p.add_argument("--alternate", action="store_true", help="a batch-16 run after each batch-1 run")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="batch sizes of the runs in turn, e.g. 4,8 (default 1, or 1,16 with --alternate)")
    args = engine_script_args(p, argv, _worker, 1800.0)
    if args is None:   # a `run_worker` subprocess: its engine ran
        return 0
    view = embedded_views(p, args.view, "--view")
    if len(view) != 1:
        p.error("--view takes one view: v3 or v32")
    if args.runs < 1 or args.tokens < 2 or not 1 <= args.batch1_prompts <= len(PROMPTS):
        p.error(f"--runs >= 1, --tokens >= 2 and --batch1-prompts in [1, {len(PROMPTS)}] are required")
    if args.batches is not None and (args.alternate or not args.batches or not all(1 <= b <= 16 for b in args.batches)):
        p.error("--batches takes batch sizes in [1, 16] and replaces --alternate")
    from vllm_frontier.models.embedded import embedded_model_path

    report = Report(args.json, meta={"view": view[0], "runs": args.runs, "tokens": args.tokens,
                                     "batch1_prompts": args.batch1_prompts, "alternate": args.alternate,
                                     "batches": args.batches})
    with report.section(view[0]) as rec, tempfile.TemporaryDirectory() as tmp:
        env = {"FRONTIER_MTP_STATS": f"{tmp}/stats.json"} | ({"FRONTIER_DSA": "1"} if view[0] == "v32" else {})
        spec = {"model": str(embedded_model_path(view[0])), "runs": args.runs, "tokens": args.tokens,
                "batch1_prompts": args.batch1_prompts, "alternate": args.alternate, "batches": args.batches}
        rows = run_worker(__file__, spec, tmp, env, args.timeout)
        rec["runs"] = rows
        ratios = [v for row in rows for b in row["unpaired_ratios"].values() for v in b.values()]
        rec["unpaired_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
        rec["drafted_steps"] = sum(sum(row["steps_by_k"][1:]) for row in rows)
        rec["steps"] = sum(sum(row["steps_by_k"]) for row in rows)
    report.write()
    sec = report.data["sections"][view[0]]
    print(view[0], sec["status"], "unpaired ratio range", sec.get("unpaired_ratio_range"), "drafted",
          sec.get("drafted_steps"), "of", sec.get("steps"))
    return 0 if sec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
