"""Prefill/decode disaggregation: `FrontierPDConnector` moves the KV between vLLM instances."""

from __future__ import annotations

import logging
import os

from .feature import Feature

logger = logging.getLogger("vllm.frontier")


class PDFeature(Feature):
    name = "pd"

    def unmet(self, vllm_config) -> str | None:
        kv = vllm_config.kv_transfer_config
        if kv is not None and kv.kv_connector is not None:
            return None  # the user configured a connector; the connector checks its own settings
        if not os.environ.get("FRONTIER_PD_SECRET"):
            return "P/D needs FRONTIER_PD_SECRET (the same secret on every instance) and FRONTIER_PD_PORT"
        return None

    def update_config(self, vllm_config) -> None:
        """Add `FrontierPDConnector` in the `kv_both` role unless a connector is configured already."""
        from vllm.config import KVTransferConfig

        from vllm_frontier.kv_connectors import CONNECTOR_NAME

        kv = vllm_config.kv_transfer_config
        if kv is not None and kv.kv_connector is not None:
            return
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_load_failure_policy="recompute")
        logger.info("vllm-frontier: P/D connector %s (kv_both)", CONNECTOR_NAME)

    def register(self) -> None:
        from vllm_frontier.kv_connectors import register

        register()
