"""Capabilities shared by our dense and sparse MLA backends (one latent head of 576, any block size)."""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import MultipleOf

from .latent_cache_io import SUPPORTED_KV_CACHE_DTYPES


class LatentBackendCapabilities:
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = SUPPORTED_KV_CACHE_DTYPES

    @staticmethod
    def get_name() -> str:
        # CUSTOM survives pickling into engine processes (a dynamically added enum member does not).
        return "CUSTOM"

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [576]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size > 0
