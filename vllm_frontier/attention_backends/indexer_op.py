"""Lightning indexer for DeepSeek-V3.2 on any device, replacing vLLM's `SparseAttnIndexer` (DeepGEMM / CUDA
only; on CPU limited to index_topk == 512 without MTP).

Per step: quantize this step's indexer keys into vLLM's indexer K cache (fp8 + one fp32 scale per token),
score every visible token of the request, `sum_h w_h * relu(q_h . k)`, and write each query token's top-k
request-local positions (stable ties: lower position wins; -1 = unused) into the shared top-k buffer that
the sparse MLA backend reads.

Two paths, one result:
- CPU: decode / MTP tokens of all requests together in one call of our C++ kernel (`kernels/dsa_cpu.py`: scores
  and top-k; it also writes the K cache), or where it cannot be built, through vLLM's paged C++ scores
  (`fp8_paged_mqa_logits_cpu`) and a torch top-k; prefill chunks request by request against their keys read
  once as a contiguous matrix, in row tiles (`kernels/indexer_topk.py`); the step's layout comes from the
  metadata builder (no host syncs here).
- GPU (Triton): one kernel row per query token over the paged cache, in row chunks.
Both keep the working memory of one layer call under `WORKSPACE_BYTES`, and the profile run (no attention
metadata) runs the same path on one full-size tile, so vLLM's memory profile sees that peak.

The layer's forward is the registered custom op `torch.ops.vllm_frontier.sparse_attn_indexer` (it mutates the
top-k buffer, returns nothing), as vLLM's own indexer is `torch.ops.vllm.sparse_attn_indexer`: torch.compile
sees one opaque node, vLLM's piecewise compilation splits its graphs there (`register_indexer` adds it to the
attention ops vLLM's default `splitting_ops` hold), and breakable CUDA graphs end their capture segment there.
The op finds its layer by name in vLLM's static forward context, as vLLM's attention ops do.
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import Library
from vllm.forward_context import get_forward_context
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_frontier.kernels import dsa_cpu
from vllm_frontier.kernels._common import use_triton
from vllm_frontier.kernels.indexer import indexer_paged_logits, topk_indices, write_indexer_k_cache
from vllm_frontier.kernels.indexer_topk import (
    WORKSPACE_BYTES,
    indexer_topk_request,
    request_keys,
    stable_topk_prefix,
    tile_rows,
)

from .sparse_mla import FrontierSparseMLAMetadata

# fp32 [rows, max_len] buffers alive at once on the Triton path: logits and the top-k kernel's input view
_FLAT_BUFFERS = 2


def flat_chunk_rows(max_len: int, workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """Query rows per chunk on the Triton path so that its logits stay under `workspace_bytes`."""
    return max(1, workspace_bytes // (max(1, max_len) * 4 * _FLAT_BUFFERS))


def _paged_logits_cpp():
    return getattr(torch.ops._C, "fp8_paged_mqa_logits_cpu", None)


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
        self.layer_name = register_layer(k_cache.prefix + INDEXER_SUFFIX, self)

    def forward_native(self, hidden_states: torch.Tensor, q_quant, k: torch.Tensor | None, weights: torch.Tensor):
        if isinstance(q_quant, tuple):
            raise NotImplementedError("FP4 indexer queries are not supported")
        torch.ops.vllm_frontier.sparse_attn_indexer(q_quant, k, weights, self.topk_indices_buffer, self.layer_name)
        return self.topk_indices_buffer

    forward_cpu = forward_native
    forward_cuda = forward_native
    forward_oot = forward_native

    def run(self, q_quant: torch.Tensor, k: torch.Tensor | None, weights: torch.Tensor) -> None:
        """The op's body: K cache write, scores, top-k into `topk_indices_buffer`."""
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            self._profile_run(q_quant, weights)
            return
        index_md = metadata.get(self.k_cache.prefix)
        mla_md = next((m for m in metadata.values() if isinstance(m, FrontierSparseMLAMetadata)), None)
        if index_md is None or mla_md is None:
            return
        n = mla_md.num_actual_tokens
        kv_cache = self.k_cache.kv_cache
        out = self.topk_indices_buffer[:n]
        if mla_md.cpu_layout is not None and not use_triton(None, q_quant):
            # the torch ops of a small step run on one thread; the C++ kernel needs no switch
            with contextlib.nullcontext() if dsa_cpu.available() else mla_md.cpu_layout.threads():
                if k is not None:
                    write_indexer_k_cache(k[:n], kv_cache, index_md.slot_mapping[:n], scale_fmt=self.scale_fmt)
                if n:
                    self._forward_cpu_tiles(q_quant[:n], weights[:n], kv_cache, index_md.block_table, mla_md, out)
            return
        if k is not None:
            write_indexer_k_cache(k[:n], kv_cache, index_md.slot_mapping[:n], scale_fmt=self.scale_fmt)
        if n:
            self._forward_flat(q_quant[:n], weights[:n], kv_cache, index_md.block_table[mla_md.token_req[:n]],
                               mla_md.token_visible[:n], mla_md.max_seq_len, out)

    def _forward_cpu_tiles(self, q, weights, kv_cache, block_table, md: FrontierSparseMLAMetadata, out) -> None:
        layout, k = md.cpu_layout, self.topk_tokens
        cache = kv_cache.squeeze(2) if kv_cache.dim() == 4 else kv_cache
        paged_cpp = _paged_logits_cpp()
        short = layout.short_tokens
        if short.numel() and dsa_cpu.available():
            # one C++ call; a decode / MTP step (every token short) takes views, no gather
            rows = slice(0, q.shape[0]) if short.numel() == q.shape[0] else short
            out[rows, :k] = dsa_cpu.indexer_topk(q[rows], weights[rows], cache, block_table, md.token_req[rows],
                                                 md.token_visible[rows], k)
        elif short.numel():
            if paged_cpp is not None and layout.short_max_len * 4 * short.numel() <= WORKSPACE_BYTES:
                vis = md.token_visible[short]
                logits = paged_cpp(q[short], cache.view(cache.shape[0], -1), weights[short].float(), vis,
                                   block_table[md.token_req[short]], cache.shape[1], layout.short_max_len)
                out[short, :k] = stable_topk_prefix(logits, vis, k)
            else:
                self._forward_flat(q[short], weights[short], kv_cache, block_table[md.token_req[short]],
                                   md.token_visible[short], layout.short_max_len, out, rows=short)
        for r, q0, q1, seq_len in layout.long_requests:
            keys = request_keys(cache, block_table[r], seq_len)
            indexer_topk_request(q[q0:q1], weights[q0:q1], keys, k, out[q0:q1])

    def _forward_flat(self, q, weights, kv_cache, block_rows, visible, max_len: int, out,
                      rows: torch.Tensor | None = None) -> None:
        """One row per query token over the paged cache, `flat_chunk_rows` rows at a time."""
        step = flat_chunk_rows(max_len)
        for t0 in range(0, q.shape[0], step):
            t1 = min(q.shape[0], t0 + step)
            logits = indexer_paged_logits(q[t0:t1].unsqueeze(1), weights[t0:t1].float().unsqueeze(1), kv_cache,
                                          block_rows[t0:t1], visible[t0:t1], max_len, causal=False)
            top = topk_indices(logits[:, 0], self.topk_tokens, lengths=visible[t0:t1])
            if rows is None:
                out[t0:t1, : self.topk_tokens] = top
            else:
                out[rows[t0:t1], : self.topk_tokens] = top

    def _profile_run(self, q, weights) -> None:
        """vLLM's memory profile has no attention metadata: run one full-size tile of the real path on dummy
        keys at the model's maximum length, so the peak it measures includes the indexer's workspace."""
        T, H, D = q.shape
        if T == 0:
            return
        L = self.max_model_len
        if use_triton(None, q):
            bs = 64
            cache = torch.zeros(1, bs, D + 4, dtype=torch.uint8, device=q.device)
            step = min(T, flat_chunk_rows(L))
            bt = torch.zeros(step, -(-L // bs), dtype=torch.int32, device=q.device)
            vis = torch.full((step,), L, dtype=torch.int32, device=q.device)
            scratch = torch.empty(step, self.topk_tokens, dtype=torch.int32, device=q.device)
            self._forward_flat(torch.zeros_like(q[:step]), torch.zeros_like(weights[:step]), cache, bt, vis, L, scratch)
        else:
            step = min(T, tile_rows(L, H, D))
            keys = torch.zeros(L, D, dtype=torch.float32, device=q.device)
            scratch = torch.empty(step, self.topk_tokens, dtype=torch.int32, device=q.device)
            indexer_topk_request(torch.zeros_like(q[:step]), torch.zeros_like(weights[:step]), keys, self.topk_tokens, scratch)


# ------------------------------------------------------------------------------------------ the custom op
OP_NAME = "vllm_frontier::sparse_attn_indexer"
INDEXER_SUFFIX = ".frontier_indexer"


def register_layer(name: str, layer) -> str:
    """Put the layer into vLLM's static forward context under `name` (what the op looks it up by)."""
    from vllm.config import get_current_vllm_config

    context = get_current_vllm_config().compilation_config.static_forward_context
    if name in context:
        raise ValueError(f"duplicate layer name in the forward context: {name}")
    context[name] = layer
    return name


def _sparse_attn_indexer(q_quant: torch.Tensor, k: torch.Tensor | None, weights: torch.Tensor,
                         topk_indices_buffer: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].run(q_quant, k, weights)


def _sparse_attn_indexer_fake(q_quant: torch.Tensor, k: torch.Tensor | None, weights: torch.Tensor,
                              topk_indices_buffer: torch.Tensor, layer_name: str) -> None:
    return None


_breakable_op = None


def _op(q_quant: torch.Tensor, k: torch.Tensor | None, weights: torch.Tensor, topk_indices_buffer: torch.Tensor,
        layer_name: str) -> None:
    # A breakable CUDA graph (V3.2's default on CUDA) ends its capture segment here and runs the indexer eagerly,
    # as at vLLM's attention ops. Wrapped at the first call: vLLM turns the mode on after plugins load.
    global _breakable_op
    if _breakable_op is None:
        from vllm.compilation.breakable_cudagraph import eager_break_during_capture

        _breakable_op = eager_break_during_capture(_sparse_attn_indexer)
    _breakable_op(q_quant, k, weights, topk_indices_buffer, layer_name)


_LIB = Library("vllm_frontier", "FRAGMENT")  # noqa: TID251 - the op's lifetime is this module's
direct_register_custom_op(op_name="sparse_attn_indexer", op_func=_op, mutates_args=["topk_indices_buffer"],
                          fake_impl=_sparse_attn_indexer_fake, target_lib=_LIB)


def register_indexer() -> None:
    """Make vLLM build our indexer wherever a model asks for `SparseAttnIndexer`, and split compiled graphs at
    its op as at vLLM's own indexer op (once per process)."""
    from vllm_frontier.compat import add_attention_op, op_registry_oot

    if op_registry_oot().get("SparseAttnIndexer") is not FrontierSparseAttnIndexer:
        SparseAttnIndexer.register_oot(FrontierSparseAttnIndexer)
    add_attention_op(OP_NAME)
