"""Ratio controller, checked number by number against its documented model (controller.py docstring).

Every expected value here is worked out by hand from the formulas in the module docstring, on round
cost models (not read back from the code): config and sample validation at each bound, Holt's rate
forecast, the prompt/decode moments, the prefill P90 TTFT model and its utilisation cap, the decode
step model and its Little's-law demand, the feedback step and its guards, and the split/hysteresis rules.
"""

from __future__ import annotations

import math

import pytest

from vllm_frontier.schedulers.controller import ControllerConfig, LoadSample, RatioController
from vllm_frontier.schedulers.cost_model import DecodeCost, PrefillCost

K = math.log(10.0)  # P90 of an exponential wait, in units of its mean

# Round cost models: prefill D = 0.01 + 1e-4 L + 1e-7 L^2; decode step = 0.02 + 1e-3 B + 1e-6 ctx.
PRE = PrefillCost(a=0.01, b=1e-4, c=1e-7)
DEC = DecodeCost(a=0.02, b=1e-3, c=1e-6)


def cfg(**kw) -> ControllerConfig:
    base = dict(slo_ttft_s=1.0, slo_tpot_s=0.1, prefill=PRE, decode=DEC)
    base.update(kw)
    return ControllerConfig(**base)


def ls(t=1.0, prompts=(), completed=(), n_p=2, n_d=2, window=1.0, **kw) -> LoadSample:
    return LoadSample(t=t, window_s=window, prompt_lens=tuple(prompts), completed=tuple(completed),
                      n_prefill=n_p, n_decode=n_d, **kw)


def approx(v):
    return pytest.approx(v, rel=1e-9, abs=1e-12)


# ---- ControllerConfig validation: every bound, the value just inside is accepted, its message is exact ----

SLO_MSG = "slo_ttft_s and slo_tpot_s must be > 0 seconds (e.g. --slo-ttft 2000 --slo-tpot 100 in ms)"
SMOOTH_MSG = "smoothing must be in (0, 1] and trend_smoothing in [0, 1]"
NONNEG_MSG = "min_gain, cooldown_s, reverse_cooldown_s, horizon_s must be >= 0 and confirm >= 1"


@pytest.mark.parametrize("bad, msg", [
    (dict(slo_ttft_s=0.0), SLO_MSG),
    (dict(slo_tpot_s=0.0), SLO_MSG),
    (dict(slo_ttft_s=-1.0), SLO_MSG),
    (dict(tpot_headroom=0.0), "tpot_headroom must be in (0, 1], got 0.0"),
    (dict(tpot_headroom=1.01), "tpot_headroom must be in (0, 1], got 1.01"),
    (dict(max_util=0.0), "max_util must be in (0, 1), got 0.0"),
    (dict(max_util=1.0), "max_util must be in (0, 1), got 1.0"),
    (dict(max_util=1.5), "max_util must be in (0, 1), got 1.5"),
    (dict(smoothing=0.0), SMOOTH_MSG),
    (dict(smoothing=1.5), SMOOTH_MSG),
    (dict(trend_smoothing=-0.1), SMOOTH_MSG),
    (dict(trend_smoothing=1.5), SMOOTH_MSG),
    (dict(demand_smoothing=0.0), "demand_smoothing must be in (0, 1], got 0.0"),
    (dict(demand_smoothing=1.5), "demand_smoothing must be in (0, 1], got 1.5"),
    (dict(min_gain=-0.1), NONNEG_MSG),
    (dict(cooldown_s=-1.0), NONNEG_MSG),
    (dict(reverse_cooldown_s=-1.0), NONNEG_MSG),
    (dict(horizon_s=-1.0), NONNEG_MSG),
    (dict(confirm=0), NONNEG_MSG),
    (dict(max_step_frac=0.0), "max_step_frac must be in (0, 1], got 0.0"),
    (dict(max_step_frac=1.5), "max_step_frac must be in (0, 1], got 1.5"),
    (dict(min_per_role=0), "min_per_role must be >= 1: a role in use never gets zero instances"),
    (dict(feedback_settle_s=-1.0), "feedback_settle_s must be >= 0, got -1.0"),
    (dict(mix_smoothing=0.0), "mix_smoothing must be in (0, 1] or None, got 0.0"),
    (dict(mix_smoothing=1.5), "mix_smoothing must be in (0, 1] or None, got 1.5"),
    (dict(rescale_shift=1.0), "rescale_shift must be > 1, got 1.0"),
    (dict(spare_to_prefill=0.0), "spare_to_prefill must be in (0, 1] or None, got 0.0"),
    (dict(spare_to_prefill=1.5), "spare_to_prefill must be in (0, 1] or None, got 1.5"),
    (dict(decode_move_pressure=-0.1), "decode_move_pressure must be a number >= 0 or None, got -0.1"),
    (dict(decode_move_pressure=math.inf), "decode_move_pressure must be a number >= 0 or None, got inf"),
])
def test_config_rejects_each_bound_with_its_message(bad, msg):
    with pytest.raises(ValueError) as e:
        cfg(**bad)
    assert str(e.value) == msg


@pytest.mark.parametrize("edge", [
    dict(slo_ttft_s=1e-6, slo_tpot_s=1e-6), dict(tpot_headroom=1.0), dict(tpot_headroom=1e-6),
    dict(max_util=1e-6), dict(max_util=0.999), dict(smoothing=1.0), dict(smoothing=1e-6),
    dict(trend_smoothing=0.0), dict(trend_smoothing=1.0), dict(demand_smoothing=1.0), dict(demand_smoothing=1e-6),
    dict(min_gain=0.0, cooldown_s=0.0, reverse_cooldown_s=0.0, horizon_s=0.0, confirm=1),
    dict(max_step_frac=1.0), dict(max_step_frac=1e-6), dict(min_per_role=1), dict(feedback_settle_s=0.0),
    dict(mix_smoothing=None), dict(mix_smoothing=1.0), dict(mix_smoothing=1e-6), dict(rescale_shift=1.001),
    dict(spare_to_prefill=None), dict(spare_to_prefill=1.0), dict(spare_to_prefill=1e-6),
])
def test_config_accepts_the_values_at_each_bound(edge):
    c = cfg(**edge)
    for k, v in edge.items():
        assert getattr(c, k) == v


# ---- LoadSample validation ----

