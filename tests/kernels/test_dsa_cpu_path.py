"""DSA's CPU path (tiled indexer top-k over contiguous keys, sparse MLA over gathered rows) against the
torch references, and the indexer's bounded working memory at a long context."""

import json
import subprocess
import sys

import pytest
import torch

from kernel_testing import assert_close, poisoned_block_table, written_latent_cache
from vllm_frontier.kernels import quantize_fp8_e4m3, request_positions_to_slots, write_indexer_k_cache
from vllm_frontier.kernels.indexer_topk import (
    WORKSPACE_BYTES,
    indexer_topk_request,
    request_keys,
    stable_topk_prefix,
)
from vllm_frontier.kernels.ref import (
    ref_indexer_paged_logits,
    ref_mla_sparse_decode,
    ref_topk_indices,
)
from vllm_frontier.kernels.sparse_mla_tokens import sparse_mla_tokens

D, BS = 128, 64


def test_stable_topk_prefix_matches_reference_with_ties_and_short_rows():
    gen = torch.Generator().manual_seed(0)
    R, C, k = 40, 300, 32
    x = torch.randint(-3, 4, (R, C), generator=gen).float()  # heavy ties at the k-th place
    x[5, :] = 0.0
    x[7, 10] = float("nan")
    vis = torch.randint(1, C + 1, (R,), generator=gen)
    vis[:4] = torch.tensor([1, k - 1, k, k + 1])
    want = ref_topk_indices(torch.nan_to_num(x, nan=float("-inf")), k, lengths=vis)
    got = stable_topk_prefix(x.clone(), vis, k)
    assert torch.equal(got, want)
    # every column beyond the longest row's view is ignored, and short tables come out whole
    assert torch.equal(stable_topk_prefix(x[:, :20].clone(), vis.clamp_max(20), k),
                       ref_topk_indices(x[:, :20].nan_to_num(nan=float("-inf")), k, lengths=vis.clamp_max(20)))


def _indexer_problem(L, H, gen, nb_extra=2):
    n_blk = -(-L // BS)
    nb = n_blk + nb_extra
    bt = poisoned_block_table(1, n_blk + 1, [L], BS, nb, gen)
    cache = torch.full((nb, BS, D + 4), 0xFF, dtype=torch.uint8)  # NaN everywhere not written
    pos = torch.arange(L)
    write_indexer_k_cache(torch.randn(L, D, generator=gen), cache, bt[0, pos // BS].long() * BS + pos % BS,
                          backend="torch")
    return cache, bt


@pytest.mark.parametrize("L,T,k,H", [(300, 300, 16, 4), (700, 129, 64, 8), (200, 1, 64, 4), (50, 50, 64, 4)])
def test_indexer_topk_request_matches_reference(L, T, k, H):
    gen = torch.Generator().manual_seed(L + T)
    cache, bt = _indexer_problem(L, H, gen)
    qv, qs = quantize_fp8_e4m3(torch.randn(T, H, D, generator=gen), D)
    w = torch.randn(T, H, generator=gen) * qs[..., 0]
    vis = torch.arange(L - T + 1, L + 1, dtype=torch.int32)
    ref_logits = ref_indexer_paged_logits(qv.unsqueeze(1), w.unsqueeze(1), cache, bt.expand(T, -1), vis, L,
                                          causal=False)[:, 0]
    want = ref_topk_indices(ref_logits, k, lengths=vis)
    out = torch.full((T, k + 3), -7, dtype=torch.int32)
    # a tiny workspace forces several row tiles
    indexer_topk_request(qv, w, request_keys(cache, bt[0], L), k, out, workspace_bytes=L * (D * 8 + 8) + 64 * L * 60)
    assert torch.equal(out[:, k:], torch.full((T, 3), -7, dtype=torch.int32))
    got = out[:, :k]
    # logits equal up to fp32 summation order: compare the selected scores, and positions where no near-tie
    sel_want = torch.gather(ref_logits, 1, want.clamp_min(0).long()).masked_fill(want < 0, 0)
    sel_got = torch.gather(ref_logits, 1, got.clamp_min(0).long()).masked_fill(got < 0, 0)
    assert torch.equal(got < 0, want < 0)
    assert_close(sel_got.sort(1).values, sel_want.sort(1).values, atol=1e-3, rtol=1e-5, what="selected logits")
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype,fp8,lse_tol", [(torch.float32, False, 1e-4), (torch.bfloat16, True, 1e-4),
                                               (torch.bfloat16, False, 2e-2)])  # bf16 cache: bf16 products
