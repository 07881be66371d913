"""Sparse MLA backend for DeepSeek-V3.2 (DSA): every query token attends to its indexer's top-k tokens only.

All tokens of a step, decode and prefill alike, take the absorbed (MQA) path, as FlashMLA's sparse kernels
do: our indexer (`indexer_op.py`) writes each token's top-k request-local positions into the shared
`topk_indices_buffer`; `forward_mqa` turns them into physical cache slots and hands those to
`flash_mla_with_kvcache(..., indices=...)` (Triton on GPUs, the vectorized torch reference on CPU).
Any `index_topk`, any block size, bf16/fp32 or FP8 cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.sparse_mla_attention import SharedTopkIndicesBuffer
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MLAAttentionImpl,
)

from vllm_frontier.kernels import dsa_cpu
from vllm_frontier.kernels._common import current_device, use_triton
from vllm_frontier.kernels.flash_mla_interface import (
    flash_mla_with_kvcache,
    request_positions_to_slots,
    warm_up_split_variants,
)
from vllm_frontier.kernels.sparse_mla_tokens import sparse_mla_tokens

from .absorbed_weights import make_absorbed_weights_contiguous
from .capabilities import LatentBackendCapabilities
from .latent_cache_io import check_kv_cache_dtype, is_fp8_cache, write_rows
from .token_layout import token_rows

logger = init_logger("vllm.frontier.sparse_mla")


class FrontierSparseMLABackend(LatentBackendCapabilities, AttentionBackend):
    @staticmethod
    def get_metadata_cls() -> type["FrontierSparseMLAMetadata"]:
        return FrontierSparseMLAMetadata

    @staticmethod
    def get_builder_cls() -> type["FrontierSparseMLAMetadataBuilder"]:
        return FrontierSparseMLAMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type["FrontierSparseMLAImpl"]:
        return FrontierSparseMLAImpl

    @classmethod
    def is_mla(cls) -> bool:
        return True

    @classmethod
    def is_sparse(cls) -> bool:
        return True


# Requests with at most this many query tokens (decode, MTP verification) are scored together by vLLM's
# paged C++ indexer kernel on CPU; longer ones (prefill chunks) against their contiguous keys.
SHORT_QUERY_LEN = 16
# A CPU step scoring at most this many (query token, key) pairs runs its DSA ops on one thread: a few
# milliseconds of work, where waking the other OpenMP threads for each small op costs more than it saves.
ONE_THREAD_PAIRS = 1 << 22


@dataclass
class CpuStepLayout:
    """Host-side layout of one step for the CPU path, built once per step by the metadata builder."""

    short_tokens: torch.Tensor  # [n_short] int64 tokens of short-query requests
    short_max_len: int  # max keys any of them sees
    long_requests: list[tuple[int, int, int, int]] = field(default_factory=list)  # (req, q0, q1, seq_len)
    one_thread: bool = False

    @classmethod
    def of(cls, short_tokens: torch.Tensor, short_max_len: int, long_requests=()) -> "CpuStepLayout":
        """The layout, on one thread when it is a small decode step (no prefill, few token-key pairs)."""
        small = not long_requests and short_tokens.numel() * short_max_len <= ONE_THREAD_PAIRS
        return cls(short_tokens, short_max_len, list(long_requests), one_thread=small)

    def threads(self):
        """Context in which this step's DSA ops run (one thread for small decode steps)."""
        return _one_thread() if self.one_thread else contextlib.nullcontext()


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class FrontierSparseMLAMetadata(AttentionMetadata):
    """One step's layout. Every token is an MQA ("decode") token: there is no separate prefill path."""

    num_reqs: int
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [num_reqs + 1]
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    seq_lens: torch.Tensor  # [num_reqs]
    token_req: torch.Tensor  # [num_actual_tokens] request of each token
    token_visible: torch.Tensor  # [num_actual_tokens] causal length (position + 1) of each token
    max_seq_len: int
    block_size: int
    topk_tokens: int
    num_decodes: int = 0
    num_decode_tokens: int = 0
    num_prefills: int = 0
    prefill: None = None
    decode: None = None
    cpu_layout: CpuStepLayout | None = None  # None off CPU


def cpu_step_layout(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, token_visible: torch.Tensor,
                    device: torch.device) -> CpuStepLayout:
    qsl = query_start_loc_cpu.tolist()
    seq = seq_lens_cpu.tolist()
    short, long_reqs = [], []
    for r, (q0, q1) in enumerate(zip(qsl[:-1], qsl[1:])):
        if q1 == q0:
            continue
        if q1 - q0 <= SHORT_QUERY_LEN:
            short.extend(range(q0, q1))
        else:
            long_reqs.append((r, q0, q1, int(seq[r])))
    short_t = torch.tensor(short, dtype=torch.int64, device=device)
    return CpuStepLayout.of(short_t, int(token_visible[short_t].max()) if short else 0, long_reqs)


