import pytest
import torch
import triton
import triton.language as tl

from kernel_testing import DEVICE
from vllm_frontier.kernels.fp8 import (
    bf16_bits_to_f32,
    dequantize_fp8_e4m3,
    f32_to_bf16_bits,
    f32_to_e4m3_bits,
    quantize_fp8_e4m3,
)


@triton.jit
def _codec_kernel(X, E4, B16, F32, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(X + o)
    tl.store(E4 + o, f32_to_e4m3_bits(x))
    b = f32_to_bf16_bits(x)
    tl.store(B16 + o, b)
    tl.store(F32 + o, bf16_bits_to_f32(b))


def _wide_values(n: int, gen) -> torch.Tensor:
    parts = [torch.randn(n, generator=gen) * s for s in (1e-4, 3e-3, 0.05, 1.0, 30.0, 300.0)]
    special = torch.tensor([0.0, -0.0, 448.0, -448.0, 449.0, 1e6, -1e6, 2**-6, 2**-9, 2**-10, 3 * 2**-10, -(2**-7)])
    return torch.cat(parts + [special])


def test_triton_codecs_match_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x = _wide_values(600, gen)
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEVICE)
    e4 = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b16 = torch.empty(n, dtype=torch.int16, device=DEVICE)
    f32 = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _codec_kernel[(1,)](x, e4, b16, f32, N=n)
    want_e4 = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(e4, want_e4)
    assert torch.equal(b16, x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(f32, x.to(torch.bfloat16).float())


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("group", [128, 64])
def test_quantize_roundtrip_error_within_half_step(scale_fmt, group):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 256, generator=gen) * torch.logspace(-3, 2, 256)
    v, s = quantize_fp8_e4m3(x, group, scale_fmt)
    assert v.dtype == torch.float8_e4m3fn and s.shape == (5, 3, 256 // group) and s.dtype == torch.float32
    amax = x.reshape(5, 3, -1, group).abs().amax(-1)
    assert torch.all(s * 448 >= amax.clamp_min(1e-4) * (1 - 1e-6)), "scale must cover amax (no saturation)"
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), "ue8m0 scales are powers of two"
    xh = dequantize_fp8_e4m3(v, s, group)
    # e4m3 has 3 mantissa bits: rounding error <= 2^-4 relative (normal) or half the 2^-9 subnormal step
    q = (x.reshape(5, 3, -1, group) / s[..., None]).reshape(x.shape)
    bound = (q.abs() / 16).clamp_min(2**-10) * s.repeat_interleave(group, -1) * (1 + 1e-6)
    assert torch.all((xh - x).abs() <= bound)


def test_quantize_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_fp8_e4m3(torch.zeros(2, 100), 128)
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_fp8_e4m3(torch.zeros(2, 128), 128, "e8m0")
