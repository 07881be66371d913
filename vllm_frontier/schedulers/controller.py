"""DOPD-style prefill:decode ratio controller: pure decisions on numbers.

One `RatioController` object is fed a `LoadSample` every interval (by the live router's monitor or by
the simulator) and answers with a `RatioDecision`: how many of the managed instances should prefill and
how many decode. No I/O, no clock, no torch, no vLLM: the same object runs live and in simulation.

How it decides (the DOPD paper's formula was not available to us, see docs/papers.md section 2; this
is our design in its spirit):

1. **Forecast** the arrival rate with Holt's linear smoothing over the per-interval rates and look
   `horizon_s` ahead (proactive: a rising load is provisioned before it arrives); smooth ``E[L]``,
   ``E[L^2]`` (prompt) and the decode moments of step 3 with an EWMA.
2. **Prefill demand** (instances, real-valued). Expected prefill time per request is convex in length,
   ``D = a + b E[L] + c E[L^2]`` (so length variance raises it). A prefill instance is a queue with
   utilisation ``rho = lam D / n``; an M/G/1-style estimate of the P90 TTFT is
   ``D + k * rho D (1 + cv^2) / (2 (1 - rho))`` with ``k = ln 10`` (P90 of an exponential wait). The
   largest ``rho`` that keeps this under the TTFT SLO gives ``n_p = lam D / rho``. Queued prefill work
   adds ``backlog_s / max(horizon_s, slo_ttft_s)`` instances.
3. **Decode demand.** Output lengths are predicted per prompt-length bucket from completed requests
   (length-aware: a shift from long-prompt/short-output to short-prompt/long-output work is seen at
   arrival, not when the outputs finish). A step of batch ``B`` costs ``a + b B + c ctx``; one request
   adds ``w = b O + c O (L + O / 2)`` step-seconds over its life. By Little's law a step of ``n_d``
   instances takes ``t = a + lam w t / n_d``; keeping ``t`` under ``tau = tpot_headroom * SLO`` needs
   ``n_d >= lam w / (1 - a / tau)``, and KV memory ``n_d >= lam w + lam E[O (L + O)] a / kv_capacity``.
4. **Feedback.** The cost model predicts the mean decode step, so the decode cost is corrected with the
   P90 over requests of their mean TPOT. Under a per-token SLO (`slo_kind` ``tbt-p90`` / ``tbt-p99``: a
   request's own P90 / P99 gap between tokens, which the router measures from every streamed token) the
   tail of the gaps is learnt separately: the tail factor ``g`` = measured P90 (over requests) of the
   per-token metric / measured P90 of the mean TPOT (EWMA, 1..4), and the step-time target becomes
   ``tau = tpot_headroom * SLO / g`` (comparing a gap percentile with the mean-step model would read the
   gaps' spread as a wrong cost and inflate the decode demand). When the measured P90 TTFT (TPOT) exceeds the model's prediction for the current
   split by more than 25% (or falls 20% below it), the prefill (decode) cost is scaled by
   ``ratio ** 0.3`` (clamped to 0.5..4 x; for decode, the per-request work, not the step intercept), so a
   wrong cost model is corrected by the measurements.
   Not within `feedback_settle_s` of a change, and TTFT misses while more than one SLO of prefill work
   per instance is queued do not raise the prefill cost (both are transients: re-roled instances still
   draining, a mix shift); a model that predicts overload while the SLO is met is scaled down. A scale
   is dropped when the mix it was learnt on moves by more than `rescale_shift` (E[L] or E[O]): short
   prompts batch and share the step intercept, so a scale learnt on them underprices long ones.
5. **Split** the N managed instances: ``n_p`` in ``[min_per_role, N - min_per_role]`` (with per-role GPU
   counts `prefill_gpus` / `decode_gpus`, the G GPUs: ``n_d = (G - n_p g_p) / g_d`` whole instances) minimising the
   pressure ``max(need_p / n_p, need_d / n_d)``. When that pressure is at most `spare_to_prefill`, the
   spare instances go to prefill (the most prefill instances with pressure <= the cap): a decode ->
   prefill move only takes effect once the instance has drained its decodes, prefill -> decode at once.
6. **Hysteresis.** Change only if the new split lowers the pressure by at least `min_gain` (relative),
   the same direction was proposed `confirm` times in a row (skipped, and any gain accepted, when the
   pressure exceeds 1, i.e. an SLO is at risk), a move from prefill to decode only when the pressure
   exceeds `decode_move_pressure` (undoing it waits for the moved instances' decodes to drain),
   `cooldown_s` passed since the last change (`reverse_cooldown_s` for a reversal),
   and move at most ``ceil(max_step_frac * N)`` instances at once. Never zero instances for a role (both
   are in use in a disaggregated deployment): `min_per_role` >= 1 is enforced, and a split that violates
   it (e.g. after failures) is repaired at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from vllm_frontier.schedulers.cost_model import DecodeCost, PrefillCost

__all__ = ["ControllerConfig", "LoadSample", "RatioDecision", "RatioController", "split_pressure", "SLO_KINDS"]

# Decode-side SLO kinds: a request's mean TPOT, or the P90 / P99 of its own gaps between tokens.
SLO_KINDS = ("tpot-mean", "tbt-p90", "tbt-p99")

_P90_EXP = math.log(10.0)  # P90 of an exponential distribution, in units of its mean


@dataclass(frozen=True)
class ControllerConfig:
    """Controller settings. Times in seconds; costs from `cost_model`.

    Attributes:
        slo_ttft_s / slo_tpot_s: the SLOs (P90 targets).
        prefill / decode: cost models of one instance.
        kv_capacity_tokens: KV tokens one decode instance holds (None: not a constraint).
        tpot_headroom: target decode step time as a fraction of the TPOT SLO (batch jitter margin).
        max_util: utilisation cap for a prefill instance.
        horizon_s: forecast look-ahead (about the time a role change takes to take effect).
        smoothing / trend_smoothing: Holt's level and trend factors for the arrival rate (0..1].
        mix_smoothing: EWMA factor of the prompt-length and decode moments per interval (None: `smoothing`);
            faster than the rate's, so a mix shift is priced within an interval or two.
        demand_smoothing: EWMA factor applied to the demand estimates (1 = none).
        min_gain: relative pressure drop a new split must bring to be applied.
        confirm: consecutive decisions proposing a move (same direction) before it is applied.
        cooldown_s: minimum time between two applied changes.
        reverse_cooldown_s: minimum time before a change in the opposite direction of the last one.
        max_step_frac: at most ``max(1, ceil(max_step_frac * N))`` instances change role per decision.
        min_per_role: instances each role always keeps (>= 1).
        feedback: scale costs by measured/predicted P90 when the SLO signal disagrees with the model.
        feedback_settle_s: no feedback for this long after an applied change (re-roled instances are
            still draining, so the measured SLOs describe a transient, not a wrong cost model).
        rescale_shift: a feedback cost scale is dropped (back to 1) when the mix it was learnt on moves by
            more than this factor: E[L] for the prefill scale, the predicted E[O] for the decode scale.
        slo_kind: what `slo_tpot_s` bounds: ``tpot-mean`` (a request's mean time per output token), ``tbt-p90``
            / ``tbt-p99`` (the P90 / P99 of a request's gaps between tokens); the decode feedback compares
            the matching measurement (`LoadSample.tpot_p90_s`, `tbt_p90_s`, `tbt_p99_s`) with the model.
        kv_paged: KV is paged (vLLM): a request holds ``L + O/2`` tokens on average over its life, not a
            reservation of ``L + O`` (the KV term of the decode demand uses ``E[O (L + O/2)]``).
        tail_smoothing: EWMA factor of the tail factor ``g`` (per-token SLO kinds).
        spare_to_prefill: when the least pressure of any split is at most this value, the spare
            instances go to prefill: the split with the most prefill instances whose pressure stays at
            or below it (None, the default: plain pressure balancing, so the split follows the mix at any
            load; 0.9 was tried in the simulator, see benchmarks/dopd.py --spare-to-prefill). Reason: decode -> prefill moves take effect
            only after the moved instance drains its decodes (many seconds of long outputs), prefill ->
            decode moves at once, so slack is cheapest to keep on the prefill side.
        prefill_gpus / decode_gpus: GPUs one instance of the role uses (its tensor-parallel size; `prefill`
            and `decode` are the costs of one instance of that role at that size). Re-roling keeps the GPUs:
            with 2 and 1, one prefill instance becomes two decode instances and two decode instances one
            prefill instance; a split is p prefill instances and (GPUs - 2 p) decode instances, and
            `RatioDecision.n_prefill + n_decode` can differ from the sample's total.
        decode_move_pressure: move instances from prefill to decode only when the current split's pressure
            exceeds this (None: any pressure, the plain rule). Below it, such a move trades prefill headroom
            for decode headroom that is not needed yet, and undoing it when the mix turns back costs a
            drain: the moved instances serve prompts only in chunks beside their decodes until those finish
            (18-31 s on the shifting mix's long outputs), while a move to decode takes effect at once and
            can wait until it is needed. 0.9, not 1: a decode demand the model underprices shows up in the
            measured TPOT/TBT only when the requests finish (a code output decodes for ~16 s), too late for
            the feedback, so the move is made with a margin. Chosen among 0.8 / 0.9 / 1.0 on the shifting
            workload of `benchmarks/dopd.py` (the traces the README's table uses: fitted to them). Moves
            toward prefill keep the pressure rule.
    """

    slo_ttft_s: float
    slo_tpot_s: float
    prefill: PrefillCost
    decode: DecodeCost
    kv_capacity_tokens: int | None = None
    tpot_headroom: float = 0.85
    max_util: float = 0.9
    horizon_s: float = 10.0
    smoothing: float = 0.3
    trend_smoothing: float = 0.1
    demand_smoothing: float = 1.0
    min_gain: float = 0.1
    confirm: int = 2
    cooldown_s: float = 0.0
    reverse_cooldown_s: float = 0.0
    max_step_frac: float = 0.25
    min_per_role: int = 1
    feedback: bool = True
    feedback_settle_s: float = 10.0
    spare_to_prefill: float | None = None
    mix_smoothing: float | None = 0.6
    rescale_shift: float = 1.5
    slo_kind: str = "tpot-mean"
    kv_paged: bool = False
    tail_smoothing: float = 0.3
    decode_move_pressure: float | None = 0.9
    prefill_gpus: int = 1
    decode_gpus: int = 1

    def __post_init__(self) -> None:
        if not (self.slo_ttft_s > 0 and self.slo_tpot_s > 0):
            raise ValueError("slo_ttft_s and slo_tpot_s must be > 0 seconds (e.g. --slo-ttft 2000 --slo-tpot 100 in ms)")
        if not 0 < self.tpot_headroom <= 1:
            raise ValueError(f"tpot_headroom must be in (0, 1], got {self.tpot_headroom}")
        if not 0 < self.max_util < 1:
            raise ValueError(f"max_util must be in (0, 1), got {self.max_util}")
        if not (0 < self.smoothing <= 1 and 0 <= self.trend_smoothing <= 1):
            raise ValueError("smoothing must be in (0, 1] and trend_smoothing in [0, 1]")
        if not 0 < self.demand_smoothing <= 1:
            raise ValueError(f"demand_smoothing must be in (0, 1], got {self.demand_smoothing}")
        if min(self.min_gain, self.cooldown_s, self.reverse_cooldown_s, self.horizon_s) < 0 or self.confirm < 1:
            raise ValueError("min_gain, cooldown_s, reverse_cooldown_s, horizon_s must be >= 0 and confirm >= 1")
        if not 0 < self.max_step_frac <= 1:
            raise ValueError(f"max_step_frac must be in (0, 1], got {self.max_step_frac}")
        if self.min_per_role < 1:
            raise ValueError("min_per_role must be >= 1: a role in use never gets zero instances")
        if self.feedback_settle_s < 0:
            raise ValueError(f"feedback_settle_s must be >= 0, got {self.feedback_settle_s}")
        if self.mix_smoothing is not None and not 0 < self.mix_smoothing <= 1:
            raise ValueError(f"mix_smoothing must be in (0, 1] or None, got {self.mix_smoothing}")
        if not self.rescale_shift > 1:
            raise ValueError(f"rescale_shift must be > 1, got {self.rescale_shift}")
        if not 0 < self.tail_smoothing <= 1:
            raise ValueError(f"tail_smoothing must be in (0, 1], got {self.tail_smoothing}")
        if self.slo_kind not in SLO_KINDS:
            raise ValueError(f"slo_kind must be one of {', '.join(SLO_KINDS)}, got {self.slo_kind!r}")
        if not (isinstance(self.prefill_gpus, int) and isinstance(self.decode_gpus, int)
                and self.prefill_gpus >= 1 and self.decode_gpus >= 1):
            raise ValueError(f"prefill_gpus and decode_gpus must be integers >= 1 (GPUs per instance of the role), "
                             f"got {self.prefill_gpus} and {self.decode_gpus}")
        if self.decode_move_pressure is not None and not (0 <= self.decode_move_pressure < math.inf):
            raise ValueError(f"decode_move_pressure must be a number >= 0 or None, got {self.decode_move_pressure}")
        if self.spare_to_prefill is not None and not 0 < self.spare_to_prefill <= 1:
            raise ValueError(f"spare_to_prefill must be in (0, 1] or None, got {self.spare_to_prefill}")


@dataclass(frozen=True)
class LoadSample:
    """What was measured over the last `window_s` seconds, at time `t` (seconds, any monotonic clock).

    Attributes:
        prompt_lens: prompt lengths (tokens) of the requests that arrived in the window.
        completed: ``(prompt_len, output_len)`` of the requests that finished in the window (they teach
            the controller how long outputs are for a given prompt length).
        n_prefill / n_decode: current number of managed instances in each role.
        queued_prefill_tokens / queued_prefill_sq_tokens: sum of L and of L^2 over prompts waiting for
            prefill (router or engine queues).
        running_decode: requests currently decoding (all decode instances); informational.
        ttft_p90_s / tpot_p90_s: measured P90 over the window (None: no samples).
        tbt_p90_s / tbt_p99_s: P90 over the window's requests of each request's own P90 / P99 gap between
            tokens (None: no samples, e.g. no streamed request).
    """

    t: float
    window_s: float
    prompt_lens: tuple[int, ...]
    completed: tuple[tuple[int, int], ...]
    n_prefill: int
    n_decode: int
    queued_prefill_tokens: float = 0.0
    queued_prefill_sq_tokens: float = 0.0
    running_decode: int = 0
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    tbt_p90_s: float | None = None
    tbt_p99_s: float | None = None

    def decode_signal(self, kind: str) -> float | None:
        """The measured decode latency SLO kind `kind` is written on (None without a sample of it)."""
        if kind == "tpot-mean":
            return self.tpot_p90_s
        return self.tbt_p90_s if kind == "tbt-p90" else self.tbt_p99_s

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.n_prefill < 0 or self.n_decode < 0 or self.running_decode < 0:
            raise ValueError("n_prefill, n_decode, running_decode must be >= 0")
        if any(x < 0 for x in self.prompt_lens) or any(p < 0 or o < 0 for p, o in self.completed):
            raise ValueError("token counts in prompt_lens / completed must be >= 0")

    @property
    def arrivals(self) -> int:
        return len(self.prompt_lens)


@dataclass(frozen=True)
class RatioDecision:
    """The controller's answer. `n_prefill + n_decode` equals the sample's total (its GPUs, with per-role
    `ControllerConfig.prefill_gpus` / `decode_gpus`); `changed` says whether it
    differs from the sample's split. `need_*` are the demand estimates (instances, real-valued);
    `pressure_*` the split pressure ``max(need_p / n_p, need_d / n_d)`` now and after the decision."""

    n_prefill: int
    n_decode: int
    changed: bool
    reason: str
    need_prefill: float
    need_decode: float
    pressure_before: float
    pressure_after: float
    rate_forecast: float


def split_pressure(need_p: float, need_d: float, n_p: int, n_d: int) -> float:
    """``max(need_p / n_p, need_d / n_d)``; infinite when a role with demand has no instance."""
    def one(need: float, n: int) -> float:
        if n <= 0:
            return math.inf if need > 0 else 0.0
        return need / n
    return max(one(need_p, n_p), one(need_d, n_d))


@dataclass
class _State:
    level: float | None = None
    trend: float = 0.0
    last_t: float | None = None
    len_mean: float | None = None
    len_sq_mean: float | None = None
    out_by_bucket: dict[int, float] = field(default_factory=dict)  # prompt-length bucket -> E[O]
    out_mean: float | None = None  # fallback for unseen buckets
    # per-request decode moments of arrivals, with predicted outputs O^: E[O^], E[O^ (L + O^/2)], E[O^ (L + O^)]
    dec_o: float | None = None
    dec_ctx: float | None = None
    dec_kv: float | None = None
    prefill_scale: float = 1.0
    decode_scale: float = 1.0
    # the mix a cost scale was learnt on: E[L] for the prefill scale, E[O^] for the decode scale
    prefill_scale_len: float | None = None
    decode_scale_out: float | None = None
    tail: float = 1.0  # per-token SLO metric / mean TPOT (P90s over requests), learnt
    need_p: float | None = None
    need_d: float | None = None
    pending_dir: int = 0
    pending_count: int = 0
    last_change_t: float | None = None
    last_dir: int = 0
    history: list[RatioDecision] = field(default_factory=list)


class RatioController:
    """Decides the prefill:decode split of the managed instances; call `step` once per interval."""

    def __init__(self, config: ControllerConfig, *, history: int = 0) -> None:
        self.config = config
        self._s = _State()
        self._keep = history

    @property
    def history(self) -> list[RatioDecision]:
        """The last `history` decisions (empty unless asked for in the constructor)."""
        return list(self._s.history)

    # ---- estimation -----------------------------------------------------------------------------
    def _update(self, x: LoadSample) -> None:
        cfg, s = self.config, self._s
        rate = x.arrivals / x.window_s
        if s.level is None:
            s.level = rate
        else:
            prev = s.level
            dt = (x.t - s.last_t) if s.last_t is not None and x.t > s.last_t else x.window_s
            # the trend is per second (the forecast looks horizon_s seconds ahead), so the level one interval
            # on is level + trend * dt
            s.level = cfg.smoothing * rate + (1 - cfg.smoothing) * (s.level + s.trend * dt)
            s.trend = cfg.trend_smoothing * (s.level - prev) / dt + (1 - cfg.trend_smoothing) * s.trend
        s.last_t = x.t
        a = cfg.mix_smoothing if cfg.mix_smoothing is not None else cfg.smoothing
        for p_len, o_len in x.completed:
            k = _bucket(p_len)
            prev_o = s.out_by_bucket.get(k)
            s.out_by_bucket[k] = o_len if prev_o is None else 0.1 * o_len + 0.9 * prev_o
            s.out_mean = o_len if s.out_mean is None else 0.05 * o_len + 0.95 * s.out_mean
        if x.prompt_lens:
            n = len(x.prompt_lens)
            m = sum(x.prompt_lens) / n
            m2 = sum(v * v for v in x.prompt_lens) / n
            s.len_mean = m if s.len_mean is None else a * m + (1 - a) * s.len_mean
            s.len_sq_mean = m2 if s.len_sq_mean is None else a * m2 + (1 - a) * s.len_sq_mean
            outs = [self.predict_output(v) for v in x.prompt_lens]
            do = sum(outs) / n
            dc = sum(o * (v + o / 2) for o, v in zip(outs, x.prompt_lens)) / n
            dk = sum(o * (v + o) for o, v in zip(outs, x.prompt_lens)) / n
            s.dec_o = do if s.dec_o is None else a * do + (1 - a) * s.dec_o
            s.dec_ctx = dc if s.dec_ctx is None else a * dc + (1 - a) * s.dec_ctx
            s.dec_kv = dk if s.dec_kv is None else a * dk + (1 - a) * s.dec_kv

    def predict_output(self, prompt_len: int) -> float:
        """Expected output tokens for a prompt of `prompt_len` tokens (learnt from completions; 0 before any)."""
        s = self._s
        v = s.out_by_bucket.get(_bucket(prompt_len))
        if v is not None:
            return v
        return s.out_mean or 0.0

    def forecast_rate(self) -> float:
        """Arrival rate (requests/s) expected `horizon_s` ahead; never below the current level."""
        s = self._s
        if s.level is None:
            return 0.0
        return max(0.0, s.level, s.level + s.trend * self.config.horizon_s)

    def _prefill_time(self) -> tuple[float, float]:
        """(mean prefill seconds per request, squared coefficient of variation of it)."""
        cfg, s = self.config, self._s
        m = s.len_mean or 0.0
        m2 = max(s.len_sq_mean or 0.0, m * m)
        d = cfg.prefill.expected_s(m, m2) * self._s.prefill_scale
        var_l = m2 - m * m
        lin = (cfg.prefill.b + 2 * cfg.prefill.c * m) * self._s.prefill_scale  # dD/dL at the mean
        cv2 = (lin * lin * var_l) / (d * d) if d > 0 else 0.0
        return d, cv2

    def _prefill_rho(self, d: float, cv2: float) -> float:
        """Largest prefill utilisation whose estimated P90 TTFT meets the SLO (floor 0.05)."""
        cfg = self.config
        slack = cfg.slo_ttft_s / d - 1.0 if d > 0 else math.inf
        if slack <= 0:
            return 0.05
        g = 2.0 * slack / (_P90_EXP * (1.0 + cv2))
        return max(0.05, min(cfg.max_util, g / (1.0 + g)))

    def predicted_ttft_p90(self, rate: float, n_p: int) -> float:
        """Model P90 TTFT (s) at arrival `rate` with `n_p` prefill instances (inf when overloaded)."""
        d, cv2 = self._prefill_time()
        if n_p <= 0:
            return math.inf
        rho = rate * d / n_p
        if rho >= 1:
            return math.inf
        return d + _P90_EXP * rho * d * (1 + cv2) / (2 * (1 - rho))

    def _decode_work(self) -> tuple[float, float]:
        """(step intercept, decode step-seconds one arriving request adds over its life, per unit batch).

        The feedback scale applies to the per-request work only: the intercept (a step's fixed cost) is
        what the profile pins down best, and with a tight TPOT SLO a scaled intercept close to the
        step-time target turns a modest correction into an infinite decode demand."""
        cfg, s = self.config, self._s
        a, b, c = cfg.decode.coeffs(1)
        work = b * (s.dec_o or 0.0) + c * (s.dec_ctx or 0.0)
        return a, work * s.decode_scale

    def step_target_s(self) -> float:
        """Mean decode step time the split aims at: ``tpot_headroom * SLO``, divided by the learnt tail factor
        under a per-token SLO (1 for the mean TPOT)."""
        return self.config.tpot_headroom * self.config.slo_tpot_s / self._s.tail

    def predicted_step_s(self, rate: float, n_d: int) -> float:
        """Model decode step time (s) with `n_d` decode instances (inf when it cannot keep up)."""
        a, work = self._decode_work()
        if n_d <= 0:
            return math.inf
        u = rate * work / n_d
        return math.inf if u >= 1 else a / (1 - u)

    def demand(self, x: LoadSample) -> tuple[float, float]:
        """(prefill instances, decode instances) needed, real-valued, from the current estimates."""
        cfg, s = self.config, self._s
        lam = self.forecast_rate()
        d, cv2 = self._prefill_time()
        need_p = lam * d / self._prefill_rho(d, cv2)
        backlog_s = cfg.prefill.tokens_s(x.queued_prefill_tokens, x.queued_prefill_sq_tokens) * s.prefill_scale \
            if x.queued_prefill_tokens > 0 else 0.0
        need_p += backlog_s / max(cfg.horizon_s, cfg.slo_ttft_s)
        # Little's law: the cluster holds lam * O * t decoding requests when steps take t seconds, so a step
        # of n_d instances takes t = a + (lam * work / n_d) * t; t <= tau needs n_d >= lam * work / (1 - a / tau).
        a, work = self._decode_work()
        tau = self.step_target_s()
        if a >= tau:
            need_d = math.inf if lam * work > 0 else 0.0
        else:
            need_d = lam * work / (1 - a / tau)
        if cfg.kv_capacity_tokens:
            # KV held = lam * E[O (L + O)] * t tokens (reservations of prompt + output) with t = a / (1 - lam w / n_d):
            # fitting it in n_d * capacity needs n_d >= lam w + lam E[O (L + O)] a / capacity.
            held = s.dec_ctx if cfg.kv_paged else s.dec_kv
            need_d = max(need_d, lam * work + lam * (held or 0.0) * a / cfg.kv_capacity_tokens)
        # Requests already decoding are not counted: an instance moved to prefill keeps decoding them
        # until they finish (draining), so they do not pin instances to the decode role.
        return need_p, need_d

    def _feedback(self, x: LoadSample) -> None:
        cfg, s = self.config, self._s
        if not cfg.feedback:
            return
        # A scale corrects the cost model for the mix it was measured on (e.g. short prompts batch and
        # share the step intercept, so they cost less than the per-request model says); when the mix moves
        # by more than `rescale_shift` x, the correction no longer applies and the model starts over.
        if _shifted(s.prefill_scale_len, s.len_mean, cfg.rescale_shift):
            s.prefill_scale, s.prefill_scale_len = 1.0, None
        if _shifted(s.decode_scale_out, s.dec_o, cfg.rescale_shift):
            s.decode_scale, s.decode_scale_out = 1.0, None
        if s.last_change_t is not None and x.t - s.last_change_t < cfg.feedback_settle_s:
            return
        lam = s.level or 0.0
        if x.ttft_p90_s is not None and x.n_prefill > 0:
            pred = self.predicted_ttft_p90(lam, x.n_prefill)
            r = _measured_ratio(x.ttft_p90_s, pred, cfg.slo_ttft_s)
            # A queue of more than one TTFT SLO of prefill work per instance is a transient (a mix shift,
            # instances still draining) that the backlog term provisions for: measurements above the
            # steady-state model then say nothing about the cost model, so they do not raise it.
            backlog_s = cfg.prefill.tokens_s(x.queued_prefill_tokens, x.queued_prefill_sq_tokens) \
                if x.queued_prefill_tokens > 0 else 0.0
            if r is not None and not (r > 1 and backlog_s > x.n_prefill * cfg.slo_ttft_s):
                step = _ratio_step(r)
                s.prefill_scale = _clamp(s.prefill_scale * step, 0.5, 4.0)
                if step != 1.0:
                    s.prefill_scale_len = s.len_mean
        tbt = x.decode_signal(cfg.slo_kind) if cfg.slo_kind != "tpot-mean" else None
        if tbt is not None and x.tpot_p90_s:
            g = _clamp(tbt / x.tpot_p90_s, 1.0, 4.0)
            s.tail = cfg.tail_smoothing * g + (1 - cfg.tail_smoothing) * s.tail
        if x.tpot_p90_s is not None and x.n_decode > 0:
            pred = self.predicted_step_s(lam, x.n_decode)
            r = _measured_ratio(x.tpot_p90_s, pred, cfg.slo_tpot_s / s.tail)
            if r is not None:
                step = _ratio_step(r)
                s.decode_scale = _clamp(s.decode_scale * step, 0.5, 4.0)
                if step != 1.0:
                    s.decode_scale_out = s.dec_o

    # ---- decision -------------------------------------------------------------------------------
    def step(self, x: LoadSample) -> RatioDecision:
        """Feed one sample, get the split to apply now (`changed` False means keep the current one)."""
        cfg, s = self.config, self._s
        self._update(x)
        self._feedback(x)
        n = x.n_prefill + x.n_decode
        gp, gd = cfg.prefill_gpus, cfg.decode_gpus
        gpus = x.n_prefill * gp + x.n_decode * gd  # re-roling keeps the GPUs: p prefill + n_dec(p) decode

        def n_dec(p: int) -> int:
            return (gpus - p * gp) // gd

        raw_p, raw_d = self.demand(x)
        w = cfg.demand_smoothing
        if s.need_p is None or not (math.isfinite(s.need_p) and math.isfinite(s.need_d)):
            s.need_p, s.need_d = raw_p, raw_d
        else:
            s.need_p = w * raw_p + (1 - w) * s.need_p
            s.need_d = w * raw_d + (1 - w) * s.need_d
        need_p, need_d = s.need_p, s.need_d
        before = split_pressure(need_p, need_d, x.n_prefill, x.n_decode)
        lam = self.forecast_rate()

        def keep(reason: str) -> RatioDecision:
            return self._record(RatioDecision(x.n_prefill, x.n_decode, False, reason, need_p, need_d,
                                              before, before, lam))

        # The splits: p prefill instances and the decode instances the other GPUs make (whole instances, at
        # least min_per_role of each); with one GPU per instance of each role, p + (n - p).
        splits = [p for p in range(cfg.min_per_role, gpus // gp + 1)
                  if (gpus - p * gp) % gd == 0 and n_dec(p) >= cfg.min_per_role]
        if not splits:
            s.pending_dir = s.pending_count = 0
            return keep(f"only {n} managed instances: need {2 * cfg.min_per_role} to split" if gp == gd == 1 else
                        f"{gpus} GPUs cannot hold {cfg.min_per_role} prefill instance(s) of {gp} and decode "
                        f"instance(s) of {gd} GPUs")
        lo, hi = splits[0], splits[-1]

        def press(p: int) -> float:
            return split_pressure(need_p, need_d, p, n_dec(p))

        best = min(splits, key=lambda p: (press(p), abs(p - x.n_prefill)))
        # Spare capacity to prefill: the objective becomes max(pressure, cap), ties to more prefill.
        cap = cfg.spare_to_prefill
        spare = cap is not None and press(best) <= cap
        if spare:
            best = max(p for p in splits if press(p) <= cap)
        # A current split outside the bounds (e.g. a role emptied by failures) is always repaired.
        repair = not (lo <= x.n_prefill <= hi and x.n_decode >= cfg.min_per_role)
        if best == x.n_prefill:
            s.pending_dir = s.pending_count = 0
            return keep("current split is best")
        after_full = press(best)
        if not repair and best < x.n_prefill and cfg.decode_move_pressure is not None \
                and before <= cfg.decode_move_pressure:
            s.pending_dir = s.pending_count = 0
            return keep(f"pressure {before:.2f} <= {cfg.decode_move_pressure}: prefill instances are kept, a move "
                        "back would wait for their decodes to drain")
        if not repair:
            j_before, j_after = (max(before, cap), max(after_full, cap)) if spare else (before, after_full)
            # A spare move (both splits within the cap) must shift at least `min_gain` of the instances.
            spare_move = spare and j_before <= cap and best - x.n_prefill >= max(1, round(cfg.min_gain * n))
            # An SLO at risk (pressure > 1) accepts any gain; otherwise it must be at least `min_gain`.
            need_gain = 0.0 if before > 1.0 else cfg.min_gain
            if not spare_move and not math.isinf(before) and j_after > j_before * (1 - need_gain) - 1e-12:
                s.pending_dir = s.pending_count = 0
                return keep(f"gain below {need_gain:.0%} (pressure {before:.2f} -> {after_full:.2f})")
            direction = 1 if best > x.n_prefill else -1
            if direction == s.pending_dir:
                s.pending_count += 1
            else:
                s.pending_dir, s.pending_count = direction, 1
            # An SLO at risk (pressure > 1) is acted on at once; otherwise the move must be confirmed.
            if before <= 1.0 and s.pending_count < cfg.confirm:
                return keep(f"waiting for confirmation {s.pending_count}/{cfg.confirm}")
            if s.last_change_t is not None and x.t - s.last_change_t < cfg.cooldown_s:
                return keep("cooling down")
            if (direction == -s.last_dir and s.last_change_t is not None
                    and x.t - s.last_change_t < cfg.reverse_cooldown_s):
                return keep("reversal too soon after the last change")
        # at most max_step_frac of the GPUs change role (whole prefill instances, at least one)
        max_step = max(1, math.ceil(cfg.max_step_frac * gpus) // gp)
        target = min(max(best, x.n_prefill - max_step), x.n_prefill + max_step) if not repair else best
        target = min((p for p in splits if lo <= p <= hi), key=lambda p: (abs(p - target), p))
        s.pending_dir = s.pending_count = 0
        s.last_change_t = x.t
        s.last_dir = 1 if target > x.n_prefill else -1
        after = press(target)
        why = "repair: a role had fewer than min_per_role instances" if repair else (
            f"pressure {before:.2f} -> {after:.2f} (need P {need_p:.2f}, D {need_d:.2f}, rate {lam:.2f}/s)")
        return self._record(RatioDecision(target, n_dec(target), True, why, need_p, need_d, before, after, lam))

    def _record(self, d: RatioDecision) -> RatioDecision:
        if self._keep:
            self._s.history.append(d)
            del self._s.history[:-self._keep]
        return d

    def with_config(self, **changes) -> "RatioController":
        """A fresh controller with some settings changed (state not copied)."""
        return RatioController(replace(self.config, **changes), history=self._keep)


def _bucket(prompt_len: int) -> int:
    """Half-octave bucket of a prompt length (1, 1.4, 2, 2.8, 4, ... tokens)."""
    return int(2 * math.log2(max(prompt_len, 1)))


def _shifted(ref: float | None, now: float | None, factor: float) -> bool:
    """Whether `now` differs from `ref` by more than `factor` x (False when either is unknown or zero)."""
    if not ref or not now:
        return False
    return max(now / ref, ref / now) > factor


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


def _measured_ratio(measured: float, predicted: float, slo: float) -> float | None:
    """measured / predicted for the feedback; when the model says overloaded (infinite prediction) but the
    measurement meets the SLO, the model is too pessimistic: 0.5 (without this a cost scale pushed up by
    a transient could never come down, since every later prediction would be infinite too)."""
    if predicted > 0 and math.isfinite(predicted):
        return measured / predicted
    if math.isinf(predicted) and measured <= slo:
        return 0.5
    return None


def _ratio_step(r: float) -> float:
    """Multiplicative correction for measured/predicted ratio `r`: dead band 0.8..1.25, then a 30% step
    in log space (``r ** 0.3``), so one noisy window moves the scale little."""
    if 0.8 <= r <= 1.25 or not math.isfinite(r) or r <= 0:
        return 1.0
    return r ** 0.3
