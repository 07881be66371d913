"""The adaptive draft-length rule, in plain Python (no torch, no vLLM): unit tests run it without an engine.

Notation: K = the cap (`FRONTIER_MTP_K`, vLLM's `num_speculative_tokens`), k = the draft length chosen for a
step, B = the number of requests decoding in that step, a_i = the conditional acceptance of draft position i
(the fraction of drafts at position i that the target accepted, among steps whose positions 1..i-1 were all
accepted).

Expected tokens a request gains from one target forward with k drafts (greedy or rejection sampling, each
position accepted only if every earlier one was):

    E(k) = 1 + sum_{j=1..k} prod_{i=1..j} a_i

Cost of one engine step, in units of "one token through the target model":

    T(B, k) = F + k D + B (k + 1) (1 + rho) + B max(k - 1, 0) rho      (k > 0)
    T(B, 0) = F + B                          with the drafter-skipping proposer (`drafter_skips`)
    T(B, 0) = F + B (1 + rho)                without it (vLLM's proposer runs its first pass every step)

- F: the per-step cost that does not grow with tokens (weight reads on a GPU, Python and scheduling
  overhead on CPU), in token units.
- D: the fixed cost of each drafted position (one drafter forward: its launch, input preparation and
  attention metadata, the draft sampling; verification metadata and the rejection sampler), in token units.
  On vLLM CPU this is the dominant cost of speculation (`benchmarks/results/mtp/mtp_cpu_v7.json`, embedded
  model, V3 view: a k = 1 / 2 / 3 step takes 2.8x / 3.6x / 4.1x a plain step at batch 1 and 6.5x / 9.1x /
  11.2x at batch 16), and without it the rule keeps drafting where no drafting is fastest. One D per
  position, not one per drafting step: priced once per step, k = 3 looked nearly as cheap as k = 1. The
  first position costs more than each further one there (it also carries the verification), so k D
  overprices k > 1 somewhat: the error leans towards fewer drafts.
- rho: cost of one token through the MTP module relative to the target (about one decoder layer out of
  `num_hidden_layers`). The drafter's first pass runs over all B (k + 1) verified tokens, each further draft
  position is one more pass over B tokens. A step that drafts nothing runs no drafter with
  `proposer.SkippingMTPProposer` (the positions it skipped are replayed in one pass when drafting resumes,
  a cost of B rho per skipped step paid only if drafting resumes, left out of T(B, 0)): it costs what a
  plain step costs.

Step costs, measured where possible. Every decode-only step is timed from its `schedule()` to the next one
(the model runner, the post-step draft round trip of a drafting step, the engine loop; an interval that
ends in an idle engine is dropped) and kept twice:
- `StepTimes`: per (batch-size bucket, k) cell, the last `cell_window` times and their median. Buckets: 1, 2,
  3, 4 alone, then each octave in two halves ([5, 6], [7, 8], [9, 12], [13, 16], ...); a drafting step's
  time is also kept as a ratio to the median of the last 8 k = 0 steps of its bucket (paired: both measured
  at the machine's speed of the moment). Where a bucket has `cell_min_points` times at k = 0 and paired
  ratios at some k' > 0, the rule uses the median paired ratio T(k') / T(0) there; other
  k, and buckets without measurements, take the nearest measured ratio (nearest k', then nearest bucket,
  ties to the larger bucket) carried by the fitted model's shape (`DraftLengthPolicy.cost_function`).
  A single linear model pooled over all batch sizes mispriced vLLM CPU by 30 % (a k = 1 step at batch 1
  modelled at 1.9x a plain one, measured 2.7x, once batch-16 steps entered the fit), enough to draft where
  drafting loses.
- `CostModel`: the fitted model, for the shape and where nothing is measured. beta (seconds per token unit):
  least squares of time = beta (c + U + D k) over the drafting steps (U = the token-proportional part), when
  their U spreads enough (batch sizes and k vary); else the prior F + D (64) scaled to their mean time. F:
  time / beta - U averaged over the non-drafting steps; D: (time / beta - U - F) / k averaged over the
  drafting steps. D is 0 until non-drafting steps are measured.

Probing: a rule that stops drafting never measures drafting again (and vice versa), so every `probe_every`
steps (every `probe_every // 8` while the other class has fewer than `probe_min_points` points) the policy
runs the other class: one step at k = 0 while drafting, two steps at k = 1 while not (the first step drafts,
the second verifies those drafts, which also re-measures acceptance). While the rule keeps not drafting,
the interval between k = 1 probes doubles after each probe, up to `probe_max_every` steps (a probe costs
two drafting steps; on a device where drafting never pays it stays under 1 % of the steps), and returns to
`probe_every` as soon as the rule drafts again. While the measured costs say that no k > 0 would pay even
if every draft were accepted, the interval is `probe_hopeless_every` (4096 steps) from the start: such a
probe can only re-measure the costs, and it also pays the catch-up pass over every position skipped since
the last one (measured on vLLM CPU, V3 view, batch 16: 7 probes every 1024 steps cost 2.3 % of throughput at
an unchanged median step, `benchmarks/results/mtp/mtp_cpu_v12_v3_b16.json`). That pass costs time in
proportion to the positions it replays (vLLM CPU, V3.2 view, batch 16: 30 ms for 212 positions, 204 ms for
1044, against an 8.5 ms plain step; `benchmarks/results/mtp/probe_cost_v32.json`), and the running requests'
skipped positions grow with their age: a due k = 1 probe therefore waits for a step where they are few, at
most `probe_replay_per_request` (16) positions per request on average, running or waiting (waiting ones up to
the free batch slots; a waiting request's prompt counts: the probe's drafter pass covers it; so: new requests
with short prompts, e.g. a batch that has just started), and at most half its interval, after which it runs
whatever the replay (requests that outlive half an interval, or long prompts, pay it as before). Between such
probes the rule is quiet (`quiet_until`): nothing it could measure would change its table, so the scheduler
skips its per-step work (timing, table refreshes, probe checks) until shortly before the next probe, and an
adaptive step costs what a step pinned at k = 0 costs.

The rule: k*(B) = the smallest k in [0, K] whose throughput B E(k) / T(B, k) is within `tie_margin` (10 %)
of the best. The margin leans towards fewer drafts: what the model leaves out (the catch-up pass when
drafting resumes, the probes, the noise of measured step costs) is paid by drafting, so a gain within the
margin is not worth it. It was 3 %; on vLLM CPU a bucket's measured k = 1 cost ratio moved 1.74 -> 1.96 within
two runs at V3.2 batch 4 (`benchmarks/results/mtp/rule_trace_v32_b4_b8.json`), where a k = 1 step gains
1.75-1.86 tokens (a predicted gain of 1-7 %), and one engine pair drafting there ran at 0.86x of no speculation
(`mtp_cpu_v19_b4_b8.json`). Where MTP pays (a GPU: a k = 1 step costing ~1.1x a plain one gains 1.8 tokens),
the gains are tens of percent and the margin changes nothing. Larger batches make each extra position cost
more (the B terms grow while F does not), so k* falls with B; lower acceptance lowers E(k) and so k*.

Estimates: a_i is counted over the last `window_steps` engine steps. Each position carries a Beta prior of
`prior_strength` pseudo-observations centred on the estimate of the position before it (position 1: on
`first_prior`), so a position that has not been drafted recently is assumed as good as the one before it.
When k* stays below a position long enough for its observations to leave the window, the estimate returns
to the optimistic prior and the position is drafted again to be re-measured.
"""

