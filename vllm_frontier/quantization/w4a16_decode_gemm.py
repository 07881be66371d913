"""W4A16 GEMM built for decode shapes (M <= 16) on FP4 weights (NVFP4 / MXFP4) in a layout permuted once at load.

Imports torch and triton only (never vllm). y[M, N] = x[M, K] @ W[N, K]^T, W held as an `FP4Decode` built by
`permute_fp4` from an `FP4Tensor` (the canonical "pairs" layout of `fp4_formats`); `unpermute_fp4` inverts it.

Why a new layout: at M <= 16 the GEMM should be bound by reading 4.25-4.5 bits per weight, so the work per weight
value must stay at a few instructions. The "pairs" kernel (`w4a16_gemm`: nibble split into even / odd K, per-value
bit placement, fp16 -> fp32 convert, fp32 scale multiply, convert back) runs 12.8 SASS instructions per weight
value per thread in its main loop at M = 1 (sm_90, NVFP4, bf16 x); this kernel 6.3, of which the decode proper is
~1.4 integer ops + 0.5 HMUL2, the bf16 conversion ~1.5 (F2F + PRMT; none with fp16 x), the rest MMA operand moves
and addressing (`python benchmarks/gpu_compile.py --only w4a16 --sass`, benchmarks/results/gpu_compile/).

Layout (`FP4Decode`):
  words   int32 [..., N, Kp / 8], Kp = K rounded up to `kb` (the layout's K block; zero codes in the padding).
          Word j of row n holds the 8 codes of k = 8j .. 8j + 7, bits arranged so that four shift / mask
          expressions each yield two fp16 bit patterns at once (the two 16-bit halves of one 32-bit result):
              A = w & 0x8E008E00                                      (k slots 0, 1)
              B = (w << 3) & 0x8E008E00                               (k slots 4, 5)
              C = ((w << 6) & 0x0E000E00) | ((w << 1) & 0x80008000)   (k slots 2, 3)
              D = ((w << 9) & 0x0E000E00) | ((w << 2) & 0x80008000)   (k slots 6, 7)
          Each half then holds the E2M1 code with its exponent and mantissa bits in fp16's bits 11..9 and its
          sign in bit 15: the fp16 value is E2M1 * 2^-14 exactly (the +-0.5 codes as fp16 subnormals).
          11 integer ops per 8 values in SASS (ptxas fuses each `(a & m1) | (b & m2)` into one LOP3): a Marlin-style
          placement adapted to E2M1 (no magic-number subtract: E2M1's exponent / mantissa bits are fp16's).
  scales  uint8 [..., Kp / kb, N, kb / G]: the block scales of one K block of a row range are contiguous, so
          one load serves a [BLOCK_N, kb] weight tile. E4M3 bits (NVFP4) / E8M0 codes (MXFP4), as in FP4Tensor.
  post    float32 [..., 2]: (2^(14 + R), global_scale), applied to the fp32 accumulator, in that order.

Decode in fp16: each block scale is decoded to fp16 once per tile row and multiplied into its values in fp16
(fp16 x fp16, two values per HMUL2 once the compiler packs them). The product is exact:
  NVFP4: E2M1 (multiples of 0.5, <= 2 significant bits) * E4M3 (multiples of 2^-9, <= 4 significant bits)
         * 2^-14 is an integer multiple of 2^-24 (fp16's smallest subnormal) below 6 * 448 * 2^-14 < 1, with
         <= 6 significant bits: representable. R = 0.
  MXFP4: the E8M0 scale 2^(b - 127) is taken as fp16 2^(b - 127 - R) with a per-tensor R chosen at load so the
         largest block exponent maps to 2^15; exact for every block within 24 binades of the largest
         (`FP4Decode.exact`; a block further down flushes to zero, so callers keep the pairs kernel for such a
         tensor; real weights span far fewer binades).
The exact fp16 weights feed tl.dot in the activation dtype (fp16 as is; bf16 and fp32 hold them exactly too),
accumulated in fp32; no even / odd split of x (a tile's K order is the natural one).

The layout lives in `fp4_decode_layout` (torch only); this module re-exports it. The torch reference
(`ref_w4a16_decode_gemm`) dequantizes through `unpermute_fp4` and `fp4_formats.dequantize`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .fp4_decode_layout import FP4Decode, permute_fp4, unpermute_fp4
from .fp4_formats import ref_w4a16_matmul

__all__ = [
    "FP4Decode",
    "DecodeConfig",
    "permute_fp4",
    "unpermute_fp4",
    "w4a16_decode_gemm",
    "ref_w4a16_decode_gemm",
    "default_decode_config",
]

DECODE_M = 16  # M up to this runs one 16-row MMA tile (the decode tiles); larger M (prefill) takes 64-row tiles
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ------------------------------------------------------------------------------------------- kernel
@triton.jit
def _half_to_fp16(v, HIGH: tl.constexpr):
    """uint32 [...] holding two fp16 bit patterns -> the low (HIGH=False) or high one, as fp16."""
    if HIGH:
        v = v >> 16
    return v.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _e2m1x8_to_fp16(w):
    """uint32 words [R, C] (decode layout) -> fp16 [R, C * 8] in k order: E2M1 value * 2^-14, exact.

    Four shift / mask expressions, each yielding two fp16 bit patterns (lo and hi 16 bits): 11 integer ops per
    8 values; splitting a 32-bit register into its halves costs nothing on the GPU.
    """
    a = w & 0x8E008E00
    b = (w << 3) & 0x8E008E00
    c = ((w << 6) & 0x0E000E00) | ((w << 1) & 0x80008000)
    d = ((w << 9) & 0x0E000E00) | ((w << 2) & 0x80008000)
    lo = tl.join(tl.join(_half_to_fp16(a, False), _half_to_fp16(b, False)),
                 tl.join(_half_to_fp16(c, False), _half_to_fp16(d, False)))  # [R, C, 2, 2]: slots a c b d
    hi = tl.join(tl.join(_half_to_fp16(a, True), _half_to_fp16(b, True)),
                 tl.join(_half_to_fp16(c, True), _half_to_fp16(d, True)))
    v = tl.join(hi, lo)  # [R, C, 2, 2, 2]
    return tl.reshape(v, (w.shape[0], w.shape[1] * 8))


@triton.jit
def _scale_to_fp16(b, bias, SCALE_E8M0: tl.constexpr):
    """int32 scale bytes [...] -> fp16 [...]: the E4M3 value (exact), or 2^(b - bias) for E8M0 (clamped to fp16's
    range [2^-24, 2^15]; `permute_fp4` picks bias so the largest scale is 2^15)."""
    if SCALE_E8M0:
        e = tl.minimum(tl.maximum(b - bias, -24), 15)
        s = ((e + 127) << 23).to(tl.float32, bitcast=True).to(tl.float16)
    else:
        # E4M3's exponent / mantissa bits into fp16's (bits 13..7): the fp16 value is E4M3 * 2^-8, exact for
        # normals and subnormals; * 256 is exact in fp16 (E4M3 <= 448)
        bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        s = bits.to(tl.int16).to(tl.float16, bitcast=True) * 256.0
    return s


@triton.jit
def _w4a16_decode_kernel(x_ptr, w_ptr, s_ptr, p_ptr, bias_ptr, y_ptr, M, N, K, KP,
                         stride_xm, stride_xk, stride_wn, stride_sb, stride_sn, stride_ym, stride_yn,
                         GROUP: tl.constexpr, SCALE_E8M0: tl.constexpr, IS_FP32: tl.constexpr,
                         SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr):
    """y[M, N] (+)= x[M, K] @ W[N, K]^T for programs (i_mn, i_k): K blocks i_k, i_k + SPLIT_K, ... of KB."""
    NW: tl.constexpr = KB // 8  # words per row per K block
    NG: tl.constexpr = KB // GROUP  # scales per row per K block
    i_mn = tl.program_id(0)
    i_k = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    i_m = i_mn // n_blocks
    i_n = i_mn % n_blocks
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_w = tl.arange(0, NW)
    offs_g = tl.arange(0, NG)
    offs_kk = tl.arange(0, KB)
    bias = tl.load(bias_ptr)
    p_w = w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :]
    p_s = s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i_kb in range(i_k, KP // KB, SPLIT_K):
        # weights stream through once: no reuse in L2 worth keeping
        b_w = tl.load(p_w + i_kb * NW, mask=n_mask[:, None], other=0,
                      eviction_policy="evict_first").to(tl.uint32, bitcast=True)  # [BLOCK_N, NW]
        b_s = tl.load(p_s + i_kb * stride_sb, mask=n_mask[:, None], other=0,
                      eviction_policy="evict_first").to(tl.int32)  # [BLOCK_N, NG]
        scale = _scale_to_fp16(b_s, bias, SCALE_E8M0)  # [BLOCK_N, NG] fp16
        w = _e2m1x8_to_fp16(b_w)  # [BLOCK_N, KB] fp16, E2M1 * 2^-14
        w = tl.reshape(tl.reshape(w, (BLOCK_N, NG, GROUP)) * scale[:, :, None], (BLOCK_N, KB))  # exact in fp16
        offs_k = i_kb * KB + offs_kk
        b_x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                      mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)  # [BLOCK_M, KB]
        if IS_FP32:
            acc += tl.dot(b_x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(b_x, tl.trans(w.to(b_x.dtype)))
    acc = acc * tl.load(p_ptr) * tl.load(p_ptr + 1)  # 2^(14 + R) (exact), then the global scale
    p_y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    m_y = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_y)
    else:
        tl.atomic_add(p_y, acc, mask=m_y)


# ------------------------------------------------------------------------------------------- launcher
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch options of `w4a16_decode_gemm` (BLOCK_K is the layout's kb, fixed at permute time)."""

    block_m: int = 16
    block_n: int = 32
    split_k: int = 1
    num_warps: int = 2
    num_stages: int = 4

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_decode_config(M: int, N: int, K: int, device: torch.device, kb: int = 256) -> DecodeConfig:
    """Tiles for M <= 16. Each warp owns 16 weight rows (BLOCK_N = 32, 2 warps): the x tile (padded to the MMA's
    16 rows) is read from shared memory once per warp per K block, so fewer rows per warp would spend more on x
    than on weights, and 1-warp programs leave SM sub-partitions idle. Split-K (fp32 atomics: two more launches,
    for the zeroed output and the cast) only while there are fewer than two programs per SM and each part
    still streams >= 4 K blocks. Offline compile (benchmarks/gpu_compile.py): no spills on sm_80 / sm_90."""
    if M > DECODE_M:  # prefill through the same layout (no second copy of the weights): 64 x 64 tiles, 8 warps
        # and 2 stages: 4 warps spill on sm_80 / sm_120 and 3 stages need 112 KiB of shared memory for MXFP4
        return DecodeConfig(block_m=64, block_n=64, split_k=1, num_warps=8, num_stages=2)
    sms = _num_sms(device)
    block_n = 32
    tiles = triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, kb)
    split_k = 1
    while tiles * split_k < 2 * sms and split_k < 4 and k_blocks >= 8 * split_k:
        split_k *= 2
    return DecodeConfig(block_m=16, block_n=block_n, split_k=split_k, num_warps=2, num_stages=4)


