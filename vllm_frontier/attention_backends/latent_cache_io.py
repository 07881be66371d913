"""KV-cache dtype handling shared by the dense and sparse MLA backends.

`auto` (the model dtype) stores 576 values per token; `fp8_ds_mla` stores FlashMLA's 656-byte rows
(512 e4m3 values, 4 fp32 scales, 64 bf16 rope values), which vLLM allocates as opaque uint8.
"""

from __future__ import annotations

import torch

from vllm_frontier.kernels.latent_cache import write_latent_cache

SUPPORTED_KV_CACHE_DTYPES = ["auto", "float16", "bfloat16", "fp8_ds_mla"]


def is_fp8_cache(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype == "fp8_ds_mla"


def check_kv_cache_dtype(kv_cache_dtype: str, backend: str) -> None:
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"{backend} supports --kv-cache-dtype {', '.join(SUPPORTED_KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}. "
            "Use fp8_ds_mla for the 656-byte FP8 latent cache.")


def write_rows(kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
               kv_cache_dtype: str) -> None:
    """Write this step's latent rows into the paged cache (vLLM's CPU build lacks concat_and_cache_mla)."""
    if kv_cache.numel() == 0:
        return
    n = slot_mapping.shape[0]
    write_latent_cache(kv_c_normed[:n], k_pe.reshape(k_pe.shape[0], -1)[:n], kv_cache, slot_mapping.flatten(),
                       fp8=is_fp8_cache(kv_cache_dtype))