from __future__ import annotations

import collections
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Bounds and priors of the rule (see the module docstring for the symbols)."""

    max_k: int
    draft_cost: float
    fixed_cost: float = 64.0
    window_steps: int = 128
    prior_strength: float = 2.0
    first_prior: float = 0.5
    tie_margin: float = 0.10
    cost_window: int = 512
    min_cost_points: int = 24
    probe_every: int = 64
    probe_min_points: int = 4
    probe_max_every: int = 1024
    probe_hopeless_every: int = 4096
    probe_replay_per_request: float = 16.0
    drafter_skips: bool = False
    cell_window: int = 32
    cell_min_points: int = 4

    def __post_init__(self):
        if not isinstance(self.max_k, int) or self.max_k < 0:
            raise ValueError(f"max_k must be a non-negative integer (the MTP draft cap), got {self.max_k!r}")
        if not 0.0 <= self.draft_cost:
            raise ValueError(f"draft_cost must be >= 0 (MTP cost per token / target cost), got {self.draft_cost!r}")
        if not 0.0 <= self.fixed_cost:
            raise ValueError(f"fixed_cost must be >= 0 (token units), got {self.fixed_cost!r}")
        if self.window_steps < 1 or self.cost_window < 2:
            raise ValueError("window_steps must be >= 1 and cost_window >= 2")
        if (self.probe_every < 8 or self.probe_min_points < 1 or self.probe_max_every < self.probe_every
                or self.probe_hopeless_every < self.probe_max_every):
            raise ValueError("probe_every must be >= 8, probe_max_every >= probe_every, probe_hopeless_every >= "
                             "probe_max_every and probe_min_points >= 1")
        if not 0.0 <= self.first_prior <= 1.0 or self.prior_strength <= 0:
            raise ValueError("first_prior must be in [0, 1] and prior_strength > 0")
        if not self.probe_replay_per_request >= 0:
            raise ValueError(f"probe_replay_per_request must be >= 0, got {self.probe_replay_per_request!r}")
        if self.cell_window < 1 or not 1 <= self.cell_min_points <= self.cell_window:
            raise ValueError("cell_window must be >= 1 and cell_min_points in [1, cell_window]")


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i: tokens per target forward with k drafts, a = conditional rates."""
    total, run = 1.0, 1.0
    for a in acceptance[:k]:
        run *= a
        total += run
    return total


