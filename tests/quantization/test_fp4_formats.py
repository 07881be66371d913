"""FP4 formats against hand-computed vectors from the specs (E2M1, NVFP4, OCP MX v1.0 MXFP4) and error bounds."""

import math

import pytest
import torch

from vllm_frontier.quantization.fp4_formats import (
    FP4Tensor,
    bits_per_value,
    dequantize,
    e2m1_to_float,
    e4m3_bits_to_float,
    e8m0_bits_to_float,
    pack_fp4,
    quantize,
    quantize_e2m1,
    quantize_mxfp4,
    quantize_nvfp4,
    unpack_fp4,
)


def codes(vals):
    return quantize_e2m1(torch.tensor(vals, dtype=torch.float32)).tolist()


# ------------------------------------------------------------------------------------------------ E2M1
def test_e2m1_all_codes_decode_to_spec_values():
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    got = e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    assert got.tolist() == expected
    assert torch.signbit(got[8])  # code 0b1000 is negative zero
    # every representable value quantizes to its own code
    assert codes(expected) == list(range(16))


@pytest.mark.parametrize("value,code", [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # ties go to the even code
    (0.2500001, 1), (0.7499999, 1), (1.2500001, 3), (2.5000002, 5), (4.9999995, 6), (5.0000005, 7),
], ids=lambda v: str(v))
def test_e2m1_round_to_nearest_even(value, code):
    assert codes([value]) == [code]
    assert codes([-value]) == [code | 8]


def test_e2m1_saturates_and_keeps_negative_zero():
    assert codes([6.0, 6.5, 7.99, 100.0, 3e38]) == [7] * 5
    assert codes([-6.5, -1e30]) == [15, 15]
    assert codes([-0.0, -0.1, -0.25, 0.0, 0.1]) == [8, 8, 8, 0, 0]


def test_pack_two_values_per_byte_low_nibble_first():
    packed = pack_fp4(torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x8F]]
    assert unpack_fp4(packed).tolist() == [[0x1, 0x2, 0xF, 0x8]]
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_scale_decoders():
    # E4M3: 0x7E = 448 (max), 0x38 = 1.0, 0x39 = 1.125, subnormals k * 2^-9
    assert e4m3_bits_to_float(torch.tensor([0x7E, 0x38, 0x39, 0x01, 0x07, 0x08], dtype=torch.uint8)).tolist() == [
        448.0, 1.0, 1.125, 2.0**-9, 7 * 2.0**-9, 2.0**-6]
    # E8M0: 2^(code - 127); 0 -> 2^-127, 254 -> 2^127, 255 -> NaN
    got = e8m0_bits_to_float(torch.tensor([0, 127, 128, 254, 255], dtype=torch.uint8))
    assert got[:4].tolist() == [2.0**-127, 1.0, 2.0, 2.0**127]
    assert math.isnan(got[4].item())


# ----------------------------------------------------------------------------------------------- NVFP4
def _row(*blocks, group):
    out = torch.zeros(len(blocks) * group)
    for i, vals in enumerate(blocks):
        out[i * group: i * group + len(vals)] = torch.tensor(vals)
    return out[None, :]


