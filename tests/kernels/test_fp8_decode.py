"""FP8 e4m3 decode without Triton's float8e4nv (the sm_80 / sm_86 path) against torch, code by code and inside
the kernels that read FP8 (MLA over the fp8_ds_mla cache, indexer logits)."""

import pytest
import torch
import triton
import triton.language as tl

from kernel_testing import DEVICE, assert_close
from mla_setup import build_paged_cache
from vllm_frontier.kernels import (
    _common,
    flash_mla_with_kvcache,
    get_mla_metadata,
    indexer_paged_logits,
    indexer_ragged_logits,
    request_positions_to_slots,
)
from vllm_frontier.kernels import mla_attention as mla
from vllm_frontier.kernels.fp8 import e4m3_bits_to, quantize_fp8_e4m3

SM80 = (8, 0)


@triton.jit
def _decode_kernel(B, OUT, NATIVE: tl.constexpr, DT: tl.constexpr):
    o = tl.arange(0, 256)
    tl.store(OUT + o, e4m3_bits_to(tl.load(B + o), DT, NATIVE))


@pytest.mark.parametrize("native", [True, False], ids=["float8e4nv", "bit_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_e4m3_code_decodes_like_torch(native, dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEVICE)
    out = torch.empty(256, dtype=dtype, device=DEVICE)
    _decode_kernel[(1,)](codes, out, NATIVE=native, DT={torch.float32: tl.float32, torch.float16: tl.float16}[dtype])
    want = codes.view(torch.float8_e4m3fn).to(dtype)
    got, want = out.cpu(), want.cpu()
    nan = torch.isnan(want)
    assert nan.sum() == 2
    if native and DEVICE == "cpu":
        pass  # the interpreter's own float8e4nv cast reads the NaN codes as +-480; GPUs' cvt gives NaN
    else:
        assert torch.equal(torch.isnan(got), nan), "0x7F and 0xFF are the NaN codes of e4m3fn"
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan])), "-0.0 (0x80) keeps its sign"
    # the cases named explicitly: zero, smallest / largest subnormal, smallest normal, max, negatives
    for code, value in ((0x00, 0.0), (0x01, 2**-9), (0x07, 7 * 2**-9), (0x08, 2**-6), (0x7E, 448.0),
                        (0xFE, -448.0), (0x81, -(2**-9)), (0xB8, -1.0)):
        assert float(got[code]) == value, hex(code)


def test_target_decides_the_fp8_path_and_tiles():
    cpu = torch.device("cpu")
    assert _common.native_fp8(cpu), "the interpreter has float8e4nv"
    for cap, native in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((12, 0), True)):
        with _common.assume_target(cap):
            assert _common.native_fp8(cpu) == native, cap
            assert _common.target_capability(cpu) == cap
    assert _common.target_capability(cpu) is None, "the pin is undone on exit"
    # unknown capabilities fall back to the closest known one of the same major version, else sm_80's
    assert mla.gpu_config((8, 7)) == mla.gpu_config((8, 6))
    assert mla.gpu_config((12, 1)) == mla.gpu_config((12, 0))
    assert mla.gpu_config((7, 5)) == mla.gpu_config((8, 0))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_mla_over_fp8_cache_on_the_sm80_path(sparse, dtype, atol):
    gen = torch.Generator().manual_seed(11)
    seqlens = [40, 75]
    cache, bt, sl = build_paged_cache(seqlens, 16, dtype, True, gen)
    q = torch.randn(2, 1, 4, 576, generator=gen).to(dtype).to(DEVICE)
    idx = None
    if sparse:  # request-local positions (-1: unused) -> physical cache slots, FlashMLA's meaning
        pos = torch.randint(-1, 80, (2, 1, 32), generator=gen).int().to(DEVICE)
        idx = request_positions_to_slots(pos, bt, cache.shape[1], sl)
    kw = dict(is_fp8_kvcache=True, softmax_scale=0.05, indices=idx)
    ref_out, ref_lse = flash_mla_with_kvcache(q, cache, bt, sl, tile_scheduler_metadata=get_mla_metadata()[0], backend="torch", **kw)
    with _common.assume_target(SM80):
        sched, _ = get_mla_metadata(num_splits=2)
        out, lse = flash_mla_with_kvcache(q, cache, bt, sl, tile_scheduler_metadata=sched, backend="triton", **kw)
    assert_close(out, ref_out, atol, what="out")
    assert_close(lse, ref_lse, 1e-4, what="lse")


def test_indexer_logits_on_the_sm80_path():
    from test_indexer import D, _paged_problem

    gen = torch.Generator().manual_seed(12)
    q, w, cache, bt, sl = _paged_problem([70, 130], 2, gen, q_fp8=True)
    want = indexer_paged_logits(q, w, cache, bt, sl, 131, causal=True, backend="torch")
    with _common.assume_target(SM80):
        got = indexer_paged_logits(q, w, cache, bt, sl, 131, causal=True, backend="triton")
    assert_close(got, want, 1e-4, 1e-5, what="paged logits")
    # ragged (prefill) logits with an FP8 K
    k, ks = quantize_fp8_e4m3(torch.randn(50, D, generator=gen), D)
    qr, wr = q[0, 0:1].expand(6, -1, -1).contiguous(), w[0, 0:1].expand(6, -1).contiguous()
    ksta = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    kend = torch.tensor([1, 5, 17, 30, 44, 50], dtype=torch.int32, device=DEVICE)
    args = (qr, wr, k.to(DEVICE), ks[:, 0].to(DEVICE), ksta, kend)
    want_r = indexer_ragged_logits(*args, backend="torch")
    with _common.assume_target(SM80):
        got_r = indexer_ragged_logits(*args, backend="triton")
    assert_close(got_r, want_r, 1e-4, 1e-5, what="ragged logits")
