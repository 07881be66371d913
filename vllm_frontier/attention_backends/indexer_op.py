"""Lightning indexer for DeepSeek-V3.2 on any device, replacing vLLM's `SparseAttnIndexer` (DeepGEMM / CUDA
only; on CPU limited to index_topk == 512 without MTP).

Per step: quantize this step's indexer keys into vLLM's indexer K cache (fp8 + one fp32 scale per token),
score every visible token of the request, `sum_h w_h * relu(q_h . k)`, and write each query token's top-k
request-local positions (stable ties: lower position wins; -1 = unused) into the shared top-k buffer that
the sparse MLA backend reads. One kernel row per query token, so decode, MTP verification and chunked
prefill share one path.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer

from vllm_frontier.kernels.indexer import indexer_paged_logits, topk_indices, write_indexer_k_cache

from .sparse_mla import FrontierSparseMLAMetadata


class FrontierSparseAttnIndexer(SparseAttnIndexer):
    def __init__(self, k_cache, quant_block_size: int, scale_fmt: str | None, topk_tokens: int, head_dim: int,
                 max_model_len: int, max_total_seq_len: int, topk_indices_buffer: torch.Tensor,
                 skip_k_cache_insert: bool = False, use_fp4_cache: bool = False, compress_ratio: int = 1, **_):
        # vLLM's __init__ insists on DeepGEMM on CUDA; none of its state is needed here.
        CustomOp.__init__(self)
        if not isinstance(topk_tokens, int) or topk_tokens <= 0:
            raise ValueError(f"index_topk must be a positive integer, got {topk_tokens!r}")
        if use_fp4_cache or compress_ratio != 1 or skip_k_cache_insert:
            raise NotImplementedError("the vllm-frontier indexer supports DeepSeek-V3.2's FP8 indexer cache only "
                                      "(no FP4 cache, compression or external K-cache insertion)")
        self.k_cache = k_cache
        self.quant_block_size = quant_block_size
        self.scale_fmt = scale_fmt
        self.topk_tokens = topk_tokens
        self.head_dim = head_dim
        self.max_model_len = max_model_len
        self.max_total_seq_len = max_total_seq_len
        self.topk_indices_buffer = topk_indices_buffer
        self.skip_k_cache_insert = skip_k_cache_insert
        self.use_fp4_cache = use_fp4_cache
        self.compress_ratio = compress_ratio
        self.dcp_world_size = 1

    def forward_native(self, hidden_states: torch.Tensor, q_quant, k: torch.Tensor | None, weights: torch.Tensor):
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return self.topk_indices_buffer  # profiling run: no batch layout
        index_md = metadata.get(self.k_cache.prefix)
        mla_md = next((m for m in metadata.values() if isinstance(m, FrontierSparseMLAMetadata)), None)
        if index_md is None or mla_md is None:
            return self.topk_indices_buffer
        if isinstance(q_quant, tuple):
            raise NotImplementedError("FP4 indexer queries are not supported")
        n = mla_md.num_actual_tokens
        kv_cache = self.k_cache.kv_cache
        if k is not None:
            write_indexer_k_cache(k[:n], kv_cache, index_md.slot_mapping[:n], scale_fmt=self.scale_fmt)
        req, visible = mla_md.token_req[:n], mla_md.token_visible[:n]
        out = self.topk_indices_buffer[:n, : self.topk_tokens]
        if n == 0:
            return self.topk_indices_buffer
        max_len = int(visible.max().item())
        logits = indexer_paged_logits(
            q_quant[:n].unsqueeze(1), weights[:n].float().unsqueeze(1), kv_cache, index_md.block_table[req],
            visible, max_len, causal=False,
        )
        out.copy_(topk_indices(logits[:, 0], self.topk_tokens, lengths=visible))
        return self.topk_indices_buffer

    forward_cpu = forward_native
    forward_cuda = forward_native
    forward_oot = forward_native


def register_indexer() -> None:
    """Make vLLM build our indexer wherever a model asks for `SparseAttnIndexer` (once per process)."""
    from vllm_frontier.compat import op_registry_oot

    if op_registry_oot().get("SparseAttnIndexer") is not FrontierSparseAttnIndexer:
        SparseAttnIndexer.register_oot(FrontierSparseAttnIndexer)
