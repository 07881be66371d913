"""The decode-shape W4A16 GEMM (layout permuted at load) against the torch reference; on CPU through
TRITON_INTERPRET=1 (fp16 / fp32 activations only: the interpreter's bf16 arithmetic is broken).

Tolerances as in test_w4a16_gemm: fp32 1e-5 of the output's magnitude (fp32 sums in another order); fp16 the
output's single rounding to fp16 plus the order difference. The decoded weights are exact in fp16, so no
tolerance is spent on the weights.
"""

import pytest
import torch
from gemm_testing import DEV, TOL, assert_close

from vllm_frontier.quantization import fp4_decode_layout as layout
from vllm_frontier.quantization.fp4_formats import FP4Tensor, dequantize, pack_fp4, quantize
from vllm_frontier.quantization.fp4_ops import fp4_linear
from vllm_frontier.quantization.w4a16_decode_gemm import (
    DecodeConfig,
    default_decode_config,
    permute_fp4,
    ref_w4a16_decode_gemm,
    unpermute_fp4,
    w4a16_decode_gemm,
)
from vllm_frontier.quantization.w4a16_gemm import ref_w4a16_gemm


def _to(q: FP4Tensor, dev=DEV) -> FP4Tensor:
    return FP4Tensor(q.fmt, q.packed.to(dev), q.scales.to(dev), q.global_scale.to(dev), q.layout)


def _on_dev(d, dev=DEV):
    """The permuted weight on the test device."""
    return type(d)(d.fmt, d.words.to(dev), d.scales.to(dev), d.post.to(dev), d.exp_bias.to(dev), d.k, d.kb, d.exact)


