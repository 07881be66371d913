"""FP8 cache writers on all-zero and tiny groups: the scale is floored at 1e-4 / 448, so a zero group
stores code 0 with a finite scale (dequantizes to exact zeros, never 0/0 = NaN) and a group below the
floor is not blown up to full range. Both the Triton kernels and the torch references are checked
against the written-out rule, not against each other."""

import pytest
import torch

from kernel_testing import DEVICE
from vllm_frontier.kernels import read_latent_cache, write_indexer_k_cache, write_latent_cache

BS = 16
FLOOR = torch.tensor(1e-4, dtype=torch.float32) / 448  # the fp32 scale of a floored group


def floor_scale(scale_fmt):
    return FLOOR if scale_fmt is None else torch.exp2(torch.ceil(torch.log2(FLOOR)))  # ue8m0: 2**-22


def latent_rows():
    gen = torch.Generator().manual_seed(0)
    kv_c = torch.randn(3, 512, generator=gen)
    kv_c[0] = 0.0  # a whole token of zeros
    kv_c[1, 256:384] = 0.0  # one zero group
    kv_c[2, :128] = 1e-6 * torch.sign(torch.randn(128, generator=gen))  # below the floor
    return kv_c, torch.randn(3, 64, generator=gen)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_latent_writer_floors_zero_and_tiny_groups(backend, scale_fmt):
    kv_c, k_pe = latent_rows()
    cache = torch.full((1, BS, 656), 0xFF, dtype=torch.uint8, device=DEVICE)
    slots = torch.tensor([3, 7, 11], device=DEVICE)
    write_latent_cache(kv_c.to(DEVICE), k_pe.to(DEVICE), cache, slots, fp8=True, scale_fmt=scale_fmt,
                       backend=backend)
    rows = cache.view(-1, 656)[slots].cpu()
    scales = rows[:, 512:528].contiguous().view(torch.float32)
    fs = floor_scale(scale_fmt)
    assert torch.equal(scales[0], fs.expand(4)), scales[0]
    assert scales[1, 2] == fs and torch.all(scales[1, [0, 1, 3]] > fs)
    assert scales[2, 0] == fs
    assert torch.all(rows[0, :512] == 0) and torch.all(rows[1, 256:384] == 0)  # code 0 = +0.0
    deq = read_latent_cache(cache, fp8=True).view(-1, 576)[slots].cpu()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[0, :512] == 0) and torch.all(deq[1, 256:384] == 0)
    # 1e-6 / (1e-4 / 448) = 4.48: quantized near 4.5, dequantized close to 1e-6 (not 448 x scale)
    assert torch.allclose(deq[2, :128].abs(), torch.full((128,), 1e-6), rtol=2**-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_indexer_writer_floors_a_zero_and_a_tiny_token(backend, scale_fmt):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 128, generator=gen)
    k[0] = 0.0
    k[2] = 3e-5
    cache = torch.full((1, 64, 132), 0xFF, dtype=torch.uint8, device=DEVICE)
    slots = torch.tensor([5, 9, 60], device=DEVICE)
    write_indexer_k_cache(k.to(DEVICE), cache, slots, scale_fmt, backend=backend)
    blk = cache.view(-1).cpu()
    vals = torch.stack([blk[s * 128:(s + 1) * 128] for s in slots.tolist()])
    scales = torch.stack([blk[64 * 128 + s * 4: 64 * 128 + s * 4 + 4] for s in slots.tolist()]).view(torch.float32)[:, 0]
    fs = floor_scale(scale_fmt)
    assert scales[0] == fs and scales[2] == fs and scales[1] > fs
    assert torch.all(vals[0] == 0)
    deq = vals.view(torch.float8_e4m3fn).float() * scales[:, None]
    assert torch.isfinite(deq).all() and torch.all(deq[0] == 0)
    assert torch.allclose(deq[2], torch.full((128,), 3e-5), rtol=2**-3)