def test_nvfp4_hand_vector():
    # tensor amax 2688 = 6 * 448 -> global decode scale exactly 1.0
    w = _row([2688.0, -448.0], [6.6, 1.125, -2.8125, 0.5], [6 * 2.0**-8, 1.5 * 2.0**-8, -2.0**-8], group=16)
    q = quantize_nvfp4(w)
    assert q.global_scale.item() == 1.0
    # block 0: 2688 / 6 = 448 -> 0x7E; block 1: 6.6 / 6 = 1.1 -> nearest E4M3 1.125 (0x39);
    # block 2: 2^-8 is an E4M3 subnormal (2 * 2^-9) -> 0x02
    assert q.scales.tolist() == [[0x7E, 0x39, 0x02]]
    c = unpack_fp4(q.packed)[0]
    assert c[:2].tolist() == [7, 0x8 | 2]  # 6, -1 (x 448)
    # 6.6/1.125 = 5.87 -> 6; 1.125/1.125 = 1 -> code 2; -2.8125/1.125 = -2.5 tie -> -2 (code 0xC); 0.5/1.125 =
    # 0.444 -> 0.5 (code 1)
    assert c[16:20].tolist() == [7, 2, 0xC, 1]
    assert c[32:35].tolist() == [7, 3, 0x8 | 2]  # 6, 1.5, -1 (x 2^-8)
    d = dequantize(q)[0]
    assert d[:2].tolist() == [2688.0, -448.0]
    assert d[16:20].tolist() == [6.75, 1.125, -2.25, 0.5625]
    assert d[32:35].tolist() == [6 * 2.0**-8, 1.5 * 2.0**-8, -2.0**-8]
    assert (d[2:16] == 0).all() and (d[20:32] == 0).all()


def test_nvfp4_block_scale_underflow_decodes_to_zero():
    # block amax 6 * 2^-11 -> scale 2^-11, below half the smallest E4M3 subnormal (2^-10 tie -> 0)
    w = _row([2688.0], [6 * 2.0**-11, -3 * 2.0**-11], group=16)
    q = quantize_nvfp4(w)
    assert q.scales.tolist() == [[0x7E, 0x00]]
    d = dequantize(q)[0, 16:]
    assert (d == 0).all()
    assert torch.signbit(d[1])  # the negative value keeps its sign as -0


def test_nvfp4_global_scale_per_expert_and_all_zero():
    w = torch.zeros(2, 4, 16)
    w[1, 0, 0] = -5376.0  # amax 5376 -> global 2.0
    q = quantize_nvfp4(w)
    assert q.global_scale.tolist() == [1.0, 2.0]  # all-zero expert: scale 1, codes 0
    assert (q.packed[0] == 0).all()
    assert dequantize(q)[1, 0, 0].item() == -5376.0


# ----------------------------------------------------------------------------------------------- MXFP4
def test_mxfp4_hand_vector():
    w = _row([6.0, 5.0, -0.25, 1.0],  # amax 6: floor(log2 6) = 2 -> shared exp 0 (code 127)
             [7.0, 3.5],  # amax 7: same exponent, 7 saturates to 6
             [8.0, 1.0, -3.0],  # amax 8: floor(log2 8) = 3 -> exp 1 (code 128)
             [0.75, 0.1],  # amax 0.75: floor(log2) = -1 -> exp -3 (code 124)
             [2.0**-130],  # fp32 subnormal: exp -132 clamps to -127 (code 0)
             [],  # all zero -> code 0
             group=32)
    q = quantize_mxfp4(w)
    assert q.scales.tolist() == [[127, 127, 128, 124, 0, 0]]
    assert q.global_scale.item() == 1.0
    c = unpack_fp4(q.packed)[0]
    assert c[0:4].tolist() == [7, 6, 8, 2]  # 6, 5 tie -> 4, -0.25 tie -> -0, 1
    assert c[32:34].tolist() == [7, 6]  # 7 -> 6 (saturated), 3.5 tie -> 4
    assert c[64:67].tolist() == [6, 1, 0x8 | 3]  # 8/2 = 4, 1/2 = 0.5, -3/2 = -1.5
    assert c[96:98].tolist() == [7, 2]  # 0.75*8 = 6, 0.1*8 = 0.8 -> 1
    assert c[128].item() == 0  # 2^-130 / 2^-127 = 0.125 -> 0
    d = dequantize(q)[0]
    assert d[[0, 1, 2, 32, 33, 64, 65, 66, 96, 97]].tolist() == [6, 4, -0.0, 6, 4, 8, 1, -3, 0.75, 0.125]
    assert torch.signbit(d[2])