@pytest.mark.parametrize("bad, msg", [
    (dict(window=0.0), "window_s must be > 0, got 0.0"),
    (dict(window=-1.0), "window_s must be > 0, got -1.0"),
    (dict(n_p=-1), "n_prefill, n_decode, running_decode must be >= 0"),
    (dict(n_d=-1), "n_prefill, n_decode, running_decode must be >= 0"),
    (dict(running_decode=-1), "n_prefill, n_decode, running_decode must be >= 0"),
    (dict(prompts=(5, -1)), "token counts in prompt_lens / completed must be >= 0"),
    (dict(completed=((-1, 5),)), "token counts in prompt_lens / completed must be >= 0"),
    (dict(completed=((5, -1),)), "token counts in prompt_lens / completed must be >= 0"),
])
def test_sample_rejects_each_bound_with_its_message(bad, msg):
    with pytest.raises(ValueError) as e:
        ls(**bad)
    assert str(e.value) == msg


def test_sample_accepts_zeros_and_a_short_window():
    x = ls(window=0.5, prompts=(0, 0, 7), completed=((0, 0), (0, 3), (3, 0)), n_p=0, n_d=0, running_decode=0)
    assert x.arrivals == 3 and x.window_s == 0.5
    assert ls(n_p=0, n_d=5).n_prefill == 0 and ls(n_p=5, n_d=0).n_decode == 0


# ---- step 1: Holt's forecast of the arrival rate ----

def test_holt_forecast_by_hand():
    """Holt's linear method with a per-second trend: level' = s r + (1 - s)(level + trend dt);
    trend' = ts (level' - level) / dt + (1 - ts) trend, with dt the time since the last sample (the window
    when the clock did not move); forecast = max(0, level, level + trend * horizon)."""
    ctrl = RatioController(cfg(smoothing=0.5, trend_smoothing=0.5, horizon_s=10.0))
    assert ctrl.forecast_rate() == 0.0  # nothing seen yet
    ctrl.step(ls(t=1.0, prompts=[10] * 4))  # 4 req/s: level 4, trend 0
    assert (ctrl._s.level, ctrl._s.trend) == (4.0, 0.0)
    assert ctrl.forecast_rate() == 4.0
    ctrl.step(ls(t=3.0, prompts=[10] * 8))  # 8 req/s, 2 s later: level 0.5*8 + 0.5*4 = 6, trend 0.5*2/2 = 0.5
    assert ctrl._s.level == approx(6.0) and ctrl._s.trend == approx(0.5)
    assert ctrl.forecast_rate() == approx(6.0 + 0.5 * 10.0)
    # Same clock reading (dt falls back to the 2 s window): 4 arrivals in 2 s = 2 req/s.
    ctrl.step(ls(t=3.0, window=2.0, prompts=[10] * 4))
    assert ctrl._s.level == approx(0.5 * 2 + 0.5 * (6.0 + 0.5 * 2.0))  # 4.5
    assert ctrl._s.trend == approx(0.5 * (4.5 - 6.0) / 2.0 + 0.5 * 0.5)  # -0.125
    assert ctrl.forecast_rate() == approx(4.5)  # a falling trend does not lower the forecast below the level


@pytest.mark.parametrize("dt", [1.0, 2.0, 5.0])
def test_holt_tracks_a_linear_ramp_without_lag(dt):
    """Holt's method follows a linear ramp with no steady-state error, whatever the sampling interval:
    the rate rises 0.5 req/s per second, so the level converges to the latest rate and the trend to 0.5."""
    ctrl = RatioController(cfg(horizon_s=10.0))
    for k in range(1, 201):
        rate = 0.5 * k * dt  # k * dt arrivals in the last 2 s
        ctrl.step(ls(t=k * dt, window=2.0, prompts=[10] * round(k * dt)))
    assert ctrl._s.level == pytest.approx(rate, abs=0.05)
    assert ctrl._s.trend == pytest.approx(0.5, abs=0.01)
    assert ctrl.forecast_rate() == pytest.approx(rate + 5.0, abs=0.15)


def test_forecast_never_negative():
    """A steep fall drives Holt's level below zero; the forecast stays at 0."""
    ctrl = RatioController(cfg(smoothing=0.5, trend_smoothing=1.0, horizon_s=10.0))
    ctrl.step(ls(t=1.0, prompts=[10] * 10))  # level 10
    ctrl.step(ls(t=2.0))  # level 5, trend -5
    assert ctrl.forecast_rate() == approx(5.0)
    ctrl.step(ls(t=3.0))  # level 0.5 * (5 - 5) = 0, trend -5
    ctrl.step(ls(t=4.0))  # level 0.5 * (0 - 5) = -2.5, trend -2.5
    assert ctrl._s.level == approx(-2.5) and ctrl._s.trend == approx(-2.5)
    assert ctrl.forecast_rate() == 0.0


# ---- step 3: output lengths learnt per prompt-length bucket ----

def test_output_prediction_by_bucket_and_fallback():
    """Per half-octave bucket: first completion sets it, later ones move it by 10%; the global mean (5%)
    answers for buckets never seen; 0 before any completion."""
    ctrl = RatioController(cfg())
    assert ctrl.predict_output(100) == 0.0
    # 100 and 120 tokens share bucket int(2 log2 L) = 13; 1000 is bucket 19; 10 is bucket 6.
    ctrl.step(ls(completed=((100, 200), (120, 400), (1000, 40))))
    assert ctrl.predict_output(100) == approx(0.1 * 400 + 0.9 * 200)  # 220
    assert ctrl.predict_output(1000) == approx(40.0)
    global_mean = 0.05 * 40 + 0.95 * (0.05 * 400 + 0.95 * 200)  # 201.5
    assert ctrl.predict_output(10) == approx(global_mean)


# ---- steps 1-3: prompt and decode moments of the arrivals (EWMA with mix_smoothing) ----

def test_prompt_and_decode_moments_by_hand():
    ctrl = RatioController(cfg(mix_smoothing=0.5))
    # Completions first teach O(100) = 50 and O(300) = 150; then prompts 100 and 300 arrive.
    ctrl.step(ls(t=1.0, prompts=(100, 300), completed=((100, 50), (300, 150))))
    s = ctrl._s
    assert (s.len_mean, s.len_sq_mean) == (200.0, 50000.0)
    assert s.dec_o == approx(100.0)  # E[O]
    assert s.dec_ctx == approx((50 * (100 + 25) + 150 * (300 + 75)) / 2)  # E[O (L + O/2)] = 31250
    assert s.dec_kv == approx((50 * 150 + 150 * 450) / 2)  # E[O (L + O)] = 37500
    # A 500-token prompt: its bucket (17) is unseen, so O = global mean 0.05 * 150 + 0.95 * 50 = 55.
    ctrl.step(ls(t=2.0, prompts=(500,)))
    assert s.len_mean == approx(0.5 * 500 + 0.5 * 200)
    assert s.len_sq_mean == approx(0.5 * 250000 + 0.5 * 50000)
    assert s.dec_o == approx(0.5 * 55 + 0.5 * 100)
    assert s.dec_ctx == approx(0.5 * 55 * (500 + 27.5) + 0.5 * 31250)
    assert s.dec_kv == approx(0.5 * 55 * 555 + 0.5 * 37500)
    # An interval without arrivals leaves the moments alone.
    ctrl.step(ls(t=3.0))
    assert s.len_mean == approx(350.0) and s.dec_o == approx(77.5)


