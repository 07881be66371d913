"""FP4 weight formats, exact to their specs: NVFP4 and MXFP4 (OCP Microscaling v1.0). Imports torch only.

Element type, shared by both formats: FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 1, no inf/NaN).
Code `c` (4 bits) is `sign << 3 | exp << 1 | man`; magnitudes by `c & 7`: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Quantization rounds to nearest, ties to even (even mantissa bit), saturates magnitudes above 6 to 6, and keeps
the sign of negative values that round to zero (negative zero is code 0b1000).

Packing: two codes per byte along the last (K) axis; element `2i` in the low nibble, `2i + 1` in the high one.
A second layout, "chunk32" (the CPU kernel's, see `to_chunk32`), keeps the bytes per row but orders the codes by
chunks of 32 values: byte j of chunk c holds values 32c + j (low) and 32c + 16 + j (high).

- **NVFP4**: one FP8 E4M3 scale per 16 consecutive values along K and one fp32 scale per tensor.
  Decoded value = e2m1 * e4m3_scale * global_scale. The global (decode) scale is amax(|W|) / (6 * 448), so the
  largest block scale lands at E4M3's maximum 448; each block scale is amax(|block|) / 6 / global_scale rounded
  to nearest-even E4M3 (subnormals included: block scales below 2^-6 are E4M3 subnormals k * 2^-9; below 2^-10
  they round to 0 and the block decodes to zeros). Storage: 4 + 8/16 = 4.5 bits per value.
- **MXFP4**: one E8M0 scale (a power of two, 2^(code - 127); code 255 is NaN and never produced) per 32
  consecutive values along K. Per the spec the shared exponent is floor(log2(amax(|block|))) - 2 (2 = the
  largest E2M1 exponent), clamped to [-127, 127]; an all-zero block gets code 0. Elements are quantized with
  saturation (|v| / scale lies in [4, 8), so values in (6, 8) saturate to 6). Storage: 4 + 8/32 = 4.25 bits.

Scales are stored as raw bytes (uint8): E4M3 bit patterns for NVFP4, E8M0 codes for MXFP4, so that the
Triton kernel and every torch version read them the same way.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "FORMATS",
    "GROUP_SIZE",
    "E2M1_VALUES",
    "E4M3_MAX",
    "FP4Tensor",
    "quantize_e2m1",
    "e2m1_to_float",
    "pack_fp4",
    "unpack_fp4",
    "to_chunk32",
    "from_chunk32",
    "LAYOUTS",
    "e4m3_bits_to_float",
    "e8m0_bits_to_float",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "quantize",
    "quantize_chunked",
    "nvfp4_global_scale",
    "dequantize",
    "ref_w4a16_matmul",
    "bits_per_value",
]

FORMATS = ("nvfp4", "mxfp4")
GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Magnitudes of codes 0..7; codes 8..15 are their negatives (code 8 is -0.0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding boundaries between consecutive magnitudes, and whether a value exactly on the boundary goes up
# (ties to the code with an even mantissa bit: the even code).
_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)  # lower code 0,2,4,6 even: stay; 1,3,5 odd: go up
_E8M0_BIAS = 127
_MX_EMAX_ELEM = 2  # exponent of E2M1's largest normal, 6 = 1.5 * 2^2


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf; FP4 formats have neither: fix the checkpoint's weights "
                         "or leave this layer unquantized")


def quantize_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (round to nearest even, saturate at +-6, keep -0).

    Args:
        v: float tensor, any shape, finite.
    Returns:
        uint8 tensor of the same shape holding codes 0..15 (sign in bit 3).
    """
    a = v.float().abs()
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for b, up in zip(_BOUNDARIES, _TIE_UP):
        code += (a >= b if up else a > b).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes (uint8 0..15, any shape) to float32."""
    lut = torch.tensor(E2M1_VALUES + tuple(-x for x in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] (uint8 0..15, K even) into bytes [..., K/2]: element 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: bytes [..., K/2] uint8 -> codes [..., K] uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


LAYOUTS = ("pairs", "chunk32")


def to_chunk32(packed: torch.Tensor) -> torch.Tensor:
    """Canonical packed codes [..., K/2] -> the chunk32 layout [..., K/2] (see module docstring); K % 32 == 0."""
    k = packed.shape[-1] * 2
    if k % 32:
        raise ValueError(f"the chunk32 layout needs K % 32 == 0, got K = {k}")
    codes = unpack_fp4(packed).reshape(*packed.shape[:-1], k // 32, 2, 16)
    return (codes[..., 0, :] | (codes[..., 1, :] << 4)).reshape(packed.shape).contiguous()


def from_chunk32(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_chunk32`: chunk32 bytes [..., K/2] -> canonical packed codes [..., K/2]."""
    k = packed.shape[-1] * 2
    c = packed.reshape(*packed.shape[:-1], k // 32, 16)
    return pack_fp4(torch.stack((c & 0xF, c >> 4), dim=-2).reshape(*packed.shape[:-1], k))


def e4m3_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Decode FP8 E4M3 (fn: no inf, 0x7F/0xFF NaN) bit patterns stored as uint8 to float32."""
    return bits.view(torch.float8_e4m3fn).float()


def e8m0_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 codes (uint8; value 2^(code-127), 255 = NaN) to float32 (2^-127 is an fp32 subnormal)."""
    out = torch.ldexp(torch.ones(bits.shape, dtype=torch.float32, device=bits.device),
                      bits.to(torch.int32) - _E8M0_BIAS)
    return torch.where(bits == 255, torch.full_like(out, float("nan")), out)


@dataclasses.dataclass
class FP4Tensor:
    """A weight [..., N, K] in FP4 (K along which the blocks run; leading dims e.g. experts).

    Attributes:
        fmt: "nvfp4" or "mxfp4".
        packed: uint8 [..., N, K/2], two E2M1 codes per byte (see module docstring).
        scales: uint8 [..., N, K/G] block scales, G = 16 (E4M3 bits) or 32 (E8M0 codes).
        global_scale: float32 [...] per-tensor decode scale (NVFP4); all ones for MXFP4.
        layout: "pairs" (canonical, see module docstring) or "chunk32" (the CPU kernel's).
    """

    fmt: str
    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    layout: str = "pairs"

    def codes(self) -> torch.Tensor:
        """E2M1 codes [..., N, K] (uint8) in value order, whatever the layout."""
        return unpack_fp4(from_chunk32(self.packed) if self.layout == "chunk32" else self.packed)

    def with_layout(self, layout: str) -> "FP4Tensor":
        """The same weight in `layout` (a copy of the codes when it changes; scales shared)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown FP4 layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if layout == self.layout:
            return self
        packed = to_chunk32(self.packed) if layout == "chunk32" else from_chunk32(self.packed)
        return FP4Tensor(self.fmt, packed, self.scales, self.global_scale, layout)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.fmt]

    def nbytes(self) -> int:
        """Bytes held: packed codes + block scales + global scales."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.global_scale))

    def block_scale_float(self) -> torch.Tensor:
        """Decoded block scales times the global scale, float32 [..., N, K/G]."""
        s = e4m3_bits_to_float(self.scales) if self.fmt == "nvfp4" else e8m0_bits_to_float(self.scales)
        return s * self.global_scale.float()[..., None, None]


def bits_per_value(fmt: str) -> float:
    """Storage cost of a format in bits per weight value (codes + block scales; the global scale excluded)."""
    _check_fmt(fmt)
    return 4 + 8 / GROUP_SIZE[fmt]


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown FP4 format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_shape(w: torch.Tensor, group: int) -> None:
    if w.dim() < 2:
        raise ValueError(f"expected a weight [..., N, K], got shape {tuple(w.shape)}")
    if w.shape[-1] % group:
        raise ValueError(f"K = {w.shape[-1]} is not a multiple of the block size {group}; leave this weight "
                         "unquantized or pad K")


def _blocks(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-tensor decode scale for a tensor whose largest magnitude is `amax` (float32, any shape).

    amax / (6 * 448), except: 1 for an all-zero tensor, and at least 2^-149 (the smallest fp32 subnormal) so
    that a tiny but nonzero tensor (amax below ~4e-42, where the quotient underflows to 0) still gets a
    positive scale: its block scales then saturate at 448 instead of dividing by zero into NaN.
    """
    amax = amax.float()
    g = (amax / (E2M1_MAX * E4M3_MAX)).clamp(min=2.0**-149)
    return torch.where(amax > 0, g, torch.ones_like(g)).to(torch.float32)


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> FP4Tensor:
    """Quantize w [..., N, K] (K % 16 == 0, finite) to NVFP4, one global scale per leading index.

    The global scale is taken over each [N, K] matrix: for a 3-D [E, N, K] expert stack there is one per expert.
    `global_scale` ([...] float32) overrides it, so that row chunks of one matrix can be quantized separately
    with the matrix's scale (`quantize_chunked`).
    """
    _check_shape(w, 16)
    _check_finite(w, "weight")
    wb = _blocks(w, 16)  # [..., N, K/16, 16]
    if global_scale is None:
        g = nvfp4_global_scale(w.float().abs().amax(dim=(-1, -2)))  # [...]
    else:
        g = global_scale.to(torch.float32)
    block_amax = wb.abs().amax(dim=-1)  # [..., N, K/16]
    # float64: with a subnormal g the quotient must not overflow to inf before the clamp (nor 0/0 -> NaN)
    s = (block_amax.double() / E2M1_MAX / g.double()[..., None, None]).clamp(max=E4M3_MAX).float()
    s_fp8 = s.to(torch.float8_e4m3fn)  # round to nearest even, subnormals included
    s_dec = s_fp8.float() * g[..., None, None]
    safe = torch.where(s_dec > 0, s_dec, torch.ones_like(s_dec))
    v = torch.where((s_dec > 0)[..., None], wb / safe[..., None], wb * 0.0)  # keeps the sign of zeros
    codes = quantize_e2m1(v).flatten(-2)
    return FP4Tensor("nvfp4", pack_fp4(codes), s_fp8.view(torch.uint8), g)


def quantize_mxfp4(w: torch.Tensor) -> FP4Tensor:
    """Quantize w [..., N, K] (K % 32 == 0, finite) to MXFP4 (OCP MX v1.0, E2M1 elements, E8M0 scales)."""
    _check_shape(w, 32)
    _check_finite(w, "weight")
    wb = _blocks(w, 32)  # [..., N, K/32, 32]
    block_amax = wb.abs().amax(dim=-1)
    _, e = torch.frexp(block_amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1 (exact)
    shared = (e.to(torch.int32) - 1 - _MX_EMAX_ELEM).clamp(-_E8M0_BIAS, _E8M0_BIAS)
    shared = torch.where(block_amax > 0, shared, torch.full_like(shared, -_E8M0_BIAS))
    v = torch.ldexp(wb, (-shared)[..., None].to(torch.float32))  # exact division by a power of two
    codes = quantize_e2m1(v).flatten(-2)
    scales = (shared + _E8M0_BIAS).to(torch.uint8)
    g = torch.ones(w.shape[:-2], dtype=torch.float32, device=w.device)
    return FP4Tensor("mxfp4", pack_fp4(codes), scales, g)


def quantize(w: torch.Tensor, fmt: str) -> FP4Tensor:
    """Quantize w [..., N, K] to `fmt` ("nvfp4" | "mxfp4")."""
    _check_fmt(fmt)
    return quantize_nvfp4(w) if fmt == "nvfp4" else quantize_mxfp4(w)


def quantize_chunked(w: torch.Tensor, fmt: str, rows: int = 1024) -> FP4Tensor:
    """`quantize(w, fmt)`, bit for bit, in pieces of `rows` rows (one expert at a time for [E, N, K]), so the
    float32 temporaries stay a few MB instead of several times the weight: quantization at load time."""
    _check_fmt(fmt)
    if w.dim() == 3:
        parts = [quantize_chunked(w[e], fmt, rows) for e in range(w.shape[0])]
        return FP4Tensor(fmt, torch.stack([p.packed for p in parts]), torch.stack([p.scales for p in parts]),
                         torch.stack([p.global_scale for p in parts]))
    if w.dim() != 2 or w.shape[0] <= rows:
        return quantize(w, fmt)
    g = nvfp4_global_scale(w.abs().amax().float()) if fmt == "nvfp4" else None
    parts = [quantize_nvfp4(w[i:i + rows], g) if g is not None else quantize_mxfp4(w[i:i + rows])
             for i in range(0, w.shape[0], rows)]
    gs = g if g is not None else parts[0].global_scale
    return FP4Tensor(fmt, torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]), gs)


def dequantize(q: FP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode q to a dense [..., N, K] tensor of `dtype` (computed in fp32, then cast)."""
    vals = e2m1_to_float(q.codes())  # [..., N, K]
    vb = vals.reshape(*vals.shape[:-1], vals.shape[-1] // q.group_size, q.group_size)
    s = e4m3_bits_to_float(q.scales) if q.fmt == "nvfp4" else e8m0_bits_to_float(q.scales)
    # (code * block scale) is exact in fp32 (at most 5 significant bits); the global scale rounds once, last,
    # as the kernels apply it to their accumulators
    out = ((vb * s[..., None]) * q.global_scale.float()[..., None, None, None]).flatten(-2)
    return out.to(dtype)


def ref_w4a16_matmul(x: torch.Tensor, q: FP4Tensor) -> torch.Tensor:
    """Reference y = x @ dequantize(q).T in fp32, cast to x.dtype. x: [M, K], q: [N, K] -> y: [M, N]."""
    if q.packed.dim() != 2:
        raise ValueError("ref_w4a16_matmul takes a 2-D FP4 weight [N, K]")
    return (x.float() @ dequantize(q).T).to(x.dtype)