class FrontierSparseMLAMetadataBuilder(AttentionMetadataBuilder[FrontierSparseMLAMetadata]):
    # Decode batches of one shape (1 token per request, or 1 + MTP drafts) replay as full CUDA graphs, as vLLM's
    # FLASHMLA_SPARSE: the forward path reads nothing on the host (tests/attention_backends/test_cudagraph_support.py).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.kv_cache_spec = kv_cache_spec
        self.topk_tokens = vllm_config.model_config.hf_text_config.index_topk
        self._aranges = torch.empty(0, dtype=torch.int64, device=device)

    def _arange(self, n: int) -> torch.Tensor:
        """``arange(n)`` int64, from one buffer grown as needed (a decode step's token -> request map)."""
        if self._aranges.numel() < n:
            self._aranges = torch.arange(max(n, 2 * self._aranges.numel()), device=self.device)
        return self._aranges[:n]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FrontierSparseMLAMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        layout = None
        if self.device.type == "cpu" and m.max_query_len == 1 and n == m.num_reqs:
            # a decode step (one token per request): the layout without per-token index arithmetic
            req, visible = self._arange(n), m.seq_lens[:n].to(torch.int32)
            layout = CpuStepLayout.of(req, int(m.max_seq_len))
        else:
            req, visible = token_rows(m.query_start_loc, m.seq_lens, n)
            if self.device.type == "cpu":
                layout = cpu_step_layout(m.query_start_loc_cpu, m.seq_lens, visible, self.device)
        return FrontierSparseMLAMetadata(
            num_reqs=m.num_reqs, num_actual_tokens=n, query_start_loc=m.query_start_loc,
            slot_mapping=m.slot_mapping[:n], block_table=m.block_table_tensor, seq_lens=m.seq_lens,
            token_req=req, token_visible=visible, max_seq_len=m.max_seq_len,
            block_size=self.kv_cache_spec.block_size, topk_tokens=self.topk_tokens,
            num_decodes=m.num_reqs, num_decode_tokens=n, num_prefills=0, cpu_layout=layout,
        )


class FrontierSparseMLAImpl(MLAAttentionImpl[FrontierSparseMLAMetadata], SharedTopkIndicesBuffer):
    is_sparse = True
    can_return_lse_for_decode = True
    _absorbed_contiguous = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap, attn_type, kv_sharing_target_layer_name, topk_indices_buffer=None,
                 indexer=None, **mla_args) -> None:
        if any([alibi_slopes, sliding_window, logits_soft_cap, kv_sharing_target_layer_name]):
            raise NotImplementedError("the vllm-frontier sparse MLA backend does not support alibi, sliding "
                                      "windows, logit soft-capping or KV sharing")
        check_kv_cache_dtype(kv_cache_dtype, "the vllm-frontier sparse MLA backend")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_lora_rank: int = mla_args["kv_lora_rank"]
        self.supports_quant_query_input = False
        self.dcp_world_size = 1
        self.init_topk_indices_buffer(indexer, topk_indices_buffer)
        logger.info_once("vllm-frontier: sparse MLA (DSA) backend (kv cache %s)", kv_cache_dtype)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        # every key-split variant of the decode kernel compiles now, not in the middle of serving
        warm_up_split_variants(self.num_heads, act_dtype, is_fp8_cache(self.kv_cache_dtype), sparse=True,
                               device=current_device())

    def record_logical_topk_ready(self) -> None:
        """The indexer has filled the shared top-k buffer (nothing to synchronize on one stream)."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: FrontierSparseMLAMetadata, layer):
        if not self._absorbed_contiguous:   # once per layer: vLLM leaves them strided (absorbed_weights.py)
            make_absorbed_weights_contiguous(layer)
            self._absorbed_contiguous = True
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        n = q.shape[0]
        md = attn_metadata
        topk = self.topk_indices_buffer[:n, : md.topk_tokens]
        if md.cpu_layout is not None and not use_triton(None, q):
            cache = kv_c_and_k_pe_cache.squeeze(2) if kv_c_and_k_pe_cache.dim() == 4 else kv_c_and_k_pe_cache
            if not md.cpu_layout.long_requests and cache.dtype != torch.uint8 and dsa_cpu.available():
                # decode / MTP steps: one C++ call (the per-op cost of the torch path is what such a step pays)
                return dsa_cpu.sparse_mla(q, cache, md.block_table, md.token_req[:n], topk, self.scale)
            # gather each token's selected rows once per tile, batched products (no per-position masks)
            with md.cpu_layout.threads():
                return sparse_mla_tokens(q, cache, md.block_table, md.token_req[:n], topk, self.scale)
        # the indexer's request-local positions -> physical cache slots (FlashMLA's sparse indices)
        slots = request_positions_to_slots(
            topk, md.block_table[md.token_req[:n]], kv_c_and_k_pe_cache.shape[1], md.token_visible[:n]
        )
        out, lse = flash_mla_with_kvcache(
            q.unsqueeze(1), kv_c_and_k_pe_cache, None, None, head_dim_v=self.kv_lora_rank, softmax_scale=self.scale,
            is_fp8_kvcache=is_fp8_cache(self.kv_cache_dtype), indices=slots.unsqueeze(1),
        )
        return out[:, 0], lse[:, :, 0]

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        write_rows(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype)