def test_sparse_mla_tokens_matches_reference(dtype, fp8, lse_tol):
    gen = torch.Generator().manual_seed(1)
    seqlens, H, K = [90, 200, 33], 4, 48
    cache, bt = written_latent_cache(seqlens, 16, dtype, fp8, gen)
    req = torch.tensor([0, 0, 1, 1, 1, 2])
    vis = torch.tensor([89, 90, 150, 199, 200, 33])
    idx = torch.full((6, K), -1, dtype=torch.int32)
    for t in range(6):
        p = torch.randperm(int(vis[t]), generator=gen)[:K]
        idx[t, : p.numel()] = p.sort().values.int()
    q = torch.randn(6, H, 576, generator=gen).to(dtype)
    out, lse = sparse_mla_tokens(q, cache, bt, req, idx, 0.07)
    slots = request_positions_to_slots(idx, bt[req], 16, vis.int())  # FlashMLA's physical-slot indices
    ref_out, ref_lse = ref_mla_sparse_decode(q.unsqueeze(1), cache, slots.unsqueeze(1), 0.07)
    assert_close(out.float(), ref_out[:, 0].float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, what="out")
    assert_close(lse, ref_lse[:, :, 0], atol=lse_tol, what="lse")


_PEAK = """
import json, resource, sys, torch
from vllm_frontier.kernels.indexer_topk import indexer_topk_request, request_keys
L, T, H, k = 131072, 512, 8, 2048
cache = torch.zeros(L // 64, 64, 132, dtype=torch.uint8)
flat = cache.view(L // 64, -1)  # per block: 64 x 128 e4m3 codes, then 64 fp32 scales
flat[:, : 64 * 128] = 0x38  # e4m3 1.0
flat[:, 64 * 128:].view(torch.float32)[:] = 0.5
bt = torch.arange(L // 64, dtype=torch.int32)
q = torch.ones(T, H, 128).to(torch.float8_e4m3fn)
w = torch.rand(T, H)
out = torch.empty(T, k, dtype=torch.int32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
indexer_topk_request(q, w, request_keys(cache, bt, L), k, out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta_bytes": (peak - base) * 1024, "first": out[0, :3].tolist(), "last": out[-1, :3].tolist()}))
"""


def test_indexer_workspace_stays_bounded_at_long_context():
    """512 prefill tokens at a 128k context: full fp32 logits would be 256 MiB and the head scores 2 GiB;
    the tiled path must stay under WORKSPACE_BYTES (measured as the growth of the process's peak RSS)."""
    r = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["delta_bytes"] < WORKSPACE_BYTES, res
    assert res["first"] == [0, 1, 2] and res["last"] == [0, 1, 2]  # all-equal scores: lowest positions win


def test_flat_path_chunks_keep_logits_bounded():
    """The Triton (one row per token) path chunks its rows so [rows, max_len] fp32 buffers fit the same bound."""
    from vllm_frontier.attention_backends.indexer_op import _FLAT_BUFFERS, flat_chunk_rows

    for max_len in (1, 4096, 163840, 1 << 20):
        rows = flat_chunk_rows(max_len)
        assert rows >= 1
        assert rows * max_len * 4 * _FLAT_BUFFERS <= max(WORKSPACE_BYTES, max_len * 4 * _FLAT_BUFFERS)
    assert flat_chunk_rows(163840) < 8192  # 8192 prefill rows at V3.2's max context would need 5 GiB
