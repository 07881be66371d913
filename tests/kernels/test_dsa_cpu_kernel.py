"""The C++ DSA kernel for CPU (kernels/dsa_cpu.py) against the torch references: the indexer K-cache write
(byte for byte), the indexer top-k (exact on inputs whose scores are exact in fp32, ties included) and the
sparse MLA attention."""

import pytest
import torch

from kernel_testing import assert_close, poisoned_block_table, written_latent_cache
from vllm_frontier.kernels import dsa_cpu
from vllm_frontier.kernels.ref import (
    ref_indexer_paged_logits,
    ref_indexer_write_k_cache,
    ref_mla_sparse_decode,
    ref_topk_indices,
)
from vllm_frontier.kernels.flash_mla_interface import request_positions_to_slots

pytestmark = pytest.mark.skipif(not dsa_cpu.available(), reason=f"CPU DSA kernel: {dsa_cpu.status()[1]}")

D, BS = 128, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_write_k_is_byte_identical_to_the_reference(dtype, scale_fmt):
    gen = torch.Generator().manual_seed(3)
    T, nb = 37, 3
    k = (torch.randn(T, D, generator=gen) * torch.logspace(-6, 3, T)[:, None]).to(dtype)
    k[4] = 0.0                        # amax floor
    k[5, :3] = torch.tensor([448.0, -1e-3, 3e-3])   # saturation and subnormal codes after scaling
    slots = torch.randperm(nb * BS, generator=gen)[:T]
    slots[7] = -1                     # skipped
    want = torch.full((nb, BS, D + 4), 0xAB, dtype=torch.uint8)
    got = want.clone()
    ref_indexer_write_k_cache(k, want, slots, scale_fmt)
    dsa_cpu.write_k(k, got, slots, scale_fmt)
    assert torch.equal(got, want)


def _exact_problem(L, T, H, gen):
    """Keys and queries from a few small e4m3 values with power-of-two scales and weights: every product and
    sum is exact in fp32 (any summation order), and many scores tie."""
    n_blk = -(-L // BS)
    nb = n_blk + 3
    bt = poisoned_block_table(2, n_blk + 1, [0, L], BS, nb, gen)   # row 0 unused: request 1 is read
    cache = torch.full((nb, BS, D + 4), 0xFF, dtype=torch.uint8)   # NaN codes where nothing is written
    vals = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5])
    keys = vals[torch.randint(0, 6, (L, D), generator=gen)]
    keys[:, 0] = 2.0                  # amax 2 -> one power-of-two scale for every key under ue8m0
    pos = torch.arange(L)
    ref_indexer_write_k_cache(keys, cache, bt[1, pos // BS].long() * BS + pos % BS, "ue8m0")
    q = vals[torch.randint(0, 6, (T, H, D), generator=gen)].to(torch.float8_e4m3fn)
    w = torch.tensor([0.5, 1.0, 0.25, 2.0] * (H // 4))[None, :].expand(T, H).contiguous()
    return cache, bt, q, w


@pytest.mark.parametrize("L,T,k,H", [(300, 1, 16, 4), (700, 5, 64, 8), (40, 3, 64, 4), (2000, 2, 64, 4)])
def test_indexer_topk_is_exact_with_ties(L, T, k, H):
    gen = torch.Generator().manual_seed(L + T)
    cache, bt, q, w = _exact_problem(L, T, H, gen)
    req = torch.ones(T, dtype=torch.int64)
    vis = torch.tensor([L - T + 1 + i for i in range(T)], dtype=torch.int32)
    vis[0] = min(int(vis[0]), max(1, k - 3))   # one token that sees fewer keys than k
    logits = ref_indexer_paged_logits(q.unsqueeze(1), w.unsqueeze(1), cache, bt[req], vis, L, causal=False)[:, 0]
    want = ref_topk_indices(logits, k, lengths=vis)
    got = dsa_cpu.indexer_topk(q, w, cache, bt, req, vis, k)
    assert torch.equal(got, want)
    finite = torch.isfinite(logits).sum(1)
    assert (finite >= vis.long()).all()       # nothing visible read a NaN (the poisoned blocks are not touched)


def test_indexer_topk_breaks_ties_by_position_and_reads_float_queries():
    gen = torch.Generator().manual_seed(5)
    L, k, H = 150, 10, 4
    cache, bt, q, w = _exact_problem(L, 1, H, gen)
    q = q.float()
    pos = torch.arange(L)
    ref_indexer_write_k_cache(torch.ones(L, D), cache, bt[1, pos // BS].long() * BS + pos % BS, "ue8m0")
    got = dsa_cpu.indexer_topk(q, w, cache, bt, torch.ones(1, dtype=torch.int64),
                               torch.tensor([L], dtype=torch.int32), k)
    assert got.tolist() == [list(range(k))]   # every score equal: the lowest positions


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_sparse_mla_matches_reference(dtype, atol):
    gen = torch.Generator().manual_seed(1)
    seqlens, H, K = [90, 200, 33], 4, 48
    cache, bt = written_latent_cache(seqlens, 16, dtype, False, gen)
    req = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    vis = torch.tensor([89, 90, 150, 199, 200, 33, 33])
    idx = torch.full((7, K), -1, dtype=torch.int32)
    for t in range(6):
        p = torch.randperm(int(vis[t]), generator=gen)[:K]
        idx[t, : p.numel()] = p.int()          # any order, -1 anywhere after
    q = torch.randn(7, H, 576, generator=gen).to(dtype)
    out, lse = dsa_cpu.sparse_mla(q, cache, bt, req, idx, 0.07)
    slots = request_positions_to_slots(idx, bt[req], 16, vis.int())
    ref_out, ref_lse = ref_mla_sparse_decode(q.unsqueeze(1).float(), cache.float(), slots.unsqueeze(1), 0.07)
    assert out.dtype == dtype
    assert_close(out[:6].float(), ref_out[:6, 0].float(), atol=atol, what="out")
    assert_close(lse[:6], ref_lse[:6, :, 0], atol=1e-4, what="lse")
    # a token with no selected key: zero output, lse -inf (the torch path's convention)
    assert torch.equal(out[6].float(), torch.zeros(H, 512)) and torch.isneginf(lse[6]).all()


def test_bad_inputs_raise_one_line_errors():
    cache = torch.zeros(2, BS, D + 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="slots"):
        dsa_cpu.write_k(torch.zeros(3, D), cache, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="q must be"):
        dsa_cpu.sparse_mla(torch.zeros(1, 4, 576, dtype=torch.int32), torch.zeros(2, 16, 576), torch.zeros(1, 2),
                           torch.zeros(1, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_latent_equals_the_reference(dtype):
    from vllm_frontier.kernels.ref import ref_write_latent_cache

    gen = torch.Generator().manual_seed(9)
    T, nb, bs = 11, 4, 16
    kv_c = torch.randn(T, 512, generator=gen).to(dtype)
    k_pe = torch.randn(T, 64, generator=gen)             # another dtype than the cache: converted
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[3] = -1
    want = torch.full((nb, bs, 576), float("nan"), dtype=dtype)
    got = want.clone()
    ref_write_latent_cache(kv_c, k_pe, want, slots, fp8=False)
    dsa_cpu.write_latent(kv_c, k_pe, got, slots)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
