"""The P/D request protocol shared by the router (`schedulers/router.py`) and the connector
(`kv_connectors/connector.py`): what a request's `kv_transfer_params` say, and what an instance answers.

- produce: `{"frontier_pd": "produce", "transfer_id": T[, "wire": "raw"|"fp8"]}`; the answer carries
  `{"frontier_pd": "produced", "transfer_id": T, "remote_addr": A, ...}`;
- consume: `{"frontier_pd": "consume", "transfer_id": T, "remote_addr": A, "do_remote_prefill": True}`;
- hello: `{"frontier_pd": "hello"}`; the answer carries `{"frontier_pd": "hello", "kv_addr": A}`.
"""

from __future__ import annotations

PARAM = "frontier_pd"
PRODUCE, PRODUCED, CONSUME, HELLO = "produce", "produced", "consume", "hello"


def produce_params(transfer_id: str, wire: str | None = None) -> dict:
    return {PARAM: PRODUCE, "transfer_id": transfer_id, **({"wire": wire} if wire else {})}


def consume_params(transfer_id: str, remote_addr: str) -> dict:
    return {PARAM: CONSUME, "transfer_id": transfer_id, "remote_addr": remote_addr, "do_remote_prefill": True}


def hello_params() -> dict:
    return {PARAM: HELLO}


def kind(params: dict | None) -> str | None:
    """Which protocol message a request's `kv_transfer_params` carry (None: not ours)."""
    return (params or {}).get(PARAM)