def step_cost(batch: int, k: int, fixed_cost: float, draft_cost: float, drafting_cost: float = 0.0,
              drafter_skips: bool = False) -> float:
    """T(B, k) in target-token units (module docstring)."""
    if k == 0 and drafter_skips:
        return fixed_cost + batch
    return (fixed_cost + drafting_cost * k + batch * (k + 1) * (1.0 + draft_cost)
            + batch * max(k - 1, 0) * draft_cost)


def best_k(acceptance: list[float], batch: int, fixed_cost: float, draft_cost: float, max_k: int,
           tie_margin: float = 0.01, drafting_cost: float = 0.0, drafter_skips: bool = False) -> int:
    """The smallest k in [0, max_k] whose B E(k) / T(B, k) is within tie_margin of the best."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return best_of([step_cost(batch, k, fixed_cost, draft_cost, drafting_cost, drafter_skips)
                    for k in range(max_k + 1)], gains(acceptance, max_k), tie_margin)


def gains(acceptance: list[float], max_k: int) -> list[float]:
    """[E(0), ..., E(max_k)]."""
    return [expected_tokens(acceptance, k) for k in range(max_k + 1)]


def best_of(costs: list[float], gain: list[float], tie_margin: float) -> int:
    """The smallest k whose E(k) / costs[k] is within tie_margin of the best (costs[k]: a step's cost at k, in
    any unit shared by all k; gain: `gains`)."""
    rates = [e / cost for e, cost in zip(gain, costs)]
    best = max(rates)
    return next(k for k, r in enumerate(rates) if r >= best * (1.0 - tie_margin))


def batch_bucket(batch: int) -> int:
    """Index of the batch-size bucket holding ``batch``: 1, 2, 3, 4 alone, then each octave (2^e, 2^(e+1)]
    in two halves: [5, 6], [7, 8], [9, 12], [13, 16], [17, 24], [25, 32], ..."""
    if batch <= 4:
        return max(batch, 1) - 1
    e = (batch - 1).bit_length() - 1
    return 4 + 2 * (e - 2) + (batch > (1 << e) + (1 << (e - 1)))


def bucket_range(index: int) -> tuple[int, int]:
    """(lowest, highest) batch size of bucket ``index`` (`batch_bucket`)."""
    if index < 4:
        return index + 1, index + 1
    e, second = 2 + (index - 4) // 2, (index - 4) % 2
    return (1 << e) + second * (1 << (e - 1)) + 1, (1 << e) + (second + 1) * (1 << (e - 1))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class StepTimes:
    """Measured wall times of decode-only engine steps, per (batch-size bucket, k): the last `cell_window` of
    each, with their median (robust to the scheduling hiccups of a busy CPU) and mean batch size; and per
    (bucket, k > 0) the last `cell_window` paired ratios: a drafting step's time over the median of the last
    `ref_points` k = 0 steps of its bucket (`ratio`).

    Why paired: the speed of a CPU host drifts by 30 % and more over seconds to minutes, and a rule that does
    not draft measures drafting only in its probes (two steps every 1024-4096 steps), so a median of drafting
    times from old probes over a median of the latest plain steps moves with the machine's speed, not with the
    cost of drafting (on vLLM CPU, V3.2 view, batch 1: 1.47x-2.33x for the same k = 1 steps within 30 runs,
    `benchmarks/mtp_rule_trace.py`, and the rule drafted whenever a slow stretch of plain steps pushed it under
    the tokens a draft gains). The plain steps just before a probe ran at the probe's speed."""

    def __init__(self, cell_window: int = 32, ref_points: int = 8):
        self.cell_window = cell_window
        self._cells: dict[tuple[int, int], collections.deque[tuple[float, int]]] = {}
        self._ratios: dict[tuple[int, int], collections.deque[tuple[float, int]]] = {}
        self._refs: dict[int, collections.deque[float]] = {}   # bucket -> its last k = 0 step times
        self._ref_points = ref_points
        self._summary: dict[tuple[int, int, bool], tuple[float, float, int]] = {}   # cache, dropped on observe

    def observe(self, batch: int, k: int, seconds: float) -> None:
        if batch < 1 or not (seconds > 0 and math.isfinite(seconds)):
            return
        bucket = batch_bucket(batch)
        key = (bucket, k)
        self._append(self._cells, key, (seconds, batch))
        self._summary.pop((bucket, k, False), None)
        if k == 0:
            ref = self._refs.get(bucket)
            if ref is None:
                ref = self._refs[bucket] = collections.deque(maxlen=self._ref_points)
            ref.append(seconds)
        elif self._refs.get(bucket):
            self._append(self._ratios, key, (seconds / _median(list(self._refs[bucket])), batch))
            self._summary.pop((bucket, k, True), None)

    def _append(self, cells: dict, key: tuple[int, int], point: tuple[float, int]) -> None:
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = collections.deque(maxlen=self.cell_window)
        cell.append(point)

    def _summarize(self, cells: dict, bucket: int, k: int, ratios: bool) -> tuple[float, float, int] | None:
        got = self._summary.get((bucket, k, ratios))
        if got is None:
            cell = cells.get((bucket, k))
            if not cell:
                return None
            got = self._summary[(bucket, k, ratios)] = (_median([t for t, _ in cell]),
                                                         sum(b for _, b in cell) / len(cell), len(cell))
        return got

    def summary(self, bucket: int, k: int) -> tuple[float, float, int] | None:
        """(median seconds, mean batch size, points) of a cell, or None when it has no point."""
        return self._summarize(self._cells, bucket, k, False)

    def ratio(self, bucket: int, k: int) -> tuple[float, float, int] | None:
        """(median paired ratio T(k) / T(0), mean batch size, points) of a cell with k > 0, or None."""
        return self._summarize(self._ratios, bucket, k, True)

    def buckets(self) -> set[int]:
        return {b for b, _ in self._cells}


