"""Ratio controller decisions on hand-made load scenarios (pure numbers, instant)."""

from __future__ import annotations

import math
import random

import pytest

from vllm_frontier.schedulers.controller import (
    ControllerConfig, LoadSample, RatioController, split_pressure,
)
from vllm_frontier.schedulers.cost_model import GPU_OPT13B_A100 as GPU

# Long prompts with short outputs (summarisation) vs short prompts with long outputs (code).
PREFILL_HEAVY = ((1500, 40),)
DECODE_HEAVY = ((100, 400),)


def cfg(**kw) -> ControllerConfig:
    base = dict(slo_ttft_s=1.0, slo_tpot_s=0.1, prefill=GPU.prefill, decode=GPU.decode,
                kv_capacity_tokens=GPU.kv_capacity_tokens)
    base.update(kw)
    return ControllerConfig(**base)


def sample(t, rate, shape, n_p, n_d, window=2.0, **kw) -> LoadSample:
    """`rate` req/s of requests shaped `shape` ((prompt, output) pairs, cycled) for `window` seconds."""
    n = int(round(rate * window))
    reqs = [shape[i % len(shape)] for i in range(n)]
    return LoadSample(t=t, window_s=window, prompt_lens=tuple(p for p, _ in reqs),
                      completed=tuple(reqs), n_prefill=n_p, n_decode=n_d, **kw)


def drive(ctrl, rate, shape, n_p, n_d, steps, t0=0.0, **kw):
    """Feed `steps` samples, applying each decision; returns (n_p, n_d, decisions)."""
    out = []
    for k in range(steps):
        d = ctrl.step(sample(t0 + 2.0 * (k + 1), rate, shape, n_p, n_d, **kw))
        out.append(d)
        assert d.n_prefill + d.n_decode == n_p + n_d
        n_p, n_d = d.n_prefill, d.n_decode
    return n_p, n_d, out


def test_prefill_heavy_load_moves_instances_to_prefill():
    n_p, n_d, _ = drive(RatioController(cfg()), 20, PREFILL_HEAVY, 4, 4, 10)
    assert n_p > 4, (n_p, n_d)


def test_decode_heavy_load_moves_instances_to_decode():
    # 40 req/s needs more than the 4 decode instances (pressure > spare_to_prefill): instances move.
    n_p, n_d, _ = drive(RatioController(cfg(spare_to_prefill=0.9)), 40, DECODE_HEAVY, 4, 4, 10)
    assert n_d > 4, (n_p, n_d)
    # Plain pressure balancing moves them even at a light load; by default (decode_move_pressure 0.9) a
    # light load keeps the prefill instances (moving them back later would wait for a drain).
    n_p, n_d, _ = drive(RatioController(cfg(decode_move_pressure=None)), 20, DECODE_HEAVY, 4, 4, 10)
    assert n_d > 4, (n_p, n_d)
    n_p, n_d, decisions = drive(RatioController(cfg()), 20, DECODE_HEAVY, 4, 4, 10)
    assert (n_p, n_d) == (4, 4) and any("prefill instances are kept" in d.reason for d in decisions)


def test_spare_instances_stay_on_prefill_at_light_decode_heavy_load():
    """Decode need 3.1 of 4 decode instances (pressure 0.79 <= 0.9): the spare stays on prefill."""
    n_p, n_d, ds = drive(RatioController(cfg(spare_to_prefill=0.9)), 20, DECODE_HEAVY, 4, 4, 10)
    assert (n_p, n_d) == (4, 4) and not any(d.changed for d in ds)
    assert ds[-1].pressure_after <= 0.9


def test_spare_instances_move_to_prefill():
    """From 1:7 at the same light load the controller fills prefill up to the cap: the most prefill
    instances whose split pressure stays <= spare_to_prefill (4 of 8 here), never beyond it."""
    n_p, n_d, ds = drive(RatioController(cfg(spare_to_prefill=0.9)), 20, DECODE_HEAVY, 1, 7, 12)
    assert n_p == 4, (n_p, n_d)
    assert all(d.pressure_after <= 0.9 for d in ds if d.changed)
    assert split_pressure(ds[-1].need_prefill, ds[-1].need_decode, n_p + 1, n_d - 1) > 0.9
    n_p2, _, _ = drive(RatioController(cfg(spare_to_prefill=None)), 20, DECODE_HEAVY, 1, 7, 12)
    assert n_p2 < n_p


