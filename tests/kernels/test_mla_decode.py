"""Dense paged MLA decode: Triton kernel vs torch reference, and the reference vs un-absorbed attention."""

import zlib

import pytest
import torch

from kernel_testing import DEVICE, assert_close
from mla_setup import build_paged_cache
from vllm_frontier.kernels import flash_mla_with_kvcache, get_mla_metadata
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
    out, lse = flash_mla_with_kvcache(q, cache, bt, sl, num_splits=splits, backend="triton", **kw)
    ref_out, ref_lse = flash_mla_with_kvcache(q, cache, bt, sl, backend="torch", **kw)
    assert out.dtype == dtype and out.shape == (len(seqlens), s_q, h, 512) and lse.shape == (len(seqlens), h, s_q)
    assert_close(out, ref_out, atol, what="out")
    assert_close(lse, ref_lse, 1e-4, what="lse")
    for r, n in enumerate(seqlens):
        if n == 0:
            assert torch.all(out[r] == 0) and torch.all(lse[r] == float("-inf")), "no keys -> zero output, lse -inf"


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
    sp, _ = ref_mla_sparse_decode(q_abs[None], cache, bt, torch.tensor([T], dtype=torch.int32), idx[None], scale)
    assert_close(torch.einsum("shc,hdc->shd", sp[0], w_uv), want, 1e-5, what="sparse (all indices) vs dense")


class _CudaSeqlens:
    """Stands in for ``cache_seqlens`` on a CUDA device, so the split heuristic runs on any machine
    (on a CPU tensor it always answers 1: one "SM")."""

    def __init__(self, lens):
        self._t = torch.tensor(lens, dtype=torch.int32)
        self.shape, self.is_cuda, self.device = self._t.shape, True, torch.device("cuda", 0)

    def max(self):
        return self._t.max()


@pytest.mark.parametrize("lens,rows,topk,heads,want", [
    # 132 SMs, block_m 64, block_n 32; splits = min(ceil(SMs / programs), key tiles // 4, 32)
    ([4096], 16, None, None, 32),  # 128 tiles -> 32, capped at 32
    ([512], 16, None, None, 4),  # 16 tiles -> 4
    ([4096] * 64, 16, None, None, 3),  # 64 programs -> ceil(132 / 64) = 3
    ([4096] * 200, 16, None, None, 1),  # more programs than SMs: no split
    ([100, 4096], 128, 2048, 128, 16),  # sparse: 2 x 2 row blocks, topk 2048 -> 64 tiles -> 16
], ids=["long", "short", "batch64", "batch200", "sparse"])
def test_metadata_split_count_on_a_gpu_shape(monkeypatch, lens, rows, topk, heads, want):
    import types
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    sched, n = get_mla_metadata(_CudaSeqlens(lens), rows, 1, num_heads_q=heads, topk=topk)
    assert n == sched.num_splits == want


def test_metadata_splits_and_validation():
    sl = torch.tensor([4096], dtype=torch.int32)
    sched, n = get_mla_metadata(sl, 16, 1)
    assert n == sched.num_splits == 1  # CPU: one "SM", one program already fills it
    q = torch.zeros(1, 1, 16, 576)
    with pytest.raises(ValueError, match="is_fp8_kvcache"):
        flash_mla_with_kvcache(q, torch.zeros(2, 16, 656, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.int32), sl)
    with pytest.raises(ValueError, match="576"):
        flash_mla_with_kvcache(q[..., :512], torch.zeros(2, 16, 576), torch.zeros(1, 2, dtype=torch.int32), sl)
    with pytest.raises(ValueError, match="num_heads_k"):
        get_mla_metadata(sl, 16, 2)
