"""MLA attention over the paged latent cache in the absorbed (MQA) form: Triton kernels + launcher.

One kernel serves three operations (``SPARSE``/``CAUSAL`` are compile-time flags):

- dense decode: the rows of one program are ``BLOCK_M`` of the ``S_q * H`` (query token, head) pairs of one
  request; keys are positions ``[0, seq_len)`` (causal: ``<= seq_len - S_q + s``);
- sparse decode: the rows are ``BLOCK_M`` heads of one query token ``(b, s)``; keys are the physical cache
  slots in ``indices[b, s, :]`` (``block * block_size + offset``, no block table; a slot outside
  ``[0, num_slots)`` is unused), only the first ``topk_length[b]`` of them when a length is given;
- sparse prefill over a ragged KV: the sparse decode with one query token per "request" and the whole KV as
  one cache block (``block_size = S_kv``), so a slot is a row of the KV.

Math (per row ``m``): ``s_n = scale * q_m · k_n`` over 576 dims, online softmax in base 2, ``o_m = Σ p_n v_n`` with
``v_n = k_n[:512]``; FP8 rows are read as e4m3 codes whose four group scales are folded into the scores
(``q·k = Σ_g scale_g (q_g · code_g)``) and into ``p`` for the values, so the dots use the query's dtype.
With ``NUM_SPLITS > 1`` the key range is split across programs and :func:`_combine_kernel` merges the partial
results by their log-sum-exp.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import cdiv, compiles_for_gpu, native_fp8, next_pow2, target_capability
from .fp8 import bf16_bits_to_f32, e4m3_bits_to

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of the attention kernel (BLOCK_M, BLOCK_N multiples of 16)."""

    block_m: int = 64
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 operands: exact fp32 products instead of TF32 on GPUs (tests compare fp32 at 2e-5)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_k_chunk(KV, o_row, o_c, m_n, C: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr,
                  FP8_NATIVE: tl.constexpr):
    # [BLOCK_N, 128] chunk C of the latent, in the dot dtype (FP8: exact e4m3 codes, scale applied later)
    b_k = tl.load(KV + o_row[:, None] + C * 128 + o_c[None, :], mask=m_n[:, None], other=0)
    if FP8:
        return e4m3_bits_to(b_k, DT, FP8_NATIVE)
    return b_k.to(DT)


