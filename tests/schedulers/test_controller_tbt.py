"""The controller learns from the per-token signal its SLO is written on (P90 / P99 gap between tokens:
the tail factor that tightens its step-time target), and the live path carries it: router gap percentiles -> pool snapshot -> monitor sample -> controller.
Same hand-computed STEADY mix as test_controller_model (one decode instance at 2 req/s: model step time
0.02 / (1 - 2 x 0.13125) s)."""

from __future__ import annotations

import argparse

import pytest
from test_controller_model import STEADY, approx, cfg, ls

from vllm_frontier.schedulers.auto_ratio import controller_from_args
from vllm_frontier.schedulers.controller import RatioController
from vllm_frontier.schedulers.instance_pool import InstancePool
from vllm_frontier.schedulers.monitor import build_sample
from vllm_frontier.schedulers.router import gap_percentiles, parse_args

PRED = 0.02 / (1 - 2 * 0.13125)


def _steady(kind):
    ctrl = RatioController(cfg(feedback_settle_s=0.0, slo_kind=kind))
    ctrl.step(ls(t=1.0, n_p=1, n_d=1, **STEADY))
    return ctrl


def test_tail_factor_is_learnt_from_the_per_token_signal_and_tightens_the_step_target():
    """Mean TPOT on the model (ratio 1: the decode cost stays), P90 gap 2 x it: the tail factor moves
    0.3 x 2 + 0.7 x 1 = 1.3, the step target becomes 0.85 x 0.1 / 1.3, and the decode demand
    lam w / (1 - a / tau) = 2 x 0.13125 / (1 - 0.02 x 1.3 / 0.085) grows with it."""
    ctrl = _steady("tbt-p90")
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=PRED, tbt_p90_s=2 * PRED, tbt_p99_s=3 * PRED, **STEADY))
    assert ctrl._s.decode_scale == 1.0  # the gaps' spread is not read as a wrong cost
    assert ctrl._s.tail == approx(1.3) and ctrl.step_target_s() == approx(0.085 / 1.3)
    need_d = ctrl.demand(ls(t=3.0, n_p=1, n_d=1, **STEADY))[1]
    assert need_d == approx(2 * 0.13125 / (1 - 0.02 * 1.3 / 0.085))
    p99 = _steady("tbt-p99")
    p99.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=PRED, tbt_p90_s=2 * PRED, tbt_p99_s=3 * PRED, **STEADY))
    assert p99._s.tail == approx(0.3 * 3 + 0.7)
    mean = _steady("tpot-mean")
    mean.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=PRED, tbt_p90_s=2 * PRED, **STEADY))
    assert mean._s.tail == 1.0 and mean.step_target_s() == approx(0.085)


def test_tail_factor_is_clamped_and_needs_both_signals():
    ctrl = _steady("tbt-p90")
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=PRED, tbt_p90_s=10 * PRED, **STEADY))  # g clamped to 4
    assert ctrl._s.tail == approx(0.3 * 4 + 0.7)
    ctrl.step(ls(t=3.0, n_p=1, n_d=1, tbt_p90_s=PRED, **STEADY))  # no mean TPOT sample: unchanged
    assert ctrl._s.tail == approx(0.3 * 4 + 0.7)
    ctrl.step(ls(t=4.0, n_p=1, n_d=1, tpot_p90_s=PRED, tbt_p90_s=0.5 * PRED, **STEADY))  # g clamped to 1
    assert ctrl._s.tail == approx(0.3 + 0.7 * (0.3 * 4 + 0.7))


def test_decode_cost_feedback_still_reads_the_mean_tpot_under_a_per_token_slo():
    ctrl = _steady("tbt-p90")
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=2 * PRED, tbt_p90_s=2 * PRED, **STEADY))
    # g = 1 (tail stays 1): the mean TPOT is 2 x the model -> decode scale 2^0.3
    assert ctrl._s.tail == 1.0 and ctrl._s.decode_scale == approx(2 ** 0.3)


@pytest.mark.parametrize("paged, held", [(False, 37500), (True, 31250)])
def test_kv_term_uses_the_average_holding_when_kv_is_paged(paged, held):
    """KV capacity 1000 tokens: need_d = lam w + lam E[held] a / capacity, E[O (L + O)] = 37500 reserved,
    E[O (L + O/2)] = 31250 paged."""
    ctrl = RatioController(cfg(feedback_settle_s=0.0, kv_capacity_tokens=1000, kv_paged=paged))
    ctrl.step(ls(t=1.0, n_p=1, n_d=1, **STEADY))
    need_d = ctrl.demand(ls(t=2.0, n_p=1, n_d=1, **STEADY))[1]
    assert need_d == approx(2 * 0.13125 + 2 * held * 0.02 / 1000)


def test_slo_kind_is_validated():
    with pytest.raises(ValueError, match="slo_kind must be one of tpot-mean, tbt-p90, tbt-p99, got 'p50'"):
        cfg(slo_kind="p50")


def test_gap_percentiles_by_hand():
    # gaps 1, 2, ..., 20 (s): P90 rank ceil(18) = 18 -> 18; P99 rank ceil(19.8) = 20 -> 20
    times = [sum(range(k + 1)) for k in range(21)]
    assert gap_percentiles(times) == (18, 20)
    assert gap_percentiles([0.0, 0.5]) == (0.5, 0.5)
    # three gaps 0.1, 0.3, 0.2: P90 and P99 are both rank 3 -> 0.3
    assert gap_percentiles([0.0, 0.1, 0.4, 0.6]) == (pytest.approx(0.3), pytest.approx(0.3))


def test_pool_and_monitor_carry_the_per_token_samples_within_the_window():
    now = [0.0]
    pool = InstancePool([("http://p:1", "prefill"), ("http://d:1", "decode")], window_s=10.0, clock=lambda: now[0])
    pool.record_tbt(0.05, 0.2)
    now[0] = 5.0
    for k in range(9):
        pool.record_tbt(0.01 * (k + 1), 0.1)
    snap = pool.snapshot()
    assert snap.tbt_p90_s[0] == 0.05 and len(snap.tbt_p90_s) == 10 and snap.tbt_p99_s[0] == 0.2
    s = build_sample(5.0, 5.0, snap, {}, 0, {"http://p:1": "prefill", "http://d:1": "decode"})
    # P90 over the 10 requests (nearest rank 9): of 0.01..0.09 and 0.05 -> 0.08; of the P99s -> 0.1
    assert s.tbt_p90_s == pytest.approx(0.08) and s.tbt_p99_s == 0.1
    now[0] = 12.0  # the first sample (t=0) left the 10 s window
    snap = pool.snapshot()
    assert len(snap.tbt_p90_s) == 9 and 0.2 not in snap.tbt_p99_s


def test_router_flag_reaches_the_controller():
    args = parse_args(["--both", "http://a:1", "--both", "http://b:1", "--auto-ratio", "--slo-ttft", "500",
                       "--slo-tpot", "50", "--slo-kind", "tbt-p90"])
    assert controller_from_args(args).config.slo_kind == "tbt-p90"
    assert controller_from_args(argparse.Namespace(slo_ttft=500, slo_tpot=50)).config.slo_kind == "tpot-mean"
    with pytest.raises(SystemExit):
        parse_args(["--both", "http://a:1", "--slo-kind", "p95"])
