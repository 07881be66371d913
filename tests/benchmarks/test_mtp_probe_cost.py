"""`benchmarks/mtp_probe_cost.py` without an engine: the pin it writes and the summary it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from mtp_probe_cost import fit_line, probe_pin, summarize  # noqa: E402


def test_probe_pin_drafts_at_the_offset_and_the_step_after():
    assert probe_pin(2, 6) == "0,0,1,1,0,0"
    assert probe_pin(0, 3) == "1,1,0"


def test_fit_line_recovers_a_line_and_refuses_a_constant_x():
    a, b = fit_line([0, 100, 200, 400], [5, 25, 45, 85])
    assert a == pytest.approx(5) and b == pytest.approx(0.2)
    assert fit_line([3, 3], [1, 2]) is None and fit_line([1], [1]) is None


def test_summary_per_offset_and_the_extra_time_per_replayed_position():
    samples = []
    for offset, replayed in ((4, 100), (32, 500)):
        for rep in range(3):
            plain = 8.0 + rep   # the machine's speed moves; the extra time over the plain step does not
            samples.append({"repeat": rep, "batch": 16, "offset": offset, "replayed": replayed,
                            "probe_ms": [plain + 0.2 * replayed, 15.0], "plain_median_ms": plain})
    got = summarize(samples)["batch_16"]
    assert got["per_offset"]["4"]["replayed"] == 100 and got["per_offset"]["32"]["runs"] == 3
    assert got["per_offset"]["32"]["probe_first_step_ms"] == pytest.approx(9.0 + 100.0)
    assert got["per_offset"]["4"]["first_step_vs_plain"] == pytest.approx(29.0 / 9.0, abs=0.01)
    assert got["extra_ms_line"]["ms_per_replayed_position"] == pytest.approx(0.2)
    assert got["extra_ms_line"]["ms_at_no_replay"] == pytest.approx(0.0, abs=1e-6)
