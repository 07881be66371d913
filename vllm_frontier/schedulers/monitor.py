"""Resource monitor: scrapes each vLLM instance's ``/metrics`` and the router's `InstancePool`, and turns
them into the controller's `LoadSample`.

Per instance (vLLM 0.32 Prometheus names, see docs/vllm-0.32-extension-points.md section 8):
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (gauges),
``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens`` (histograms: count and sum deltas
between scrapes), ``vllm:time_to_first_token_seconds`` and ``vllm:inter_token_latency_seconds``
(histograms: P90 of the bucket deltas). Router side (`PoolSnapshot`): end-to-end TTFT/TPOT samples, each streamed request's P90 / P99 gap
between tokens,
prompt lengths of finished requests, requests waiting for an instance.

`parse_metrics` and `MetricsDelta` are pure (testable on text); `scrape` does the HTTP.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from vllm_frontier.schedulers.controller import LoadSample
from vllm_frontier.schedulers.instance_pool import PoolSnapshot

__all__ = ["InstanceMetrics", "parse_metrics", "MetricsDelta", "delta", "histogram_quantile",
           "scrape", "build_sample", "SampleBuilder"]

_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_usage"}
_HISTS = {"vllm:request_prompt_tokens": "prompt_tokens", "vllm:request_generation_tokens": "generation_tokens",
          "vllm:time_to_first_token_seconds": "ttft", "vllm:inter_token_latency_seconds": "itl"}


@dataclass
class Histogram:
    """Cumulative Prometheus histogram: ``buckets`` maps upper bound (inf included) -> cumulative count."""

    count: float = 0.0
    total: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)


@dataclass
class InstanceMetrics:
    """One scrape of one instance (summed over the engines/models it reports)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    hists: dict[str, Histogram] = field(default_factory=dict)


def parse_metrics(text: str) -> InstanceMetrics:
    """Parse vLLM's Prometheus text; missing metrics read as zero."""
    out = InstanceMetrics()
    for fam in text_string_to_metric_families(text):
        name = fam.name
        if name in _GAUGES:
            vals = [s.value for s in fam.samples if s.name == name]
            if vals:
                # kv usage is a fraction per engine: average; counts: sum
                v = sum(vals) / len(vals) if _GAUGES[name] == "kv_usage" else sum(vals)
                setattr(out, _GAUGES[name], v)
        elif name in _HISTS:
            h = out.hists.setdefault(_HISTS[name], Histogram())
            for s in fam.samples:
                if s.name.endswith("_count"):
                    h.count += s.value
                elif s.name.endswith("_sum"):
                    h.total += s.value
                elif s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    h.buckets[le] = h.buckets.get(le, 0.0) + s.value
    return out


@dataclass
class MetricsDelta:
    """What happened on one instance between two scrapes (counts >= 0; a restart resets to the new values)."""

    running: float
    waiting: float
    kv_usage: float
    hists: dict[str, Histogram]

    def mean(self, name: str) -> float | None:
        h = self.hists.get(name)
        return h.total / h.count if h and h.count > 0 else None

    def count(self, name: str) -> float:
        h = self.hists.get(name)
        return h.count if h else 0.0


def delta(prev: InstanceMetrics | None, cur: InstanceMetrics) -> MetricsDelta:
    """Histogram increments from `prev` to `cur` (gauges are `cur`'s). A first scrape (`prev` None) yields
    empty histograms; a counter that went down (instance restarted) counts from zero."""
    hists = {}
    for k, h in cur.hists.items():
        p = prev.hists.get(k) if prev else None
        if p is None:
            hists[k] = Histogram()
        elif h.count < p.count:
            hists[k] = Histogram(h.count, h.total, dict(h.buckets))
        else:
            hists[k] = Histogram(h.count - p.count, h.total - p.total,
                                 {le: c - p.buckets.get(le, 0.0) for le, c in h.buckets.items()})
    return MetricsDelta(cur.running, cur.waiting, cur.kv_usage, hists)


