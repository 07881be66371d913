"""DeepSeek Sparse Attention: our sparse MLA backend + lightning indexer for models with an indexer."""

from __future__ import annotations

import logging

from vllm_frontier.errors import FeatureError

from .feature import Feature, text_config

logger = logging.getLogger("vllm.frontier")

SPARSE_MLA_BACKEND = "vllm_frontier.attention_backends.sparse_mla.FrontierSparseMLABackend"
# vLLM's indexer-cache backend supports block size 64 only; every KV cache group must agree on one size.
DSA_BLOCK_SIZE = 64


def check_mla_geometry(text) -> None:
    """Our kernels serve DeepSeek's latent geometry only (512 latent + 64 rope): one clear line for any other."""
    from vllm_frontier.kernels.ref import LATENT_DIM

    head = (getattr(text, "kv_lora_rank", 0) or 0) + (getattr(text, "qk_rope_head_dim", 0) or 0)
    if head != LATENT_DIM:
        raise FeatureError(f"the DSA/MLA backends need kv_lora_rank + qk_rope_head_dim = {LATENT_DIM} "
                           f"(DeepSeek's 512 + 64); this model has {getattr(text, 'kv_lora_rank', None)} + "
                           f"{getattr(text, 'qk_rope_head_dim', None)}")


def apply_latent_cache_dtype(vllm_config) -> None:
    """`--kv-cache-dtype fp8` means the 656-byte FP8 latent rows with our backends (vLLM maps it so only for
    its FLASHMLA_SPARSE backend); other cache dtypes end the launch with one line."""
    from vllm_frontier.attention_backends.latent_cache_io import apply_kv_cache_dtype

    try:
        apply_kv_cache_dtype(vllm_config)
    except ValueError as e:
        raise FeatureError(str(e)) from None


class DSAFeature(Feature):
    name = "dsa"

    def applies(self, hf_config) -> str | None:
        if getattr(text_config(hf_config), "index_topk", None) is None:
            return "the model has no lightning indexer (no index_topk in its config)"
        return None

    def update_config(self, vllm_config) -> None:
        text = text_config(vllm_config.model_config.hf_config)
        check_mla_geometry(text)
        topk = text.index_topk
        if not isinstance(topk, int) or isinstance(topk, bool) or topk <= 0:
            raise FeatureError(f"index_topk must be a positive integer, the model's config.json has {topk!r}")
        apply_latent_cache_dtype(vllm_config)
        cache = vllm_config.cache_config
        if cache.block_size != DSA_BLOCK_SIZE:
            logger.info("vllm-frontier: DSA sets the KV block size to %d (was %s)", DSA_BLOCK_SIZE, cache.block_size)
            cache.block_size = DSA_BLOCK_SIZE

    def register(self) -> None:
        from vllm_frontier.attention_backends.indexer_op import register_indexer

        register_indexer()

    def register_kernel_overrides(self, device_type: str, capability: tuple[int, int] | None) -> None:
        from vllm_frontier.attention_backends import cpu_overrides

        cpu_overrides.register(device_type, capability)

    def attention_backend(self, selector) -> str | None:
        return SPARSE_MLA_BACKEND if selector.use_sparse else None