def _check(x: torch.Tensor, d: FP4Decode) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} unsupported; use float16, bfloat16 or float32")
    if d.words.dim() != 2:
        raise ValueError(f"expected a 2-D FP4 weight, got words of shape {tuple(d.words.shape)}")
    if x.shape[1] != d.k:
        raise ValueError(f"x has K = {x.shape[1]} but the weight has K = {d.k}")
    if x.device != d.words.device:
        raise ValueError(f"x is on {x.device} but the weight is on {d.words.device}; move them together")


def w4a16_decode_gemm(x: torch.Tensor, d: FP4Decode, config: DecodeConfig | None = None) -> torch.Tensor:
    """y = x @ W^T for decode shapes, W permuted by `permute_fp4`.

    Args:
        x: [M, K] float16 / bfloat16 / float32 (any strides). Built for M <= 16; larger M runs 64-row tiles.
        d: FP4Decode of shape [N, K].
        config: launch options; `default_decode_config(...)` when None.
    Returns:
        y: [M, N], x.dtype, accumulated in fp32.
    """
    _check(x, d)
    M, K = x.shape
    N = d.words.shape[0]
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device)
    cfg = config or default_decode_config(M, N, K, x.device, d.kb)
    kp = d.words.shape[1] * 8
    y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if cfg.split_k > 1
         else torch.empty((M, N), dtype=x.dtype, device=x.device))
    if cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1) or cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"block_m / block_n must be powers of two >= 16, got {cfg.block_m} / {cfg.block_n}")
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    _w4a16_decode_kernel[grid](
        x, d.words, d.scales, d.post, d.exp_bias.reshape(1), y, M, N, K, kp,
        x.stride(0), x.stride(1), d.words.stride(0), d.scales.stride(0), d.scales.stride(1),
        y.stride(0), y.stride(1),
        GROUP=d.group_size, SCALE_E8M0=d.fmt == "mxfp4", IS_FP32=x.dtype == torch.float32, SPLIT_K=cfg.split_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KB=d.kb, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y if cfg.split_k == 1 else y.to(x.dtype)


# ------------------------------------------------------------------------------------------- reference
def ref_w4a16_decode_gemm(x: torch.Tensor, d: FP4Decode) -> torch.Tensor:
    """Reference for `w4a16_decode_gemm`: fp32 dequantize (through `unpermute_fp4`) and matmul, cast to x.dtype."""
    return ref_w4a16_matmul(x, unpermute_fp4(d))
