"""Torch implementations of the vLLM Triton kernels that DeepSeek-V3.2 reaches where they cannot run: on CPU
(Triton is off there) and, for the kernels that use Triton's ``float8e4nv``, on CUDA GPUs below sm_89
(A100, A10, RTX 3090: Triton refuses the type there).

Registered through vLLM's kernel-override registry (`register_kernels`) in each worker by our platforms:
:func:`overrides_for` decides which, from the device.
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
    width = min(block_table_ptr.shape[1], expanded_block_table_ptr.shape[1])
    if max_decode_len == 1:   # a step without drafts (MTP engine, k = 0): the rows are the requests' own
        decode_seq_lens_ptr[:n].copy_(seq_lens_ptr)
        expanded_block_table_ptr[:n, :width].copy_(block_table_ptr[:, :width])
        decode_lens_ptr[:n] = 1
        return
    idx = torch.arange(n, device=seq_lens_ptr.device)
    req, local = idx // max_decode_len, idx % max_decode_len
    decode_seq_lens_ptr[:n] = (seq_lens_ptr.long()[req] - max_decode_len + local + 1).clamp_min(0).to(
        decode_seq_lens_ptr.dtype)
    expanded_block_table_ptr[:n, :width] = block_table_ptr[req, :width]
    decode_lens_ptr[:n] = 1


def fused_indexer_q_rope_quant_kernel(positions, q, q_s0, q_s1, cos_sin_cache, cos_sin_s0, q_fp8, q_fp8_s0,
                                      q_fp8_s1, weights, weights_s0, weights_s1, weights_out, weights_out_s0,
                                      weights_out_s1, softmax_scale, head_scale, fp8_min=-448.0, fp8_max=448.0,
                                      is_neox=True, **_):
    """vLLM's `_fused_indexer_q_rope_quant_kernel` in torch (it stores through ``float8e4nv``: no Triton below sm_89).

    q: [T, H, 128] bf16 indexer query (64 rope dims first); cos_sin_cache: [max_pos, 64] (32 cos, 32 sin).
    Writes q_fp8 [T, H, 128] (rope applied, rounded through bf16 as the kernel does, quantized with one
    power-of-two (ue8m0) scale per head) and weights_out [T, H] = weights * scale * softmax_scale * head_scale.
    """
    cs = cos_sin_cache[positions.long()].float()  # [T, 64]
    cos, sin = cs[:, None, :32], cs[:, None, 32:64]
    qf = q.float()
    x0, x1 = (qf[..., 0:32], qf[..., 32:64]) if is_neox else (qf[..., 0:64:2], qf[..., 1:64:2])
    r0 = (x0 * cos - x1 * sin).to(torch.bfloat16).float()
    r1 = (x1 * cos + x0 * sin).to(torch.bfloat16).float()
    nope = qf[..., 64:]
    amax = torch.maximum(torch.maximum(r0.abs().amax(-1), r1.abs().amax(-1)), nope.abs().amax(-1))  # [T, H]
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-10) * (1.0 / fp8_max))))
    rot = torch.empty_like(qf)
    if is_neox:
        rot[..., 0:32], rot[..., 32:64] = r0, r1
    else:
        rot[..., 0:64:2], rot[..., 1:64:2] = r0, r1
    rot[..., 64:] = nope
    q_fp8.copy_((rot / scale[..., None]).clamp(fp8_min, fp8_max).to(q_fp8.dtype))
    weights_out.copy_(weights.float() * scale * softmax_scale * head_scale)


_FP8_KERNELS = {
    "vllm.model_executor.layers.quantization.utils.fp8_utils.per_token_group_quant_fp8": per_token_group_quant_fp8,
    "vllm.model_executor.layers.sparse_attn_indexer._fused_indexer_q_rope_quant_kernel":
        fused_indexer_q_rope_quant_kernel,
}
_METADATA_KERNELS = {
    "vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.kernel": build_prefill_chunk_metadata,
    "vllm.v1.attention.backends.mla.indexer.PrepareUniformDecodeKernel.kernel": prepare_uniform_decode,
}


def overrides_for(device_type: str, capability: tuple[int, int] | None = None) -> dict:
    """vLLM Triton kernels (qualified name -> torch implementation) that DSA must replace on this device.

    CPU: all of them (vLLM disables Triton on CPU). CUDA below sm_89: the ones that use Triton's ``float8e4nv``
    (no such type there; the metadata kernels compile). CUDA sm_89 and later, other devices: none.
    """
    if device_type == "cpu":
        return {**_FP8_KERNELS, **_METADATA_KERNELS}
    if device_type == "cuda" and capability is not None and tuple(capability) < (8, 9):
        return dict(_FP8_KERNELS)
    return {}


def register(device_type: str = "cpu", capability: tuple[int, int] | None = None) -> list[str]:
    """Register :func:`overrides_for` the device with vLLM's kernel-override registry; returns the names.

    The CUDA platform calls ``register("cuda", torch.cuda.get_device_capability())`` from its
    ``register_triton_kernel_overrides`` (each worker) when DSA is on; the CPU platform ``register()``.
    """
    table = overrides_for(device_type, capability)
    if table:
        from vllm.triton_utils.dispatcher import register_kernels

        register_kernels(table)
    return sorted(table)
