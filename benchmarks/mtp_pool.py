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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report  # noqa: E402
from mtp import TARGET, geo_mean, pair_cluster_ci  # noqa: E402


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
                mean = geo_mean([x for p in pairs for x in p])
                cell.update(speedup_vs_none=round(mean, 4), speedup_ci95=pair_cluster_ci(pairs),
                            engine_pairs=len(pairs), speedup_per_engine_pair=[round(geo_mean(p), 4) for p in pairs],
                            at_least_target=mean >= TARGET)
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
        for view, batches in rec["results"].items():
            for batch, rows in batches.items():
                for mode, cell in rows.items():
                    print(f"{view} {batch} {mode}: {cell['speedup_vs_none']:.3f}x {cell['speedup_ci95']} over "
                          f"{cell['engine_pairs']} pairs {cell['speedup_per_engine_pair']}")


if __name__ == "__main__":
    main()
