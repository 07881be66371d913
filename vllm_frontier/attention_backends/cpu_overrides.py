"""Torch implementations of the vLLM Triton kernels that DeepSeek-V3.2 reaches on CPU (Triton is off there).

Registered through vLLM's kernel-override registry (`register_kernels`) in each worker by our CPU platform.
"""

from __future__ import annotations

import torch


def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                              tma_aligned_scales=False, out_q=None, use_ue8m0=None):
    """vLLM's `per_token_group_quant_fp8` in torch: e4m3 values and one fp32 scale per `group_size` values.

    x: [..., N] float with N % group_size == 0 -> (x_q [..., N] float8_e4m3fn, scales [..., N // group_size]).
    Scales are `amax / 448` (rounded up to a power of two with `use_ue8m0`), as vLLM's Triton kernel computes.
    """
    if column_major_scales or tma_aligned_scales:
        raise NotImplementedError("column-major / TMA-aligned scales are not needed on CPU")
    dtype = torch.float8_e4m3fn if dtype is None else dtype
    fp8_max = torch.finfo(dtype).max
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(eps) * (1.0 / fp8_max)
    if use_ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (g / scale).clamp(-fp8_max, fp8_max).reshape(x.shape).to(dtype)
    if out_q is not None:
        out_q.copy_(q)
        q = out_q
    return q, scale.squeeze(-1)


def build_prefill_chunk_metadata(query_start_loc_ptr, uncompressed_seq_lens_ptr, cu_compressed_seq_lens_ptr,
                                 row_start_cu_compressed_seq_lens_ptr, token_to_seq_ptr, cu_compressed_seq_len_ks_ptr,
                                 cu_compressed_seq_len_ke_ptr, query_slice_start, query_slice_stop, DCP_RANK,
                                 DCP_WORLD, DCP_INTERLEAVE, BLOCK_SIZE=None, COMPRESS_RATIO=1, **_):
    """vLLM's `BuildPrefillChunkMetadataKernel.kernel` (indexer prefill metadata), vectorized over requests.

    For the query tokens of each request inside [query_slice_start, query_slice_stop): the first (`ks`) and
    one-past-last (`ke`) row of its keys in the gathered K buffer; and `token_to_seq` for every key row.
    """
    if DCP_WORLD != 1:
        raise NotImplementedError("decode context parallelism is not supported by the CPU indexer metadata")
    qsl = query_start_loc_ptr.long()
    num_reqs = qsl.numel() - 1
    dev = qsl.device
    query_lens = qsl[1:] - qsl[:-1]
    n_tok = int(qsl[-1].item())
    req = torch.repeat_interleave(torch.arange(num_reqs, device=dev), query_lens, output_size=n_tok)
    abs_pos = torch.arange(n_tok, device=dev)
    offset = abs_pos - qsl[req]
    start_pos = uncompressed_seq_lens_ptr.long()[:num_reqs] - query_lens
    row_start = row_start_cu_compressed_seq_lens_ptr.long()[:num_reqs]
    ke = row_start[req] + (start_pos[req] + 1 + offset) // COMPRESS_RATIO
    keep = (abs_pos >= query_slice_start) & (abs_pos < query_slice_stop)
    out_pos = abs_pos[keep] - query_slice_start
    cu_compressed_seq_len_ks_ptr[out_pos] = row_start[req][keep].to(cu_compressed_seq_len_ks_ptr.dtype)
    cu_compressed_seq_len_ke_ptr[out_pos] = ke[keep].to(cu_compressed_seq_len_ke_ptr.dtype)
    cu = cu_compressed_seq_lens_ptr.long()[: num_reqs + 1]
    lens = cu[1:] - cu[:-1]
    total = int(lens.sum().item())
    token_to_seq_ptr[int(cu[0]): int(cu[0]) + total] = torch.repeat_interleave(
        torch.arange(num_reqs, device=dev), lens, output_size=total).to(token_to_seq_ptr.dtype)


def prepare_uniform_decode(seq_lens_ptr, decode_seq_lens_ptr, block_table_ptr, block_table_stride,
                           expanded_block_table_ptr, expanded_bt_stride, decode_lens_ptr, max_decode_len,
                           BLOCK_SIZE=None, **_):
    """vLLM's `PrepareUniformDecodeKernel.kernel`: one row per decode token (MTP: several per request)."""
    # The caller passes the decode requests' seq_lens and block table rows only: one program per token.
    n = seq_lens_ptr.shape[0] * max_decode_len
    idx = torch.arange(n, device=seq_lens_ptr.device)
    req, local = idx // max_decode_len, idx % max_decode_len
    decode_seq_lens_ptr[:n] = (seq_lens_ptr.long()[req] - max_decode_len + local + 1).clamp_min(0).to(
        decode_seq_lens_ptr.dtype)
    width = min(block_table_ptr.shape[1], expanded_block_table_ptr.shape[1])
    expanded_block_table_ptr[:n, :width] = block_table_ptr[req, :width]
    decode_lens_ptr[:n] = 1


def register() -> None:
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({
        "vllm.model_executor.layers.quantization.utils.fp8_utils.per_token_group_quant_fp8":
            per_token_group_quant_fp8,
        "vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.kernel":
            build_prefill_chunk_metadata,
        "vllm.v1.attention.backends.mla.indexer.PrepareUniformDecodeKernel.kernel": prepare_uniform_decode,
    })