def histogram_quantile(h: Histogram | None, q: float) -> float | None:
    """Quantile `q` (0..1) of a (delta) histogram by linear interpolation in its bucket, like PromQL's
    ``histogram_quantile``; None when empty. Values in the +Inf bucket report the last finite bound."""
    if h is None or h.count <= 0 or not h.buckets:
        return None
    bounds = sorted(h.buckets)
    rank = q * h.count
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = h.buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


async def scrape(session, urls: Iterable[str], timeout_s: float = 2.0) -> dict[str, InstanceMetrics | None]:
    """GET ``/metrics`` of every URL concurrently (aiohttp `session`); None for an instance that failed."""
    import aiohttp

    async def one(url: str) -> InstanceMetrics | None:
        try:
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    return None
                return parse_metrics(await r.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    urls = list(urls)
    res = await asyncio.gather(*(one(u) for u in urls))
    return dict(zip(urls, res))


def build_sample(
    t: float, window_s: float, snap: PoolSnapshot, deltas: Mapping[str, MetricsDelta | None],
    new_done: int, managed: Mapping[str, str],
) -> LoadSample:
    """Combine a pool snapshot and per-instance metric deltas into a `LoadSample`.

    Args:
        new_done: requests the router finished since the previous sample (``completed + failed`` delta):
            the last `new_done` prompt lengths of the snapshot are this window's.
        managed: url -> role (``prefill``/``decode``) of the instances the controller manages.
    """
    plens = snap.prompt_tokens[len(snap.prompt_tokens) - min(new_done, len(snap.prompt_tokens)):] if new_done else ()
    waiting_router = snap.waiting_prefill
    completed: list[tuple[int, int]] = []
    queued = 0.0
    queued_sq = 0.0
    running = 0
    mean_p = (sum(plens) / len(plens)) if plens else 0.0
    for url, role in managed.items():
        d = deltas.get(url)
        if d is None:
            continue
        if role == "decode":
            running += int(d.running)
            n = int(round(d.count("generation_tokens")))
            mp, mo = d.mean("prompt_tokens"), d.mean("generation_tokens")
            if n and mp is not None and mo is not None:
                completed.extend([(int(mp), int(round(mo)))] * n)
        else:
            # prompts queued inside prefill engines, sized by this window's mean prompt
            queued += d.waiting * mean_p
            queued_sq += d.waiting * mean_p * mean_p
    queued += waiting_router * mean_p
    queued_sq += waiting_router * mean_p * mean_p
    ttft = _p90(snap.ttft_s)
    tpot = _p90(snap.tpot_s)
    n_p = sum(1 for r in managed.values() if r == "prefill")
    # Requests still waiting at the router have arrived too (their lengths are not known yet: use the mean).
    arrivals = tuple(int(x) for x in plens) + ((int(mean_p),) * waiting_router if mean_p else ())
    return LoadSample(t=t, window_s=window_s, prompt_lens=arrivals, completed=tuple(completed),
                      n_prefill=n_p, n_decode=len(managed) - n_p, queued_prefill_tokens=queued,
                      queued_prefill_sq_tokens=queued_sq, running_decode=running,
                      ttft_p90_s=ttft, tpot_p90_s=tpot,
                      tbt_p90_s=_p90(snap.tbt_p90_s), tbt_p99_s=_p90(snap.tbt_p99_s))


def _p90(xs: tuple[float, ...]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


class SampleBuilder:
    """Keeps the previous scrape per instance and the router's done counter between samples."""

    def __init__(self) -> None:
        self._prev: dict[str, InstanceMetrics] = {}
        self._done: int | None = None
        self._t: float | None = None

    def sample(self, t: float, snap: PoolSnapshot, scraped: Mapping[str, InstanceMetrics | None],
               managed: Mapping[str, str], default_window_s: float) -> LoadSample:
        deltas = {}
        for url, m in scraped.items():
            if m is None:
                deltas[url] = None
                continue
            deltas[url] = delta(self._prev.get(url), m)
            self._prev[url] = m
        done = snap.completed + snap.failed
        new_done = 0 if self._done is None else max(0, done - self._done)
        self._done = done
        window = (t - self._t) if self._t is not None and t > self._t else default_window_s
        self._t = t
        return build_sample(t, window, snap, deltas, new_done, managed)
