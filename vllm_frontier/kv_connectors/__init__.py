"""P/D disaggregation: `FrontierPDConnector` (KV moved between vLLM instances) and its transport.

Enable on each instance either with the plugin (``FRONTIER_PD=1`` / ``--plugin pd``, which
calls `register()`) plus::

    --kv-transfer-config '{"kv_connector": "FrontierPDConnector", "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute"}'

or without the plugin, naming the module::

    --kv-transfer-config '{"kv_connector": "FrontierPDConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "vllm_frontier.kv_connectors.connector"}'

Every instance needs ``FRONTIER_PD_SECRET`` (the same on all) and its own KV port
(``FRONTIER_PD_PORT`` or ``kv_port``); see `settings.py` for all ``FRONTIER_PD_*`` knobs.
The router (`vllm-frontier router`) drives the per-request protocol described in
`connector.py`. Layout: `wire` (encodings), `auth` (HMAC), `staging`, `transport`
(ZeroMQ) know nothing of vLLM; `connector` and `stats` are the vLLM-facing shim.
"""

CONNECTOR_NAME = "FrontierPDConnector"
CONNECTOR_MODULE = "vllm_frontier.kv_connectors.connector"

__all__ = ["CONNECTOR_NAME", "CONNECTOR_MODULE", "register"]


def register() -> None:
    """Register `FrontierPDConnector` in vLLM's connector factory (idempotent, cheap:
    the connector module is imported only when an engine builds the connector)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.get_connector_class_by_name(CONNECTOR_NAME)
        return  # already registered in this process
    except ValueError:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