def test_mix_smoothing_none_falls_back_to_the_rate_smoothing():
    ctrl = RatioController(cfg(mix_smoothing=None, smoothing=0.3))
    ctrl.step(ls(t=1.0, prompts=(200,)))
    ctrl.step(ls(t=2.0, prompts=(500,)))
    assert ctrl._s.len_mean == approx(0.3 * 500 + 0.7 * 200)
    assert ctrl._s.len_sq_mean == approx(0.3 * 250000 + 0.7 * 40000)


# ---- step 2: prefill time, its variance and the P90 TTFT model ----

def test_prefill_time_before_any_sample_is_the_intercept():
    ctrl = RatioController(cfg())
    assert ctrl.predicted_ttft_p90(0.0, 1) == approx(0.01)  # E[L] = E[L^2] = 0: D = a
    # rho = 10 * 0.01 = 0.1, cv^2 = 0
    assert ctrl.predicted_ttft_p90(10.0, 1) == approx(0.01 + K * 0.1 * 0.01 / (2 * 0.9))


def test_predicted_ttft_p90_by_hand():
    """Prompts 100 and 300: E[L] = 200, E[L^2] = 50000, Var = 10^4. D = 0.01 + 0.02 + 0.005 = 0.035 s;
    dD/dL at the mean = 1e-4 + 2e-7 * 200 = 1.4e-4, so cv^2 = 1.4e-4^2 * 10^4 / 0.035^2 = 0.16."""
    ctrl = RatioController(cfg())
    ctrl.step(ls(prompts=(100, 300)))
    assert ctrl.predicted_ttft_p90(0.0, 1) == approx(0.035)
    rho = 10 * 0.035  # 10 req/s on one instance
    assert ctrl.predicted_ttft_p90(10.0, 1) == approx(0.035 + K * rho * 0.035 * 1.16 / (2 * (1 - rho)))
    rho = 10 * 0.035 / 2
    assert ctrl.predicted_ttft_p90(10.0, 2) == approx(0.035 + K * rho * 0.035 * 1.16 / (2 * (1 - rho)))
    assert ctrl.predicted_ttft_p90(10.0, 0) == math.inf
    assert ctrl.predicted_ttft_p90(40.0, 1) == math.inf  # rho = 1.4
    # A cost scale of 2 doubles D and dD/dL alike: cv^2 is unchanged.
    ctrl._s.prefill_scale = 2.0
    rho = 10 * 0.07
    assert ctrl.predicted_ttft_p90(10.0, 1) == approx(0.07 + K * rho * 0.07 * 1.16 / (2 * (1 - rho)))


def test_predicted_ttft_is_infinite_from_full_utilisation_on():
    ctrl = RatioController(cfg(prefill=PrefillCost(a=0.5, b=0.0, c=0.0)))  # D = 0.5 s exactly
    assert ctrl.predicted_ttft_p90(1.0, 1) == approx(0.5 + K * 0.5 * 0.5 / (2 * 0.5))
    assert ctrl.predicted_ttft_p90(2.0, 1) == math.inf  # rho = 1 exactly
    assert ctrl.predicted_ttft_p90(3.0, 1) == math.inf  # rho = 1.5


def test_free_prefill_needs_no_instance():
    """A zero-cost prefill model (D = 0): no prefill demand and a zero TTFT, no division by zero."""
    ctrl = RatioController(cfg(prefill=PrefillCost(a=0.0, b=0.0, c=0.0)))
    ctrl.step(ls(prompts=(100, 300)))
    assert ctrl.predicted_ttft_p90(10.0, 1) == 0.0
    assert ctrl.demand(ls(prompts=(100, 300)))[0] == 0.0


# ---- step 2: the prefill utilisation that meets the SLO, and the prefill demand ----

def _rho(slo, d=0.035, cv2=0.16):
    g = 2 * (slo / d - 1) / (K * (1 + cv2))
    return g / (1 + g)


@pytest.mark.parametrize("slo, rho", [
    (0.1, _rho(0.1)),      # slack 1.86: rho 0.58, uncapped
    (0.05, _rho(0.05)),    # slack 0.43 (below 1): rho 0.24
    (1.0, 0.9),            # slack 27.6: capped at max_util
    (0.036, 0.05),         # slack 0.03: g / (1 + g) = 0.02, floored at 0.05
    (0.03, 0.05),          # the SLO is below D itself: floor
])
def test_prefill_demand_by_hand(slo, rho):
    """2 req/s of prompts 100 and 300 (D = 0.035, cv^2 = 0.16): n_p = lam D / rho."""
    ctrl = RatioController(cfg(slo_ttft_s=slo))
    x = ls(prompts=(100, 300))
    ctrl.step(x)
    need_p = ctrl.demand(x)[0]
    assert need_p == approx(2 * 0.035 / rho)
    if 0.05 < rho < 0.9:  # the utilisation is the largest whose P90 meets the SLO
        assert ctrl.predicted_ttft_p90(2.0, need_p) == approx(slo)


def test_prefill_backlog_demand_by_hand():
    """Queued prefill work adds backlog_s / max(horizon_s, slo_ttft_s) instances, priced with the cost scale."""
    ctrl = RatioController(cfg(horizon_s=10.0, slo_ttft_s=1.0))
    ctrl.step(ls())  # no arrivals: lam = 0
    assert ctrl.demand(ls())[0] == 0.0
    # one queued 1000-token prompt: 0.01 + 0.1 + 0.1 = 0.21 s of work
    assert ctrl.demand(ls(queued_prefill_tokens=1000, queued_prefill_sq_tokens=1e6))[0] == approx(0.021)
    assert ctrl.demand(ls(queued_prefill_tokens=1, queued_prefill_sq_tokens=1))[0] == approx(
        (0.01 + 1e-4 + 1e-7) / 10)
    ctrl._s.prefill_scale = 2.0
    assert ctrl.demand(ls(queued_prefill_tokens=1000, queued_prefill_sq_tokens=1e6))[0] == approx(0.042)
    short = RatioController(cfg(horizon_s=0.5, slo_ttft_s=1.0))  # the SLO is the longer of the two
    short.step(ls())
    assert short.demand(ls(queued_prefill_tokens=1000, queued_prefill_sq_tokens=1e6))[0] == approx(0.21)


