"""FP8 e4m3 (OCP ``float8_e4m3fn``) group quantization, and the bit-level helpers the Triton kernels share.

Quantization rule (the one DeepSeek's ``act_quant`` and vLLM's indexer cache writer use), per group
of ``group_size`` consecutive values along the last dimension::

    scale = max(amax(|x_group|), 1e-4) / 448          # fp32
    scale = 2 ** ceil(log2(scale))                    # only when scale_fmt == "ue8m0"
    q     = round_to_nearest_even(clamp(x / scale, -448, 448))   # e4m3fn code
    x_hat = float(q) * scale                          # dequantization

The Triton helpers below encode and decode with integer arithmetic, so a kernel produces the same
bytes as ``torch.Tensor.to(torch.float8_e4m3fn)`` on a GPU and under ``TRITON_INTERPRET=1`` (whose own
float casts truncate instead of rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["FP8_MAX", "quantize_fp8_e4m3", "dequantize_fp8_e4m3"]

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FORMATS = (None, "ue8m0")


def _check_group(x: torch.Tensor, group_size: int) -> None:
    if group_size <= 0 or x.shape[-1] % group_size != 0:
        raise ValueError(
            f"the last dimension ({x.shape[-1]}) must be a positive multiple of group_size ({group_size})"
        )


def quantize_fp8_e4m3(
    x: torch.Tensor, group_size: int, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to FP8 e4m3 with one fp32 scale per group of ``group_size`` values.

    Args:
        x: ``[..., D]`` float16 / bfloat16 / float32; ``D % group_size == 0``.
        group_size: values per scale (128 for the MLA cache and the indexer).
        scale_fmt: None (scale = amax / 448) or ``"ue8m0"`` (scale rounded up to a power of two).

    Returns:
        values: ``[..., D]`` ``torch.float8_e4m3fn``.
        scales: ``[..., D // group_size]`` float32; ``x ≈ values.float() * scales`` per group.
    """
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    _check_group(x, group_size)
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scales = g.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    values = (g / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values.reshape(x.shape), scales


def dequantize_fp8_e4m3(
    values: torch.Tensor, scales: torch.Tensor, group_size: int, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_e4m3`.

    Args:
        values: ``[..., D]`` ``torch.float8_e4m3fn`` (or uint8 holding e4m3 codes).
        scales: ``[..., D // group_size]`` float32.
    Returns:
        ``[..., D]`` ``out_dtype`` (computed in float32).
    """
    if values.dtype == torch.uint8:
        values = values.view(torch.float8_e4m3fn)
    if values.dtype != torch.float8_e4m3fn:
        raise TypeError(f"values must be float8_e4m3fn or uint8, got {values.dtype}")
    _check_group(values, group_size)
    if tuple(scales.shape) != (*values.shape[:-1], values.shape[-1] // group_size):
        raise ValueError(
            f"scales must have shape {[*values.shape[:-1], values.shape[-1] // group_size]}, got {list(scales.shape)}"
        )
    g = values.float().reshape(*values.shape[:-1], -1, group_size) * scales.float().unsqueeze(-1)
    return g.reshape(values.shape).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton helpers (bit-exact on GPU and in the interpreter)
# ---------------------------------------------------------------------------------------------


@triton.jit
def f32_to_e4m3_bits(x):
    """fp32 -> e4m3fn code (uint8), saturating to ±448, round to nearest even."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    au = a.to(tl.int32, bitcast=True)
    # normal e4m3 (a >= 2^-6): keep 3 of fp32's 23 mantissa bits, round to nearest even,
    # then rebias the exponent from 127 to 7 (120 << 3 in the packed exp|mant field).
    normal = ((au + 0x7FFFF + ((au >> 20) & 1)) >> 20) - 960
    # subnormal e4m3 (a < 2^-6): a multiple of 2^-9; add/subtract 2^23 rounds to nearest even.
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def f32_to_bf16_bits(x):
    """fp32 -> bfloat16 bit pattern (int16), round to nearest even (NaN not handled)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def bf16_bits_to_f32(b):
    """bfloat16 bit pattern (int16) -> fp32 (exact)."""
    return ((b.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits_to_f16(b):
    """e4m3fn code (uint8) -> fp16 by integer arithmetic, for targets without ``float8e4nv`` (below sm_89).

    Exact for every code: ``S.EEEE.MMM`` moved to fp16's ``S.0EEEE.MMM0000000`` reads as the e4m3 value times
    2^-8 (exponent bias 15 instead of 7; e4m3 subnormals land on fp16 subnormals), so one multiply by 256
    restores it. ``S.1111.111`` is NaN (e4m3fn has no infinities).
    """
    c = b.to(tl.int16) & 0xFF
    h = ((c & 0x7F) << 7) | ((c & 0x80) << 8)
    x = h.to(tl.float16, bitcast=True) * 256.0
    return tl.where((c & 0x7F) == 0x7F, float("nan"), x)


@triton.jit
def e4m3_bits_to(b, dtype: tl.constexpr, NATIVE: tl.constexpr):
    """e4m3fn code (uint8) -> ``dtype`` (exact for fp16/bf16/fp32). ``NATIVE``: through Triton's ``float8e4nv``
    (sm_89 and later, and the interpreter); else :func:`e4m3_bits_to_f16` (sm_80/sm_86). The launcher decides
    with ``_common.native_fp8``."""
    if NATIVE:
        return b.to(tl.float8e4nv, bitcast=True).to(dtype)
    return e4m3_bits_to_f16(b).to(dtype)
