"""W4A16 GEMMs on FP4 weights (NVFP4 / MXFP4, see `fp4_formats`): Triton kernels that dequantize in registers.

Imports torch and triton only (never vllm). Two kernels share one inner loop:

- `w4a16_gemm(x, q)`: y[M, N] = x[M, K] @ W[N, K]^T with W held as an `FP4Tensor`. For decode shapes
  (M <= 16) the weight read dominates; FP4 reads 4.5 (NVFP4) or 4.25 (MXFP4) bits per value instead of 16.
  Optional split-K (fp32 atomics) keeps enough programs in flight when N / BLOCK_N is small.
- `w4a16_grouped_gemm(x, q, expert_offsets)`: the experts' variant. Rows of x are sorted by expert; rows
  expert_offsets[e] : expert_offsets[e + 1] are multiplied by expert e's weight q[e] ([E, N, K]).

Inner loop per K block: load BLOCK_K/2 packed bytes per output row, split the nibbles into the even- and
odd-indexed K elements, decode E2M1 by placing its bits in an fp16 and the block scale with integer ops,
multiply, and feed two tl.dot calls (x's even and odd K columns). The per-tensor scale is applied once to the fp32 accumulator.

The torch references (`ref_w4a16_gemm`, `ref_w4a16_grouped_gemm`) are the oracles for tests and the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp4_formats import FP4Tensor, dequantize, ref_w4a16_matmul

__all__ = [
    "w4a16_gemm",
    "w4a16_grouped_gemm",
    "ref_w4a16_gemm",
    "ref_w4a16_grouped_gemm",
    "default_config",
    "GemmConfig",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _decode_e2m1_lo(b):
    """Low nibble of int32 bytes -> float32 E2M1 value * 2^-14.

    The nibble's magnitude bits (exponent 2 bits, mantissa 1 bit) land in the low exponent and top mantissa
    bits of an fp16 and the sign bit in fp16's sign: fp16 then holds the E2M1 value scaled by 2^-14 exactly,
    subnormal codes (+-0.5) included. Three integer ops and two conversions per value, no branches; the
    2^14 is folded into the block scale (`_decode_scale`).
    """
    bits = ((b << 9) & 0x0E00) | ((b << 12) & 0x8000)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_scale(b, SCALE_E8M0: tl.constexpr):
    """int32 scale bytes -> float32 scale * 2^14 (the factor `_decode_e2m1_lo` leaves out).
    E8M0: 2^(b-127) (b = 0 gives 2^-127); E4M3: sign, 4 exp (bias 7), 3 man. An E8M0 scale above 2^113
    (a block whose largest |w| exceeds ~1e34, which no checkpoint holds) overflows to inf here."""
    if SCALE_E8M0:
        s = tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))
    else:
        e = (b >> 3) & 15
        m = b & 7
        normal = ((e + 120) << 23) | (m << 20)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
        s = tl.where((b & 128) != 0, -mag, mag)
    return s * 16384.0


@triton.jit
def _fp4_tile(x_ptr, w_ptr, s_ptr, offs_m, m_mask, offs_n, n_mask, K, k_start, k_step,
              stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
              GROUP: tl.constexpr, SCALE_E8M0: tl.constexpr, IS_FP32: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] (fp32) = sum over K blocks k_start, k_start + k_step, ... of x-tile @ W-tile^T,
    W decoded with its block scales (not the per-tensor scale)."""
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    offs_h = tl.arange(0, HALF)
    offs_g = tl.arange(0, NG)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, K, k_step):
        i_h = k0 // 2 + offs_h  # packed column = K index // 2
        m_h = i_h < K // 2
        i_g = k0 // GROUP + offs_g
        m_g = i_g < K // GROUP
        p_w = w_ptr + offs_n[:, None] * stride_wn + i_h[None, :] * stride_wk
        b_w = tl.load(p_w, mask=n_mask[:, None] & m_h[None, :], other=0).to(tl.int32)  # [BLOCK_N, HALF]
        p_s = s_ptr + offs_n[:, None] * stride_sn + i_g[None, :] * stride_sk
        b_s = tl.load(p_s, mask=n_mask[:, None] & m_g[None, :], other=0).to(tl.int32)  # [BLOCK_N, NG]
        scale = _decode_scale(b_s, SCALE_E8M0)[:, :, None]  # [BLOCK_N, NG, 1]
        w_lo = tl.reshape(tl.reshape(_decode_e2m1_lo(b_w), (BLOCK_N, NG, GROUP // 2)) * scale, (BLOCK_N, HALF))
        w_hi = tl.reshape(tl.reshape(_decode_e2m1_lo(b_w >> 4), (BLOCK_N, NG, GROUP // 2)) * scale, (BLOCK_N, HALF))
        p_x = x_ptr + offs_m[:, None] * stride_xm + (2 * i_h)[None, :] * stride_xk
        m_x = m_mask[:, None] & m_h[None, :]
        b_xe = tl.load(p_x, mask=m_x, other=0.0)  # [BLOCK_M, HALF] x[:, k0 + 0, 2, 4, ...]
        b_xo = tl.load(p_x + stride_xk, mask=m_x, other=0.0)  # [BLOCK_M, HALF] x[:, k0 + 1, 3, 5, ...]
        if IS_FP32:
            acc += tl.dot(b_xe, tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(b_xo, tl.trans(w_hi), input_precision="ieee")
        else:
            acc += tl.dot(b_xe, tl.trans(w_lo.to(b_xe.dtype)))
            acc += tl.dot(b_xo, tl.trans(w_hi.to(b_xo.dtype)))
    return acc


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, g_ptr, y_ptr, M, N, K,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
                  GROUP: tl.constexpr, SCALE_E8M0: tl.constexpr, IS_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i_mn = tl.program_id(0)
    i_k = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    i_m = i_mn // n_blocks
    i_n = i_mn % n_blocks
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = _fp4_tile(x_ptr, w_ptr, s_ptr, offs_m, m_mask, offs_n, n_mask, K, i_k * BLOCK_K, BLOCK_K * SPLIT_K,
                    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                    GROUP, SCALE_E8M0, IS_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = acc * tl.load(g_ptr)
    p_y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    m_y = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_y)
    else:
        tl.atomic_add(p_y, acc, mask=m_y)


@triton.jit
def _w4a16_grouped_kernel(x_ptr, w_ptr, s_ptr, g_ptr, off_ptr, y_ptr, N, K,
                          stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                          stride_ym, stride_yn,
                          GROUP: tl.constexpr, SCALE_E8M0: tl.constexpr, IS_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    i_e = tl.program_id(2)
    row_start = tl.load(off_ptr + i_e)
    row_end = tl.load(off_ptr + i_e + 1)
    row0 = row_start + i_m * BLOCK_M
    if row0 < row_end:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < row_end
        n_mask = offs_n < N
        e64 = i_e.to(tl.int64)
        acc = _fp4_tile(x_ptr, w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, offs_m, m_mask, offs_n, n_mask,
                        K, 0, BLOCK_K, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                        GROUP, SCALE_E8M0, IS_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * tl.load(g_ptr + i_e)
        p_y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------- launchers
class GemmConfig(tuple):
    """(block_m, block_n, block_k, split_k, num_warps, num_stages)."""

    __slots__ = ()

    def __new__(cls, block_m=16, block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=3):
        return super().__new__(cls, (block_m, block_n, block_k, split_k, num_warps, num_stages))

    block_m = property(lambda s: s[0])
    block_n = property(lambda s: s[1])
    block_k = property(lambda s: s[2])
    split_k = property(lambda s: s[3])
    num_warps = property(lambda s: s[4])
    num_stages = property(lambda s: s[5])

    def as_dict(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, block_k=self.block_k, split_k=self.split_k,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_config(M: int, N: int, K: int, group: int, device: torch.device) -> GemmConfig:
    """Heuristic tile choice. Decode (M <= 32): 16-row x 64-column tiles, 8 warps, split-K up to 4 until there
    are about two programs per SM; the best of a 15-config sweep on an H100 at N, K in 4096..7168
    (benchmarks/results/fp4/fp4_gpu_h100.json)."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64
    num_warps = 8 if M <= 32 else 4
    # M > 32: 128-wide K blocks; 256 made the decoded [64, 256] weight tile spill on sm_80 / sm_90 (offline
    # compile check, benchmarks/gpu_compile.py).
    block_k = min(256 if M <= 32 else 128, max(32, group, triton.next_power_of_2(K)))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = 1
    while tiles * split_k < 2 * _num_sms(device) and K >= block_k * split_k * 4 and split_k < 4:
        split_k *= 2
    return GemmConfig(block_m, block_n, block_k, split_k, num_warps, 3)


def _check_common(x: torch.Tensor, q: FP4Tensor, ndim: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} unsupported; use float16, bfloat16 or float32")
    if q.layout != "pairs":
        raise ValueError(f"the Triton kernels read the canonical 'pairs' layout, got {q.layout!r}: "
                         "use q.with_layout('pairs')")
    if q.packed.dim() != ndim:
        raise ValueError(f"expected a {ndim}-D FP4 weight, got packed shape {tuple(q.packed.shape)}")
    if x.shape[1] != q.shape[-1]:
        raise ValueError(f"x has K = {x.shape[1]} but the weight has K = {q.shape[-1]}")
    if x.device != q.packed.device:
        raise ValueError(f"x is on {x.device} but the weight is on {q.packed.device}; move them together")
    if q.packed.dtype != torch.uint8 or q.scales.dtype != torch.uint8:
        raise ValueError("FP4Tensor.packed and .scales must be uint8")


def _check_block_k(block_k: int, group: int) -> None:
    if block_k % group or block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two >= 32 and a multiple of the block size {group}")


def w4a16_gemm(x: torch.Tensor, q: FP4Tensor, config: GemmConfig | None = None) -> torch.Tensor:
    """y = x @ W^T with W in FP4.

    Args:
        x: [M, K] float16 / bfloat16 / float32 (any strides).
        q: FP4Tensor of shape [N, K] (packed [N, K/2] uint8, scales [N, K/G] uint8, global_scale [] fp32).
        config: tiles and launch options; `default_config(...)` when None.
    Returns:
        y: [M, N], x.dtype, accumulated in fp32.
    """
    _check_common(x, q, 2)
    M, K = x.shape
    N = q.shape[0]
    y_dtype = x.dtype
    if M == 0:
        return torch.empty((0, N), dtype=y_dtype, device=x.device)
    cfg = config or default_config(M, N, K, q.group_size, x.device)
    _check_block_k(cfg.block_k, q.group_size)
    y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if cfg.split_k > 1
         else torch.empty((M, N), dtype=y_dtype, device=x.device))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x, q.packed, q.scales, q.global_scale.reshape(1), y, M, N, K,
        x.stride(0), x.stride(1), q.packed.stride(0), q.packed.stride(1), q.scales.stride(0), q.scales.stride(1),
        y.stride(0), y.stride(1),
        GROUP=q.group_size, SCALE_E8M0=q.fmt == "mxfp4", IS_FP32=x.dtype == torch.float32, SPLIT_K=cfg.split_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y if cfg.split_k == 1 else y.to(y_dtype)


def w4a16_grouped_gemm(x: torch.Tensor, q: FP4Tensor, expert_offsets: torch.Tensor,
                       config: GemmConfig | None = None) -> torch.Tensor:
    """Grouped y[rows of e] = x[rows of e] @ W[e]^T for the experts of an MoE layer.

    Args:
        x: [T, K] float16 / bfloat16 / float32, rows sorted by expert.
        q: FP4Tensor [E, N, K] (packed [E, N, K/2], scales [E, N, K/G], global_scale [E]).
        expert_offsets: int32/int64 [E + 1], non-decreasing, offsets[0] = 0; rows offsets[e]:offsets[e+1] use
            expert e. Rows at or after offsets[E] are left uninitialized in y.
        config: block_m / block_n / block_k / num_warps / num_stages (split_k is ignored).
    Returns:
        y: [T, N], x.dtype.
    """
    _check_common(x, q, 3)
    E, N, K = q.shape
    if expert_offsets.shape != (E + 1,):
        raise ValueError(f"expert_offsets must have shape [{E + 1}], got {tuple(expert_offsets.shape)}")
    T = x.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    cfg = config or GemmConfig(16, 32 if N <= 4096 else 64, min(256, max(32, q.group_size, triton.next_power_of_2(K))),
                               1, 4, 3)
    _check_block_k(cfg.block_k, q.group_size)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(T, cfg.block_m), E)
    _w4a16_grouped_kernel[grid](
        x, q.packed, q.scales, q.global_scale.reshape(E), expert_offsets, y, N, K,
        x.stride(0), x.stride(1), q.packed.stride(0), q.packed.stride(1), q.packed.stride(2),
        q.scales.stride(0), q.scales.stride(1), q.scales.stride(2), y.stride(0), y.stride(1),
        GROUP=q.group_size, SCALE_E8M0=q.fmt == "mxfp4", IS_FP32=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


# --------------------------------------------------------------------------------------------- references
def ref_w4a16_gemm(x: torch.Tensor, q: FP4Tensor) -> torch.Tensor:
    """Reference for `w4a16_gemm`: fp32 dequantize and matmul, cast to x.dtype."""
    return ref_w4a16_matmul(x, q)


def ref_w4a16_grouped_gemm(x: torch.Tensor, q: FP4Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """Reference for `w4a16_grouped_gemm` (a per-expert loop in fp32). Rows past offsets[E] are zero."""
    E, N, _ = q.shape
    y = torch.zeros((x.shape[0], N), dtype=torch.float32, device=x.device)
    offs = expert_offsets.tolist()
    for e in range(E):
        a, b = offs[e], offs[e + 1]
        if b > a:
            w = dequantize(FP4Tensor(q.fmt, q.packed[e], q.scales[e], q.global_scale[e]))
            y[a:b] = x[a:b].float() @ w.T
    return y.to(x.dtype)