# ---- step 3: decode step model and decode demand ----

def test_decode_step_before_any_sample_is_the_intercept():
    ctrl = RatioController(cfg())
    assert ctrl.predicted_step_s(10.0, 1) == approx(0.02)  # no work per request yet
    assert ctrl.demand(ls())[1] == 0.0


def test_predicted_step_by_hand():
    """One sample teaches O = 50 / 150 for prompts 100 / 300: E[O] = 100, E[O (L + O/2)] = 31250, so one
    request adds w = 1e-3 * 100 + 1e-6 * 31250 = 0.13125 step-seconds; t = a / (1 - lam w / n_d)."""
    ctrl = RatioController(cfg())
    ctrl.step(ls(prompts=(100, 300), completed=((100, 50), (300, 150))))
    w = 0.13125
    assert ctrl.predicted_step_s(2.0, 1) == approx(0.02 / (1 - 2 * w))
    assert ctrl.predicted_step_s(2.0, 2) == approx(0.02 / (1 - w))
    assert ctrl.predicted_step_s(2.0, 0) == math.inf
    assert ctrl.predicted_step_s(10.0, 1) == math.inf  # u = 1.3
    ctrl._s.decode_scale = 2.0  # scales the work, not the intercept
    assert ctrl.predicted_step_s(2.0, 2) == approx(0.02 / (1 - 2 * w))


def test_predicted_step_is_infinite_from_full_utilisation_on():
    ctrl = RatioController(cfg(decode=DecodeCost(a=0.02, b=1e-3, c=0.0)))
    ctrl.step(ls(prompts=(100,), completed=((100, 125),)))  # w = 1e-3 * 125 = 0.125 exactly
    assert ctrl.predicted_step_s(4.0, 1) == approx(0.02 / 0.5)
    assert ctrl.predicted_step_s(8.0, 1) == math.inf  # u = 1 exactly
    assert ctrl.predicted_step_s(12.0, 1) == math.inf  # u = 1.5


def test_decode_work_uses_the_small_batch_coefficients():
    """The per-request work is the marginal cost at small batch: the `large` set never enters it."""
    dec = DecodeCost(a=0.02, b=1e-3, c=1e-6, large=(0.5, 0.5, 0.5), large_from=2)
    ctrl = RatioController(cfg(decode=dec))
    ctrl.step(ls(prompts=(100, 300), completed=((100, 50), (300, 150))))
    assert ctrl.predicted_step_s(2.0, 2) == approx(0.02 / (1 - 0.13125))


def test_decode_demand_by_hand():
    """tau = headroom * SLO; n_d = lam w / (1 - a / tau); with a KV capacity also lam w + lam E[O (L + O)] a / cap."""
    x = ls(prompts=(100, 300), completed=((100, 50), (300, 150)))  # lam = 2, w = 0.13125, E[O (L+O)] = 37500
    ctrl = RatioController(cfg(tpot_headroom=0.5, slo_tpot_s=0.1))  # tau = 0.05
    ctrl.step(x)
    assert ctrl.demand(x)[1] == approx(2 * 0.13125 / (1 - 0.02 / 0.05))
    kv = RatioController(cfg(tpot_headroom=0.5, slo_tpot_s=0.1, kv_capacity_tokens=1000))
    kv.step(x)
    assert kv.demand(x)[1] == approx(2 * 0.13125 + 2 * 37500 * 0.02 / 1000)  # KV-bound: 1.7625 > 0.4375
    roomy = RatioController(cfg(tpot_headroom=0.5, slo_tpot_s=0.1, kv_capacity_tokens=10**9))
    roomy.step(x)
    assert roomy.demand(x)[1] == approx(2 * 0.13125 / (1 - 0.02 / 0.05))  # time-bound


def test_decode_demand_is_infinite_when_the_intercept_reaches_the_target():
    slow = cfg(decode=DecodeCost(a=0.25, b=1e-3, c=0.0), tpot_headroom=0.5, slo_tpot_s=0.5)  # a == tau
    ctrl = RatioController(slow)
    assert ctrl.demand(ls())[1] == 0.0  # no work yet: nothing to decode
    x = ls(prompts=(100,), completed=((100, 10),))
    ctrl.step(x)
    assert ctrl.demand(x)[1] == math.inf
    # Predicted outputs of 0 (no completion yet) hold no KV: no KV-bound decode demand either.
    kv = RatioController(cfg(kv_capacity_tokens=1000))
    x = ls(prompts=(100, 300))
    kv.step(x)
    assert kv.demand(x)[1] == 0.0


# ---- small helpers: buckets, mix shift, measured ratio, feedback step ----

def test_bucket_is_half_octaves():
    from vllm_frontier.schedulers.controller import _bucket
    # bucket k holds lengths in [2^(k/2), 2^((k+1)/2)): 1 -> 0, 2 -> 2, 3 -> 3 (2.83..4), 4 -> 4, 100 -> 13
    assert [_bucket(v) for v in (0, 1, 2, 3, 4, 100, 1000)] == [0, 0, 2, 3, 4, 13, 19]


def test_shifted():
    from vllm_frontier.schedulers.controller import _shifted
    assert not _shifted(None, 5.0, 1.5) and not _shifted(0.0, 5.0, 1.5) and not _shifted(5.0, None, 1.5)
    assert not _shifted(100.0, 150.0, 1.5) and not _shifted(150.0, 100.0, 1.5)  # exactly 1.5 x: kept
    assert _shifted(100.0, 151.0, 1.5) and _shifted(151.0, 100.0, 1.5)


def test_measured_ratio():
    from vllm_frontier.schedulers.controller import _measured_ratio
    assert _measured_ratio(3.0, 2.0, 1.0) == 1.5
    assert _measured_ratio(2.0, 0.0, 5.0) is None  # no prediction to compare with
    assert _measured_ratio(1.0, math.inf, 1.0) == 0.5  # model says overloaded, SLO met (at the bound)
    assert _measured_ratio(1.5, math.inf, 1.0) is None  # overloaded and missed: the model may be right


