"""KV-cache dtype handling shared by the dense and sparse MLA backends.

`auto` (the model dtype) stores 576 values per token; `fp8_ds_mla` stores FlashMLA's 656-byte rows
(512 e4m3 values, 4 fp32 scales, 64 bf16 rope values), which vLLM allocates as opaque uint8.
"""

from __future__ import annotations

import torch

from vllm_frontier.kernels.latent_cache import write_latent_cache

SUPPORTED_KV_CACHE_DTYPES = ["auto", "float16", "bfloat16", "fp8_ds_mla"]


# --kv-cache-dtype spellings that mean an e4m3 FP8 cache; our backends store it as fp8_ds_mla (656-byte rows), as
# vLLM does for its FLASHMLA_SPARSE backend (mla_attention._canonicalize_sparse_mla_kv_cache_dtype; that rule
# keys on the backend name, and ours is CUSTOM, so it never fires for us).
FP8_ALIASES = ("fp8", "fp8_e4m3")


def canonical_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """The cache dtype our MLA backends store for a ``--kv-cache-dtype`` value: ``fp8`` / ``fp8_e4m3`` ->
    ``fp8_ds_mla``; anything else unchanged (unsupported values are refused by :func:`check_kv_cache_dtype`)."""
    return "fp8_ds_mla" if kv_cache_dtype in FP8_ALIASES else kv_cache_dtype


def apply_kv_cache_dtype(vllm_config) -> str:
    """Rewrite ``vllm_config.cache_config.cache_dtype`` to what our backends store (``fp8`` -> the 656-byte
    ``fp8_ds_mla``) and check it, so the KV cache spec, page size and the backends agree. For the platform's
    ``check_and_update_config`` (before the KV cache is sized), when our MLA / DSA backend serves the model.
    Returns the dtype now set."""
    cache_config = vllm_config.cache_config
    dtype = canonical_kv_cache_dtype(cache_config.cache_dtype)
    check_kv_cache_dtype(dtype, "the vllm-frontier MLA backends")
    cache_config.cache_dtype = dtype
    return dtype


def is_fp8_cache(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype == "fp8_ds_mla"


def check_kv_cache_dtype(kv_cache_dtype: str, backend: str) -> None:
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"{backend} supports --kv-cache-dtype {', '.join(SUPPORTED_KV_CACHE_DTYPES + list(FP8_ALIASES))}; got "
            f"{kv_cache_dtype!r}. fp8 (or fp8_ds_mla) is the 656-byte FP8 latent cache.")


def write_rows(kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
               kv_cache_dtype: str) -> None:
    """Write this step's latent rows into the paged cache (vLLM's CPU build lacks concat_and_cache_mla)."""
    if kv_cache.numel() == 0:
        return
    n = slot_mapping.shape[0]
    write_latent_cache(kv_c_normed[:n], k_pe.reshape(k_pe.shape[0], -1)[:n], kv_cache, slot_mapping.flatten(),
                       fp8=is_fp8_cache(kv_cache_dtype))
