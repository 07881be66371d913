"""Speculative expert-parallel MoE: our all-to-all dispatch/combine inside vLLM's MoE layers (CPU, gloo)."""

from __future__ import annotations

import logging

from .feature import Feature, text_config

logger = logging.getLogger("vllm.frontier")


class SpecMoEFeature(Feature):
    name = "spec_moe"

    def applies(self, hf_config) -> str | None:
        text = text_config(hf_config)
        n_experts = getattr(text, "n_routed_experts", None) or getattr(text, "num_experts", None) or 0
        return None if n_experts > 0 else "the model has no routed experts"

    def unmet(self, vllm_config) -> str | None:
        par = vllm_config.parallel_config
        if not par.enable_expert_parallel or par.tensor_parallel_size * par.data_parallel_size <= 1:
            return ("speculative MoE needs expert parallelism: add --enable-expert-parallel and "
                    "--tensor-parallel-size N or --data-parallel-size N")
        if self.settings.fp4:
            return ("speculative MoE runs unquantized experts and does not combine with fp4 "
                    "(FP4 experts keep their own method); choose one")
        return None

    def update_config(self, vllm_config) -> None:
        from vllm_frontier.moe.settings import read_settings

        read_settings()  # a wrong FRONTIER_SPEC_MOE_* value ends the launch here, in one line
        if not vllm_config.model_config.enforce_eager:
            # The dispatch plans token ranks with data-dependent control flow that torch.compile cannot trace;
            # the same switch as --enforce-eager (vLLM applies it in VllmConfig.__post_init__, before this hook).
            from vllm.config import CompilationMode, CUDAGraphMode

            vllm_config.model_config.enforce_eager = True
            vllm_config.compilation_config.mode = CompilationMode.NONE
            vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
            logger.info("vllm-frontier: spec_moe runs eagerly (its dispatch is not traced by torch.compile)")

    def register(self) -> None:
        from vllm_frontier.moe import register

        register()
