import pytest
import torch

from kernel_testing import DEVICE
from vllm_frontier.kernels import read_latent_cache, write_latent_cache

NB, BS = 6, 16


def _inputs(T, dtype, gen):
    kv_c = (torch.randn(T, 512, generator=gen) * torch.logspace(-2, 1, 512)).to(dtype).to(DEVICE)
    k_pe = torch.randn(T, 64, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(NB * BS, generator=gen)[:T]
    slots[::4] = -1  # skipped tokens
    return kv_c, k_pe, slots.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_float_cache_write_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    kv_c, k_pe, slots = _inputs(13, dtype, gen)
    poison = torch.full((NB, BS, 576), float("nan"), dtype=dtype, device=DEVICE)
    a, b = poison.clone(), poison.clone()
    write_latent_cache(kv_c, k_pe, a, slots, fp8=False, backend="triton")
    write_latent_cache(kv_c, k_pe, b, slots, fp8=False, backend="torch")
    assert torch.equal(a.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       b.view(torch.int16 if dtype == torch.float16 else torch.int32))
    flat = a.view(-1, 576)
    keep = slots >= 0
    assert torch.equal(flat[slots[keep]], torch.cat([kv_c, k_pe], -1)[keep])
    untouched = torch.ones(NB * BS, dtype=torch.bool, device=DEVICE)
    untouched[slots[keep]] = False
    assert torch.isnan(flat[untouched]).all(), "rows not in slot_mapping must not be written"


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fp8_cache_write_bytes_match_reference(dtype, scale_fmt):
    gen = torch.Generator().manual_seed(1)
    kv_c, k_pe, slots = _inputs(13, dtype, gen)
    poison = torch.full((NB, BS, 656), 0xFF, dtype=torch.uint8, device=DEVICE)
    a, b = poison.clone(), poison.clone()
    write_latent_cache(kv_c, k_pe, a, slots, fp8=True, scale_fmt=scale_fmt, backend="triton")
    write_latent_cache(kv_c, k_pe, b, slots, fp8=True, scale_fmt=scale_fmt, backend="torch")
    assert torch.equal(a, b)


def test_fp8_layout_and_dequantization():
    gen = torch.Generator().manual_seed(2)
    kv_c, k_pe, slots = _inputs(9, torch.float32, gen)
    cache = torch.zeros(NB, BS, 656, dtype=torch.uint8, device=DEVICE)
    write_latent_cache(kv_c, k_pe, cache, slots, fp8=True, backend="triton")
    keep = slots >= 0
    rows = cache.view(-1, 656)[slots[keep]]
    scales = rows[:, 512:528].contiguous().view(torch.float32)
    amax = kv_c[keep].reshape(-1, 4, 128).abs().amax(-1)
    assert torch.allclose(scales, amax / 448, rtol=1e-6), "bytes 512..528 hold amax/448 per 128 values"
    assert torch.equal(rows[:, 528:].contiguous().view(torch.bfloat16), k_pe[keep].bfloat16()), "rope stored as bf16"
    deq = read_latent_cache(cache, fp8=True).view(-1, 576)[slots[keep]]
    # e4m3 relative rounding <= 2^-4 of |x/scale| (or half the 2^-9 subnormal step), times the group scale
    err = (deq[:, :512] - kv_c[keep]).abs()
    bound = ((kv_c[keep].abs() / 16) + scales.repeat_interleave(128, -1) * 2**-10) * (1 + 1e-5)
    assert torch.all(err <= bound)


def test_write_rejects_wrong_shapes():
    cache = torch.zeros(NB, BS, 576)
    with pytest.raises(ValueError, match="656"):
        write_latent_cache(torch.zeros(2, 512), torch.zeros(2, 64), cache, torch.zeros(2, dtype=torch.long), fp8=True)
    with pytest.raises(ValueError, match="kv_c"):
        write_latent_cache(torch.zeros(2, 500), torch.zeros(2, 64), cache, torch.zeros(2, dtype=torch.long), fp8=False)
