"""benchmarks/mtp.py: the statistics of concurrent paired runs (geometric mean over rounds, bootstrap interval
over swapped round pairs) and the split of a machine's CPUs between the two engines."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import mtp  # noqa: E402


def test_geometric_mean_cancels_a_constant_cpu_bias_under_the_swap():
    # the MTP engine 2 % slower than plain; one CPU 30 % faster than the other, the engines swapping every round
    true = 0.98
    ratios = [true * (1.3 if r % 2 == 0 else 1 / 1.3) for r in range(10)]
    assert mtp.geo_mean(ratios) == pytest.approx(true)
    assert sorted(ratios)[len(ratios) // 2] != pytest.approx(true)   # a median would not cancel it


def test_swap_pair_interval_covers_the_pairs_and_needs_three():
    ratios = [1.1, 0.9, 1.05, 0.95, 1.2, 0.85, 1.0, 1.0]
    lo, hi = mtp.swap_pair_ci(ratios)
    pairs = [mtp.geo_mean(ratios[i:i + 2]) for i in range(0, 8, 2)]
    assert min(pairs) <= lo <= mtp.geo_mean(ratios) <= hi <= max(pairs)
    assert mtp.swap_pair_ci(ratios[:4]) is None


def test_concurrent_rows_use_the_geometric_mean_and_report_the_interval():
    def run(rnd, seconds, plain_seconds):
        return {"round": rnd, "batch": 1, "engine": "mtp", "mode": "0", "seconds": seconds, "cpu_seconds": seconds,
                "tokens": 64, "token_ids": [[1, 2]], "step_median_s": seconds / 64, "step_sum_s": seconds,
                "other_steps_s": 0.0, "stats_before": None, "counters_before": None, "counters_after": None,
                "stats_after": {"reached_per_pos": [0], "accepted_per_pos": [0], "k_histogram": [64, 0],
                                "run_reached_per_pos": [[0]], "run_accepted_per_pos": [[0]],
                                "decode_request_steps": 64, "decode_tokens": 64},
                "bracket": [64 / plain_seconds] * 2, "bracket_cpu": [64 / plain_seconds] * 2,
                "bracket_step_s": [plain_seconds / 64] * 2, "concurrent": True}

    rs = [run(r, s, p) for r, (s, p) in enumerate([(1.0, 1.3), (1.3, 1.0), (1.0, 1.2), (1.2, 1.0),
                                                    (1.1, 1.0), (1.0, 1.1)])]
    row = mtp.mode_row(rs, {1: [[1, 2]]})
    assert row["speedup_vs_none"] == pytest.approx(1.0)   # every swapped pair cancels
    assert row["speedup_ci95"] is not None and row["lossless"]
    for r in rs:
        del r["concurrent"]
    assert mtp.mode_row(rs, {1: [[1, 2]]}).get("speedup_ci95") is None   # one after the other: the median


def test_split_cpus_gives_each_engine_an_equal_half():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: concurrent runs need two (mtp.py refuses --concurrent there)")
    a, b = mtp.split_cpus()
    assert len(a) == len(b) >= 1 and not a & b


def test_pair_cluster_interval_widens_with_an_offset_between_engine_pairs():
    # two engine pairs, each tight inside, one 6 % above the other: the interval must cover both pairs' means
    low = [0.94, 0.95, 0.94, 0.95, 0.94, 0.95, 0.94, 0.95]
    high = [1.00, 1.01, 1.00, 1.01, 1.00, 1.01, 1.00, 1.01]
    lo, hi = mtp.pair_cluster_ci([low, high])
    assert lo <= mtp.geo_mean(low) + 1e-4 and hi >= mtp.geo_mean(high) - 1e-4   # (rounded to 4 digits)
    inside = mtp.swap_pair_ci(low + high)   # ignoring the pairs: narrower than the offset between them
    assert inside[1] - inside[0] < hi - lo
    assert mtp.pair_cluster_ci([low]) == mtp.swap_pair_ci(low)   # one engine pair: as before


def test_control_rows_without_scheduler_counters_report_the_timing_only():
    def run(rnd, pair, seconds, plain_seconds):
        return {"round": rnd, "pair": pair, "batch": 1, "engine": "mtp", "mode": "control", "seconds": seconds,
                "cpu_seconds": seconds, "tokens": 64, "token_ids": [[1, 2]], "step_median_s": seconds / 64,
                "step_sum_s": seconds, "other_steps_s": 0.0, "stats_before": None, "stats_after": None,
                "counters_before": None, "counters_after": None, "bracket": [64 / plain_seconds] * 2,
                "bracket_cpu": [64 / plain_seconds] * 2, "bracket_step_s": [plain_seconds / 64] * 2,
                "concurrent": True}

    rs = [run(r, r // 6, s, 1.0) for r, s in enumerate([1.0, 1.02, 1.0, 1.02, 1.0, 1.02,
                                                         1.1, 1.12, 1.1, 1.12, 1.1, 1.12])]
    row = mtp.mode_row(rs, {1: [[1, 2]]})
    assert "acceptance_per_pos" not in row and row["lossless"]
    assert row["speedup_per_engine_pair"] == [pytest.approx(1 / mtp.geo_mean([1.0, 1.02]), abs=1e-4),
                                              pytest.approx(1 / mtp.geo_mean([1.1, 1.12]), abs=1e-4)]
    t = mtp.targets({"batch_1": {"control": row}})["batch_1"]
    assert t["control_vs_plain"] == pytest.approx(row["speedup_vs_none"], abs=1e-4)
    assert t["control_vs_plain_ci95"] == row["speedup_ci95"]


def test_adaptive_over_fixed_k_is_paired_per_round_and_rescored_in_place(tmp_path):
    # pinned k = 0 measured at half speed in odd rounds; adaptive 3 % below it in every round
    k0 = [1.0 if r % 2 == 0 else 0.5 for r in range(4)]
    ad = [0.97 * x for x in k0]
    rows = {"0": {"tok_s": 100.0, "speedup_per_round": k0},
            "adaptive": {"tok_s": 120.0, "speedup_per_round": ad}}   # unpaired tok_s drifted the other way
    mtp.adaptive_vs_fixed(rows)
    assert rows["adaptive"]["speedup_vs_k0"] == pytest.approx(1.2)
    assert rows["adaptive"]["speedup_vs_k0_paired"] == pytest.approx(0.97)
    path = tmp_path / "r.json"
    doc = {"meta": {}, "sections": {"v3": {"results": {"batch_1": {
        "0": {"tok_s": 100.0, "speedup_per_round": k0}, "adaptive": {"tok_s": 120.0, "speedup_per_round": ad}}}}}}
    path.write_text(json.dumps(doc))
    mtp.rescore(str(path), "python benchmarks/mtp.py --rescore r.json")
    got = json.loads(path.read_text())
    assert got["sections"]["v3"]["results"]["batch_1"]["adaptive"]["speedup_vs_k0_paired"] == pytest.approx(0.97)
    assert got["meta"]["rescored_by"].endswith("--rescore r.json")


def _run(pairs_by_cell: dict, rounds: int) -> dict:
    """A minimal `mtp.py` result: per (view, batch, mode) the rounds of each engine pair in order."""
    sections = {}
    for (view, batch, mode), pairs in pairs_by_cell.items():
        rows = sections.setdefault(view, {"status": "ok", "results": {}})["results"].setdefault(batch, {"none": {}})
        rows[mode] = {"speedup_per_round": [x for p in pairs for x in p], "lossless": True,
                      "speedup_vs_none": mtp.geo_mean([x for p in pairs for x in p]),
                      "speedup_per_engine_pair": [mtp.geo_mean(p) for p in pairs] if len(pairs) > 1 else None}
    return {"meta": {"rounds": rounds, "commit": "c"}, "sections": sections}


def test_pooling_runs_counts_every_pair_of_every_run():
    import mtp_pool

    a = [[0.96, 0.98, 0.97, 0.95], [1.0, 0.99, 1.01, 0.98]]
    b = [[0.93, 0.95, 0.96, 0.94], [0.99, 1.0, 0.98, 0.97], [0.97, 0.97, 0.96, 0.98]]
    pooled = mtp_pool.pool([_run({("v3", "batch_1", "0"): a}, 4), _run({("v3", "batch_1", "0"): b}, 4)])
    cell = pooled["v3"]["batch_1"]["0"]
    every = [x for p in a + b for x in p]
    assert cell["engine_pairs"] == 5 and cell["speedup_vs_none"] == pytest.approx(mtp.geo_mean(every), abs=1e-4)
    assert cell["speedup_per_engine_pair"] == [round(mtp.geo_mean(p), 4) for p in a + b]
    lo, hi = cell["speedup_ci95"]
    assert lo < cell["speedup_vs_none"] < hi and cell["at_least_target"] == (mtp.geo_mean(every) >= mtp.TARGET)
    # one run alone gives its own means back
    assert mtp_pool.pool([_run({("v3", "batch_1", "0"): a}, 4)])["v3"]["batch_1"]["0"]["engine_pairs"] == 2


def test_pooling_refuses_rounds_that_do_not_split_into_the_reported_pairs():
    import mtp_pool

    run = _run({("v3", "batch_1", "0"): [[0.9, 0.95], [1.0, 1.05]]}, 2)
    run["meta"]["rounds"] = 1   # four "pairs" of one round against two reported pair means
    with pytest.raises(ValueError, match="do not split"):
        mtp_pool.pool([run])


def test_pooled_median_round_ratio_ignores_one_stalled_round():
    import mtp_pool

    pairs = [[1.0, 0.99, 1.01, 0.35], [1.0, 0.98, 1.02, 1.0]]   # one round where the MTP engine stalled
    cell = mtp_pool.pool([_run({("v3", "batch_16", "0"): pairs}, 4)])["v3"]["batch_16"]["0"]
    assert cell["speedup_vs_none"] < 0.9 and cell["median_round_ratio"] == pytest.approx(1.0)


def test_stalls_are_counted_per_engine_and_placed_where_the_time_went():
    import mtp_pool

    run = {"meta": {"rounds": 4}, "sections": {"v3": {"status": "ok", "results": {"batch_16": {
        # plain engine: one run 1 s over its median, all of it in the prompt step
        "none": {"seconds": [0.5, 0.52, 1.5, 0.51], "other_steps_s": [0.03, 0.03, 1.03, 0.03],
                 "decode_steps_s": [0.45, 0.46, 0.45, 0.45]},
        # MTP engine: one stall in the decode steps, one between steps, one run only 0.3 s slow (not a stall)
        "0": {"seconds": [0.5, 1.5, 1.45, 0.8, 0.5, 0.5, 0.51], "other_steps_s": [0.03] * 7,
              "decode_steps_s": [0.45, 1.45, 0.46, 0.75, 0.45, 0.45, 0.46]},
    }}}}}
    got = mtp_pool.stalls([run, run])["v3"]["batch_16"]
    assert got["none"] == {"runs": 8, "stalled": 2, "in_other_steps": 2, "in_decode_steps": 0, "between_steps": 0}
    assert got["0"] == {"runs": 14, "stalled": 4, "in_other_steps": 0, "in_decode_steps": 2, "between_steps": 2}


def test_worker_round_trips_per_option():
    """`--worker-rpc`: the MTP engine's counters (mtp), the same round trip to the plain engine (both), none."""
    class LLM:
        def __init__(self):
            self.calls = []

        def collective_rpc(self, method):
            self.calls.append(method)
            return [{"skipped_steps": 3} if method == "frontier_mtp_counters" else None]

    got = {}
    for option in ("mtp", "both", "off"):
        plain, spec = LLM(), LLM()
        got[option] = (mtp.rpc_of(plain, False, option)(), mtp.rpc_of(spec, True, option)(), plain.calls, spec.calls)
    assert got["mtp"] == (None, {"skipped_steps": 3}, [], ["frontier_mtp_counters"])
    assert got["both"] == (None, {"skipped_steps": 3}, ["check_health"], ["frontier_mtp_counters"])
    assert got["off"] == (None, None, [], [])
