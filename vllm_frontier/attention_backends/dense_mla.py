"""Dense MLA backend (`--plugin mla`): vLLM's MLA scaffolding with decode on our FlashMLA-equivalent kernels.

Prefill runs vLLM's own non-absorbed (MHA) path; decode, including MTP verification steps with several
query tokens per request, runs the absorbed (MQA) form through `flash_mla_with_kvcache`: Triton on GPUs,
the vectorized torch reference on CPU. Any block size; bf16/fp16/fp32 or the 656-byte FP8 cache.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
)
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

from vllm_frontier.kernels._common import current_device
from vllm_frontier.kernels.flash_mla_interface import (
    flash_mla_with_kvcache,
    get_mla_metadata,
    plan_num_splits,
    warm_up_split_variants,
)

from .absorbed_weights import make_absorbed_weights_contiguous
from .capabilities import LatentBackendCapabilities
from .latent_cache_io import check_kv_cache_dtype, is_fp8_cache, write_rows
from .token_layout import token_rows

logger = init_logger("vllm.frontier.dense_mla")


class FrontierMLABackend(LatentBackendCapabilities, MLACommonBackend):
    @staticmethod
    def get_impl_cls() -> type["FrontierMLAImpl"]:
        return FrontierMLAImpl

    @staticmethod
    def get_builder_cls() -> type["FrontierMLAMetadataBuilder"]:
        return FrontierMLAMetadataBuilder


class FrontierMLAMetadataBuilder(MLACommonMetadataBuilder[MLACommonMetadata]):
    """vLLM's MLA metadata, with the CUDA-graph support of our decode kernel declared: single-token decode
    batches replay as full graphs. vLLM's builder classifies requests of several query tokens (MTP
    verification) as prefills (``query_len_support`` SINGLE_ONLY), which run vLLM's MHA prefill: with MTP,
    vLLM resolves decode graphs to piecewise."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> MLACommonMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        # The key-split schedule, once per step for every layer, from host numbers: the per-layer forward must
        # not read the longest context from the device (CUDA graphs).
        md.frontier_schedule = None
        if md.decode is not None and md.num_decodes > 0:
            splits = plan_num_splits(md.num_decode_tokens, 1, self.num_heads, common_attn_metadata.max_seq_len,
                                     self.device)
            md.frontier_schedule, _ = get_mla_metadata(num_splits=splits)
        return md


class FrontierMLAImpl(CPUMLAImpl):
    """CPU-safe attribute setup from vLLM's CPU MLA impl; decode and cache writes are ours."""

    can_return_lse_for_decode: bool = True
    _absorbed_contiguous = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_kv_cache_dtype(self.kv_cache_dtype, "the vllm-frontier MLA backend")
        logger.info_once("vllm-frontier: dense MLA backend (kv cache %s)", self.kv_cache_dtype)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        # every key-split variant of the decode kernel compiles now, not in the middle of serving
        warm_up_split_variants(self.num_heads, act_dtype, is_fp8_cache(self.kv_cache_dtype), sparse=False,
                               device=current_device())

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLACommonMetadata, layer):
        if not self._absorbed_contiguous:   # once per layer: vLLM leaves them strided (absorbed_weights.py)
            make_absorbed_weights_contiguous(layer)
            self._absorbed_contiguous = True
        decode = attn_metadata.decode
        assert decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        num_tokens = q.shape[0]
        # Decode requests come first in the batch; each of their tokens becomes one kernel row.
        qsl = attn_metadata.query_start_loc[: attn_metadata.num_decodes + 1]
        req, visible = token_rows(qsl, decode.seq_lens, num_tokens)
        out, lse = flash_mla_with_kvcache(
            q.unsqueeze(1), kv_c_and_k_pe_cache, decode.block_table[req], visible,
            head_dim_v=self.kv_lora_rank, softmax_scale=self.scale, is_fp8_kvcache=is_fp8_cache(self.kv_cache_dtype),
            tile_scheduler_metadata=getattr(attn_metadata, "frontier_schedule", None),
        )
        return out[:, 0], lse[:, :, 0]

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        write_rows(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype)
