"""Lightning indexer: FP8 K cache write, paged / ragged logits, stable top-k (Triton vs torch references)."""

import pytest
import torch

from kernel_testing import DEVICE, assert_close, poisoned_block_table
from vllm_frontier.kernels import (
    indexer_paged_logits,
    indexer_ragged_logits,
    quantize_fp8_e4m3,
    topk_indices,
    write_indexer_k_cache,
)
from vllm_frontier.kernels.ref import ref_indexer_paged_logits, ref_indexer_ragged_logits, ref_topk_indices

D, H = 128, 8
BS = 64  # vLLM's indexer cache block size


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_k_cache_write_layout(scale_fmt):
    gen = torch.Generator().manual_seed(0)
    nb, T = 3, 70
    k = (torch.randn(T, D, generator=gen) * 3).to(DEVICE)
    slots = torch.randperm(nb * BS, generator=gen)[:T]
    slots[::7] = -1
    slots = slots.to(DEVICE)
    a = torch.full((nb, BS, D + 4), 0xAB, dtype=torch.uint8, device=DEVICE)
    b = a.clone()
    write_indexer_k_cache(k, a, slots, scale_fmt, backend="triton")
    write_indexer_k_cache(k, b, slots, scale_fmt, backend="torch")
    assert torch.equal(a, b)
    # vLLM layout: per block, [BS, D] fp8 values then [BS] fp32 scales
    keep = slots >= 0
    s = slots[keep].long()
    blk = a.view(nb, -1)
    vals = blk[s // BS][torch.arange(s.numel(), device=DEVICE)[:, None], (s % BS)[:, None] * D + torch.arange(D, device=DEVICE)]
    scl = blk[s // BS][torch.arange(s.numel(), device=DEVICE)[:, None], BS * D + (s % BS)[:, None] * 4 + torch.arange(4, device=DEVICE)]
    want_v, want_s = quantize_fp8_e4m3(k[keep], D, scale_fmt)
    assert torch.equal(vals, want_v.view(torch.uint8))
    assert torch.equal(scl.contiguous().view(torch.float32), want_s)


def _paged_problem(seqlens, N, gen, q_fp8=True):
    used = [-(-n // BS) for n in seqlens]
    nb = sum(used) + 1
    bt = poisoned_block_table(len(seqlens), max(used + [1]) + 1, seqlens, BS, nb, gen).to(DEVICE)
    cache = torch.full((nb, BS, D + 4), 0xFF, dtype=torch.uint8, device=DEVICE)  # NaN codes / NaN scales
    for r, n in enumerate(seqlens):
        pos = torch.arange(n, device=DEVICE)
        slots = bt[r, pos // BS].long() * BS + pos % BS
        write_indexer_k_cache(torch.randn(n, D, generator=gen).to(DEVICE), cache, slots, backend="torch")
    q = torch.randn(len(seqlens), N, H, D, generator=gen).to(DEVICE)
    w = torch.randn(len(seqlens), N, H, generator=gen).to(DEVICE)
    if q_fp8:
        qv, qs = quantize_fp8_e4m3(q, D)
        q, w = qv, w * qs[..., 0]  # q scale folded into the head weights, as vLLM does
    return q, w, cache, bt, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)


# (seqlens, N query tokens per request, causal)
PAGED_CASES = {
    "seqlen1": ([1], 1, True),
    "not_block_multiple_many_blocks_empty_row": ([130, 0, 64, 200], 1, True),
    "mtp_n2_causal": ([65, 3], 2, True),
    "mtp_n2_noncausal": ([65, 3], 2, False),
}


@pytest.mark.parametrize("q_fp8", [True, False], ids=["q_fp8", "q_fp32"])
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_paged_logits_match_reference(case, q_fp8):
    seqlens, N, causal = PAGED_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q, w, cache, bt, sl = _paged_problem(seqlens, N, gen, q_fp8)
    L = max(seqlens) + 3
    got = indexer_paged_logits(q, w, cache, bt, sl, L, causal=causal, backend="triton")
    want = indexer_paged_logits(q, w, cache, bt, sl, L, causal=causal, backend="torch")
    # exact fp8 products accumulated in fp32 in a different order: relative 1e-5
    assert_close(got, want, 1e-4, 1e-5, what="paged logits")
    for r, n in enumerate(seqlens):
        for j in range(N):
            vis = (n - N + j + 1) if causal else n
            assert torch.isfinite(got[r, j, : max(vis, 0)]).all() and torch.isinf(got[r, j, max(vis, 0):]).all()


def test_ragged_logits_match_reference_and_paged():
    gen = torch.Generator().manual_seed(5)
    # two requests of 20 and 45 tokens, causal prefill: token i of request r sees its request's rows <= i
    lens = [20, 45]
    S = sum(lens)
    k = torch.randn(S, D, generator=gen).to(DEVICE)
    kv, ks = quantize_fp8_e4m3(k, D)
    q = torch.randn(S, H, D, generator=gen).to(DEVICE)
    qv, qs = quantize_fp8_e4m3(q, D)
    w = torch.randn(S, H, generator=gen).to(DEVICE) * qs[..., 0]
    starts = torch.tensor([0] * lens[0] + [lens[0]] * lens[1], dtype=torch.int32, device=DEVICE)
    ends = torch.arange(1, S + 1, dtype=torch.int32, device=DEVICE)
    got = indexer_ragged_logits(qv, w, kv, ks[:, 0], starts, ends, backend="triton")
    want = indexer_ragged_logits(qv, w, kv, ks[:, 0], starts, ends, backend="torch")
    assert_close(got, want, 1e-4, 1e-5, what="ragged logits")
    # the same keys through the paged cache give the same logits (request 1, its last token)
    cache = torch.zeros(2, BS, D + 4, dtype=torch.uint8, device=DEVICE)
    write_indexer_k_cache(k[lens[0]:], cache, torch.arange(lens[1], device=DEVICE), backend="torch")
    paged = ref_indexer_paged_logits(qv[None, S - 1 : S], w[None, S - 1 : S], cache,
                                     torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE),
                                     torch.tensor([lens[1]], dtype=torch.int32, device=DEVICE), lens[1])
    assert_close(paged[0, 0], want[S - 1, lens[0]:], 1e-4, 1e-5, what="paged vs ragged")


def _brute_topk(x: torch.Tensor, k: int, start: int, n: int) -> list[int]:
    win = [(-float(x[start + i]), i) for i in range(n)]  # score descending, position ascending
    chosen = sorted(i for _, i in sorted(win)[:k])
    return chosen + [-1] * (k - len(chosen))


@pytest.mark.parametrize("k", [1, 7, 64, 300])
def test_topk_stable_ties_against_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    R, L = 6, 257
    x = torch.randint(0, 6, (R, L), generator=gen).float()  # many exact ties
    x[1, 5] = float("-inf")
    x[2] = torch.randn(L, generator=gen)
    starts = torch.tensor([0, 3, 10, 0, 200, 0], dtype=torch.int32)
    lens = torch.tensor([257, 100, 200, 0, 57, 5], dtype=torch.int32)  # empty row, k > length rows
    want = torch.tensor([_brute_topk(x[r], k, int(starts[r]), int(lens[r])) for r in range(R)], dtype=torch.int32)
    assert torch.equal(ref_topk_indices(x, k, lens, starts), want)
    got = topk_indices(x.to(DEVICE), k, lens.to(DEVICE), starts.to(DEVICE), backend="triton")
    assert torch.equal(got.cpu(), want)


def test_topk_2048_over_long_rows():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5000, generator=gen)
    x[0, 100:3000] = 0.25  # a tie block straddling the threshold
    lens = torch.tensor([5000, 1500], dtype=torch.int32)
    got = topk_indices(x.to(DEVICE), 2048, lens.to(DEVICE), backend="triton")
    want = ref_topk_indices(x, 2048, lens)
    assert torch.equal(got.cpu(), want)
    assert (want[1, 1500:] == -1).all() and torch.equal(want[1, :1500], torch.arange(1500, dtype=torch.int32))


def test_indexer_validation():
    with pytest.raises(ValueError, match="k must be"):
        topk_indices(torch.zeros(2, 10), 0)
    with pytest.raises(ValueError, match="k_scale"):
        indexer_ragged_logits(torch.zeros(2, H, D), torch.zeros(2, H), torch.zeros(3, D), torch.ones(3),
                              torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="uint8"):
        write_indexer_k_cache(torch.zeros(1, D), torch.zeros(1, BS, D + 4), torch.zeros(1, dtype=torch.long))
