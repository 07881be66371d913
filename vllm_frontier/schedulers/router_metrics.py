"""Prometheus metrics of the P/D router (its own registry, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RouterMetrics"]

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("frontier_router_requests", "requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.retries = Counter("frontier_router_retries", "stage retries after an instance failed",
                               ["stage"], registry=r)
        self.ttft = Histogram("frontier_router_ttft_seconds",
                              "time to first token seen by the router (streaming: first "
                              "content chunk; non-streaming: prefill response)",
                              buckets=_LAT_BUCKETS, registry=r)
        self.tpot = Histogram("frontier_router_tpot_seconds", "mean time per output token after the first",
                              buckets=_LAT_BUCKETS, registry=r)
        self.e2e = Histogram("frontier_router_e2e_seconds", "request latency",
                             buckets=_LAT_BUCKETS, registry=r)
        self.inflight = Gauge("frontier_router_inflight", "requests in flight per instance and stage",
                              ["instance", "stage"], registry=r)
        self.queue = Gauge("frontier_router_queue", "requests waiting for an instance, per stage",
                           ["stage"], registry=r)
        self.healthy = Gauge("frontier_router_instance_up", "1 when the instance is in rotation",
                             ["instance", "role"], registry=r)
        self.kv_bytes = Gauge("frontier_router_kv_bytes_moved",
                              "KV bytes received by decode instances (sum of their "
                              "frontier_pd_recv_bytes_total, scraped at each /metrics read)",
                              registry=r)