def test_mix_shift_reverses_the_ratio():
    ctrl = RatioController(cfg(spare_to_prefill=None, decode_move_pressure=None))
    n_p, n_d, _ = drive(ctrl, 20, PREFILL_HEAVY, 4, 4, 15)
    assert n_p > n_d
    n_p2, n_d2, _ = drive(ctrl, 20, DECODE_HEAVY, n_p, n_d, 30, t0=30.0)
    assert n_d2 > n_p2, (n_p2, n_d2)


def test_prefill_demand_is_convex_in_length_variance():
    """Same mean prompt length, higher variance -> more prefill demand (E[L^2] term)."""
    flat, spread = ((800, 50),), ((100, 50), (1500, 50))
    d1 = RatioController(cfg()).step(sample(2.0, 20, flat, 4, 4))
    d2 = RatioController(cfg()).step(sample(2.0, 20, spread, 4, 4))
    assert d2.need_prefill > d1.need_prefill * 1.05


def test_output_length_predicted_per_prompt_length():
    ctrl = RatioController(cfg())
    ctrl.step(sample(2.0, 10, ((1500, 40), (100, 400)), 4, 4))
    assert ctrl.predict_output(1500) == pytest.approx(40)
    assert ctrl.predict_output(100) == pytest.approx(400)


