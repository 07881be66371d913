"""Connector counters, carried by vLLM's KV-connector stats path to `/metrics`.

Workers report deltas each step (`FrontierPDStats`); vLLM aggregates them and the API
server's Prometheus logger calls `FrontierPDPromMetrics.observe`, which exposes
``frontier_pd_<name>_total`` counters and ``frontier_pd_staging_*`` gauges (labels
``model_name``, ``engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

__all__ = ["COUNTERS", "GAUGES", "FrontierPDStats", "FrontierPDPromMetrics"]

COUNTERS = {
    "staged_bytes": "KV bytes copied into prefill-side staging",
    "sent_transfers": "transfers fully sent to a decode instance",
    "sent_bytes": "KV bytes sent",
    "recv_transfers": "transfers fully received",
    "recv_bytes": "KV bytes received",
    "recv_wall_us": "wall time of successful pulls, microseconds (includes waiting for the prefill)",
    "pull_retries": "pull attempts restarted on a new connection (challenge unanswered, connection lost)",
    "recv_failed": "pulls that failed (rejected, lost, timed out, malformed) and fell back",
    "rejected_auth": "peers rejected for failing the HMAC challenge",
    "rejected_unknown": "pulls rejected for an unknown transfer id",
    "rejected_protocol": "malformed control frames rejected",
    "rejected_busy": "pulls rejected because too many sessions were open",
    "send_aborted": "sends cut short because the puller went away",
    "send_failed": "pulls refused because the transfer failed on the prefill side",
    "staging_expired": "staged transfers dropped unclaimed after the TTL",
}
GAUGES = {
    "staging_bytes_now": "KV bytes currently staged for pulls",
    "staging_transfers_now": "transfers currently staged",
}


@dataclass
class FrontierPDStats(KVConnectorStats):
    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in (other.data or {}).items():
            if k in GAUGES:  # a level, not a delta: the newest report wins
                self.data[k] = v
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if v}

    def is_empty(self) -> bool:
        return not any(v for k, v in self.data.items() if k not in GAUGES)


class FrontierPDPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"frontier_pd_{name}", documentation=doc,
                                  labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self._gauges = {
            name: create_metric_per_engine(
                self._gauge_cls(name=f"frontier_pd_{name}", documentation=doc,
                                labelnames=labelnames, multiprocess_mode="mostrecent"),
                per_engine_labelvalues,
            )
            for name, doc in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for k, v in (transfer_stats_data or {}).items():
            if k in self._counters and v:
                self._counters[k][engine_idx].inc(v)
            elif k in self._gauges:
                self._gauges[k][engine_idx].set(v)
