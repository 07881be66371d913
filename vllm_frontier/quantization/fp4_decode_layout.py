"""The FP4 weight layout of the decode GEMM (`w4a16_decode_gemm`): built once at load, inverted exactly.

Imports torch only. The layout, and why it is what it is, is described in `w4a16_decode_gemm`'s docstring:
int32 words of 8 E2M1 codes whose bits are placed so that four shift / mask expressions yield two fp16 values
each; block scales regrouped per K block ([..., Kp / kb, N, kb / G]); per-tensor output factors.
"""

from __future__ import annotations

import dataclasses

import torch

from .fp4_formats import GROUP_SIZE, FP4Tensor, pack_fp4

__all__ = ["FP4Decode", "permute_fp4", "unpermute_fp4"]

# Bit positions in a word, per k slot t = 0..7 of its 8 codes: (lowest magnitude bit, sign bit). The kernel's
# shift / mask expressions (`w4a16_decode_gemm` docstring) move them to fp16 bits 9..11 and 15 of the high (even
# slots) or low (odd slots) half; the slot order A, C, B, D is the order tl.join produces in `_e2m1x8_to_fp16`.
_SLOT_BITS = ((25, 31), (9, 15), (19, 30), (3, 14), (22, 28), (6, 12), (16, 29), (0, 13))
_FP16_MAX_EXP = 15  # the largest MXFP4 block scale maps to fp16 2^15
_FP16_EXACT_SPAN = 24  # 2^(15 - 24) * 0.5 * 2^-14 = 2^-24, fp16's smallest subnormal


# ------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass
class FP4Decode:
    """An FP4 weight [..., N, K] in the decode kernel's layout (see `w4a16_decode_gemm`'s docstring).

    Attributes:
        fmt: "nvfp4" or "mxfp4".
        words: int32 [..., N, Kp / 8].
        scales: uint8 [..., Kp / kb, N, kb / G].
        post: float32 [..., 2]: (2^(14 + R), global scale).
        exp_bias: int32 [...]: R + 127 for MXFP4 (0 for NVFP4): the kernel's scale is 2^(code - exp_bias).
        k: the true K (Kp = K rounded up to kb).
        kb: the layout's K block (power of two, 32..256, a multiple of the format's block size G).
        exact: every nonzero block decodes exactly in fp16 (always for NVFP4; MXFP4: see `w4a16_decode_gemm`).
    """

    fmt: str
    words: torch.Tensor
    scales: torch.Tensor
    post: torch.Tensor
    exp_bias: torch.Tensor
    k: int
    kb: int
    exact: bool = True

    layout = "decode"  # next to FP4Tensor's "pairs" / "chunk32" (a class attribute, not a field)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.words.shape[:-1], self.k)

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.fmt]

    def nbytes(self) -> int:
        """Bytes the kernel reads per call (codes + block scales, padding included; post / exp_bias excluded)."""
        return self.words.numel() * 4 + self.scales.numel()


def _layout_kb(k: int, group: int, kb: int | None) -> int:
    if kb is None:
        kb = min(256, max(32, group, 1 << max(0, k - 1).bit_length()))
    if kb & (kb - 1) or kb < 32 or kb > 512 or kb % group:
        raise ValueError(f"kb={kb} must be a power of two in 32..512 and a multiple of the block size {group}")
    return kb


def _pack_words(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [R, Kp] (uint8, Kp % 8 == 0) -> int32 words [R, Kp / 8] (bits per `_SLOT_BITS`), a few rows at a
    time: the int64 temporaries stay ~32 MB instead of 8 bytes per weight value (this runs at load, per layer)."""
    r, kp = codes.shape
    out = torch.empty((r, kp // 8), dtype=torch.int32, device=codes.device)
    step = max(1, (1 << 22) // max(kp, 1))
    for i in range(0, r, step):
        c = codes[i:i + step].reshape(-1, kp // 8, 8).to(torch.int64)
        word = torch.zeros(c.shape[:-1], dtype=torch.int64, device=c.device)
        for t, (mag, sign) in enumerate(_SLOT_BITS):
            word |= ((c[..., t] & 7) << mag) | (((c[..., t] >> 3) & 1) << sign)
        out[i:i + step] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return out


def permute_fp4(q: FP4Tensor, kb: int | None = None) -> FP4Decode:
    """Re-lay an FP4 weight [..., N, K] (any layout) for `w4a16_decode_gemm`. Done once, at load.

    Args:
        q: the weight; K a multiple of its block size (16 NVFP4 / 32 MXFP4), any N, leading dims kept.
        kb: the K block of the layout (default min(256, next power of two >= K)); the kernel's BLOCK_K.
    """
    group = q.group_size
    *lead, n, k = q.shape
    kb = _layout_kb(k, group, kb)
    kp = -(-k // kb) * kb
    codes = q.codes()  # [..., N, K] uint8
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k))
    words = _pack_words(codes.reshape(-1, kp)).reshape(*lead, n, kp // 8)
    s = q.scales
    if kp != k:
        s = torch.nn.functional.pad(s, (0, (kp - k) // group))  # zero scales: the padding decodes to 0
    scales = s.reshape(*lead, n, kp // kb, kb // group).movedim(-2, -3).contiguous()  # [..., Kp/kb, N, kb/G]
    g = q.global_scale.float().reshape(lead)
    if q.fmt == "nvfp4":
        r = torch.zeros(lead, dtype=torch.int32, device=g.device)
        exact = True
        bias = torch.zeros(lead, dtype=torch.int32, device=g.device)
    else:
        # blocks holding a nonzero code: their exponent must lie within the fp16 window below the largest
        live = (codes.reshape(*lead, n, kp // group, group) & 7).amax(-1) > 0  # [..., N, Kp/G]
        b = s.to(torch.int32).reshape(*lead, -1)
        live = live.reshape(*lead, -1)
        if b.shape[-1] == 0:  # N = 0
            b, live = torch.zeros((*lead, 1), dtype=torch.int32, device=b.device), torch.zeros(
                (*lead, 1), dtype=torch.bool, device=b.device)
        bmax = torch.where(live, b, torch.zeros_like(b)).amax(-1)
        bmin = torch.where(live, b, torch.full_like(b, 255)).amin(-1)
        r = bmax - 127 - _FP16_MAX_EXP
        exact = bool((bmin >= bmax - _FP16_EXACT_SPAN).all())
        bias = r + 127
    post = torch.stack([torch.ldexp(torch.ones_like(g), (14 + r).float()), g], dim=-1).to(torch.float32)
    return FP4Decode(q.fmt, words, scales, post.contiguous(), bias.to(torch.int32).contiguous(), k, kb, exact)


def _words_to_codes(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., W] -> E2M1 codes [..., 8W] (uint8), k order; the inverse of the packing above."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    slots = [((w >> mag) & 7) | (((w >> sign) & 1) << 3) for mag, sign in _SLOT_BITS]
    return torch.stack(slots, dim=-1).flatten(-2).to(torch.uint8)


def unpermute_fp4(d: FP4Decode) -> FP4Tensor:
    """The canonical ("pairs") FP4Tensor of a permuted weight: `unpermute_fp4(permute_fp4(q))` equals q."""
    *lead, n, _ = d.words.shape
    group = d.group_size
    codes = _words_to_codes(d.words)[..., : d.k]
    scales = d.scales.movedim(-3, -2).reshape(*lead, n, -1)[..., : d.k // group].contiguous()
    return FP4Tensor(d.fmt, pack_fp4(codes), scales, d.post[..., 1].contiguous())