@pytest.mark.parametrize("r, step", [
    (0.8, 1.0), (1.0, 1.0), (0.9, 1.0), (1.25, 1.0),  # dead band, both ends included
    (0.79, 0.79 ** 0.3), (2.0, 2.0 ** 0.3), (1.3, 1.3 ** 0.3), (0.1, 0.1 ** 0.3),
    (math.inf, 1.0), (0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0),
])
def test_ratio_step(r, step):
    from vllm_frontier.schedulers.controller import _ratio_step
    assert _ratio_step(r) == approx(step)


def test_split_pressure_of_an_empty_role_without_demand():
    from vllm_frontier.schedulers.controller import split_pressure
    assert split_pressure(0.0, 1.0, 0, 2) == 0.5
    assert split_pressure(1.0, 0.0, 2, 0) == 0.5


# ---- step 4: feedback, number by number ----

STEADY = dict(prompts=(100, 300), completed=((100, 50), (300, 150)))  # lam 2, D 0.035, cv^2 0.16, w 0.13125


def _steady(**kw):
    """A controller that has seen the STEADY mix at t=1 (no feedback yet)."""
    ctrl = RatioController(cfg(feedback_settle_s=0.0, **kw))
    ctrl.step(ls(t=1.0, n_p=1, n_d=1, **STEADY))
    return ctrl


def test_prefill_feedback_by_hand():
    """The same mix again keeps level 2 and the moments; measured P90 TTFT = 2 x the model's for one prefill
    instance at 2 req/s -> prefill scale 2^0.3, remembered with the E[L] it was learnt on."""
    ctrl = _steady()
    rho = 2 * 0.035
    pred = 0.035 + K * rho * 0.035 * 1.16 / (2 * (1 - rho))
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, ttft_p90_s=2 * pred, **STEADY))
    assert ctrl._s.prefill_scale == approx(2 ** 0.3)
    assert ctrl._s.prefill_scale_len == 200.0
    assert ctrl._s.decode_scale == 1.0
    # A measurement in the dead band (here 1.2 x the now-scaled model) changes neither the scale nor its mix.
    ctrl2 = RatioController(cfg(feedback_settle_s=0.0, mix_smoothing=1.0))
    ctrl2.step(ls(t=1.0, n_p=1, n_d=1, **STEADY))
    ctrl2.step(ls(t=2.0, n_p=1, n_d=1, ttft_p90_s=2 * pred, **STEADY))
    ctrl2.step(ls(t=3.0, n_p=1, n_d=1, prompts=(250,)))  # E[L] 250: 1.25 x, the scale is kept
    assert ctrl2._s.prefill_scale == approx(2 ** 0.3)
    pred2 = ctrl2.predicted_ttft_p90(2.0, 1)
    ctrl2.step(ls(t=4.0, n_p=1, n_d=1, prompts=(250, 250), ttft_p90_s=1.2 * pred2))
    assert ctrl2._s.prefill_scale == approx(2 ** 0.3) and ctrl2._s.prefill_scale_len == 200.0


def test_prefill_feedback_with_no_arrivals_uses_rate_zero():
    ctrl = RatioController(cfg(feedback_settle_s=0.0))
    ctrl.step(ls(t=1.0, n_p=1, n_d=1, ttft_p90_s=0.02))  # model: D = a = 0.01 at rate 0 -> r = 2
    assert ctrl._s.prefill_scale == approx(2 ** 0.3)


def test_feedback_needs_an_instance_of_the_role():
    ctrl = RatioController(cfg(feedback_settle_s=0.0))
    ctrl.step(ls(t=1.0, n_p=0, n_d=2, ttft_p90_s=0.001))  # no prefill instance: nothing to compare
    ctrl2 = RatioController(cfg(feedback_settle_s=0.0))
    ctrl2.step(ls(t=1.0, n_p=2, n_d=0, tpot_p90_s=0.001))
    assert ctrl._s.prefill_scale == 1.0 and ctrl2._s.decode_scale == 1.0


def test_decode_feedback_by_hand():
    """Measured P90 TPOT = 2 x the model's step time with one decode instance at 2 req/s -> decode scale
    2^0.3, remembered with the E[O] it was learnt on; 0.5 x -> 0.5^0.3."""
    ctrl = _steady()
    pred = 0.02 / (1 - 2 * 0.13125)
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=2 * pred, **STEADY))
    assert ctrl._s.decode_scale == approx(2 ** 0.3)
    assert ctrl._s.decode_scale_out == approx(100.0)
    assert ctrl._s.prefill_scale == 1.0
    # dead band: neither the scale nor the mix it was learnt on changes
    pred = ctrl.predicted_step_s(2.0, 1)
    ctrl.step(ls(t=3.0, n_p=1, n_d=1, tpot_p90_s=0.9 * pred, **STEADY))
    assert ctrl._s.decode_scale == approx(2 ** 0.3) and ctrl._s.decode_scale_out == approx(100.0)
    down = _steady()
    down.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=0.5 * 0.02 / (1 - 2 * 0.13125), **STEADY))
    assert down._s.decode_scale == approx(0.5 ** 0.3)


def test_feedback_scales_are_clamped_to_half_and_four():
    ctrl = _steady()
    ctrl._s.prefill_scale, ctrl._s.decode_scale = 3.5, 3.5
    p_pred, d_pred = ctrl.predicted_ttft_p90(2.0, 1), ctrl.predicted_step_s(2.0, 1)
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, ttft_p90_s=2 * p_pred, tpot_p90_s=2 * d_pred, **STEADY))
    assert (ctrl._s.prefill_scale, ctrl._s.decode_scale) == (4.0, 4.0)  # 3.5 * 2^0.3 = 4.3
    low = _steady()
    low._s.prefill_scale, low._s.decode_scale = 0.6, 0.6
    p_pred, d_pred = low.predicted_ttft_p90(2.0, 1), low.predicted_step_s(2.0, 1)
    low.step(ls(t=2.0, n_p=1, n_d=1, ttft_p90_s=0.1 * p_pred, tpot_p90_s=0.1 * d_pred, **STEADY))
    assert (low._s.prefill_scale, low._s.decode_scale) == (0.5, 0.5)  # 0.6 * 0.1^0.3 = 0.3


