"""Which features apply to the model being served, and the vLLM config changes they need.

Called from our platform hooks (`check_and_update_config` runs in the API process and the engine core;
`get_attn_backend_cls` wherever an attention layer is built). A feature that is switched on but does not
apply to the model stays off with one log line saying why; `--plugin all` relies on that.
"""

from __future__ import annotations

import logging

from .features import Features

logger = logging.getLogger("vllm.frontier")

SPARSE_MLA_BACKEND = "vllm_frontier.attention_backends.sparse_mla.FrontierSparseMLABackend"
DENSE_MLA_BACKEND = "vllm_frontier.attention_backends.dense_mla.FrontierMLABackend"
# vLLM's indexer-cache backend supports block size 64 only; every KV cache group must agree on one size.
DSA_BLOCK_SIZE = 64


def attention_backend_path(features: Features, selector) -> str | None:
    """Our backend's class path for this attention layer, or None to let vLLM choose."""
    if selector.use_sparse and features.dsa:
        return SPARSE_MLA_BACKEND
    if selector.use_mla and not selector.use_sparse and features.mla:
        return DENSE_MLA_BACKEND
    return None


def applicable(features: Features, hf_config) -> dict[str, str | None]:
    """For each switched-on feature: None if it applies to the model, else the reason it stays off."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    has_indexer = getattr(text, "index_topk", None) is not None
    is_mla = getattr(text, "kv_lora_rank", None) is not None
    n_mtp = getattr(text, "num_nextn_predict_layers", 0) or 0
    n_experts = getattr(text, "n_routed_experts", None) or getattr(text, "num_experts", None) or 0
    out: dict[str, str | None] = {}
    if features.dsa:
        out["dsa"] = None if has_indexer else "the model has no lightning indexer (no index_topk in its config)"
    if features.mla:
        if not is_mla:
            out["mla"] = "the model does not use Multi-head Latent Attention (no kv_lora_rank in its config)"
        elif has_indexer and features.dsa:
            out["mla"] = "the model uses sparse attention; the DSA backend serves it"
        else:
            out["mla"] = None
    if features.mtp:
        out["mtp"] = None if n_mtp > 0 else "the model has no MTP layers (num_nextn_predict_layers is 0)"
    if features.spec_moe:
        out["spec_moe"] = None if n_experts > 0 else "the model has no routed experts"
    if features.fp4:
        out["fp4"] = None
    if features.pd:
        out["pd"] = None
    return out


def update_config(features: Features, vllm_config) -> None:
    """Apply the config changes of the features that apply; log the ones that stay off and why."""
    from . import announce

    announce(features)
    model_config = vllm_config.model_config
    if model_config is None or not features.any:
        return
    hf_config = model_config.hf_config
    for name, reason in applicable(features, hf_config).items():
        if reason is not None:
            logger.info("vllm-frontier: %s stays off: %s", name, reason)
    if features.fp4 and model_config.quantization is None and vllm_config.quant_config is None:
        _select_fp4(vllm_config)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    topk = getattr(text, "index_topk", None)
    if features.dsa and topk is not None:
        if not isinstance(topk, int) or topk <= 0:
            from .cli_flag import fail

            fail(f"index_topk must be a positive integer, the model's config.json has {topk!r}")
        cache = vllm_config.cache_config
        if cache.block_size != DSA_BLOCK_SIZE:
            logger.info("vllm-frontier: DSA sets the KV block size to %d (was %s)", DSA_BLOCK_SIZE, cache.block_size)
            cache.block_size = DSA_BLOCK_SIZE
    if features.mtp:
        from vllm_frontier.spec_decode import update_vllm_config

        update_vllm_config(vllm_config)


def _select_fp4(vllm_config) -> None:
    """FRONTIER_FP4 without `--quantization`: quantize the unquantized checkpoint online with frontier_fp4."""
    from vllm.config import VllmConfig

    from vllm_frontier.quantization import QUANT_NAME

    vllm_config.model_config.quantization = QUANT_NAME
    vllm_config.quant_config = VllmConfig._get_quantization_config(vllm_config.model_config, vllm_config.load_config)
    logger.info("vllm-frontier: FP4 selects --quantization %s", QUANT_NAME)


def register_cpu_kernel_overrides(features: Features) -> None:
    """Torch replacements for vLLM Triton kernels that our features reach on CPU (Triton is off there)."""
    if features.dsa:
        from vllm_frontier.attention_backends import cpu_overrides

        cpu_overrides.register()
