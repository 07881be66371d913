"""A KV cache sized for the model and the machine, for CPU engines served with the plugin.

vLLM's CPU worker reserves `--gpu-memory-utilization` (0.92) of its NUMA node unless a KV size is given, and
refuses to start when that much is not free: on a 2-core machine with 23 GiB whose node 0 reports 7.5 GiB,
`make serve` failed that way. When the user set no size (`VLLM_CPU_KVCACHE_SPACE`, `--kv-cache-memory-bytes`),
we give vLLM one: room for `max_num_seqs` sequences of `max_model_len` tokens, at most a quarter of the memory
available now, and at least one full-length sequence; when even that does not fit, one clear line says what
to change.
"""

from __future__ import annotations

import logging

from vllm_frontier.errors import FeatureError

from .feature import text_config

logger = logging.getLogger("vllm.frontier")

GiB = 1 << 30
# Share of the memory available at start-up the KV cache may take (weights and activations need the rest).
KV_SHARE = 0.25


def kv_bytes_per_token(vllm_config) -> int:
    """KV cache bytes one token takes over all attention layers (MTP layers and the DSA indexer cache included)."""
    model_config = vllm_config.model_config
    text = text_config(model_config.hf_config)
    layers = model_config.get_num_layers(vllm_config.parallel_config) + (
        getattr(text, "num_nextn_predict_layers", 0) or 0)
    cache_dtype = vllm_config.cache_config.cache_dtype
    elem = model_config.dtype.itemsize if cache_dtype in ("auto", None) else (
        2 if cache_dtype in ("bfloat16", "float16") else 1)
    if getattr(text, "kv_lora_rank", None) is not None:
        from vllm_frontier.kernels.ref import FP8_ROW_BYTES

        row = (FP8_ROW_BYTES if cache_dtype == "fp8_ds_mla"
               else (text.kv_lora_rank + text.qk_rope_head_dim) * elem)
        if getattr(text, "index_topk", None) is not None:
            head = getattr(text, "index_head_dim", 128)
            row += head + head // 128 * 4  # fp8 indexer keys + one fp32 scale per 128
        return row * layers
    heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
    return 2 * heads * model_config.get_head_size() * elem * layers


def plan_kv_cache_bytes(bytes_per_token: int, max_model_len: int, max_num_seqs: int, available: int) -> int:
    """The KV cache size for these numbers; FeatureError when one full-length sequence does not fit."""
    one_seq = bytes_per_token * max_model_len
    if one_seq > available * KV_SHARE:
        raise FeatureError(
            f"not enough memory for the KV cache of one {max_model_len}-token sequence "
            f"({one_seq / GiB:.2f} GiB needed, {available / GiB:.2f} GiB available): lower --max-model-len, "
            "or set VLLM_CPU_KVCACHE_SPACE (GiB) yourself")
    return max(one_seq, min(one_seq * max_num_seqs, int(available * KV_SHARE)))


def size_kv_cache(vllm_config) -> None:
    """Set `cache_config.kv_cache_memory_bytes` unless the user chose a KV size."""
    import psutil

    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes is not None or vllm_config.model_config is None:
        return
    per_token = kv_bytes_per_token(vllm_config)
    size = plan_kv_cache_bytes(per_token, vllm_config.model_config.max_model_len,
                               vllm_config.scheduler_config.max_num_seqs, psutil.virtual_memory().available)
    cache.kv_cache_memory_bytes = size
    logger.info("vllm-frontier: CPU KV cache %.2f GiB (%d bytes per token; set VLLM_CPU_KVCACHE_SPACE to choose)",
                size / GiB, per_token)