def test_decode_scale_is_dropped_when_the_output_mix_moves():
    ctrl = RatioController(cfg(feedback_settle_s=0.0, mix_smoothing=1.0))
    ctrl.step(ls(t=1.0, n_p=1, n_d=1, **STEADY))
    ctrl.step(ls(t=2.0, n_p=1, n_d=1, tpot_p90_s=2 * 0.02 / (1 - 2 * 0.13125), **STEADY))
    assert ctrl._s.decode_scale == approx(2 ** 0.3)
    # E[O] (50 + 2 x 150) / 3 = 116.7: 1.17 x, kept. TPOT as the model predicts (3 req/s -> level
    # 0.3 x 3 + 0.7 x 2 = 2.3, w = 2^0.3 (1e-3 E[O] + 1e-6 E[O (L + O/2)])): dead band, the scale keeps the
    # mix it was learnt on.
    w = 2 ** 0.3 * (1e-3 * 350 / 3 + 1e-6 * (50 * 125 + 2 * 150 * 375) / 3)
    pred = 0.02 / (1 - 2.3 * w)
    ctrl.step(ls(t=3.0, n_p=1, n_d=1, prompts=(100, 300, 300), tpot_p90_s=1.1 * pred))
    assert ctrl.predicted_step_s(2.3, 1) == approx(pred)
    assert ctrl._s.decode_scale == approx(2 ** 0.3) and ctrl._s.decode_scale_out == approx(100.0)
    ctrl.step(ls(t=4.0, n_p=1, n_d=1, prompts=(100,)))  # E[O] 50: 2 x, dropped
    assert (ctrl._s.decode_scale, ctrl._s.decode_scale_out) == (1.0, None)


# Prefill D = 1 s whatever the length (a = 1): one queued prompt is 1 s of backlog.
FLAT = PrefillCost(a=1.0, b=0.0, c=0.0)


@pytest.mark.parametrize("slo, n_p, q, raised", [
    (0.4, 2, 0.0, True),    # nothing queued: a miss raises the cost
    (0.4, 2, 1.0, False),   # 1 s queued > 2 x 0.4 s: a transient, no raise
    (0.5, 2, 1.0, True),    # 1 s queued = 2 x 0.5 s (not more): raises
])
def test_ttft_miss_with_a_backlog_does_not_raise_the_cost(slo, n_p, q, raised):
    ctrl = RatioController(cfg(prefill=FLAT, slo_ttft_s=slo, feedback_settle_s=0.0))
    # no arrivals: the model's P90 TTFT is D = 1 s; measured 2 s -> r = 2
    ctrl.step(ls(t=1.0, n_p=n_p, n_d=2, ttft_p90_s=2.0, queued_prefill_tokens=q, queued_prefill_sq_tokens=q))
    assert ctrl._s.prefill_scale == approx(2 ** 0.3 if raised else 1.0)


def test_backlog_guard_only_blocks_a_real_raise():
    """r = 1.5 with a large backlog: still a raise, still ignored; r = 0.5 with it: lowered."""
    ctrl = RatioController(cfg(prefill=FLAT, slo_ttft_s=0.4, feedback_settle_s=0.0))
    ctrl.step(ls(t=1.0, n_p=2, n_d=2, ttft_p90_s=1.5, queued_prefill_tokens=5, queued_prefill_sq_tokens=5))
    assert ctrl._s.prefill_scale == 1.0
    ctrl.step(ls(t=2.0, n_p=2, n_d=2, ttft_p90_s=0.5, queued_prefill_tokens=5, queued_prefill_sq_tokens=5))
    assert ctrl._s.prefill_scale == approx(0.5 ** 0.3)


def test_feedback_settles_for_feedback_settle_s_after_a_change():
    """A change at t=6; settle 10 s: no feedback at t=10 or 15.9, feedback from t=16 on."""
    def run(t):
        ctrl = RatioController(cfg(feedback_settle_s=10.0))
        ctrl._s.last_change_t = 6.0
        ctrl.step(ls(t=t, n_p=1, n_d=1, ttft_p90_s=0.02))  # model 0.01 s: r = 2
        return ctrl._s.prefill_scale
    assert run(10.0) == 1.0 and run(15.9) == 1.0
    assert run(16.0) == approx(2 ** 0.3)


# ---- history and with_config ----

def test_history_keeps_the_last_decisions():
    assert RatioController(cfg()).history == []
    c = RatioController(cfg())
    c.step(ls())
    assert c.history == []  # not asked for
    h = RatioController(cfg(), history=2)
    ds = [h.step(ls(t=float(k))) for k in range(1, 4)]
    assert h.history == ds[1:]


def test_with_config_is_a_fresh_controller_with_the_changes():
    c = RatioController(cfg(min_gain=0.1), history=3)
    c.step(ls(prompts=(100,)))
    d = c.with_config(min_gain=0.3, confirm=4)
    assert d.config == cfg(min_gain=0.3, confirm=4)
    assert c.config.min_gain == 0.1
    assert d.forecast_rate() == 0.0 and d.history == []
    ds = [d.step(ls(t=float(k))) for k in range(1, 6)]
    assert d.history == ds[2:]


# ---- steps 5-6: split and hysteresis, on demands given by hand ----

class Fixed(RatioController):
    """The decision rules alone: demand() answers the (need_p, need_d) pairs given, one per step."""

    def __init__(self, needs, **kw):
        super().__init__(cfg(feedback=False, **kw))
        self.needs = list(needs)

    def demand(self, x):
        return self.needs.pop(0)


def decide(needs, splits, t0=1.0, dt=1.0, **kw):
    """Feed one sample per (n_p, n_d) in `splits` (no arrivals: rate 0), with the demands `needs`."""
    ctrl = Fixed(needs, **kw)
    return [ctrl.step(ls(t=t0 + k * dt, n_p=p, n_d=d)) for k, (p, d) in enumerate(splits)]


def test_demand_smoothing_by_hand():
    d = decide([(2.0, 2.0), (4.0, 6.0)], [(2, 2)] * 2, demand_smoothing=0.5)
    assert (d[1].need_prefill, d[1].need_decode) == (3.0, 4.0)
    # an infinite estimate is not averaged with: the next finite one replaces it
    d = decide([(1.0, math.inf), (1.0, 2.0)], [(2, 2)] * 2, demand_smoothing=0.5)
    assert (d[1].need_prefill, d[1].need_decode) == (1.0, 2.0)


