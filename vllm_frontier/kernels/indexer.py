"""Lightning indexer (DeepSeek-V3.2 DSA): FP8 K cache write, logits over paged and ragged K, stable top-k.

Math (per query token ``t`` with ``H`` indexer heads of dim ``D``, shared single-head key ``k_s``)::

    logits[t, s] = sum_h w[t, h] * relu(q[t, h] · k_s)          (k dequantized: code * per-token scale)

``w`` carries the query's FP8 scale and the softmax/head scales (as vLLM folds them), so ``q`` may be the raw
e4m3 codes. Masked (invisible) keys get ``-inf``.

Indexer K cache (vLLM's layout for ``DeepseekV32IndexerCache``): ``[num_blocks, block_size, D + 4]`` uint8,
block size 64 in vLLM; *within each block* the bytes are all tokens' ``D`` e4m3 values first
(``[block_size, D]``), then all tokens' fp32 scales (``[block_size]``): the ``[block_size, D + 4]`` shape is
only the allocation size, rows are not interleaved. One scale per token: ``max(amax, 1e-4) / 448``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dsa_cpu
from ._common import check_dtype, check_same_device, compiles_for_gpu, native_fp8, next_pow2, use_triton
from .fp8 import SCALE_FORMATS, e4m3_bits_to, f32_to_e4m3_bits
from .ref import (
    ref_indexer_paged_logits,
    ref_indexer_ragged_logits,
    ref_indexer_write_k_cache,
    ref_topk_indices,
)

__all__ = [
    "write_indexer_k_cache",
    "indexer_paged_logits",
    "indexer_ragged_logits",
    "topk_indices",
    "MAX_TOPK",
]

MAX_TOPK = 4096
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_k_cache(cache: torch.Tensor) -> int:
    if cache.dim() == 4 and cache.shape[2] == 1:
        cache = cache.squeeze(2)
    if cache.dim() != 3 or cache.dtype != torch.uint8:
        raise ValueError(f"indexer K cache must be uint8 [num_blocks, block_size, D + 4], got {cache.dtype} {list(cache.shape)}")
    if cache.stride(2) != 1 or cache.stride(1) != cache.shape[2]:
        raise ValueError("indexer K cache blocks must be contiguous (stride(1) == D + 4, stride(2) == 1)")
    if cache.stride(0) % 4 or cache.storage_offset() % 4 or (cache.shape[1] * (cache.shape[2] - 4)) % 4:
        raise ValueError("indexer K cache blocks and their scale area must be 4-byte aligned")
    return cache.shape[2] - 4


# ---------------------------------------------------------------------------------------------
# K cache write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_k_kernel(
    K, stride_k,  # [T, D] float
    SLOTS,  # [T] int64
    C8, C32,  # cache bytes / the same buffer as fp32
    stride_blk, block_size,
    D: tl.constexpr,
    DP: tl.constexpr,
    SCALE_UE8M0: tl.constexpr,
):
    i_t = tl.program_id(0)
    slot = tl.load(SLOTS + i_t)
    if slot < 0:
        return
    i_blk = slot // block_size
    i_off = slot % block_size
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_k = tl.load(K + i_t * stride_k + o_d, mask=m_d, other=0).to(tl.float32)  # [DP]
    b_scale = tl.maximum(tl.max(tl.abs(b_k), axis=0), 1e-4) / 448.0
    if SCALE_UE8M0:
        b_scale = tl.exp2(tl.ceil(tl.log2(b_scale)))
    p_blk = i_blk * stride_blk
    tl.store(C8 + p_blk + i_off * D + o_d, f32_to_e4m3_bits(b_k / b_scale), mask=m_d)
    tl.store(C32 + (p_blk + block_size * D) // 4 + i_off, b_scale)


def write_indexer_k_cache(
    k: torch.Tensor,
    k_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale_fmt: str | None = None,
    backend: str | None = None,
) -> None:
    """Quantize indexer keys to FP8 (one fp32 scale per token) and write them by slot, in place.

    Args:
        k: ``[T, D]`` float16/bfloat16/float32 (after k_norm, rope and rotation).
        k_cache: ``[num_blocks, block_size, D + 4]`` uint8 (layout in the module docstring).
        slot_mapping: ``[T]`` int; ``-1`` = skip.
        scale_fmt: None or ``"ue8m0"``.
    """
    D = _check_k_cache(k_cache)
    k_cache = k_cache.squeeze(2) if k_cache.dim() == 4 else k_cache
    T = k.shape[0]
    if k.dim() != 2 or k.shape[1] != D or slot_mapping.shape != (T,):
        raise ValueError(f"expected k [T, {D}] and slot_mapping [T], got {list(k.shape)}, {list(slot_mapping.shape)}")
    check_dtype("k", k, _FLOATS)
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    check_same_device(k=k, k_cache=k_cache, slot_mapping=slot_mapping)
    if T == 0:
        return
    if not use_triton(backend, k):
        if backend != "torch" and dsa_cpu.available():
            dsa_cpu.write_k(k, k_cache, slot_mapping, scale_fmt)   # byte-identical, one call
        else:
            ref_indexer_write_k_cache(k, k_cache, slot_mapping, scale_fmt)
        return
    k = k if k.stride(1) == 1 else k.contiguous()
    _write_k_kernel[(T,)](
        k, k.stride(0), slot_mapping.long(), k_cache, k_cache.view(torch.float32),
        k_cache.stride(0), k_cache.shape[1], D=D, DP=next_pow2(max(D, 16)),
        SCALE_UE8M0=scale_fmt == "ue8m0", num_warps=1,
    )


# ---------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------


@triton.jit
def _logits_kernel(
    Q, stride_qt, stride_qh,  # [R, H, D] (R = B * N paged, T ragged)
    W, stride_wt,  # [R, H] fp32
    K8, K32,  # paged: cache bytes / fp32 view; ragged: [S, D] values (fp8 codes as uint8, or float) / [S] scales
    stride_k,  # paged: bytes per block; ragged: elements per key row
    BT, stride_bt,  # paged: [B, max_blocks] int32
    LO, HI,  # [R] int32 visible key window [lo, hi) per query row
    OUT, stride_or,  # [R, L] fp32
    L, N_Q, block_size,
    H: tl.constexpr,
    D: tl.constexpr,
    HP: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    Q_FP8: tl.constexpr,
    K_FP8: tl.constexpr,
    DT: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.load(LO + i_r)
    hi = tl.load(HI + i_r)
    p_out = OUT + i_r * stride_or + o_n
    if (i_n * BLOCK_N >= hi) | (i_n * BLOCK_N + BLOCK_N <= lo):
        tl.store(p_out, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=o_n < L)
        return
    m_n = (o_n >= lo) & (o_n < hi)
    o_h = tl.arange(0, HP)
    o_d = tl.arange(0, DP)
    m_h = o_h < H
    m_d = o_d < D
    b_q = tl.load(Q + i_r * stride_qt + o_h[:, None] * stride_qh + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0)
    if Q_FP8:
        b_q = e4m3_bits_to(b_q, DT, FP8_NATIVE)  # [HP, DP]
    else:
        b_q = b_q.to(DT)
    b_w = tl.load(W + i_r * stride_wt + o_h, mask=m_h, other=0)  # [HP]
    o_pos = tl.where(m_n, o_n, 0)
    if PAGED:
        i_b = i_r // N_Q
        b_blk = tl.load(BT + i_b * stride_bt + o_pos // block_size, mask=m_n, other=0).to(tl.int64)
        o_tok = o_pos % block_size
        p_blk = b_blk * stride_k  # [BLOCK_N] byte offset of the block
        b_k = tl.load(K8 + p_blk[:, None] + o_tok[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0)
        b_ks = tl.load(K32 + (p_blk + block_size * D) // 4 + o_tok, mask=m_n, other=0)  # [BLOCK_N]
    else:
        b_k = tl.load(K8 + o_pos[:, None].to(tl.int64) * stride_k + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0)
        if K_FP8:
            b_ks = tl.load(K32 + o_pos, mask=m_n, other=0)
        else:
            b_ks = tl.full([BLOCK_N], 1.0, tl.float32)
    if K_FP8:
        b_k = e4m3_bits_to(b_k, DT, FP8_NATIVE)  # [BLOCK_N, DP]
    else:
        b_k = b_k.to(DT)
    if DT == tl.float32:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [HP, BLOCK_N] fp32
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = tl.maximum(b_s, 0.0) * b_w[:, None]
    b_logit = tl.sum(b_s, axis=0) * b_ks
    tl.store(p_out, tl.where(m_n, b_logit, float("-inf")), mask=o_n < L)


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _logits_warps(device: torch.device) -> int:
    # Below sm_89 the e4m3 codes are decoded with integer arithmetic: with 4 warps the decoded [64, 128] query
    # and [128, 128] key tiles need 255 registers (sm_80) and spill on sm_86; 8 warps hold them in ~145.
    return 4 if native_fp8(device) else 8


def _q_arg(q: torch.Tensor):
    """(tensor for the kernel, is_fp8, dot dtype)."""
    if q.dtype == torch.float8_e4m3fn:
        return q.view(torch.uint8), True, (tl.bfloat16 if compiles_for_gpu(q.device) else tl.float32)
    check_dtype("q", q, _FLOATS)
    return q, False, (_DT[q.dtype] if compiles_for_gpu(q.device) else tl.float32)


def indexer_paged_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    causal: bool = True,
    backend: str | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Indexer logits of decode queries over the paged FP8 K cache.

    Args:
        q: ``[B, N, H, D]`` float8_e4m3fn codes (or float); ``N`` query tokens per request (MTP: N > 1).
        weights: ``[B, N, H]`` float32 head weights (q scale and softmax/head scales folded in).
        k_cache: ``[num_blocks, block_size, D + 4]`` uint8 (module docstring).
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32 (the N new tokens included).
        max_seq_len: width of the output (>= max(seq_lens)).
        causal: query ``n`` sits at ``seq_len - N + n`` and sees keys ``<=`` it; else all keys ``< seq_len``.
    Returns: ``[B, N, max_seq_len]`` float32 logits, ``-inf`` for invisible keys.
    """
    D = _check_k_cache(k_cache)
    k_cache = k_cache.squeeze(2) if k_cache.dim() == 4 else k_cache
    if q.dim() != 4 or q.shape[-1] != D:
        raise ValueError(f"q must be [B, N, H, {D}], got {list(q.shape)}")
    B, N, H, _ = q.shape
    if weights.shape != (B, N, H):
        raise ValueError(f"weights must be [B, N, H] = {[B, N, H]}, got {list(weights.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError("block_table must be [B, max_blocks] and seq_lens [B]")
    if max_seq_len < 0:
        raise ValueError("max_seq_len must be >= 0")
    if not use_triton(backend, q):
        return ref_indexer_paged_logits(q, weights, k_cache, block_table, seq_lens, max_seq_len, causal)
    out = torch.empty(B, N, max_seq_len, dtype=torch.float32, device=q.device)
    if B * N == 0 or max_seq_len == 0:
        return out
    sl = seq_lens.to(torch.int32)
    hi = sl[:, None].expand(B, N)
    if causal:
        hi = torch.minimum(hi, sl[:, None] - N + 1 + torch.arange(N, device=q.device, dtype=torch.int32)[None, :])
    hi = hi.clamp_min(0).to(torch.int32).reshape(-1).contiguous()
    lo = torch.zeros_like(hi)
    qa, q_fp8, dt = _q_arg(q)
    qa = qa.reshape(B * N, H, D)
    w = weights.float().reshape(B * N, H)
    bt = block_table.to(torch.int32)
    bn = block_n or (128 if compiles_for_gpu(q.device) else max(16, min(256, next_pow2(max_seq_len))))
    grid = (B * N, triton.cdiv(max_seq_len, bn))
    _logits_kernel[grid](
        qa, qa.stride(0), qa.stride(1), w, w.stride(0),
        k_cache, k_cache.view(torch.float32), k_cache.stride(0), bt, bt.stride(0),
        lo, hi, out, max_seq_len, max_seq_len, N, k_cache.shape[1],
        H=H, D=D, HP=next_pow2(max(H, 16)), DP=next_pow2(max(D, 16)), BLOCK_N=bn,
        PAGED=True, Q_FP8=q_fp8, K_FP8=True, DT=dt, FP8_NATIVE=native_fp8(q.device), num_warps=_logits_warps(q.device),
    )
    return out


def indexer_ragged_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    cu_seqlen_ks: torch.Tensor,
    cu_seqlen_ke: torch.Tensor,
    backend: str | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Indexer logits for prefill over a ragged (gathered) K, DeepGEMM ``fp8_mqa_logits`` style.

    Args:
        q: ``[T, H, D]`` float8_e4m3fn codes or float; weights: ``[T, H]`` float32.
        k: ``[S, D]`` float8_e4m3fn with ``k_scale [S]`` float32, or float with ``k_scale=None``.
        cu_seqlen_ks, cu_seqlen_ke: ``[T]`` int32: query ``t`` sees key rows ``ks[t] <= s < ke[t]``
            (causal prefill: ``ks`` = first row of its request, ``ke`` = its own row + 1).
    Returns: ``[T, S]`` float32 logits, ``-inf`` outside each window.
    """
    if q.dim() != 3 or k.dim() != 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [T, H, D] and k [S, D], got {list(q.shape)}, {list(k.shape)}")
    T, H, D = q.shape
    S = k.shape[0]
    if weights.shape != (T, H) or cu_seqlen_ks.shape != (T,) or cu_seqlen_ke.shape != (T,):
        raise ValueError("weights must be [T, H]; cu_seqlen_ks and cu_seqlen_ke [T]")
    k_fp8 = k.dtype == torch.float8_e4m3fn
    if k_fp8 != (k_scale is not None):
        raise ValueError("k_scale is required exactly when k is float8_e4m3fn")
    if k_scale is not None and k_scale.shape != (S,):
        raise ValueError(f"k_scale must be [S={S}], got {list(k_scale.shape)}")
    if not use_triton(backend, q):
        return ref_indexer_ragged_logits(q, weights, k, k_scale, cu_seqlen_ks, cu_seqlen_ke)
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    if T == 0 or S == 0:
        return out
    qa, q_fp8, dt = _q_arg(q)
    if not k_fp8:
        check_dtype("k", k, _FLOATS)
        if not compiles_for_gpu(q.device):
            dt = tl.float32
    ka = k.view(torch.uint8) if k_fp8 else k
    ka = ka if ka.stride(1) == 1 else ka.contiguous()
    ks32 = k_scale.float().contiguous() if k_fp8 else ka
    w = weights.float()
    bn = block_n or (128 if compiles_for_gpu(q.device) else max(16, min(256, next_pow2(S))))
    lo = cu_seqlen_ks.to(torch.int32).contiguous()
    hi = cu_seqlen_ke.to(torch.int32).clamp_max(S).contiguous()
    _logits_kernel[(T, triton.cdiv(S, bn))](
        qa, qa.stride(0), qa.stride(1), w, w.stride(0), ka, ks32, ka.stride(0), lo, 0,
        lo, hi, out, out.stride(0), S, 1, 1,
        H=H, D=D, HP=next_pow2(max(H, 16)), DP=next_pow2(max(D, 16)), BLOCK_N=bn,
        PAGED=False, Q_FP8=q_fp8, K_FP8=k_fp8, DT=dt, FP8_NATIVE=native_fp8(q.device), num_warps=_logits_warps(q.device),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------


@triton.jit
def _skey(x):
    # float32 -> int32 whose signed order is the float order (NaN excluded)
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _topk_kernel(
    X, stride_x,  # [R, L] fp32
    STARTS, LENS,  # [R] int32
    OUT, stride_o,  # [R, K] int32, pre-filled with -1
    K,
    BLOCK: tl.constexpr,
):
    """Exact top-K per row: binary-search the K-th largest key (32 counting passes over the row), then
    write every key above it plus the lowest-position keys equal to it, in ascending position order."""
    i_r = tl.program_id(0).to(tl.int64)
    start = tl.load(STARTS + i_r)
    n = tl.load(LENS + i_r)
    p_x = X + i_r * stride_x + start
    o_b = tl.arange(0, BLOCK)
    # threshold = max T with count(key >= T) >= K; the smallest key when the row holds <= K keys
    b_lo = tl.full([1], -2147483648, tl.int64)
    b_hi = tl.full([1], 2147483647, tl.int64)
    if n > K:
        for _ in range(32):
            b_mid = (b_lo + b_hi + 1) >> 1
            cnt = 0
            for c0 in range(0, n, BLOCK):
                o = c0 + o_b
                m = o < n
                b_key = _skey(tl.load(p_x + o, mask=m, other=0.0))
                cnt += tl.sum((m & (b_key >= b_mid)).to(tl.int32), axis=0)
            b_lo = tl.where(cnt >= K, b_mid, b_lo)
            b_hi = tl.where(cnt >= K, b_hi, b_mid - 1)
    # keys strictly above the threshold are all taken; ties at it fill the rest, lowest position first
    n_gt = 0
    for c0 in range(0, n, BLOCK):
        o = c0 + o_b
        m = o < n
        b_key = _skey(tl.load(p_x + o, mask=m, other=0.0))
        n_gt += tl.sum((m & (b_key > b_lo)).to(tl.int32), axis=0)
    need_eq = K - n_gt
    written = 0
    seen_eq = 0
    for c0 in range(0, n, BLOCK):
        o = c0 + o_b
        m = o < n
        b_key = _skey(tl.load(p_x + o, mask=m, other=0.0))
        m_eq = m & (b_key == b_lo)
        r_eq = seen_eq + tl.cumsum(m_eq.to(tl.int32), axis=0) - 1  # rank among equal keys
        m_sel = m & ((b_key > b_lo) | (m_eq & (r_eq < need_eq)))
        pos = written + tl.cumsum(m_sel.to(tl.int32), axis=0) - 1
        tl.store(OUT + i_r * stride_o + pos, o, mask=m_sel & (pos < K))
        written += tl.sum(m_sel.to(tl.int32), axis=0)
        seen_eq += tl.sum(m_eq.to(tl.int32), axis=0)


def topk_indices(
    logits: torch.Tensor,
    k: int,
    lengths: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    backend: str | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Top-``k`` positions per row, deterministic: higher logit first, equal logits -> lower position wins.

    Args:
        logits: ``[R, L]`` float32.
        k: 1..4096 (DeepSeek-V3.2 uses 2048).
        lengths: ``[R]`` int32 tokens in each row's window (default ``L - starts``).
        starts: ``[R]`` int32 first column of each window (default 0; ragged prefill passes ``cu_seqlen_ks``).
    Returns: ``[R, k]`` int32 window-relative positions in ascending order, then ``-1`` for unused slots
        (a window with fewer than ``k`` tokens). Every column in the window is a candidate.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, L], got {list(logits.shape)}")
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k must be in [1, {MAX_TOPK}], got {k}")
    R, L = logits.shape
    if not use_triton(backend, logits):
        return ref_topk_indices(logits, k, lengths, starts)
    dev = logits.device
    st = torch.zeros(R, dtype=torch.int32, device=dev) if starts is None else starts.to(torch.int32)
    ln = (L - st) if lengths is None else lengths.to(torch.int32)
    ln = torch.minimum(ln, L - st).clamp_min(0).to(torch.int32).contiguous()
    out = torch.full((R, k), -1, dtype=torch.int32, device=dev)
    if R == 0 or L == 0:
        return out
    x = logits.float()
    x = x if x.stride(1) == 1 else x.contiguous()
    blk = block or (4096 if compiles_for_gpu(logits.device) else max(16, min(8192, next_pow2(L))))
    _topk_kernel[(R,)](x, x.stride(0), st.contiguous(), ln, out, out.stride(0), k, BLOCK=blk, num_warps=8)
    return out