def _kernel_decode(words: torch.Tensor) -> torch.Tensor:
    """The kernel's shift / mask expressions in torch, written from the docstring, independent of the layout's
    slot table: words [..., W] int32 -> the 8 fp16 values per word (E2M1 * 2^-14) as float32, in k order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    m = 0xFFFFFFFF
    a = w & 0x8E008E00
    b = ((w << 3) & m) & 0x8E008E00
    c = (((w << 6) & m) & 0x0E000E00) | (((w << 1) & m) & 0x80008000)
    d = (((w << 9) & m) & 0x0E000E00) | (((w << 2) & m) & 0x80008000)
    halves = []
    for v in (a, c, b, d):  # the kernel's join order: per register, the high half first
        halves += [(v >> 16) & 0xFFFF, v & 0xFFFF]
    bits = torch.stack(halves, -1).flatten(-2).to(torch.int32)
    bits = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16)
    return bits.view(torch.float16).float()


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(5, 64), (33, 96), (7, 320), (3, 4, 160)], ids=lambda s: "x".join(map(str, s)))
def test_permute_round_trips(fmt, shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = quantize(torch.randn(*shape, generator=g) * 3, fmt)
    d = permute_fp4(q)
    kp = d.words.shape[-1] * 8
    assert kp % d.kb == 0 and kp >= shape[-1] and d.words.dtype == torch.int32
    assert d.scales.shape == (*shape[:-2], kp // d.kb, shape[-2], d.kb // q.group_size)
    back = unpermute_fp4(d)
    assert torch.equal(back.packed, q.packed) and torch.equal(back.scales, q.scales)
    assert torch.equal(back.global_scale, q.global_scale)
    assert torch.equal(dequantize(back), dequantize(q))


def test_word_packing_in_row_chunks_round_trips():
    """Rows are packed a few at a time (bounded temporaries at load): a chunk border must not shift anything."""
    codes = torch.randint(0, 16, (5, 2**20), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    words = layout._pack_words(codes)  # 4 rows per chunk at this K: two chunks
    assert torch.equal(layout._words_to_codes(words), codes)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_layout_matches_the_kernels_bit_expressions(fmt):
    """Every code through every k slot: the kernel's shift / mask expressions (emulated from the docstring)
    give E2M1 * 2^-14 of the code the layout put there; the padding beyond K decodes to zeros."""
    k = 96
    codes = (torch.arange(4 * k) * 7 % 16).to(torch.uint8).reshape(4, k)  # every code in every slot
    q = FP4Tensor(fmt, pack_fp4(codes), torch.full((4, k // {"nvfp4": 16, "mxfp4": 32}[fmt]), 0x38, dtype=torch.uint8),
                  torch.tensor(1.0))
    d = permute_fp4(q)
    got = _kernel_decode(d.words)
    e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    assert torch.equal(got[:, :k], e2m1[codes.long()] * 2.0**-14)
    assert torch.equal(torch.signbit(got[:, :k]), codes >= 8)  # -0 keeps its sign
    assert (got[:, k:] == 0).all()


def test_a_wrong_permutation_is_caught(monkeypatch):
    """A slot table that disagrees with the kernel still round-trips (it is its own inverse) but the kernel,
    and the emulated bit expressions, then read the wrong k: both checks fail."""
    g = torch.Generator().manual_seed(1)
    q = quantize(torch.randn(16, 64, generator=g), "nvfp4")
    x = torch.randn(2, 64, generator=g)
    wrong = list(layout._SLOT_BITS)
    wrong[0], wrong[1] = wrong[1], wrong[0]
    monkeypatch.setattr(layout, "_SLOT_BITS", tuple(wrong))
    d = permute_fp4(q)
    assert torch.equal(unpermute_fp4(d).packed, q.packed)  # round trip alone cannot tell
    assert not torch.equal(_kernel_decode(d.words)[:, :64], dequantize(FP4Tensor(
        "nvfp4", q.packed, torch.full_like(q.scales, 0x38), torch.tensor(1.0))) * 2.0**-14)
    d = _on_dev(d)
    got = w4a16_decode_gemm(x.to(DEV), d)
    assert (got.cpu() - ref_w4a16_gemm(x, q)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ kernel
# odd N; K tails the formats allow (K % 16 for NVFP4, K % 32 for MXFP4) padded up to the layout's K block
_SHAPES = [("nvfp4", 33, 96), ("nvfp4", 20, 320), ("nvfp4", 16, 48), ("mxfp4", 33, 96), ("mxfp4", 20, 320),
           ("mxfp4", 7, 160)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 4, 16])
@pytest.mark.parametrize("fmt,N,K", _SHAPES, ids=[f"{f}-N{n}K{k}" for f, n, k in _SHAPES])
def test_decode_gemm_matches_reference(fmt, dtype, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    q = quantize(torch.randn(N, K, generator=g), fmt)
    d = _on_dev(permute_fp4(q))
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    got = w4a16_decode_gemm(x, d)
    assert_close(got, ref_w4a16_decode_gemm(x, d))
    assert_close(got, ref_w4a16_gemm(x, _to(q)))  # the canonical weight's reference, not only the layout's


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("cfg,M", [(DecodeConfig(16, 16, 2, 1, 1), 5), (DecodeConfig(16, 32, 3, 2, 2), 16),
                                   (None, 40), (DecodeConfig(32, 16, 1, 1, 1), 40)],
                         ids=["splitk2", "splitk3", "prefill-default", "two-m-tiles"])
def test_decode_gemm_configs_large_m_and_strided_x(fmt, cfg, M):
    g = torch.Generator().manual_seed(7)
    q = quantize(torch.randn(48, 640, generator=g) * 100, fmt)  # 640: Kp 768 with kb 256, three K blocks
    d = _on_dev(permute_fp4(q))
    x = torch.randn(640, M, generator=g).T.to(DEV)  # non-contiguous [M, 640]
    assert_close(w4a16_decode_gemm(x, d, cfg), ref_w4a16_decode_gemm(x, d))


def test_decode_gemm_exact_on_representable_weights():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (24, 64), generator=g)
    vals = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])[codes]
    vals[:, 0] = 6.0
    vals[:, 32] = 6.0
    q = quantize(vals, "mxfp4")
    x = torch.randint(-4, 5, (3, 64), generator=g).float()
    assert torch.equal(w4a16_decode_gemm(x.to(DEV), _on_dev(permute_fp4(q))).cpu(), x @ vals.T)


def _hand_weight(fmt, scale_bytes, N=4, K=64):
    """[N, K] with codes through all 16 values and the given block-scale bytes (cycled)."""
    from vllm_frontier.quantization.fp4_formats import GROUP_SIZE

    codes = (torch.arange(N * K) % 16).to(torch.uint8).reshape(N, K)
    nb = K // GROUP_SIZE[fmt]
    scales = torch.tensor(scale_bytes, dtype=torch.uint8).repeat(N * nb)[: N * nb].reshape(N, nb)
    return FP4Tensor(fmt, pack_fp4(codes), scales, torch.tensor(1.0 if fmt == "mxfp4" else 0.75))


_SCALE_CASES = [
    ("nvfp4", [0x00, 0x00, 0x00, 0x00], "zero"),
    ("nvfp4", [0x01, 0x03, 0x07, 0x00], "e4m3-subnormal"),  # 2^-9, 3 * 2^-9, 7 * 2^-9, 0
    ("nvfp4", [0x08, 0x7E, 0x01, 0x38], "normal-and-subnormal"),  # 2^-6, 448, 2^-9, 1
    ("nvfp4", [0x80, 0x81, 0xFE, 0x38], "negative"),  # -0, -2^-9, -448, 1 (E4M3 has a sign bit)
    ("mxfp4", [0x00, 0x00], "e8m0-all-zero-codes"),
    ("mxfp4", [0x7F, 0x67], "e8m0-24-binades"),  # 2^0 and 2^-24: the edge of the exact window
]
# fp32 only: no fp16 x puts these products inside fp16's range
_SCALE_CASES_FP32 = [
    ("mxfp4", [0x01, 0x00], "e8m0-smallest"),  # 2^-126, 2^-127 (fp32 subnormal)
    ("mxfp4", [0xFC, 0xF0], "e8m0-largest"),  # 2^125, 2^113 (6 * 2^127 would overflow the reference)
]


@pytest.mark.parametrize("dtype,fmt,scale_bytes,what",
                         [(dt, *c) for dt in (torch.float32, torch.float16) for c in _SCALE_CASES]
                         + [(torch.float32, *c) for c in _SCALE_CASES_FP32],
                         ids=lambda v: v if isinstance(v, str) else (
                             str(v)[6:] if isinstance(v, torch.dtype) else None))
def test_decode_zero_and_subnormal_scales(fmt, scale_bytes, what, dtype):
    q = _hand_weight(fmt, scale_bytes)
    if what == "e8m0-all-zero-codes":
        q.packed.zero_()
    d = permute_fp4(q)
    assert d.exact
    # fp32: x scaled so that tiny / huge scales still give outputs well inside fp32; fp16 x stays ~1 and the
    # fp16 output must then match within fp16's range (outputs may flush / saturate like the reference's cast)
    big = {"e8m0-smallest": 2.0**100, "e8m0-largest": 2.0**-110}.get(what, 1.0)
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * big).to(dtype)
    got = w4a16_decode_gemm(x.to(DEV), _on_dev(d)).cpu()
    want = x.double() @ dequantize(q).double().T
    assert torch.isfinite(got).all()
    if what in ("zero", "e8m0-all-zero-codes"):
        assert (got == 0).all()
    else:
        assert want.abs().max() > 0
    tol = TOL[dtype] * want.abs().max() + (2.0**-24 if dtype == torch.float16 else 0.0)
    assert ((got.double() - want).abs() <= tol).all(), (got, want)


def test_mxfp4_scales_beyond_the_fp16_window_are_flagged():
    assert permute_fp4(_hand_weight("mxfp4", [0x7F, 0x66])).exact is False  # 25 binades apart
    assert permute_fp4(_hand_weight("mxfp4", [0x7F, 0x00])).exact is False
    # a zero-code block does not count, whatever its scale
    q = _hand_weight("mxfp4", [0x7F, 0x00])
    codes = q.codes()
    codes[:, 32:] = 0
    assert permute_fp4(FP4Tensor("mxfp4", pack_fp4(codes), q.scales, q.global_scale)).exact is True
    assert permute_fp4(quantize(torch.randn(8, 64), "nvfp4")).exact is True


def test_decode_gemm_validation():
    d = permute_fp4(quantize(torch.randn(8, 64), "nvfp4"))
    with pytest.raises(ValueError, match="K = 32"):
        w4a16_decode_gemm(torch.randn(2, 32), d)
    with pytest.raises(ValueError, match="dtype"):
        w4a16_decode_gemm(torch.randn(2, 64).double(), d)
    with pytest.raises(ValueError, match="powers of two"):
        w4a16_decode_gemm(torch.randn(2, 64), d, DecodeConfig(16, 24))
    with pytest.raises(ValueError, match="kb="):
        permute_fp4(quantize(torch.randn(8, 64), "mxfp4"), kb=16)
    assert w4a16_decode_gemm(torch.randn(0, 64), d).shape == (0, 8)


def test_default_decode_config():
    cpu = torch.device("cpu")
    for M in (1, 4, 16):
        cfg = default_decode_config(M, 4096, 4096, cpu)
        assert cfg.block_m == 16 and cfg.block_n // cfg.num_warps >= 16  # a warp owns >= 16 weight rows
    assert default_decode_config(33, 4096, 4096, cpu).block_m == 64
    assert default_decode_config(1, 16, 256, cpu).split_k == 1  # one K block: nothing to split


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp4_linear_takes_the_decode_layout(backend):
    q = quantize(torch.randn(24, 64), "mxfp4")
    x = torch.randn(2, 3, 64)
    b = torch.randn(24)
    y = fp4_linear(x, permute_fp4(q), b, backend=backend)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ dequantize(q).T + b, rtol=1e-5, atol=1e-5)
