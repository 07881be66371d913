"""Synthetic request traces for the cluster simulator (generated offline, deterministic per seed).

Length mixes: three request kinds whose shapes follow the datasets DistServe evaluates (ShareGPT chat,
HumanEval code, LongBench summarisation): chat has medium prompts and medium outputs, code short prompts
and long outputs, summarisation long prompts and short outputs. Lengths are log-normal, clipped to
``[min_len, max_len]`` (prompt + output <= `max_len`). The parameters are ours (the datasets' rough
shapes), not fitted to the datasets.

Arrivals: Poisson, or bursty (a two-state Markov-modulated Poisson process: bursts at `burst_factor` times
the mean rate, calm periods below it, same long-run mean).

Mix schedule: a list of phases ``(duration_s, {kind: weight})``; the `shifting` workload moves from a
prefill-heavy mix (summarisation) to a decode-heavy mix (code) and back.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Request", "LengthDist", "KINDS", "Phase", "WORKLOADS", "make_trace", "mix_at", "phase_at", "phase_starts"]


@dataclass(frozen=True)
class Request:
    """One request: arrival time (s), prompt and output lengths (tokens), kind name, id."""

    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int
    kind: str


@dataclass(frozen=True)
class LengthDist:
    """Log-normal token count with the given median and sigma (of the log), clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int = 4
    hi: int = 4096

    def sample(self, rng: random.Random) -> int:
        x = self.median * math.exp(rng.gauss(0.0, self.sigma))
        return int(min(self.hi, max(self.lo, round(x))))


# kind -> (prompt, output)
KINDS: dict[str, tuple[LengthDist, LengthDist]] = {
    "chat": (LengthDist(600, 0.7, 16, 1600), LengthDist(180, 0.7, 8, 600)),
    "code": (LengthDist(150, 0.4, 16, 600), LengthDist(320, 0.5, 16, 900)),
    "summarize": (LengthDist(1400, 0.25, 300, 1900), LengthDist(60, 0.5, 8, 200)),
}


@dataclass(frozen=True)
class Phase:
    duration_s: float
    mix: Mapping[str, float]


# Workloads as phase lists. Durations are fractions of the trace (scaled in `make_trace`).
WORKLOADS: dict[str, tuple[Phase, ...]] = {
    "chat": (Phase(1.0, {"chat": 1.0}),),
    "mixed": (Phase(1.0, {"chat": 0.5, "code": 0.25, "summarize": 0.25}),),
    # prefill-heavy -> decode-heavy -> prefill-heavy
    "shifting": (
        Phase(1 / 3, {"summarize": 0.8, "chat": 0.2}),
        Phase(1 / 3, {"code": 0.8, "chat": 0.2}),
        Phase(1 / 3, {"summarize": 0.8, "chat": 0.2}),
    ),
}


def phase_starts(phases: Sequence[Phase], duration_s: float) -> list[float]:
    """Start time (s) of every phase in a trace `duration_s` long (phase durations are fractions)."""
    total = sum(p.duration_s for p in phases)
    starts, acc = [0.0], 0.0
    for p in phases[:-1]:
        acc += p.duration_s / total * duration_s
        starts.append(acc)
    return starts


def phase_at(phases: Sequence[Phase], duration_s: float, t: float) -> int:
    """Index of the phase in force at time `t` (times before 0 belong to the first phase)."""
    return max(0, bisect.bisect_right(phase_starts(phases, duration_s), t) - 1)


def mix_at(phases: Sequence[Phase], duration_s: float, t: float) -> Mapping[str, float]:
    """The mix in force at time `t` of a trace `duration_s` long (phase durations are fractions)."""
    return phases[phase_at(phases, duration_s, t)].mix


def make_trace(
    workload: str | Sequence[Phase],
    rate: float,
    duration_s: float,
    *,
    arrivals: str = "poisson",
    burst_factor: float = 3.0,
    burst_fraction: float = 0.2,
    mean_burst_s: float = 5.0,
    max_len: int = 2048,
    seed: int = 0,
) -> list[Request]:
    """Requests arriving over ``[0, duration_s)`` at mean `rate` per second.

    Args:
        workload: a name in `WORKLOADS` or a phase list (durations as fractions of the trace).
        arrivals: ``"poisson"`` or ``"bursty"`` (MMPP: a fraction `burst_fraction` of the time at
            `burst_factor` x the mean rate, bursts `mean_burst_s` long on average).
        max_len: prompt + output is clipped to this many tokens (the model's context).
    Returns:
        requests sorted by arrival time, ids 0..n-1.
    """
    if isinstance(workload, str) and workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {sorted(WORKLOADS)}")
    phases = WORKLOADS[workload] if isinstance(workload, str) else tuple(workload)
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be > 0, got rate={rate}, duration_s={duration_s}")
    if arrivals not in ("poisson", "bursty"):
        raise ValueError(f"arrivals must be 'poisson' or 'bursty', got {arrivals!r}")
    if arrivals == "bursty" and not (0 < burst_fraction < 1 and burst_factor * burst_fraction < 1):
        raise ValueError("bursty arrivals need 0 < burst_fraction < 1 and burst_factor * burst_fraction < 1")
    rng = random.Random(seed)
    out: list[Request] = []
    t = 0.0
    # MMPP state: rate during bursts and calm so that the time-average rate equals `rate`.
    burst = False
    hi = rate * burst_factor
    lo = rate * (1 - burst_factor * burst_fraction) / (1 - burst_fraction)
    mean_calm_s = mean_burst_s * (1 - burst_fraction) / burst_fraction
    switch_at = rng.expovariate(1 / mean_calm_s) if arrivals == "bursty" else math.inf
    while True:
        cur = (hi if burst else lo) if arrivals == "bursty" else rate
        dt = rng.expovariate(cur) if cur > 0 else math.inf
        if t + dt >= switch_at:
            t = switch_at
            burst = not burst
            switch_at = t + rng.expovariate(1 / (mean_burst_s if burst else mean_calm_s))
            continue
        t += dt
        if t >= duration_s:
            break
        mix = mix_at(phases, duration_s, t)
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        pd, od = KINDS[kind]
        p = min(pd.sample(rng), max_len - 8)
        o = max(1, min(od.sample(rng), max_len - p))
        out.append(Request(len(out), t, p, o, kind))
    return out
