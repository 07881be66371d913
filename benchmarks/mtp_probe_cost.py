"""What an MTP probe costs against how many skipped positions its first step replays, on vLLM CPU.

    python benchmarks/mtp_probe_cost.py --view v32 --batches 16 --json benchmarks/results/mtp/probe_cost_v32.json

While the adaptive rule does not draft, the drafter skips every step (`SkippingMTPProposer`); a k = 1 probe's
first step first replays, in one catch-up pass, every position the running requests skipped, then drafts. The
running requests' skipped positions grow with their age, so the probe's cost depends on when it lands in their
lives. One MTP engine (embedded model, float32, eager, cap K = 3, the drafter-skipping worker) generates
`--tokens` greedy tokens for a batch of prompts, pinned at k = 0 except two k = 1 steps (draft, then verify) at
decode step `--offsets` of the run (`mtp_step_log.PeriodPinnedStepLogScheduler`: the pin cycle restarts with
every run), each offset `--repeats` times in shuffled order. Per run: the positions the catch-up replayed (the
proposer's counters), the probe's two step times and the run's median k = 0 step (the scheduler's step log).
Reported per (batch, offset): medians, the probe's first step over a plain step, and a least-squares line of the
first step's extra time (over the median plain step) against the replayed positions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, embedded_views, engine_script_args, run_worker  # noqa: E402
from mtp import CAP_K, PROMPTS  # noqa: E402
from mtp_step_log import read_log  # noqa: E402

SCHEDULER_CLS = "mtp_step_log.PeriodPinnedStepLogScheduler"


def probe_pin(offset: int, length: int) -> str:
    """A pin cycle of ``length`` entries: k = 1 at steps ``offset`` and ``offset + 1`` of a run (0: its prefill
    step), k = 0 elsewhere."""
    return ",".join("1" if offset <= j <= offset + 1 else "0" for j in range(length))


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import os

    from vllm import LLM, SamplingParams

    from mtp_step_log import LOG_ENV
    from vllm_frontier.spec_decode import executor_backend, worker_cls
    from vllm_frontier.spec_decode.scheduler import REQUEST_PIN_KEY

    log = Path(spec["step_log"])
    os.environ[LOG_ENV] = str(log)
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=max(spec["batches"]), compilation_config={"custom_ops": ["-rotary_embedding"]},
              speculative_config={"method": "mtp", "num_speculative_tokens": CAP_K}, scheduler_cls=SCHEDULER_CLS,
              worker_cls=worker_cls(), distributed_executor_backend=executor_backend("mp"))
    length = spec["tokens"] + 8

    def run(batch: int, pin: str) -> dict:
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True,
                                extra_args={REQUEST_PIN_KEY: pin})
        c0 = llm.collective_rpc("frontier_mtp_counters")[0]
        llm.generate(prompts, params, use_tqdm=False)
        c1 = llm.collective_rpc("frontier_mtp_counters")[0]
        steps, _ = read_log(log)
        plain = [t for _, k, t in steps if k == 0]
        drafting = [t for _, k, t in steps if k > 0]
        return {"replayed": c1["caught_up_tokens"] - c0["caught_up_tokens"],
                "catch_up_passes": c1["catch_up_passes"] - c0["catch_up_passes"],
                "probe_ms": [round(1e3 * t, 3) for t in drafting],
                "plain_median_ms": round(1e3 * statistics.median(plain), 3) if plain else None}

    for batch in spec["batches"]:   # warm-up: the first drafting step at a batch size pays one-time costs
        run(batch, "0")
        run(batch, probe_pin(spec["offsets"][0], length))
    rng = random.Random(0)
    samples = []
    for rep in range(spec["repeats"]):
        for batch in spec["batches"]:
            offsets = list(spec["offsets"])
            rng.shuffle(offsets)
            for offset in offsets:
                got = run(batch, probe_pin(offset, length))
                samples.append({"repeat": rep, "batch": batch, "offset": offset, **got})
                print(json.dumps(samples[-1]), flush=True)
    Path(out_path).write_text(json.dumps({"samples": samples}))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line y = a + b x, or None when x does not vary."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def summarize(samples: list[dict]) -> dict:
    """Per batch: per offset medians (replayed positions, probe steps, plain step, first probe step / plain
    step), and the line of the first probe step's extra ms over the plain step against replayed positions."""
    out = {}
    for batch in sorted({s["batch"] for s in samples}):
        rows = [s for s in samples if s["batch"] == batch and len(s["probe_ms"]) >= 1 and s["plain_median_ms"]]
        per_offset = {}
        for offset in sorted({s["offset"] for s in rows}):
            got = [s for s in rows if s["offset"] == offset]
            per_offset[str(offset)] = {
                "runs": len(got),
                "replayed": statistics.median(s["replayed"] for s in got),
                "probe_first_step_ms": round(statistics.median(s["probe_ms"][0] for s in got), 2),
                "probe_second_step_ms": round(statistics.median(s["probe_ms"][1] for s in got
                                                                if len(s["probe_ms"]) > 1), 2)
                if any(len(s["probe_ms"]) > 1 for s in got) else None,
                "plain_step_ms": round(statistics.median(s["plain_median_ms"] for s in got), 2),
                "first_step_vs_plain": round(statistics.median(s["probe_ms"][0] / s["plain_median_ms"]
                                                               for s in got), 2),
            }
        line = fit_line([s["replayed"] for s in rows], [s["probe_ms"][0] - s["plain_median_ms"] for s in rows])
        out[f"batch_{batch}"] = {
            "per_offset": per_offset,
            "extra_ms_line": None if line is None else {"ms_at_no_replay": round(line[0], 2),
                                                        "ms_per_replayed_position": round(line[1], 4)},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--view", default="v32", help="embedded model view: v3 or v32 (default v32)")
    p.add_argument("--batches", default="16", help="comma-separated batch sizes (default 16)")
    p.add_argument("--offsets", default="1,4,8,16,32,48,60",
                   help="decode steps of a run where the probe starts (default 1,4,8,16,32,48,60)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="runs per (batch, offset) (default 3)")
    args = engine_script_args(p, argv, _worker, timeout=1800.0)
    if args is None:
        return 0
    view = embedded_views(p, args.view, "--view")
    if len(view) != 1:
        p.error("--view takes one view")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        offsets = [int(o) for o in args.offsets.split(",") if o.strip()]
    except ValueError:
        p.error("--batches and --offsets take comma-separated integers")
    if not batches or min(batches) < 1 or not offsets or min(offsets) < 1 or args.repeats < 1:
        p.error("--batches, --offsets and --repeats take positive integers")
    if max(offsets) + 2 >= args.tokens:
        p.error(f"every offset must be below --tokens - 2 ({args.tokens - 2}): the probe's two steps end the run")
    from vllm_frontier.models.embedded import embedded_model_path

    report = Report(args.json, meta={"view": view[0], "batches": batches, "offsets": offsets,
                                     "tokens": args.tokens, "repeats": args.repeats})
    with report.section(view[0]) as rec, tempfile.TemporaryDirectory() as tmp:
        env = {"FRONTIER_DSA": "1"} if view[0] == "v32" else {}
        spec = {"model": str(embedded_model_path(view[0])), "batches": batches, "offsets": offsets,
                "tokens": args.tokens, "repeats": args.repeats, "step_log": str(Path(tmp) / "steps.jsonl")}
        got = run_worker(Path(__file__), spec, tmp, env, args.timeout)
        rec["env"] = env
        rec["results"] = summarize(got["samples"])
        rec["samples"] = got["samples"]
        print(json.dumps(rec["results"], indent=1))
    return 0 if report.data["sections"][view[0]]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