@triton.jit
def _mla_attn_fwd_kernel(
    Q, stride_qb, stride_qs, stride_qh,  # [B, S_Q, H, 576]
    KV, KV32, KV16,  # cache (own dtype, or uint8) + fp32 / int16 views of it (FP8 only)
    stride_kv_blk, stride_kv_tok,  # elements of KV
    BT, stride_bt,  # [B, max_blocks] int32
    SEQLENS,  # [B] int32 (dense)
    IDX, stride_ib, stride_is,  # [B, S_Q, TOPK] int32 physical slots (SPARSE)
    TOPK_LEN,  # [B] int32 indices used per request (SPARSE and HAS_TOPK_LEN)
    O, stride_ob, stride_os, stride_oh,  # [B, S_Q, H, 512] final out (NUM_SPLITS == 1)
    LSE, stride_lb, stride_lh, stride_ls,  # [B, H, S_Q] fp32
    MAXL,  # [B, S_Q, H] fp32 max logits (WRITE_MAX)
    O_PART, LSE_PART,  # [B, S_Q, H, NUM_SPLITS, 512], [B, S_Q, H, NUM_SPLITS] fp32 contiguous
    sm_scale, H, S_Q, TOPK, block_size, num_slots,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr,
    HAS_TOPK_LEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    WRITE_MAX: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_bm = tl.program_id(0)
    i_split = tl.program_id(1)
    if SPARSE:
        n_hb = tl.cdiv(H, BLOCK_M)
        n_rb = S_Q * n_hb
        i_b = i_bm // n_rb
        i_rb = i_bm % n_rb
        i_s0 = i_rb // n_hb
        i_h = (i_rb % n_hb) * BLOCK_M + tl.arange(0, BLOCK_M)
        i_s = tl.zeros([BLOCK_M], dtype=tl.int32) + i_s0
        m_m = i_h < H
    else:
        n_rb = tl.cdiv(S_Q * H, BLOCK_M)
        i_b = i_bm // n_rb
        i_r = (i_bm % n_rb) * BLOCK_M + tl.arange(0, BLOCK_M)
        i_s = i_r // H
        i_h = i_r % H
        m_m = i_r < S_Q * H
    i_b64 = i_b.to(tl.int64)

    o_c = tl.arange(0, 128)
    o_r = tl.arange(0, 64)
    p_q = Q + i_b64 * stride_qb + i_s.to(tl.int64)[:, None] * stride_qs + i_h[:, None] * stride_qh
    b_q0 = tl.load(p_q + o_c[None, :], mask=m_m[:, None], other=0).to(DT)  # [BLOCK_M, 128]
    b_q1 = tl.load(p_q + 128 + o_c[None, :], mask=m_m[:, None], other=0).to(DT)
    b_q2 = tl.load(p_q + 256 + o_c[None, :], mask=m_m[:, None], other=0).to(DT)
    b_q3 = tl.load(p_q + 384 + o_c[None, :], mask=m_m[:, None], other=0).to(DT)
    b_qr = tl.load(p_q + 512 + o_r[None, :], mask=m_m[:, None], other=0).to(DT)  # [BLOCK_M, 64]

    # key range of this program
    if SPARSE:
        n_keys = TOPK
        if HAS_TOPK_LEN:
            n_keys = tl.minimum(TOPK, tl.maximum(tl.load(TOPK_LEN + i_b), 0))
        seqlen = n_keys  # unused
    else:
        seqlen = tl.load(SEQLENS + i_b)
        n_keys = seqlen
        if CAUSAL:
            s_max = tl.max(tl.where(m_m, i_s, 0), axis=0)
            n_keys = tl.minimum(seqlen, seqlen - S_Q + s_max + 1)
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_lo = i_split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    q_pos = seqlen - S_Q + i_s  # [BLOCK_M] position of each row's query token (causal)

    qk_scale = sm_scale * 1.4426950408889634
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_o0 = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
    b_o1 = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
    b_o2 = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
    b_o3 = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
    o_n0 = tl.arange(0, BLOCK_N)
    for i_t in range(t_lo, t_hi):
        o_n = i_t * BLOCK_N + o_n0
        if SPARSE:
            # physical slot = block * block_size + offset; anything outside the cache (-1, -2^31, ...) is unused
            b_pos = tl.load(IDX + i_b64 * stride_ib + i_s0 * stride_is + o_n, mask=o_n < n_keys, other=-1)
            m_n = (b_pos >= 0) & (b_pos < num_slots)
            b_pos = tl.where(m_n, b_pos, 0)
            b_blk = (b_pos // block_size).to(tl.int64)
        else:
            b_pos = o_n
            m_n = o_n < n_keys
            b_pos = tl.where(m_n, b_pos, 0)
            b_blk = tl.load(BT + i_b64 * stride_bt + b_pos // block_size, mask=m_n, other=0).to(tl.int64)
        o_row = b_blk * stride_kv_blk + (b_pos % block_size) * stride_kv_tok  # [BLOCK_N] int64

        b_k0 = _load_k_chunk(KV, o_row, o_c, m_n, 0, FP8, DT, FP8_NATIVE)  # [BLOCK_N, 128]
        b_k1 = _load_k_chunk(KV, o_row, o_c, m_n, 1, FP8, DT, FP8_NATIVE)
        b_k2 = _load_k_chunk(KV, o_row, o_c, m_n, 2, FP8, DT, FP8_NATIVE)
        b_k3 = _load_k_chunk(KV, o_row, o_c, m_n, 3, FP8, DT, FP8_NATIVE)
        if FP8:
            p_sc = KV32 + o_row // 4 + 128
            b_sc0 = tl.load(p_sc, mask=m_n, other=0)  # [BLOCK_N] fp32
            b_sc1 = tl.load(p_sc + 1, mask=m_n, other=0)
            b_sc2 = tl.load(p_sc + 2, mask=m_n, other=0)
            b_sc3 = tl.load(p_sc + 3, mask=m_n, other=0)
            b_kr = bf16_bits_to_f32(
                tl.load(KV16 + o_row[:, None] // 2 + 264 + o_r[None, :], mask=m_n[:, None], other=0)
            ).to(DT)  # [BLOCK_N, 64]
            b_s = _dot(b_q0, tl.trans(b_k0), None, IEEE) * b_sc0[None, :]
            b_s += _dot(b_q1, tl.trans(b_k1), None, IEEE) * b_sc1[None, :]
            b_s += _dot(b_q2, tl.trans(b_k2), None, IEEE) * b_sc2[None, :]
            b_s += _dot(b_q3, tl.trans(b_k3), None, IEEE) * b_sc3[None, :]
        else:
            b_kr = tl.load(KV + o_row[:, None] + 512 + o_r[None, :], mask=m_n[:, None], other=0).to(DT)
            b_s = _dot(b_q0, tl.trans(b_k0), None, IEEE)
            b_s = _dot(b_q1, tl.trans(b_k1), b_s, IEEE)
            b_s = _dot(b_q2, tl.trans(b_k2), b_s, IEEE)
            b_s = _dot(b_q3, tl.trans(b_k3), b_s, IEEE)
        b_s = _dot(b_qr, tl.trans(b_kr), b_s, IEEE)  # [BLOCK_M, BLOCK_N] fp32
        b_s = b_s * qk_scale
        m_s = m_n[None, :] & m_m[:, None]
        if CAUSAL:
            m_s = m_s & (b_pos[None, :] <= q_pos[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        if FP8:
            b_o0 = _dot((b_p * b_sc0[None, :]).to(DT), b_k0, b_o0 * b_alpha[:, None], IEEE)
            b_o1 = _dot((b_p * b_sc1[None, :]).to(DT), b_k1, b_o1 * b_alpha[:, None], IEEE)
            b_o2 = _dot((b_p * b_sc2[None, :]).to(DT), b_k2, b_o2 * b_alpha[:, None], IEEE)
            b_o3 = _dot((b_p * b_sc3[None, :]).to(DT), b_k3, b_o3 * b_alpha[:, None], IEEE)
        else:
            b_pd = b_p.to(DT)
            b_o0 = _dot(b_pd, b_k0, b_o0 * b_alpha[:, None], IEEE)
            b_o1 = _dot(b_pd, b_k1, b_o1 * b_alpha[:, None], IEEE)
            b_o2 = _dot(b_pd, b_k2, b_o2 * b_alpha[:, None], IEEE)
            b_o3 = _dot(b_pd, b_k3, b_o3 * b_alpha[:, None], IEEE)
        b_m = b_m_new

    # finalize: empty rows (no valid key) give a zero output; their lse is -inf in the partial results (so the
    # combine can merge them) and +inf in the final one (FlashMLA's convention)
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_inv = tl.where(b_l > 0, 1.0 / b_l_safe, 0.0)
    b_lse = tl.where(b_l > 0, b_m * 0.6931471805599453 + tl.log(b_l_safe), float("-inf"))
    if NUM_SPLITS == 1:
        p_o = O + i_b64 * stride_ob + i_s.to(tl.int64)[:, None] * stride_os + i_h[:, None] * stride_oh + o_c[None, :]
        tl.store(p_o, (b_o0 * b_inv[:, None]).to(O.dtype.element_ty), mask=m_m[:, None])
        tl.store(p_o + 128, (b_o1 * b_inv[:, None]).to(O.dtype.element_ty), mask=m_m[:, None])
        tl.store(p_o + 256, (b_o2 * b_inv[:, None]).to(O.dtype.element_ty), mask=m_m[:, None])
        tl.store(p_o + 384, (b_o3 * b_inv[:, None]).to(O.dtype.element_ty), mask=m_m[:, None])
        b_lse = tl.where(b_l > 0, b_lse, float("inf"))
        tl.store(LSE + i_b64 * stride_lb + i_h * stride_lh + i_s * stride_ls, b_lse, mask=m_m)
        if WRITE_MAX:
            tl.store(MAXL + (i_b64 * S_Q + i_s) * H + i_h, b_m * 0.6931471805599453, mask=m_m)
    else:
        i_row = ((i_b64 * S_Q + i_s) * H + i_h) * NUM_SPLITS + i_split  # [BLOCK_M]
        p_o = O_PART + i_row[:, None] * 512 + o_c[None, :]
        tl.store(p_o, b_o0 * b_inv[:, None], mask=m_m[:, None])
        tl.store(p_o + 128, b_o1 * b_inv[:, None], mask=m_m[:, None])
        tl.store(p_o + 256, b_o2 * b_inv[:, None], mask=m_m[:, None])
        tl.store(p_o + 384, b_o3 * b_inv[:, None], mask=m_m[:, None])
        tl.store(LSE_PART + i_row, b_lse, mask=m_m)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART,  # [R, NUM_SPLITS, 512], [R, NUM_SPLITS] fp32; R = B * S_Q * H
    O, stride_ob, stride_os, stride_oh,
    LSE, stride_lb, stride_lh, stride_ls,
    S_Q, H,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_b = i_row // (S_Q * H)
    i_s = (i_row // H) % S_Q
    i_h = i_row % H
    o_sp = tl.arange(0, SPLITS_P2)
    m_sp = o_sp < NUM_SPLITS
    b_lse = tl.load(LSE_PART + i_row * NUM_SPLITS + o_sp, mask=m_sp, other=float("-inf"))  # [SPLITS_P2]
    b_max = tl.max(b_lse, axis=0)
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_w = tl.exp(b_lse - b_max_safe)
    b_sum = tl.sum(b_w, axis=0)
    b_sum_safe = tl.where(b_sum > 0, b_sum, 1.0)
    b_w = b_w / b_sum_safe
    o_d = tl.arange(0, 512)
    b_o = tl.load(O_PART + (i_row * NUM_SPLITS + o_sp[:, None]) * 512 + o_d[None, :], mask=m_sp[:, None], other=0)
    b_out = tl.sum(b_o * b_w[:, None], axis=0)  # [512]
    tl.store(O + i_b * stride_ob + i_s * stride_os + i_h * stride_oh + o_d, b_out.to(O.dtype.element_ty))
    tl.store(
        LSE + i_b * stride_lb + i_h * stride_lh + i_s * stride_ls,
        tl.where(b_sum > 0, b_max_safe + tl.log(b_sum_safe), float("inf")),
    )


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# Per-GPU tile configs, keyed by compute capability; chosen with the offline compile check
# (benchmarks/gpu_compile.py, ptxas of the Triton wheel). 64 x 32 tiles with 8 warps hold a [64, 512] fp32
# accumulator plus the [64, 576] query in registers: 255 registers and 270-540 bytes of spills per thread on
# sm_80 / sm_90, and ~112 KiB of shared memory (over the 99 KiB of sm_86 / sm_89 / sm_120). 32-row tiles halve
# both: 200-255 registers without spills, 44-76 KiB. sm_100 keeps 64 rows: its MMA accumulates in tensor
# memory (no register pressure; 108 KiB of its 227 KiB). sm_90 is measured, not only compiled: on an H200, 64 x 64
# tiles (spilling) run dense decode in 0.94 ms against 3.02 ms for 32 x 32 without spills, sparse decode 1.01 vs
# 3.27 ms (b = 128, bf16 cache; benchmarks/results/gpu_check/gpu_check_h200.json), as on an H100 before
# (kernels_gpu_h100_run1.json): the larger tile's fewer passes over the keys outweigh the spills.
_SMALL = KernelConfig(block_m=32, block_n=32, num_warps=8, num_stages=1)
_GPU_CONFIGS = {
    (8, 0): _SMALL,
    (8, 6): _SMALL,
    (8, 9): _SMALL,
    (9, 0): KernelConfig(block_m=64, block_n=64, num_warps=8, num_stages=1),
    (10, 0): KernelConfig(block_m=64, block_n=32, num_warps=8, num_stages=1),
    (12, 0): _SMALL,
}


def gpu_config(capability: tuple[int, int]) -> KernelConfig:
    """The tile config for a CUDA compute capability: its own entry, else the closest lower one of that major
    version, else the sm_80 one."""
    if capability in _GPU_CONFIGS:
        return _GPU_CONFIGS[capability]
    same_major = [c for c in _GPU_CONFIGS if c[0] == capability[0] and c <= capability]
    return _GPU_CONFIGS[max(same_major)] if same_major else _GPU_CONFIGS[(8, 0)]


def default_config(device: torch.device, num_rows: int) -> KernelConfig:
    """Tile sizes: on GPUs the config of that GPU generation; under the interpreter few, large programs."""
    cap = target_capability(device)
    if cap is not None and compiles_for_gpu(device):
        return gpu_config(cap)
    return KernelConfig(block_m=max(16, min(64, next_pow2(num_rows))), block_n=64, num_warps=4, num_stages=1)


def mla_attention_fwd(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor | None,
    seqlens: torch.Tensor | None,
    sm_scale: float,
    *,
    fp8: bool,
    indices: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    causal: bool = False,
    num_splits: int = 1,
    config: KernelConfig | None = None,
    write_max: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Launcher (inputs already validated by the public functions in :mod:`.flash_mla_interface`).

    Args:
        q: ``[B, S_q, H, 576]`` fp16/bf16/fp32, last dim contiguous.
        cache: ``[num_blocks, block_size, 576]`` (q's dtype or any float) / ``[.., 656]`` uint8 (``fp8``);
            last dim contiguous, any block and row strides.
        block_table: ``[B, *]`` int32 (stride(1) == 1; stride(0) may be 0); seqlens: ``[B]`` int32 (dense only).
        indices: ``[B, S_q, topk]`` int32 physical slots (``block * block_size + offset``) for the sparse
            kernel, else None; topk_length: optional ``[B]`` int32 (sparse: only the first ``topk_length[b]``).
        out_dtype: dtype of ``out`` (default q's).
    Returns: out ``[B, S_q, H, 512]``, lse ``[B, H, S_q]`` fp32 (``+inf`` for a row without a valid key),
        and max_logits ``[B, S_q, H]`` fp32 when ``write_max`` (then ``num_splits`` must be 1).
    """
    B, S_Q, H, _ = q.shape
    sparse = indices is not None
    rows = H if sparse else S_Q * H
    cfg = config or default_config(q.device, rows)
    if write_max and num_splits != 1:
        raise ValueError("max logits are only produced with num_splits == 1")
    out = torch.empty(B, S_Q, H, 512, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(B, H, S_Q, dtype=torch.float32, device=q.device)
    maxl = torch.empty(B, S_Q, H, dtype=torch.float32, device=q.device) if write_max else lse
    if B == 0 or S_Q == 0 or H == 0:
        return (out, lse, maxl) if write_max else (out, lse)
    if num_splits > 1:
        o_part = torch.empty(B, S_Q, H, num_splits, 512, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, S_Q, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse
    if fp8:
        kv, kv32, kv16 = cache, cache.view(torch.float32), cache.view(torch.int16)
    else:
        kv = kv32 = kv16 = cache
    n_rb = S_Q * cdiv(H, cfg.block_m) if sparse else cdiv(S_Q * H, cfg.block_m)
    idx = indices if sparse else block_table  # placeholder pointer when dense
    topk = indices.shape[-1] if sparse else 0
    tlen = topk_length if topk_length is not None else idx  # placeholder pointer without lengths
    if sparse:  # the sparse kernel reads neither
        block_table = seqlens = idx
    _mla_attn_fwd_kernel[(B * n_rb, num_splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        kv, kv32, kv16, cache.stride(0), cache.stride(1),
        block_table, block_table.stride(0), seqlens,
        idx, idx.stride(0), idx.stride(1) if sparse else 0, tlen,
        out, out.stride(0), out.stride(1), out.stride(2),
        lse, lse.stride(0), lse.stride(1), lse.stride(2),
        maxl, o_part, lse_part,
        float(sm_scale), H, S_Q, topk, cache.shape[1], cache.shape[0] * cache.shape[1],
        NUM_SPLITS=num_splits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SPARSE=sparse, HAS_TOPK_LEN=sparse and topk_length is not None, CAUSAL=bool(causal) and not sparse,
        FP8=fp8, FP8_NATIVE=native_fp8(q.device), WRITE_MAX=write_max,
        DT=_DT[q.dtype], IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(B * S_Q * H,)](
            o_part, lse_part,
            out, out.stride(0), out.stride(1), out.stride(2),
            lse, lse.stride(0), lse.stride(1), lse.stride(2),
            S_Q, H, NUM_SPLITS=num_splits, SPLITS_P2=next_pow2(num_splits), num_warps=4,
        )
    return (out, lse, maxl) if write_max else (out, lse)


__all__ = ["KernelConfig", "default_config", "mla_attention_fwd", "LOG2E", "LN2"]
