"""Pool several runs of `benchmarks/mtp.py` (same views, batch sizes and modes): the speedups over all their
engine pairs, as if one run had started them all.

    python benchmarks/mtp_pool.py benchmarks/results/mtp/mtp_cpu_v21.json \
        benchmarks/results/mtp/mtp_cpu_v21_second.json --json benchmarks/results/mtp/mtp_cpu_v21_pooled.json

Why: an engine's speed depends on its start (the A/A control of `mtp.py --control` puts two identical engines
0.96-1.03x apart over three pairs), so one run's three pairs leave a target 3 % from 1.0 inside the measure's
resolution; more pairs narrow it. Each input keeps its per-round ratios in engine-pair order
(`speedup_per_round`, `--rounds` per pair); the pooled report gives, per (view, batch, mode), the geometric mean
over every round of every pair, the 95 % bootstrap interval resampling the pairs and then the swapped round
pairs inside each (`mtp.pair_cluster_ci`), each pair's mean, and the checks of `mtp.targets` on the pooled means
(wall time). Inputs whose commit differs are pooled all the same and listed: say why in the result's index.

Beside them, two diagnostics of the rounds that an engine stall moved (this VM: a run now and then takes about
1 s longer than its cell's median, in the plain engine and the MTP engine alike): `median_round_ratio`, the
median of the pooled per-round ratios (a stall on either side is one outlier to it, where it moves the geometric
mean by up to 1-2 % over 180 rounds), and `stalls`, per row of each input (plain engine `none` included) the
runs that took `STALL_S` longer than the row's median, and where the time went: a step that was not a decode
step (the prompt step), the decode steps, or neither (the engine between steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report  # noqa: E402
from mtp import TARGET, geo_mean, pair_cluster_ci  # noqa: E402

STALL_S = 0.7   # seconds over a row's median run that count as a stall (a decode step takes 3-15 ms here)


def pairs_of(row: dict, rounds: int) -> list[list[float]]:
    """One row's per-round ratios split into its engine pairs (checked against the pair means it reports)."""
    ratios = row["speedup_per_round"]
    pairs = [ratios[i:i + rounds] for i in range(0, len(ratios), rounds)]
    reported = row.get("speedup_per_engine_pair") or [row["speedup_vs_none"]]
    if len(pairs) != len(reported) or any(abs(geo_mean(p) - m) > 1e-3 for p, m in zip(pairs, reported)):
        raise ValueError("per-round ratios do not split into the reported engine pairs "
                         f"({len(ratios)} rounds, {rounds} per pair, pairs {reported})")
    return pairs


def pool(runs: list[dict]) -> dict:
    """{view: {batch: {mode: pooled row}}} over the runs' engine pairs."""
    out: dict = {}
    for run in runs:
        rounds = run["meta"]["rounds"]
        for view, sec in run["sections"].items():
            if sec.get("status") != "ok":
                raise ValueError(f"section {view} of a run did not finish ({sec.get('status')})")
            for batch, rows in sec["results"].items():
                for mode, row in rows.items():
                    if mode == "none" or "speedup_per_round" not in row:
                        continue
                    cell = out.setdefault(view, {}).setdefault(batch, {}).setdefault(
                        mode, {"pairs": [], "lossless": True})
                    cell["pairs"] += pairs_of(row, rounds)
                    cell["lossless"] = cell["lossless"] and row.get("lossless", False)
    for view in out.values():
        for rows in view.values():
            for cell in rows.values():
                pairs = cell.pop("pairs")
                rounds = [x for p in pairs for x in p]
                mean = geo_mean(rounds)
                cell.update(speedup_vs_none=round(mean, 4), speedup_ci95=pair_cluster_ci(pairs),
                            engine_pairs=len(pairs), speedup_per_engine_pair=[round(geo_mean(p), 4) for p in pairs],
                            at_least_target=mean >= TARGET, median_round_ratio=round(statistics.median(rounds), 4))
    return out


def stalls(runs: list[dict], threshold: float = STALL_S) -> dict:
    """{view: {batch: {mode: counts}}} over the runs: runs of each row (`none`: the plain engine) that took
    ``threshold`` seconds longer than the row's median, split by where the extra time went (the row's
    `other_steps_s`: steps that were not decode steps, `decode_steps_s`, or the rest: between steps)."""
    out: dict = {}
    for run in runs:
        for view, sec in run["sections"].items():
            for batch, rows in sec.get("results", {}).items():
                for mode, row in rows.items():
                    secs = row.get("seconds") or []
                    cell = out.setdefault(view, {}).setdefault(batch, {}).setdefault(
                        mode, {"runs": 0, "stalled": 0, "in_other_steps": 0, "in_decode_steps": 0,
                               "between_steps": 0})
                    cell["runs"] += len(secs)
                    if not secs:
                        continue
                    med = statistics.median(secs)
                    others, decodes = row.get("other_steps_s"), row.get("decode_steps_s")
                    med_other = statistics.median(others) if others else 0.0
                    med_decode = statistics.median(decodes) if decodes else 0.0
                    for i, t in enumerate(secs):
                        if t - med < threshold:
                            continue
                        cell["stalled"] += 1
                        extra_other = others[i] - med_other if others else 0.0
                        extra_decode = decodes[i] - med_decode if decodes else 0.0
                        where = max((extra_other, "in_other_steps"), (extra_decode, "in_decode_steps"),
                                    (t - med - extra_other - extra_decode, "between_steps"))[1]
                        cell[where] += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="result files of benchmarks/mtp.py")
    p.add_argument("--json", help="write the pooled report here")
    args = p.parse_args()
    runs = []
    for path in args.runs:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            p.error(f"cannot read {path}: {e}")
    report = Report(args.json, meta={"inputs": args.runs, "target": TARGET,
                                     "input_commits": [r["meta"].get("commit") for r in runs],
                                     "input_commands": [r["meta"].get("command") for r in runs]})
    with report.section("pooled") as rec:
        rec["results"] = pool(runs)
        rec["stalls"] = stalls(runs)
        for view, batches in rec["results"].items():
            for batch, rows in batches.items():
                for mode, cell in rows.items():
                    got = rec["stalls"].get(view, {}).get(batch, {})
                    print(f"{view} {batch} {mode}: {cell['speedup_vs_none']:.3f}x {cell['speedup_ci95']} over "
                          f"{cell['engine_pairs']} pairs {cell['speedup_per_engine_pair']}, median round "
                          f"{cell['median_round_ratio']:.3f}; stalled runs: MTP {got.get(mode, {}).get('stalled')}, "
                          f"plain {got.get('none', {}).get('stalled')}")


if __name__ == "__main__":
    main()
