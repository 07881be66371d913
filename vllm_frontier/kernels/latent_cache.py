"""Latent (MLA) paged KV cache: write by slot mapping, read / dequantize.

Cache layouts (one row per token, ``[num_blocks, block_size, row]``, rows contiguous, any block stride):

- float: ``row = 576`` values of the cache dtype: ``[0:512]`` latent ``kv_c``, ``[512:576]`` rope ``k_pe``.
- FP8 (``fp8=True``): ``row = 656`` uint8 bytes: ``[0:512]`` e4m3fn codes of ``kv_c``,
  ``[512:528]`` 4 fp32 scales (one per 128 latent values, see :mod:`.fp8`), ``[528:656]`` 64 bf16 rope
  values (not quantized).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dsa_cpu
from ._common import check_dtype, check_same_device, use_triton
from .fp8 import SCALE_FORMATS, f32_to_bf16_bits, f32_to_e4m3_bits
from .ref import FP8_ROW_BYTES, LATENT_DIM, decode_latent_rows, ref_write_latent_cache

__all__ = ["write_latent_cache", "read_latent_cache"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_latent_kernel(
    KVC, stride_kvc,  # [T, 512] float
    KPE, stride_kpe,  # [T, 64] float, or int16 bf16 bits when KPE_BF16_BITS
    SLOTS,  # [T] int64
    C8, C32, C16,  # the cache viewed as uint8/fp32/int16 (FP8) or its own float dtype (C8 only)
    stride_blk, stride_tok,  # in elements of C8's dtype
    block_size,
    FP8: tl.constexpr,
    KPE_BF16_BITS: tl.constexpr,
    SCALE_UE8M0: tl.constexpr,
):
    i_t = tl.program_id(0)
    slot = tl.load(SLOTS + i_t)
    if slot < 0:
        return
    o_row = (slot // block_size) * stride_blk + (slot % block_size) * stride_tok  # int64
    o_g = tl.arange(0, 4)
    o_c = tl.arange(0, 128)
    b_x = tl.load(KVC + i_t * stride_kvc + o_g[:, None] * 128 + o_c[None, :])  # [4, 128]
    o_r = tl.arange(0, 64)
    if FP8:
        b_xf = b_x.to(tl.float32)
        b_scale = tl.maximum(tl.max(tl.abs(b_xf), axis=1), 1e-4) / 448.0  # [4]
        if SCALE_UE8M0:
            b_scale = tl.exp2(tl.ceil(tl.log2(b_scale)))
        b_q = f32_to_e4m3_bits(b_xf / b_scale[:, None])
        tl.store(C8 + o_row + o_g[:, None] * 128 + o_c[None, :], b_q)
        tl.store(C32 + o_row // 4 + 128 + o_g, b_scale)
        if KPE_BF16_BITS:
            b_pe = tl.load(KPE + i_t * stride_kpe + o_r)  # [64] int16
        else:
            b_pe = f32_to_bf16_bits(tl.load(KPE + i_t * stride_kpe + o_r).to(tl.float32))
        tl.store(C16 + o_row // 2 + 264 + o_r, b_pe)
    else:
        tl.store(C8 + o_row + o_g[:, None] * 128 + o_c[None, :], b_x.to(C8.dtype.element_ty))
        b_pe = tl.load(KPE + i_t * stride_kpe + o_r)
        tl.store(C8 + o_row + 512 + o_r, b_pe.to(C8.dtype.element_ty))


def _check_cache(cache: torch.Tensor, fp8: bool) -> torch.Tensor:
    if cache.dim() == 4 and cache.shape[2] == 1:  # FlashMLA's [num_blocks, block_size, 1, row]
        cache = cache.squeeze(2)
    if cache.dim() != 3:
        raise ValueError(f"cache must be [num_blocks, block_size, row], got shape {list(cache.shape)}")
    want = FP8_ROW_BYTES if fp8 else LATENT_DIM
    if cache.shape[2] != want:
        raise ValueError(f"{'FP8' if fp8 else 'float'} latent cache rows must be {want} wide, got {cache.shape[2]}")
    if fp8:
        check_dtype("FP8 latent cache", cache, (torch.uint8,))
    else:
        check_dtype("latent cache", cache, _FLOATS)
    if cache.stride(2) != 1 or cache.stride(1) != cache.shape[2]:
        raise ValueError("latent cache rows must be contiguous within a block (stride(1) == row, stride(2) == 1)")
    if fp8 and (cache.stride(0) % 4 or cache.storage_offset() % 4):
        raise ValueError("FP8 latent cache blocks must start at 4-byte aligned offsets (fp32 scales)")
    return cache


def write_latent_cache(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fp8: bool,
    scale_fmt: str | None = None,
    backend: str | None = None,
) -> None:
    """Write token rows into the paged latent cache, in place.

    Args:
        kv_c: ``[T, 512]`` float16/bfloat16/float32 latent (normalized ``c^KV``).
        k_pe: ``[T, 64]`` float rope key.
        cache: ``[num_blocks, block_size, 576]`` float (``fp8=False``) or ``[num_blocks, block_size, 656]``
            uint8 (``fp8=True``); see the module docstring for the byte layout.
        slot_mapping: ``[T]`` int; slot = block * block_size + offset, ``-1`` = skip the token.
        fp8: write the FP8 layout (values quantized per 128 with fp32 scales, rope stored as bf16).
        scale_fmt: None or ``"ue8m0"`` (power-of-two scales), FP8 only.
        backend: None (Triton on CUDA; on CPU the C++ kernel of `dsa_cpu` for a float cache where it builds, else
            torch), ``"triton"`` or ``"torch"`` (the reference).
    """
    cache = _check_cache(cache, fp8)
    T = kv_c.shape[0]
    if kv_c.dim() != 2 or kv_c.shape[1] != 512 or k_pe.shape != (T, 64) or slot_mapping.shape != (T,):
        raise ValueError(
            f"expected kv_c [T, 512], k_pe [T, 64], slot_mapping [T]; got {list(kv_c.shape)}, "
            f"{list(k_pe.shape)}, {list(slot_mapping.shape)}"
        )
    check_dtype("kv_c", kv_c, _FLOATS)
    check_dtype("k_pe", k_pe, _FLOATS)
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    check_same_device(kv_c=kv_c, k_pe=k_pe, cache=cache, slot_mapping=slot_mapping)
    if T == 0:
        return
    if not use_triton(backend, cache):
        if backend != "torch" and not fp8 and dsa_cpu.available():
            dsa_cpu.write_latent(kv_c, k_pe, cache, slot_mapping)   # one call: no mask, cat and index_put
        else:
            ref_write_latent_cache(kv_c, k_pe, cache, slot_mapping, fp8, scale_fmt)
        return
    kv_c = kv_c if kv_c.stride(1) == 1 else kv_c.contiguous()
    k_pe = k_pe if k_pe.stride(1) == 1 else k_pe.contiguous()
    kpe_bits = fp8 and k_pe.dtype == torch.bfloat16
    kpe_arg = k_pe.view(torch.int16) if kpe_bits else k_pe
    if fp8:
        c8, c32, c16 = cache, cache.view(torch.float32), cache.view(torch.int16)
    else:
        c8 = c32 = c16 = cache
    _write_latent_kernel[(T,)](
        kv_c, kv_c.stride(0), kpe_arg, kpe_arg.stride(0), slot_mapping.long(),
        c8, c32, c16, cache.stride(0), cache.stride(1), cache.shape[1],
        FP8=fp8, KPE_BF16_BITS=kpe_bits, SCALE_UE8M0=scale_fmt == "ue8m0",
        num_warps=4,
    )


def read_latent_cache(cache: torch.Tensor, fp8: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a whole latent cache: ``[num_blocks, block_size, 576 | 656]`` -> ``[num_blocks, block_size, 576]``.

    For FP8 caches: latent = e4m3 value * its group scale, rope = the stored bf16 values.
    """
    cache = _check_cache(cache, fp8)
    return decode_latent_rows(cache).to(out_dtype)