class AcceptanceWindow:
    """Per-position draft outcomes of the last `window_steps` steps (one entry per step with drafts)."""

    def __init__(self, max_k: int, window_steps: int):
        self.max_k = max_k
        self.window_steps = window_steps
        self._steps: collections.deque[tuple[int, list[int], list[int]]] = collections.deque()
        self.reached = [0] * max_k
        self.accepted = [0] * max_k

    def observe(self, step: int, outcomes: list[tuple[int, int]]) -> None:
        """Record one step: outcomes = [(num_drafted, num_accepted)] per request (num_accepted <= num_drafted)."""
        reached, accepted = [0] * self.max_k, [0] * self.max_k
        for drafted, acc in outcomes:
            drafted = min(drafted, self.max_k)
            if not 0 <= acc <= drafted:
                raise ValueError(f"accepted {acc} drafts out of {drafted}: must be within [0, drafted]")
            for i in range(min(acc + 1, drafted)):
                reached[i] += 1
            for i in range(acc):
                accepted[i] += 1
        if any(reached):
            self._steps.append((step, reached, accepted))
            for i in range(self.max_k):
                self.reached[i] += reached[i]
                self.accepted[i] += accepted[i]
        self.expire(step)

    def expire(self, step: int) -> None:
        while self._steps and self._steps[0][0] <= step - self.window_steps:
            _, reached, accepted = self._steps.popleft()
            for i in range(self.max_k):
                self.reached[i] -= reached[i]
                self.accepted[i] -= accepted[i]

    def estimates(self, first_prior: float, prior_strength: float) -> list[float]:
        """Posterior means of a_1..a_K, each position's prior centred on the estimate of the one before."""
        out, prior = [], first_prior
        for n, s in zip(self.reached, self.accepted):
            est = (s + prior_strength * prior) / (n + prior_strength)
            out.append(est)
            prior = est
        return out