def test_mxfp4_requantize_is_identity():
    w = torch.randn(8, 128) * torch.logspace(-3, 3, 8)[:, None]
    q = quantize_mxfp4(w)
    q2 = quantize_mxfp4(dequantize(q))
    assert torch.equal(q.packed, q2.packed) and torch.equal(q.scales, q2.scales)


# ------------------------------------------------------------------------------------------ error bounds
def _half_gap(a):
    """Largest rounding error of E2M1 for |v| = a (in units of the scale) inside the representable range."""
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dist", ["normal", "heavy_tail", "rows_of_mixed_scale"])
def test_quantize_dequantize_error_bound(fmt, dist):
    g = torch.Generator().manual_seed(1)
    if dist == "normal":
        w = torch.randn(64, 256, generator=g)
    elif dist == "heavy_tail":
        w = torch.randn(64, 256, generator=g) ** 3
    else:
        w = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 64)[:, None]
    q = quantize(w, fmt)
    grp = q.group_size
    s = q.block_scale_float().repeat_interleave(grp, dim=-1)  # [N, K] effective scale of each element
    a = w.abs() / s
    err = (dequantize(q) - w).abs()
    if fmt == "mxfp4":
        # spec's exponent choice puts the block amax at [4, 8) scale units: saturation error < 2 scale units
        blk_a = a.reshape(64, -1, grp).amax(-1)
        assert (blk_a >= 4).all() and (blk_a < 8).all()
    else:
        # E4M3 rounding of the block scale moves the block amax off 6 by at most a factor (1 +- 2^-4)
        # (these blocks' scales are normal E4M3 numbers: checked)
        assert (q.scales.view(torch.float8_e4m3fn).float() >= 2.0**-6).all()
        assert (a <= 6 / (1 - 2.0**-4) + 1e-5).all()
    bound = s * (_half_gap(a.clamp(max=6)) + (a - 6).clamp(min=0))
    # the division by the scale and the product in dequantize are fp32: allow 2 ulp of the value
    slack = 2 * torch.finfo(torch.float32).eps * w.abs()
    assert (err <= bound + slack).all(), (err - bound).max()
    # and the relative RMS error of FP4 on these data is what the format's 3-bit resolution allows
    rel = (err.norm() / w.norm()).item()
    assert rel < 0.2


def test_bits_per_value_and_nbytes():
    assert bits_per_value("nvfp4") == 4.5 and bits_per_value("mxfp4") == 4.25
    w = torch.randn(128, 512)
    for fmt in ("nvfp4", "mxfp4"):
        q = quantize(w, fmt)
        assert q.nbytes() == 128 * 512 * bits_per_value(fmt) / 8 + 4
        assert w.numel() * 2 / q.nbytes() >= 3.5  # vs bf16


@pytest.mark.parametrize("bad,match", [
    (torch.randn(4, 24), "multiple of the block size"),
    (torch.tensor([[float("nan")] * 32]), "NaN or inf"),
    (torch.randn(32), r"\[..., N, K\]"),
])
def test_invalid_input_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize(bad, "mxfp4" if bad.shape[-1] != 24 else "nvfp4")
    with pytest.raises(ValueError, match="unknown FP4 format"):
        quantize(torch.randn(4, 32), "fp4")


def test_fp4tensor_shape():
    q = quantize(torch.randn(3, 5, 64), "nvfp4")
    assert isinstance(q, FP4Tensor) and q.shape == (3, 5, 64) and q.scales.shape == (3, 5, 4)


