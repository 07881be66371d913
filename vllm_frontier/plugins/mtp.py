"""MTP speculative decoding: the model's own MTP layers draft, with an adaptive draft length."""

from __future__ import annotations

import logging

from .feature import Feature, text_config

logger = logging.getLogger("vllm.frontier")


class MTPFeature(Feature):
    name = "mtp"

    def applies(self, hf_config) -> str | None:
        n_mtp = getattr(text_config(hf_config), "num_nextn_predict_layers", 0) or 0
        return None if n_mtp > 0 else "the model has no MTP layers (num_nextn_predict_layers is 0)"

    def not_worth_it(self) -> str | None:
        from vllm_frontier.spec_decode.device import mtp_pays

        pays, why = mtp_pays()
        return None if pays else why

    def update_config(self, vllm_config) -> None:
        """Add MTP drafting (`{"method": "mtp", "num_speculative_tokens": K}`) unless the user chose a
        speculative method, then let the adaptive scheduler choose the draft length per step."""
        from vllm.config import SpeculativeConfig

        from vllm_frontier import compat
        from vllm_frontier.spec_decode import update_vllm_config

        if vllm_config.speculative_config is None:
            vllm_config.speculative_config = SpeculativeConfig(
                method="mtp", num_speculative_tokens=self.settings.mtp_k,
                target_model_config=vllm_config.model_config, target_parallel_config=vllm_config.parallel_config)
            compat.refresh_after_speculative_config(vllm_config)
            logger.info("vllm-frontier: MTP drafting with up to %d tokens per step", self.settings.mtp_k)
        update_vllm_config(vllm_config)

    def register(self) -> None:
        from vllm_frontier.spec_decode import register

        register()