def test_too_few_instances_to_split():
    d = decide([(5.0, 0.0)], [(2, 1)], min_per_role=2)
    assert not d[0].changed and d[0].reason == "only 3 managed instances: need 4 to split"
    d = decide([(5.0, 0.0)], [(1, 0)])
    assert d[0].reason == "only 1 managed instances: need 2 to split"
    d = decide([(3.0, 0.1)], [(2, 2)], min_per_role=2)  # 4 = 2 x 2: splittable, but only 2:2 is allowed
    assert d[0].reason == "current split is best"
    d = decide([(3.0, 0.1)], [(1, 1)])  # two instances split 1:1
    assert d[0].reason == "current split is best" and d[0].pressure_before == 3.0


def test_best_split_stays_within_min_per_role():
    # All prefill: the best split keeps one decode instance (pressure 4/3), never 4:0.
    d = decide([(4.0, 0.0)], [(2, 2)], max_step_frac=1.0)
    assert (d[0].n_prefill, d[0].n_decode) == (3, 1) and d[0].pressure_after == approx(4 / 3)
    d = decide([(4.0, 0.0)], [(3, 1)], max_step_frac=1.0)
    assert not d[0].changed and d[0].reason == "current split is best"
    d = decide([(0.0, 4.0)], [(2, 2)], max_step_frac=1.0)
    assert (d[0].n_prefill, d[0].n_decode) == (1, 3)
    # All decode: 1:3 is the best allowed split (0:4 would have pressure 1 < 4/3, but is not allowed).
    d = decide([(0.0, 4.0)], [(1, 3)], max_step_frac=1.0)
    assert not d[0].changed and d[0].reason == "current split is best"
    d = decide([(0.0, 6.0)], [(2, 4)], max_step_frac=1.0, min_per_role=2)
    assert not d[0].changed and d[0].reason == "current split is best"


def test_ties_keep_the_current_split():
    d = decide([(0.0, 0.0)], [(3, 3)])
    assert not d[0].changed and d[0].reason == "current split is best" and d[0].pressure_before == 0.0


def test_a_move_and_its_reason():
    """need (3, 1) on 2:2: pressure 1.5 (SLO at risk) -> 3:1 at once, pressure max(1, 1) = 1."""
    d = decide([(3.0, 1.0)], [(2, 2)])
    assert (d[0].n_prefill, d[0].n_decode, d[0].changed) == (3, 1, True)
    assert d[0].reason == "pressure 1.50 -> 1.00 (need P 3.00, D 1.00, rate 0.00/s)"
    assert (d[0].pressure_before, d[0].pressure_after) == (1.5, 1.0)


def test_step_size_is_at_most_ceil_frac_n_and_at_least_one():
    d = decide([(3.0, 0.0)], [(1, 3)])  # best 3:1, at most ceil(0.25 * 4) = 1 instance moves
    assert (d[0].n_prefill, d[0].n_decode) == (2, 2)
    d = decide([(7.0, 0.0)], [(1, 7)], max_step_frac=0.01)  # ceil(0.08) = 1
    assert (d[0].n_prefill, d[0].n_decode) == (2, 6)
    d = decide([(7.0, 0.0)], [(1, 7)], max_step_frac=0.5)  # ceil(4) = 4
    assert (d[0].n_prefill, d[0].n_decode) == (5, 3)


REPAIR = "repair: a role had fewer than min_per_role instances"


@pytest.mark.parametrize("split", [(8, 0), (0, 8)])
def test_repair_goes_to_the_best_split_in_one_move(split):
    d = decide([(1.0, 1.0)], [split])  # best 4:4; ceil(0.25 * 8) = 2 would not reach it
    assert (d[0].n_prefill, d[0].n_decode, d[0].changed, d[0].reason) == (4, 4, True, REPAIR)


@pytest.mark.parametrize("split, target", [((1, 7), 3), ((7, 1), 5)])
def test_a_split_at_the_bounds_is_no_repair(split, target):
    d = decide([(1.0, 1.0)], [split], confirm=1)  # 1:7 and 7:1 are allowed splits: step-limited, a normal reason
    assert d[0].n_prefill == target and d[0].reason.startswith("pressure ")


GAIN10 = "gain below 10% (pressure {:.2f} -> {:.2f})"


def test_a_small_gain_is_not_worth_a_move():
    # need (1.8, 1.7) on 2:3: pressure 0.9; 3:2 gives max(0.6, 0.85) = 0.85, 5.6% better: kept
    d = decide([(1.8, 1.7)], [(2, 3)], confirm=1)
    assert not d[0].changed and d[0].reason == GAIN10.format(0.9, 0.85)
    # at pressure exactly 1 the gain is still required: need (2, 0.95) on 2:2 -> 3:1 gives 0.95
    d = decide([(2.0, 0.95)], [(2, 2)], confirm=1)
    assert not d[0].changed and d[0].reason == GAIN10.format(1.0, 0.95)


def test_an_slo_at_risk_takes_any_gain_at_once():
    # need (2.2, 1.05) on 2:2: pressure 1.1 > 1; 3:1 gives 1.05, 4.5% better: applied, unconfirmed
    d = decide([(2.2, 1.05)], [(2, 2)], confirm=2)
    assert d[0].changed and (d[0].n_prefill, d[0].n_decode) == (3, 1)


def test_gain_tolerance_is_one_part_in_a_trillion():
    # min_gain 0: a gain of 1e-13 is float noise (kept), one of 1e-12 is not (acted on)
    d = decide([(2.0, 1.0 - 1e-13)], [(2, 2)], min_gain=0.0)
    assert d[0].reason == "gain below 0% (pressure 1.00 -> 1.00)"
    d = decide([(2.0, 1.0 - 1e-12)], [(2, 2)], min_gain=0.0)
    assert d[0].reason == "waiting for confirmation 1/2"


def test_confirmation_at_pressure_one():
    # need (2, 0.5) on 2:2: pressure exactly 1 (not > 1): a move to 3:1 (0.67) waits for confirmation
    d = decide([(2.0, 0.5)] * 2, [(2, 2)] * 2)
    assert d[0].reason == "waiting for confirmation 1/2" and not d[0].changed
    assert d[1].changed and d[1].n_prefill == 3


UP, DOWN = (1.5, 0.5), (0.5, 1.5)  # on 2:2 (pressure 0.75): 3:1 or 1:3 (pressure 0.5)


def test_confirmation_counts_one_direction_only():
    d = decide([UP, DOWN, DOWN], [(2, 2)] * 3, decode_move_pressure=None)
    assert [x.reason for x in d[:2]] == ["waiting for confirmation 1/2"] * 2
    assert d[2].changed and d[2].n_prefill == 1


