"""Dense Multi-head Latent Attention on our backend (any block size, FP8 latent cache) for MLA models."""

from __future__ import annotations

from .dsa import apply_latent_cache_dtype, check_mla_geometry
from .feature import Feature, text_config

DENSE_MLA_BACKEND = "vllm_frontier.attention_backends.dense_mla.FrontierMLABackend"


class MLAFeature(Feature):
    name = "mla"

    def applies(self, hf_config) -> str | None:
        text = text_config(hf_config)
        if getattr(text, "kv_lora_rank", None) is None:
            return "the model does not use Multi-head Latent Attention (no kv_lora_rank in its config)"
        if getattr(text, "index_topk", None) is not None and self.settings.dsa:
            return "the model uses sparse attention; the DSA backend serves it"
        return None

    def update_config(self, vllm_config) -> None:
        check_mla_geometry(text_config(vllm_config.model_config.hf_config))
        apply_latent_cache_dtype(vllm_config)

    def attention_backend(self, selector) -> str | None:
        return DENSE_MLA_BACKEND if selector.use_mla and not selector.use_sparse else None
