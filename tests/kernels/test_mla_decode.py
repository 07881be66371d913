"""Dense paged MLA decode: Triton kernel vs torch reference, and the reference vs un-absorbed attention."""

import zlib

import pytest
import torch

from kernel_testing import DEVICE, assert_close
from mla_setup import build_paged_cache
from vllm_frontier.kernels import flash_mla_with_kvcache, get_mla_metadata, request_positions_to_slots
from vllm_frontier.kernels.ref import ref_dense_attention_unabsorbed, ref_mla_decode, ref_mla_sparse_decode

# (seqlens, s_q, heads, block_size, num_splits)
CASES = {
    "seqlen1": ([1], 1, 16, 16, 1),
    "not_block_multiple_odd_heads": ([37, 5], 1, 5, 16, 1),
    "many_blocks_split": ([300], 1, 4, 16, 3),
    "empty_row": ([0, 20, 3], 1, 4, 16, 2),
    "mtp_causal_s2": ([17, 64], 2, 8, 16, 1),
    "mtp_causal_s3_block64_split": ([130, 2], 3, 4, 64, 2),
}
# Tolerances (inputs of unit variance, outputs are convex combinations of them):
#  fp32: only summation order differs -> 2e-5;
#  fp16 / FP8 cache: the kernel rounds p (and p*scale for FP8) to fp16 before the PV dot
#  (2^-11 relative) and stores fp16 output -> 2e-3.
MODES = {"fp32": (torch.float32, False, 2e-5), "fp16": (torch.float16, False, 2e-3),
         "fp32_fp8cache": (torch.float32, True, 2e-5), "fp16_fp8cache": (torch.float16, True, 2e-3)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_dense_decode_matches_reference(case, mode):
    seqlens, s_q, h, bs, splits = CASES[case]
    dtype, fp8, atol = MODES[mode]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    cache, bt, sl = build_paged_cache(seqlens, bs, dtype, fp8, gen)
    q = torch.randn(len(seqlens), s_q, h, 576, generator=gen).to(dtype).to(DEVICE)
    causal = s_q > 1
    kw = dict(causal=causal, is_fp8_kvcache=fp8, softmax_scale=0.05)
    sched, _ = get_mla_metadata(num_splits=splits)
    out, lse = flash_mla_with_kvcache(q, cache, bt, sl, tile_scheduler_metadata=sched, backend="triton", **kw)
    ref_out, ref_lse = flash_mla_with_kvcache(q, cache, bt, sl, backend="torch", **kw)
    assert out.dtype == dtype and out.shape == (len(seqlens), s_q, h, 512) and lse.shape == (len(seqlens), h, s_q)
    assert_close(out, ref_out, atol, what="out")
    assert_close(lse, ref_lse, 1e-4, what="lse")
    for r, n in enumerate(seqlens):
        if n == 0:
            assert torch.all(out[r] == 0) and torch.all(lse[r] == float("inf")), "no keys -> zero output, lse +inf"


def _absorbed_problem(S, T, H, gen, d_nope=128, d_v=128):
    q_nope, q_pe = torch.randn(S, H, d_nope, generator=gen), torch.randn(S, H, 64, generator=gen)
    kv_c, k_pe = torch.randn(T, 512, generator=gen), torch.randn(T, 64, generator=gen)
    w_uk = torch.randn(H, d_nope, 512, generator=gen) / 512**0.5
    w_uv = torch.randn(H, d_v, 512, generator=gen) / 512**0.5
    q_abs = torch.cat([torch.einsum("shd,hdc->shc", q_nope, w_uk), q_pe], -1)  # [S, H, 576]
    return q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, q_abs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_equals_unabsorbed_attention(causal):
    """Absorbed form (one 576-wide latent head) == plain MHA with k_nope = W_UK c, v = W_UV c."""
    gen = torch.Generator().manual_seed(7)
    S, T, H, bs, scale = 3, 45, 4, 16, 192**-0.5
    q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, q_abs = _absorbed_problem(S, T, H, gen)
    nb = -(-T // bs)
    cache = torch.zeros(nb, bs, 576)
    cache.view(-1, 576)[:T] = torch.cat([kv_c, k_pe], -1)
    bt = torch.arange(nb, dtype=torch.int32)[None]
    out, _ = ref_mla_decode(q_abs[None], cache, bt, torch.tensor([T], dtype=torch.int32), scale, causal=causal)
    got = torch.einsum("shc,hdc->shd", out[0], w_uv)
    want = ref_dense_attention_unabsorbed(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, scale, T - S if causal else None)
    assert_close(got, want, 1e-5, what="absorbed vs un-absorbed")
    # the sparse reference with every visible position listed is the same attention
    idx = torch.arange(T, dtype=torch.int32).expand(S, T).clone()
    if causal:
        idx[torch.arange(T)[None, :] > (T - S + torch.arange(S))[:, None]] = -1
    slots = request_positions_to_slots(idx[None], bt, bs)
    sp, _ = ref_mla_sparse_decode(q_abs[None], cache, slots, scale)
    assert_close(torch.einsum("shc,hdc->shd", sp[0], w_uv), want, 1e-5, what="sparse (all indices) vs dense")


@pytest.mark.parametrize("programs,keys,want", [
    # 132 SMs, block_n 32: splits = min(ceil(SMs / programs), key tiles // 4, 32), rounded down to a power of two
    (1, 4096, 32),  # 128 key tiles -> 32, capped at 32
    (1, 512, 4),  # 16 key tiles -> 4
    (64, 4096, 2),  # 64 programs -> ceil(132 / 64) = 3 -> 2
    (3, 4096, 32),  # 3 programs -> ceil(132 / 3) = 44, capped at 32
    (10, 4096, 8),  # 10 programs -> 14 -> 8
    (200, 4096, 1),  # more programs than SMs: no split
    (4, 2048, 16),  # sparse shape: 4 row blocks, top-k 2048 -> 64 tiles -> 16
], ids=["long", "short", "batch64", "batch3", "batch10", "batch200", "sparse"])
def test_split_count_on_a_gpu_shape(monkeypatch, programs, keys, want):
    """The key-split heuristic as it runs on a 132-SM GPU (on CPU tensors it always answers 1)."""
    import types

    from vllm_frontier.kernels import flash_mla_interface as fmi
    from vllm_frontier.kernels.mla_attention import KernelConfig

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    cfg = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
    assert fmi._splits(programs, keys, cfg, torch.device("cuda", 0)) == want
    assert fmi._splits(programs, keys, cfg, torch.device("cpu")) == 1


def test_metadata_and_validation():
    sl = torch.tensor([4096], dtype=torch.int32)
    sched, none = get_mla_metadata(sl, 16, 1)  # FlashMLA's older arguments: accepted, ignored
    assert none is None and not sched.have_initialized and sched.num_splits is None
    with pytest.raises(ValueError, match="num_splits"):
        get_mla_metadata(num_splits=0)
    q = torch.zeros(1, 1, 16, 576)
    with pytest.raises(ValueError, match="is_fp8_kvcache"):
        flash_mla_with_kvcache(q, torch.zeros(2, 16, 656, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.int32), sl)
    with pytest.raises(ValueError, match="576"):
        flash_mla_with_kvcache(q[..., :320], torch.zeros(2, 16, 576), torch.zeros(1, 2, dtype=torch.int32), sl)
    with pytest.raises(NotImplementedError, match="MODEL1"):
        flash_mla_with_kvcache(q[..., :512], torch.zeros(2, 16, 576), torch.zeros(1, 2, dtype=torch.int32), sl)