@pytest.mark.parametrize("n", [2, 3, 8, 33])
@pytest.mark.parametrize("shape", [PREFILL_HEAVY, DECODE_HEAVY], ids=["prefill-heavy", "decode-heavy"])
def test_never_zero_instances_for_a_role(n, shape):
    ctrl = RatioController(cfg(max_step_frac=1.0, confirm=1, min_gain=0.0))
    _, _, ds = drive(ctrl, 1000, shape, n // 2, n - n // 2, 12)  # far beyond capacity
    assert all(d.n_prefill >= 1 and d.n_decode >= 1 for d in ds)


def test_random_scenarios_keep_invariants():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        ctrl = RatioController(cfg(max_step_frac=rng.choice([0.1, 0.5, 1.0]), confirm=rng.randint(1, 3)))
        n_p = rng.randint(1, n - 1)
        for k in range(20):
            shape = tuple((rng.randint(1, 2000), rng.randint(1, 800)) for _ in range(3))
            rate = rng.choice([0.0, 0.5, 5.0, 50.0, 500.0])
            d = ctrl.step(sample(2.0 * (k + 1), rate, shape, n_p, n - n_p,
                                 ttft_p90_s=rng.choice([None, 0.1, 5.0]), tpot_p90_s=rng.choice([None, 0.01, 1.0])))
            assert d.n_prefill + d.n_decode == n
            assert 1 <= d.n_prefill <= n - 1
            assert math.isfinite(d.rate_forecast) and d.need_prefill >= 0 and d.need_decode >= 0
            n_p = d.n_prefill


def test_repairs_a_split_with_an_empty_role():
    d = RatioController(cfg()).step(sample(2.0, 5, PREFILL_HEAVY, 6, 0))
    assert d.changed and d.n_decode >= 1 and d.n_prefill + d.n_decode == 6


def test_single_instance_is_left_alone():
    d = RatioController(cfg()).step(sample(2.0, 5, PREFILL_HEAVY, 1, 0))
    assert not d.changed and (d.n_prefill, d.n_decode) == (1, 0)


def test_hysteresis_no_flapping_under_alternating_noise():
    """Load that alternates every sample between two slightly different mixes near balance: no changes."""
    ctrl = RatioController(cfg())
    n_p, n_d = 4, 4
    # find a balanced split for a 50/50 mix first
    mix = ((1500, 40), (100, 400))
    n_p, n_d, _ = drive(ctrl, 12, mix, n_p, n_d, 20)
    changes = 0
    for k in range(40):
        shape = mix + (((900, 100),) if k % 2 else ((200, 250),))
        d = ctrl.step(sample(100.0 + 2 * k, 12 * (1.05 if k % 2 else 0.95), shape, n_p, n_d))
        changes += d.changed
        n_p, n_d = d.n_prefill, d.n_decode
    assert changes <= 1, changes


def test_confirmation_delays_a_non_urgent_move():
    ctrl = RatioController(cfg(confirm=3, decode_move_pressure=None))
    # light load (pressure < 1): moves only after 3 consistent proposals
    ds = [ctrl.step(sample(2.0 * (k + 1), 2, DECODE_HEAVY, 6, 2)) for k in range(3)]
    assert [d.changed for d in ds] == [False, False, True]
    assert ds[0].pressure_before <= 1.0


def test_urgent_move_skips_confirmation():
    ctrl = RatioController(cfg(confirm=5))
    d = ctrl.step(sample(2.0, 40, PREFILL_HEAVY, 2, 6))
    assert d.pressure_before > 1.0 and d.changed and d.n_prefill > 2


def test_cooldown_blocks_back_to_back_changes():
    def run(cooldown_s, t2):
        ctrl = RatioController(cfg(confirm=1, cooldown_s=cooldown_s, max_step_frac=0.1))
        d1 = ctrl.step(sample(2.0, 40, PREFILL_HEAVY, 2, 14))
        assert d1.changed and d1.n_prefill == 4  # ceil(0.1 * 16) = 2 moved
        return ctrl.step(sample(t2, 40, PREFILL_HEAVY, d1.n_prefill, d1.n_decode))

    # without a cooldown the still-overloaded prefill side gets two more instances at once
    free = run(0.0, 4.0)
    assert free.changed and free.n_prefill == 6 and free.pressure_before > 1.0
    # with it, the same (urgent) move waits until cooldown_s after the last change
    held = run(10.0, 4.0)
    assert not held.changed and held.reason == "cooling down" and held.n_prefill == 4
    assert run(10.0, 11.9).reason == "cooling down"
    later = run(10.0, 12.0)
    assert later.changed and later.n_prefill == 6


def test_step_size_is_bounded():
    ctrl = RatioController(cfg(confirm=1, max_step_frac=0.1))
    d = ctrl.step(sample(2.0, 200, PREFILL_HEAVY, 2, 38))
    assert d.changed and d.n_prefill - 2 == 4  # ceil(0.1 * 40)


def test_forecast_follows_a_ramp_ahead_of_the_level():
    ctrl = RatioController(cfg(horizon_s=10.0))
    for k in range(20):
        ctrl.step(sample(2.0 * (k + 1), 5 + k, PREFILL_HEAVY, 4, 4))
    assert ctrl.forecast_rate() > 24  # last measured 24 req/s, rising 0.5 req/s per second


def test_feedback_raises_prefill_cost_when_ttft_is_missed():
    ctrl = RatioController(cfg())
    base = ctrl.step(sample(2.0, 10, PREFILL_HEAVY, 4, 4)).need_prefill
    for k in range(10):
        d = ctrl.step(sample(4.0 + 2 * k, 10, PREFILL_HEAVY, 4, 4, ttft_p90_s=5.0))
    assert d.need_prefill > base * 1.5
    ctrl_off = RatioController(cfg(feedback=False))
    ctrl_off.step(sample(2.0, 10, PREFILL_HEAVY, 4, 4))
    for k in range(10):
        d_off = ctrl_off.step(sample(4.0 + 2 * k, 10, PREFILL_HEAVY, 4, 4, ttft_p90_s=5.0))
    assert d_off.need_prefill == pytest.approx(base, rel=0.05)


def test_feedback_scale_comes_down_when_the_model_says_overloaded_but_ttft_is_met():
    """A prefill cost scale pushed up (by a transient) until the model predicts overload (infinite P90)
    must come down once the measured TTFT meets the SLO; an infinite prediction gave no ratio before."""
    ctrl = RatioController(cfg(feedback_settle_s=0.0))
    ctrl.step(sample(2.0, 20, PREFILL_HEAVY, 4, 4))
    ctrl._s.prefill_scale = 4.0
    assert math.isinf(ctrl.predicted_ttft_p90(20, 4))
    for k in range(6):
        ctrl.step(sample(4.0 + 2 * k, 20, PREFILL_HEAVY, 4, 4, ttft_p90_s=0.3))
    assert ctrl._s.prefill_scale < 2.5


def test_feedback_ignores_ttft_misses_while_a_backlog_drains():
    """TTFT misses with more than one SLO of queued prefill work per instance are a transient: no raise."""
    tok = 200_000  # ~20 s of prefill work > 4 instances x 1 s
    quiet, plain = RatioController(cfg(feedback_settle_s=0.0)), RatioController(cfg(feedback_settle_s=0.0))
    for c in (quiet, plain):
        c.step(sample(2.0, 10, PREFILL_HEAVY, 4, 4))
    for k in range(5):
        quiet.step(sample(4.0 + 2 * k, 10, PREFILL_HEAVY, 4, 4, ttft_p90_s=5.0, queued_prefill_tokens=tok,
                          queued_prefill_sq_tokens=tok * 1500))
        plain.step(sample(4.0 + 2 * k, 10, PREFILL_HEAVY, 4, 4, ttft_p90_s=5.0))
    assert quiet._s.prefill_scale == 1.0
    assert plain._s.prefill_scale > 1.5


def test_feedback_waits_after_a_change():
    """No feedback within feedback_settle_s of an applied change (instances still draining)."""
    ctrl = RatioController(cfg(confirm=1, feedback_settle_s=10.0))
    d = ctrl.step(sample(2.0, 30, PREFILL_HEAVY, 2, 6))
    assert d.changed
    n_p, n_d = d.n_prefill, d.n_decode
    ctrl.step(sample(4.0, 30, PREFILL_HEAVY, n_p, n_d, ttft_p90_s=5.0, tpot_p90_s=1.0))
    assert (ctrl._s.prefill_scale, ctrl._s.decode_scale) == (1.0, 1.0)
    late = RatioController(cfg(confirm=1, feedback_settle_s=0.0))
    late.step(sample(2.0, 30, PREFILL_HEAVY, 2, 6))
    late.step(sample(4.0, 30, PREFILL_HEAVY, n_p, n_d, ttft_p90_s=5.0, tpot_p90_s=1.0))
    assert late._s.prefill_scale > 1.0 or late._s.decode_scale > 1.0


def test_split_pressure():
    assert split_pressure(2.0, 1.0, 2, 2) == 1.0
    assert split_pressure(1.0, 0.0, 1, 0) == 1.0
    assert split_pressure(1.0, 1.0, 1, 0) == math.inf


@pytest.mark.parametrize("bad", [dict(slo_ttft_s=0), dict(slo_tpot_s=-1), dict(min_per_role=0),
                                 dict(tpot_headroom=1.5), dict(max_step_frac=0), dict(confirm=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        cfg(**bad)


def test_sample_validation():
    with pytest.raises(ValueError):
        sample(1.0, 1, PREFILL_HEAVY, 1, 1, window=0)
    with pytest.raises(ValueError):
        LoadSample(t=0, window_s=1, prompt_lens=(-1,), completed=(), n_prefill=1, n_decode=1)


def test_controller_imports_neither_torch_nor_vllm():
    import subprocess
    import sys
    code = ("import sys, vllm_frontier.schedulers.controller, vllm_frontier.schedulers.simulator;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reverse_cooldown_blocks_an_immediate_reversal():
    ctrl = RatioController(cfg(confirm=1, reverse_cooldown_s=20.0, max_step_frac=0.1, spare_to_prefill=None,
                               decode_move_pressure=None))
    n_p, n_d = 2, 14
    d1 = ctrl.step(sample(2.0, 40, PREFILL_HEAVY, n_p, n_d))
    assert d1.changed and d1.n_prefill > 2
    n_p, n_d = d1.n_prefill, d1.n_decode
    last_up = 2.0
    reversals = []
    for k in range(2, 30):
        t = 2.0 * k
        d = ctrl.step(sample(t, 40, DECODE_HEAVY, n_p, n_d))
        if d.changed and d.n_prefill > n_p and not reversals:
            last_up = t
        if d.changed and d.n_prefill < n_p:
            reversals.append(t)
        n_p, n_d = d.n_prefill, d.n_decode
    assert reversals, "the decode-heavy load must eventually move instances back"
    assert reversals[0] - last_up >= 20.0, (last_up, reversals)


def test_demand_smoothing_damps_a_one_sample_spike():
    raw, smooth = RatioController(cfg()), RatioController(cfg(demand_smoothing=0.3))
    for c in (raw, smooth):
        c.step(sample(2.0, 10, PREFILL_HEAVY, 4, 4))
    r = raw.step(sample(4.0, 10, PREFILL_HEAVY, 4, 4, queued_prefill_tokens=200_000,
                        queued_prefill_sq_tokens=200_000 * 1500))
    s_ = smooth.step(sample(4.0, 10, PREFILL_HEAVY, 4, 4, queued_prefill_tokens=200_000,
                            queued_prefill_sq_tokens=200_000 * 1500))
    assert s_.need_prefill < r.need_prefill


def test_cost_scale_learnt_on_one_mix_is_dropped_when_the_mix_moves():
    """A prefill scale learnt on short prompts (which batch and cost less than the per-request model says)
    underprices long prompts: once E[L] moves by more than rescale_shift, the scale is back to 1 and the
    prefill demand is the model's own; while the mix stays, the scale is kept."""
    ctrl = RatioController(cfg(feedback_settle_s=0.0))
    ctrl.step(sample(2.0, 30, DECODE_HEAVY, 4, 4))
    for k in range(8):  # measured TTFT far below the model's prediction
        ctrl.step(sample(4.0 + 2 * k, 30, DECODE_HEAVY, 4, 4, ttft_p90_s=0.01))
    assert ctrl._s.prefill_scale < 0.8
    kept = ctrl._s.prefill_scale
    ctrl.step(sample(20.0, 30, DECODE_HEAVY, 4, 4))
    assert ctrl._s.prefill_scale == kept  # same mix: the correction still applies
    unscaled = RatioController(cfg(feedback=False))  # same samples, never corrected
    unscaled.step(sample(2.0, 30, DECODE_HEAVY, 4, 4))
    for k in range(9):
        unscaled.step(sample(4.0 + 2 * k, 30, DECODE_HEAVY, 4, 4, ttft_p90_s=0.01))
    d = ctrl.step(sample(22.0, 30, PREFILL_HEAVY, 4, 4))  # 100-token prompts -> 1500
    assert ctrl._s.prefill_scale == 1.0
    assert d.need_prefill == pytest.approx(unscaled.step(sample(22.0, 30, PREFILL_HEAVY, 4, 4)).need_prefill)
    no_reset = RatioController(cfg(feedback_settle_s=0.0, rescale_shift=1e9))
    no_reset.step(sample(2.0, 30, DECODE_HEAVY, 4, 4))
    for k in range(8):
        no_reset.step(sample(4.0 + 2 * k, 30, DECODE_HEAVY, 4, 4, ttft_p90_s=0.01))
    no_reset.step(sample(22.0, 30, PREFILL_HEAVY, 4, 4))
    assert no_reset._s.prefill_scale < 0.8


def test_decode_feedback_scales_the_work_not_the_step_intercept():
    """With a tight TPOT SLO the step intercept is close to the step-time target: a decode scale of 1.6
    applied to it would make the intercept alone miss the target (infinite demand); applied to the
    per-request work it raises the demand in proportion."""
    ctrl = RatioController(cfg(slo_tpot_s=0.035))
    ctrl.step(sample(2.0, 20, DECODE_HEAVY, 4, 4))
    base = ctrl.demand(sample(2.0, 20, DECODE_HEAVY, 4, 4))[1]
    assert GPU.decode.a * 1.6 > 0.85 * 0.035  # the scaled intercept alone would exceed the target
    ctrl._s.decode_scale = 1.6
    need_d = ctrl.demand(sample(2.0, 20, DECODE_HEAVY, 4, 4))[1]
    assert math.isfinite(need_d) and need_d > 1.3 * base