@pytest.mark.parametrize("interrupt, split", [
    ((0.0, 0.0), (2, 2)),    # current split best
    ((5.0, 0.0), (1, 0)),    # too few instances
    ((1.8, 1.7), (2, 3)),    # gain too small
])
def test_any_keep_resets_the_confirmation(interrupt, split):
    d = decide([UP, interrupt, UP, UP], [(2, 2), split, (2, 2), (2, 2)], confirm=2)
    assert d[2].reason == "waiting for confirmation 1/2" and not d[2].changed
    assert d[3].changed


def test_an_applied_move_resets_the_confirmation():
    d = decide([UP, UP, UP], [(2, 2), (2, 2), (2, 2)], confirm=2)
    assert d[1].changed
    assert d[2].reason == "waiting for confirmation 1/2"


def test_reversal_cooldown_by_hand():
    """A move down at t=1; reverse_cooldown_s 5: a move up waits until t=6 (exactly 5 s is enough);
    a further move down is no reversal and is not held."""
    needs = [DOWN, UP, UP]
    kw = dict(confirm=1, reverse_cooldown_s=5.0, decode_move_pressure=None)  # DOWN on 2:2 is at pressure 0.75
    d = decide(needs, [(2, 2), (2, 2), (2, 2)], dt=4.0, **kw)
    assert d[0].changed and d[0].n_prefill == 1
    assert d[1].reason == "reversal too soon after the last change" and not d[1].changed
    assert d[2].changed and d[2].n_prefill == 3  # t = 9
    d = decide([DOWN, UP], [(2, 2), (2, 2)], dt=5.0, **kw)
    assert d[1].changed and d[1].n_prefill == 3
    # need (0.5, 3) on 3:3 (pressure 1) -> best 1:5 (0.6), one instance per move (ceil(0.1 * 6) = 1)
    down = (0.5, 3.0)
    d = decide([down, down], [(3, 3), (2, 4)], max_step_frac=0.1, **kw)
    assert d[0].n_prefill == 2 and d[1].changed and d[1].n_prefill == 1


def test_reversal_cooldown_after_a_move_up():
    d = decide([UP, DOWN], [(2, 2), (3, 1)], confirm=1, reverse_cooldown_s=5.0)
    assert d[1].reason == "reversal too soon after the last change"


# ---- moves to decode only above decode_move_pressure (default 0.9) ----

def test_a_move_to_decode_waits_until_the_pressure_exceeds_decode_move_pressure():
    """On 2:2: need (0.5, 1.5) is pressure 0.75 and need (0.5, 1.8) exactly 0.9: both would go to 1:3
    (0.5 and 0.6, gains of 33 %), but neither exceeds 0.9, so the prefill instances are kept. Need
    (0.5, 1.9) is pressure 0.95: 1:3 (max(0.5, 0.633) = 0.633) is applied."""
    d = decide([DOWN, (0.5, 1.8), (0.5, 1.9)], [(2, 2)] * 3, confirm=1)
    assert [x.changed for x in d] == [False, False, True]
    assert d[0].reason == ("pressure 0.75 <= 0.9: prefill instances are kept, a move back would wait for their "
                           "decodes to drain")
    assert d[1].pressure_before == approx(0.9) and d[1].n_prefill == 2
    assert (d[2].n_prefill, d[2].n_decode) == (1, 3) and d[2].pressure_after == approx(1.9 / 3)
    # a threshold of your own, and None: the plain pressure rule moves at 0.75 too
    assert decide([DOWN], [(2, 2)], confirm=1, decode_move_pressure=0.7)[0].n_prefill == 1
    assert decide([DOWN], [(2, 2)], confirm=1, decode_move_pressure=None)[0].n_prefill == 1


def test_decode_move_pressure_leaves_moves_to_prefill_and_repairs_alone():
    # UP on 2:2 (pressure 0.75 <= 0.9) goes to 3:1: moves toward prefill keep the plain rule
    assert decide([UP], [(2, 2)], confirm=1)[0].n_prefill == 3
    # 3:0 lacks a decode instance: repaired to 2:1 although the pressure (0.1 / 3) is far below 0.9
    d = decide([(0.1, 0.0)], [(3, 0)], confirm=1)
    assert d[0].changed and (d[0].n_prefill, d[0].n_decode) == (2, 1)
    assert d[0].reason == "repair: a role had fewer than min_per_role instances"


def test_a_held_move_to_decode_resets_the_confirmation():
    """confirm 2: a move up waits (1/2); a held move down in between clears the count, so the next move up
    waits again."""
    d = decide([UP, DOWN, UP, UP], [(2, 2)] * 4, confirm=2)
    assert d[0].reason == "waiting for confirmation 1/2"
    assert not d[1].changed and d[1].reason.startswith("pressure 0.75 <= 0.9")
    assert d[2].reason == "waiting for confirmation 1/2" and d[3].changed and d[3].n_prefill == 3


# ---- spare capacity to prefill ----

def test_spare_instances_go_to_prefill_up_to_the_cap():
    """need (0.5, 1) on 1:3 (n = 4), cap 0.5: pressures 1:3 0.5, 2:2 0.5, 3:1 1.0. The least is 0.5 (at the
    cap, which counts): the most prefill instances within it is 2:2."""
    d = decide([(0.5, 1.0)], [(1, 3)], confirm=1, spare_to_prefill=0.5)
    assert d[0].changed and (d[0].n_prefill, d[0].n_decode) == (2, 2)
    # a spare move must shift at least round(min_gain * n) instances: with min_gain 0.5 that is 2, here 1
    d = decide([(0.5, 1.0)], [(1, 3)], confirm=1, spare_to_prefill=0.5, min_gain=0.5)
    assert not d[0].changed and d[0].reason == "gain below 50% (pressure 0.50 -> 0.50)"


def test_spare_split_already_in_place():
    # need (1, 0), cap 1: every split is within the cap; 3:1 is the most prefill there is
    d = decide([(1.0, 0.0)], [(3, 1)], spare_to_prefill=1.0)
    assert not d[0].changed and d[0].reason == "current split is best"


def test_spare_gain_is_measured_against_the_cap():
    """need (1.1, 0) on 2:2, cap 0.5: now 0.55, best 3:1 at 0.37. Under the cap every split counts as 0.5,
    so the move gains 0.55 -> 0.5 (9%), below min_gain 10%: kept."""
    d = decide([(1.1, 0.0)], [(2, 2)], confirm=1, spare_to_prefill=0.5)
    assert not d[0].changed and d[0].reason == GAIN10.format(0.55, 1.1 / 3)
