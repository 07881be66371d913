"""Settings of a `FrontierPDConnector` instance: one frozen dataclass, one reader.

Each value comes from ``kv_connector_extra_config`` first, then the environment, then
the default (the KV port falls back to ``kv_transfer_config.kv_port``):

| extra_config key   | environment                  | default       | meaning |
|--------------------|------------------------------|---------------|---------|
| host               | FRONTIER_PD_HOST             | 127.0.0.1     | address the KV listener binds |
| advertise_host     | FRONTIER_PD_ADVERTISE_HOST   | host          | address peers dial (set when host is 0.0.0.0) |
| port               | FRONTIER_PD_PORT             | kv_port 14579 | KV listener port of TP rank 0 (rank r: port + r) |
| secret             | FRONTIER_PD_SECRET           | (required)    | shared secret for the HMAC challenge |
| wire               | FRONTIER_PD_WIRE             | raw           | raw (exact) or fp8 (656 B/token/layer for MLA) |
| transport          | FRONTIER_PD_TRANSPORT        | zmq           | zmq, nixl (payloads by NIXL READ) or auto (nixl when importable) |
| timeout_s          | FRONTIER_PD_TIMEOUT          | 30            | longest a pull may take before recompute |
| idle_timeout_s     | FRONTIER_PD_IDLE_TIMEOUT     | 10            | longest silence inside a pull |
| unknown_wait_s     | FRONTIER_PD_UNKNOWN_WAIT     | 10            | how long a server waits for a transfer id it does not know yet |
| staging_ttl_s      | FRONTIER_PD_STAGING_TTL      | 480           | staged KV no puller is on is dropped this long after its last chunk |
| staging_max_bytes  | FRONTIER_PD_STAGING_MAX_BYTES| 4 GiB         | staged KV budget; oldest transfers go first |

Prefer the environment for the secret: vLLM logs its config, extra_config included.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from vllm_frontier.kv_connectors.transport import TRANSPORTS
from vllm_frontier.kv_connectors.wire import ENCODINGS

TRANSPORT_NAMES = (*TRANSPORTS, "auto")

__all__ = ["PDSettings", "read_settings"]


@dataclass(frozen=True)
class PDSettings:
    host: str
    advertise_host: str
    port: int
    secret: bytes
    wire: str
    transport: str
    timeout_s: float
    idle_timeout_s: float
    unknown_wait_s: float
    staging_ttl_s: float
    staging_max_bytes: int

    def kv_addr(self, rank: int = 0) -> str:
        return f"tcp://{self.advertise_host}:{self.port + rank}"


def _pick(extra: dict[str, Any], key: str, env: str, default: Any) -> Any:
    if key in extra and extra[key] is not None:
        return extra[key]
    v = os.environ.get(env)
    return default if v in (None, "") else v


def _num(name: str, value: Any, cast, minimum: float) -> Any:
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"frontier-pd: {name} must be a number, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"frontier-pd: {name} must be >= {minimum}, got {v}")
    return v


def read_settings(extra: dict[str, Any] | None, kv_port: int = 14579) -> PDSettings:
    """Build `PDSettings` from ``kv_connector_extra_config`` and ``FRONTIER_PD_*``."""
    extra = dict(extra or {})
    host = str(_pick(extra, "host", "FRONTIER_PD_HOST", "127.0.0.1"))
    adv = _pick(extra, "advertise_host", "FRONTIER_PD_ADVERTISE_HOST", None)
    if adv is None:
        adv = socket.gethostname() if host in ("0.0.0.0", "::", "*") else host
    secret = _pick(extra, "secret", "FRONTIER_PD_SECRET", None)
    if not secret:
        raise ValueError(
            "frontier-pd: no shared secret; set FRONTIER_PD_SECRET (the same value on every "
            "prefill and decode instance) or kv_connector_extra_config.secret"
        )
    wire = str(_pick(extra, "wire", "FRONTIER_PD_WIRE", "raw"))
    if wire not in ENCODINGS:
        raise ValueError(f"frontier-pd: wire must be one of {ENCODINGS}, got {wire!r}")
    transport = str(_pick(extra, "transport", "FRONTIER_PD_TRANSPORT", "zmq"))
    if transport not in TRANSPORT_NAMES:
        raise ValueError(f"frontier-pd: transport must be one of {TRANSPORT_NAMES}, got {transport!r}")
    return PDSettings(
        host=host,
        advertise_host=str(adv),
        port=_num("port", _pick(extra, "port", "FRONTIER_PD_PORT", kv_port), int, 1),
        secret=str(secret).encode(),
        wire=wire,
        transport=transport,
        timeout_s=_num("timeout_s", _pick(extra, "timeout_s", "FRONTIER_PD_TIMEOUT", 30), float, 0.1),
        idle_timeout_s=_num("idle_timeout_s",
                            _pick(extra, "idle_timeout_s", "FRONTIER_PD_IDLE_TIMEOUT", 10), float, 0.1),
        unknown_wait_s=_num("unknown_wait_s",
                            _pick(extra, "unknown_wait_s", "FRONTIER_PD_UNKNOWN_WAIT", 10), float, 0),
        staging_ttl_s=_num("staging_ttl_s",
                           _pick(extra, "staging_ttl_s", "FRONTIER_PD_STAGING_TTL", 480), float, 1),
        staging_max_bytes=_num("staging_max_bytes",
                               _pick(extra, "staging_max_bytes", "FRONTIER_PD_STAGING_MAX_BYTES", 4 << 30),
                               int, 1),
    )
