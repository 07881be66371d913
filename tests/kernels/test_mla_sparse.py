"""Sparse MLA (decode over the paged cache, prefill over a ragged KV): Triton kernel vs torch reference."""

import zlib

import pytest
import torch

from kernel_testing import DEVICE, assert_close
from mla_setup import build_paged_cache
from vllm_frontier.kernels import (
    flash_mla_sparse_fwd,
    flash_mla_with_kvcache,
    get_mla_metadata,
    request_positions_to_slots,
    write_latent_cache,
)

# Tolerances as in test_mla_decode: fp32 summation order 2e-5; fp16 p rounding + fp16 output 2e-3.
MODES = {"fp32": (torch.float32, False, 2e-5), "fp16": (torch.float16, False, 2e-3),
         "fp32_fp8cache": (torch.float32, True, 2e-5), "fp16_fp8cache": (torch.float16, True, 2e-3)}

# (seqlens, s_q, heads, topk, num_splits)
DECODE_CASES = {
    "basic": ([40, 70], 1, 4, 32, 1),
    "mtp2_odd_heads_topk_gt_seqlen": ([50, 9], 2, 5, 48, 1),
    "empty_row_split": ([0, 30, 1], 1, 4, 16, 2),
}


def _indices(seqlens, s_q, topk, gen):
    """Random positions with every kind of unused slot: -1, positions >= seq_len, an all -1 query."""
    rows = []
    for n in seqlens:
        idx = torch.randint(0, max(n, 1) + 4, (s_q, topk), generator=gen)  # some >= seq_len
        idx[torch.rand(s_q, topk, generator=gen) < 0.25] = -1
        rows.append(idx)
    idx = torch.stack(rows).int()
    idx[0, -1] = -1  # one query with no key at all
    return idx.to(DEVICE)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_sparse_decode_matches_reference(case, mode):
    seqlens, s_q, h, topk, splits = DECODE_CASES[case]
    dtype, fp8, atol = MODES[mode]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    cache, bt, sl = build_paged_cache(seqlens, 16, dtype, fp8, gen)
    q = torch.randn(len(seqlens), s_q, h, 576, generator=gen).to(dtype).to(DEVICE)
    idx = request_positions_to_slots(_indices(seqlens, s_q, topk, gen), bt, 16, sl)  # physical slots
    kw = dict(is_fp8_kvcache=fp8, softmax_scale=0.05, indices=idx)
    sched, _ = get_mla_metadata(num_splits=splits)
    out, lse = flash_mla_with_kvcache(q, cache, None, None, tile_scheduler_metadata=sched, backend="triton", **kw)
    ref_out, ref_lse = flash_mla_with_kvcache(q, cache, None, None, backend="torch", **kw)
    assert_close(out, ref_out, atol, what="out")
    assert_close(lse, ref_lse, 1e-4, what="lse")
    assert torch.all(out[0, -1] == 0) and torch.all(lse[0, :, -1] == float("inf")), "all -1 -> zero row, lse +inf"


@pytest.mark.parametrize("mode", list(MODES))
def test_sparse_prefill_matches_reference(mode):
    dtype, fp8, atol = MODES[mode]
    gen = torch.Generator().manual_seed(3)
    s_q, s_kv, h, topk = 9, 70, 6, 40
    kv_c, k_pe = torch.randn(s_kv, 512, generator=gen), torch.randn(s_kv, 64, generator=gen)
    if fp8:
        kv = torch.zeros(s_kv, 1, 656, dtype=torch.uint8, device=DEVICE)
    else:
        kv = torch.zeros(s_kv, 1, 576, dtype=dtype, device=DEVICE)
    write_latent_cache(kv_c.to(dtype).to(DEVICE), k_pe.to(dtype).to(DEVICE), kv.view(s_kv, 1, -1),
                       torch.arange(s_kv, device=DEVICE), fp8=fp8, backend="torch")
    q = torch.randn(s_q, h, 576, generator=gen).to(dtype).to(DEVICE)
    idx = torch.randint(-1, s_kv + 5, (s_q, 1, topk), generator=gen).int()
    idx[2] = -1  # a query with no key
    idx = idx.to(DEVICE)
    out, mx, lse = flash_mla_sparse_fwd(q, kv, idx, 0.05, backend="triton")
    r_out, r_mx, r_lse = flash_mla_sparse_fwd(q, kv, idx, 0.05, backend="torch")
    assert out.shape == (s_q, h, 512) and mx.shape == (s_q, h) and lse.shape == (s_q, h)
    assert_close(out, r_out, atol, what="out")
    assert_close(mx, r_mx, 1e-4, what="max_logits")
    assert_close(lse, r_lse, 1e-4, what="lse")
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("inf")) and torch.all(mx[2] == float("-inf"))


def test_sparse_prefill_validates_indices_shape():
    with pytest.raises(ValueError, match="indices"):
        flash_mla_sparse_fwd(torch.zeros(3, 4, 576), torch.zeros(5, 1, 576), torch.zeros(3, 8, dtype=torch.int32), 0.1)