class _Sums:
    """Running sums over a sliding window of (U, t, k) points: every quantity the cost fit reads, kept in O(1)
    per point (the rule reads the fit at every table refresh, which while drafting is every step)."""

    KEYS = ("u", "t", "k", "uu", "kk", "uk", "ut", "kt", "inv_k", "u_k", "t_k")

    def __init__(self, maxlen: int):
        self.points: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=maxlen)
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self._since_rebuild = 0

    @staticmethod
    def _terms(u: float, t: float, k: int) -> tuple[float, ...]:
        ik = 1.0 / k if k else 0.0
        return (u, t, k, u * u, k * k, u * k, u * t, k * t, ik, u * ik, t * ik)

    def append(self, u: float, t: float, k: int) -> None:
        if len(self.points) == self.points.maxlen:
            for key, v in zip(self.KEYS, self._terms(*self.points[0])):
                self.sums[key] -= v
        self.points.append((u, t, k))
        for key, v in zip(self.KEYS, self._terms(u, t, k)):
            self.sums[key] += v
        self._since_rebuild += 1
        if self._since_rebuild >= 4 * (self.points.maxlen or 1):   # bound the rounding drift of the updates
            self.sums = dict.fromkeys(self.KEYS, 0.0)
            for pt in self.points:
                for key, v in zip(self.KEYS, self._terms(*pt)):
                    self.sums[key] += v
            self._since_rebuild = 0

    def __len__(self) -> int:
        return len(self.points)