# ------------------------------------------------------------------------------- edge cases, block scales
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("amax", [1e-38, 1e-41, 4e-42, 1e-44, 2.0**-149], ids=lambda v: f"{v:g}")
def test_tiny_tensor_quantizes_to_finite_values(fmt, amax):
    """Largest magnitude ~1e-41 and below: NVFP4's amax / 2688 underflows; never NaN, never inf."""
    w = torch.zeros(3, 64)
    w[0, :5] = torch.tensor([amax, -amax, amax / 2, 0.0, -0.0])
    w[2, 40] = amax
    q = quantize(w, fmt)
    assert torch.isfinite(q.global_scale).all() and (q.global_scale > 0).all()
    s = e4m3_bits_to_float(q.scales) if fmt == "nvfp4" else e8m0_bits_to_float(q.scales)
    assert torch.isfinite(s).all()
    d = dequantize(q)
    assert torch.isfinite(d).all()
    assert (d.abs() <= 2 * amax).all()  # nothing blows up either
    if fmt == "nvfp4" and amax >= 1e-44:  # the largest element decodes to about itself (at 2^-149 itself,
        # block scale * global scale underflows and the block is zero: finite, which is what is asked)
        assert d[0, 0].item() > 0 and abs(d[0, 0].item() - amax) <= 0.5 * amax


def _block_amax(w, group):
    return [[max(abs(float(v)) for v in row[i:i + group]) for i in range(0, len(row), group)] for row in w.tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_block_scales_from_first_principles(seed):
    """Each block's decoded scale must be its own amax / 6 up to E4M3 rounding (2^-4 relative), the global
    scale the tensor's amax / (6 * 448): bounds from the input alone, so a wrong block's scale (neighbour's,
    off by one block, unrounded, per-row instead of per-block) fails."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 96, generator=g) * torch.logspace(-3, 1, 6).repeat_interleave(16)  # blocks differ 1e4x
    q = quantize_nvfp4(w)
    gs = float(w.abs().max()) / (6 * 448)
    assert abs(q.global_scale.item() - gs) <= 1e-6 * gs
    dec = dequantize(q)
    for r, row in enumerate(_block_amax(w, 16)):
        for b, amax in enumerate(row):
            scale = e4m3_bits_to_float(q.scales[r, b]).item() * gs
            assert abs(6 * scale - amax) <= amax / 16 + 1e-12, (r, b)
            # the block's largest element decodes to code 6 (|w| / scale >= 6 / (1 + 1/16) > 5)
            got = dec[r, 16 * b:16 * (b + 1)].abs().max().item()
            assert abs(got - amax) <= amax / 16 + 1e-12, (r, b)
            # every element within half a code step (at most 1 scale unit, between 4 and 6) of its value
            err = (dec[r, 16 * b:16 * (b + 1)] - w[r, 16 * b:16 * (b + 1)]).abs().max().item()
            assert err <= (amax / 6) * (1 + 1 / 16) * (1 + 1e-6), (r, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_mxfp4_block_scales_from_first_principles(seed):
    """E8M0 code = floor(log2(block amax)) - 2 + 127, computed here with math.frexp per block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 128, generator=g) * torch.logspace(-4, 2, 4).repeat_interleave(32)
    q = quantize_mxfp4(w)
    for r, row in enumerate(_block_amax(w, 32)):
        for b, amax in enumerate(row):
            _, e = math.frexp(amax)
            assert q.scales[r, b].item() == (e - 1) - 2 + 127, (r, b)
            err = (dequantize(q)[r, 32 * b:32 * (b + 1)] - w[r, 32 * b:32 * (b + 1)]).abs().max().item()
            assert err <= 2.0 ** (e - 1 - 2) * 2 * (1 + 1e-6), (r, b)  # half the widest step (2 units), or saturation at 6 of [6, 8)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantize_chunked_is_bit_identical(fmt):
    from vllm_frontier.quantization.fp4_formats import quantize_chunked

    g = torch.Generator().manual_seed(4)
    w = torch.randn(70, 64, generator=g)
    w[33, 5] = 40.0  # the tensor's amax in a later chunk: the global scale must still be the tensor's
    for x in (w, torch.stack([w, w * 3])):
        a, b = quantize(x, fmt), quantize_chunked(x, fmt, rows=16)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
        assert torch.equal(a.global_scale, b.global_scale)
