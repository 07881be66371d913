"""FP4 (NVFP4 / MXFP4) online weight quantization: the `frontier_fp4` quantization method."""

from __future__ import annotations

import logging

from .feature import Feature

logger = logging.getLogger("vllm.frontier")


class FP4Feature(Feature):
    name = "fp4"

    def not_worth_it(self) -> str | None:
        from vllm_frontier.quantization.device import pays_on_this_device

        pays, why = pays_on_this_device()
        return None if pays else why

    def update_config(self, vllm_config) -> None:
        """Select `frontier_fp4` in the format asked for, unless the user chose another quantization method."""
        from vllm_frontier.quantization import QUANT_NAME
        from vllm_frontier.quantization.fp4_config import FrontierFP4Config

        model_config = vllm_config.model_config
        if model_config.quantization not in (None, QUANT_NAME):
            logger.info("vllm-frontier: fp4 stays off: the model is quantized with %s", model_config.quantization)
            return
        current = vllm_config.quant_config
        if isinstance(current, FrontierFP4Config) and current.fmt == self.settings.fp4:
            return
        model_config.quantization = QUANT_NAME
        vllm_config.quant_config = FrontierFP4Config(self.settings.fp4)
        logger.info("vllm-frontier: FP4 selects --quantization %s (%s)", QUANT_NAME, self.settings.fp4)

    def register(self) -> None:
        from vllm_frontier.quantization import register

        register()