class CostModel:
    """Fits F and D of T(B, k) from measured step times (module docstring).

    Points are (U, seconds, k) with U = T(B, k) - F - k D, in two windows: drafting steps (k > 0, up to
    `window` points) and non-drafting steps (k = 0, up to `window // 4`). The fit reads running sums (O(1)).
    """

    def __init__(self, prior: float, window: int, min_points: int):
        self.prior = prior
        self.min_points = min_points
        self._points = _Sums(window)
        self._plain = _Sums(max(window // 4, 2))

    def observe(self, units: float, seconds: float, k: int = 1) -> None:
        """One decode-only step: its token units U, wall time, and draft length k (0: a non-drafting step)."""
        if units > 0 and seconds > 0 and math.isfinite(seconds):
            (self._points if k > 0 else self._plain).append(units, seconds, k)

    def count(self, drafted: bool) -> int:
        """Points in the window of drafting (True) or non-drafting (False) steps."""
        return len(self._points if drafted else self._plain)

    def _beta(self) -> tuple[float | None, bool]:
        """(beta, fitted): seconds per token unit from the drafting steps, None without any.

        Least squares of time = beta (c + U) (+ beta D k when k varies, so that the drafting cost that grows
        with k does not pass for token cost) when U spreads enough (batch sizes and k vary); else beta scales
        the prior F + D to the mean measured time (fitted False)."""
        s = self._points.sums
        n = len(self._points)
        if not n:
            return None, False
        mu, mt, mk = s["u"] / n, s["t"] / n, s["k"] / n
        var_u = s["uu"] / n - mu * mu
        if n >= self.min_points and var_u > (0.05 * mu) ** 2:
            cov_ut = s["ut"] / n - mu * mt
            var_k = s["kk"] / n - mk * mk
            beta = None
            if var_k > 1e-9:
                cov_uk = s["uk"] / n - mu * mk
                cov_kt = s["kt"] / n - mk * mt
                det = var_u * var_k - cov_uk ** 2
                if det > 1e-6 * var_u * var_k:   # U is not a function of k alone
                    beta = (cov_ut * var_k - cov_kt * cov_uk) / det
            else:
                beta = cov_ut / var_u
            if beta is not None and beta > 0:
                return beta, True
        return mt / (self.prior + mu), False

    def fixed_cost(self) -> float:
        """F + D: the fixed cost of a one-draft step (from the drafting steps alone)."""
        return sum(self.costs())

    def costs(self) -> tuple[float, float]:
        """(F, D) in token units: F of a non-drafting step, D the extra of each drafted position.

        time / beta - U of a drafting step is F + k D; of a non-drafting step, F. Without non-drafting steps
        the drafting steps' mean gives F (and D = 0)."""
        beta, fitted = self._beta()
        if beta is None:
            return self.prior, 0.0
        d, n = self._points.sums, len(self._points)
        if not len(self._plain):
            if not fitted:
                return self.prior, 0.0
            return min(max(d["t"] / (n * beta) - d["u"] / n, 0.0), 4096.0), 0.0
        p, m = self._plain.sums, len(self._plain)
        fixed = min(max(p["t"] / (m * beta) - p["u"] / m, 0.0), 4096.0)
        # mean over drafting points of (t / beta - u - F) / k
        per_draft = (d["t_k"] / beta - d["u_k"] - fixed * d["inv_k"]) / n
        return fixed, min(max(per_draft, 0.0), 4096.0)


class DraftLengthPolicy:
    """Measured acceptance + measured step cost -> k per batch size. One instance per scheduler."""

    def __init__(self, config: PolicyConfig):
        self.config = config
        self.window = AcceptanceWindow(config.max_k, config.window_steps)
        self.cost = CostModel(config.fixed_cost, config.cost_window, config.min_cost_points)
        self.times = StepTimes(config.cell_window)
        self._idle_every = config.probe_every   # current interval between k = 1 probes while not drafting
        self._last_probe = 0
        self._probe_left = 0

    def acceptance(self) -> list[float]:
        return self.window.estimates(self.config.first_prior, self.config.prior_strength)

    def units(self, batch: int, k: int) -> float:
        """T(B, k) - F - D [k > 0]: the token-proportional part of a step's cost."""
        return step_cost(batch, k, 0.0, self.config.draft_cost, drafter_skips=self.config.drafter_skips)

    def observe_step(self, batch: int, k: int, seconds: float, units: float | None = None) -> None:
        """One decode-only engine step: ``batch`` decoding requests, draft length k, its wall time; ``units``
        (`units`) feeds the cost fit too (None: the measured cells only)."""
        self.times.observe(batch, k, seconds)
        if units is not None:
            self.cost.observe(units, seconds, k)

    # -- step costs: measured cells anchor the fitted model --------------------------------------------------

    def _measured(self) -> dict[int, dict[int, tuple[float, float]]]:
        """{bucket: {k: (measured T(k) / T(0), mean batch of the k cell)}} over buckets where k = 0 has
        `cell_min_points` times and some k > 0 as many paired ratios (`StepTimes.ratio`)."""
        c, out = self.config, {}
        for bucket in self.times.buckets():
            plain = self.times.summary(bucket, 0)
            if plain is None or plain[2] < c.cell_min_points:
                continue
            ks = {}
            for k in range(1, c.max_k + 1):
                got = self.times.ratio(bucket, k)
                if got is not None and got[2] >= c.cell_min_points:
                    ks[k] = (got[0], got[1])
            if ks:
                out[bucket] = ks
        return out

    def measured_ratios(self) -> dict[str, dict[int, float]]:
        """{"lo-hi" batch sizes: {k: measured T(k) / T(0)}} (JSON-ready, for stats)."""
        return {"%d-%d" % bucket_range(b): {k: round(r, 3) for k, (r, _) in ks.items()}
                for b, ks in sorted(self._measured().items())}

    def step_time_cells(self) -> dict[str, dict[int, list]]:
        """{"lo-hi" batch sizes: {k: [median ms, points]}} of every timed cell (JSON-ready, for stats): what the
        rule has measured, before `cell_min_points` lets a cell anchor the costs."""
        return self._cells_json(self.times.summary, range(self.config.max_k + 1), 1e3)

    def paired_ratio_cells(self) -> dict[str, dict[int, list]]:
        """{"lo-hi" batch sizes: {k: [median paired ratio, points]}} (JSON-ready, for stats; `StepTimes.ratio`)."""
        return self._cells_json(self.times.ratio, range(1, self.config.max_k + 1), 1.0)

    def _cells_json(self, summary, ks, scale: float) -> dict[str, dict[int, list]]:
        out: dict[str, dict[int, list]] = {}
        for b in sorted(self.times.buckets()):
            for k in ks:
                got = summary(b, k)
                if got is not None:
                    out.setdefault("%d-%d" % bucket_range(b), {})[k] = [round(scale * got[0], 3), got[2]]
        return out

    @staticmethod
    def _anchor(bucket: int, measured: dict) -> dict[int, tuple[float, float]] | None:
        """The measured ratios of ``bucket``, else of the nearest measured bucket (ties: the larger one, whose
        drafting costs more relative to a plain step: the error leans towards fewer drafts), else None."""
        if not measured:
            return None
        return measured[min(measured, key=lambda j: (abs(j - bucket), -j))]

    def step_costs(self, batch: int, fit: tuple[float, float], anchor: dict | None) -> list[float]:
        """T(B, k) for k = 0..K (`cost_function`)."""
        return self.cost_function(fit, anchor)(batch)

    def cost_function(self, fit: tuple[float, float], anchor: dict | None):
        """B -> [T(B, k) for k = 0..K]. The fitted model (F, D = ``fit``) alone without an ``anchor``; with one,
        T(B, k) / T(B, 0) is the measured ratio of the anchor's nearest k' (nearest in k, then the smaller),
        carried to (B, k) by the model's shape: measured(k') x [model(B, k) / model(B, 0)] / [model(B', k') /
        model(B', 0)], B' the batch the anchor measured; at least 1 (drafting adds work to a plain step)."""
        c = self.config
        fixed, drafting = fit
        ks = range(c.max_k + 1)

        def model(b: float) -> list[float]:
            return [step_cost(b, k, fixed, c.draft_cost, drafting, c.drafter_skips) for k in ks]

        if anchor is None:
            return model
        scale = [1.0]
        for k in ks[1:]:
            near = min(anchor, key=lambda j: (abs(j - k), j))
            ratio, b_near = anchor[near]
            scale.append(ratio * step_cost(b_near, 0, fixed, c.draft_cost, drafting, c.drafter_skips)
                         / step_cost(b_near, near, fixed, c.draft_cost, drafting, c.drafter_skips))

        def anchored(b: float) -> list[float]:
            m = model(b)
            return [m[0]] + [max(mk * s, m[0]) for mk, s in zip(m[1:], scale[1:])]

        return anchored

    def _best_k(self, acceptance: list[float], batch: int, fit: tuple[float, float], anchor: dict | None) -> int:
        return best_of(self.step_costs(max(batch, 1), fit, anchor), gains(acceptance, self.config.max_k),
                       self.config.tie_margin)

    def choose(self, batch: int) -> int:
        return self._best_k(self.acceptance(), batch, self.cost.costs(),
                            self._anchor(batch_bucket(batch), self._measured()))

    def drafting_can_pay(self, batch: int) -> bool:
        """Whether some k > 0 would beat k = 0 at this batch size if every draft were accepted, at the measured
        step costs. When not, an acceptance probe cannot change the rule's choice; only the costs can."""
        return self._best_k([1.0] * self.config.max_k, batch, self.cost.costs(),
                            self._anchor(batch_bucket(batch), self._measured())) > 0

    def probe(self, step: int, chosen_k: int, batch: int = 1, replay=None) -> int | None:
        """The k of an exploration step at engine step ``step``, or None (module docstring, Probing).

        chosen_k: what the rule picked for this step, batch: the step's decoding requests. A drafting rule
        gets one k = 0 step; a non-drafting rule gets k = 1 on two consecutive steps (drafts are made in one
        step and verified in the next), at intervals that double while the rule keeps not drafting, and at
        `probe_hopeless_every` at once while the measured costs say drafting cannot pay even at full acceptance
        (`drafting_can_pay`; a probe, with the catch-up pass it triggers, would only re-measure the costs).
        replay: None, or a function giving the mean number of positions per request, running or admissible, that
        the drafter has not passed over (what the probe's first step would replay or compute); a due k = 1 probe
        then waits, at most half its interval, for a step where that is at most `probe_replay_per_request`
        (module docstring, Probing).
        Call once per step.
        """
        c = self.config
        drafting = chosen_k > 0
        few = self.cost.count(not drafting) < c.probe_min_points
        if drafting:
            self._idle_every, self._probe_left = c.probe_every, 0
            every = max(c.probe_every // 8, 4) if few else c.probe_every
            return 0 if step % every == 0 else None
        if self._probe_left > 0:
            self._probe_left -= 1
            return 1
        every = max(c.probe_every // 8, 4) if few else self._idle_every
        waited = step - self._last_probe
        if waited < every:
            return None
        if (not few and replay is not None and waited < every + every // 2
                and replay() > c.probe_replay_per_request):
            return None   # a long catch-up pass: wait for newer requests (read only when a probe is due)
        if not few and every < c.probe_hopeless_every and not self.drafting_can_pay(batch):
            self._idle_every = c.probe_hopeless_every   # read only when a probe is due: the fit is not free
            if waited < self._idle_every:
                return None
        self._last_probe, self._probe_left = step, 1
        if not few:
            # doubling up to probe_max_every; a hopeless interval stays until the rule drafts again
            self._idle_every = max(min(2 * self._idle_every, c.probe_max_every), self._idle_every)
        return 1

    def quiet_until(self, table: list[int], max_batch: int, lead: int) -> int:
        """The rule step before which the rule can skip its per-step work (0: none); ``table``: its current k
        per batch size, ``lead``: steps before the next due probe from which it measures again.

        Quiet: the rule drafts at no batch size, and would draft at none even if every draft were accepted at
        the measured step costs (so no acceptance estimate can change the table), and the probe interval is
        `probe_hopeless_every` with no probe in progress (so the next probe's step is known). Until ``lead``
        steps before that probe, timing steps, refreshing the table and asking for probes would change
        nothing the rule decides; from then on, the plain steps just before the probe are timed again, so the
        probe's drafting steps are priced against fresh references (`StepTimes.ratio`)."""
        c = self.config
        if (any(table) or self._probe_left or self._idle_every < c.probe_hopeless_every
                or self.cost.count(True) < c.probe_min_points):
            return 0
        if any(self.table(max_batch, acceptance=[1.0] * c.max_k)):
            return 0
        return self._last_probe + self._idle_every - lead

    def table(self, max_batch: int, acceptance: list[float] | None = None) -> list[int]:
        """[k*(B) for B in 0..max_batch]; entry 0 (no decode requests) repeats entry 1. ``acceptance``: the
        conditional acceptance per position to assume (None: the measured estimates, `acceptance`).

        Per range of batch-size buckets that share an anchor (`cost_function`), filled by bisection on the
        breakpoints (O(K log width) evaluations per range instead of one per batch size). Exact for the fitted
        model alone: for k > j its throughput ratio of k over j is a linear-fractional function of B
        (monotone) whose limit for large B, E(k) (j + 1) / (E(j) (k + 1)) at most, is <= 1, so k beats j on an
        initial range of batch sizes only and k*(B) is non-increasing; a measured anchor scales each k's cost
        by one factor over its whole range (where the bisection may miss a breakpoint that the scaling
        introduced).
        """
        gain = gains(self.acceptance() if acceptance is None else acceptance, self.config.max_k)
        fit = self.cost.costs()
        measured = self._measured()
        margin = self.config.tie_margin
        table = [0] * (max_batch + 1)
        ranges: list[list] = []   # [first, last, anchor]: consecutive buckets that share an anchor, merged
        for bucket in range(batch_bucket(max_batch) + 1 if max_batch >= 1 else 0):
            anchor = self._anchor(bucket, measured)
            first, last = bucket_range(bucket)
            if ranges and ranges[-1][2] is anchor:
                ranges[-1][1] = last
            else:
                ranges.append([first, last, anchor])
        for first, last, anchor in ranges:
            costs = self.cost_function(fit, anchor)

            def k_of(b: int) -> int:
                return best_of(costs(b), gain, margin)

            lo, last = first, min(last, max_batch)
            while lo <= last:
                k = k_of(lo)
                a, b = lo, last   # largest a >= lo with k_of(a) == k
                if k_of(b) == k:
                    a = b
                while a < b:
                    mid = (a + b + 1) // 2
                    if k_of(mid) == k:
                        a = mid
                    else:
                        b = mid - 1
                table[lo:a + 1] = [k] * (a + 1 - lo)
                lo = a + 1
        table[0] = table[1] if max_batch >= 1 else 0
        return table
