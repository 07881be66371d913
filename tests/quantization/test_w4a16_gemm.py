"""Triton W4A16 GEMMs (dense and grouped) against the torch references; on CPU through TRITON_INTERPRET=1.

Tolerances: fp32 activations: both sides accumulate in fp32 in a different order: rtol/atol 1e-5 relative to
the output's magnitude (sqrt(K) terms of size ~1). fp16: the kernel's output is rounded to fp16 once, like the
reference's: 1 fp16 ulp (2^-10 relative) plus the fp32 order difference.
"""

import pytest
import torch
from gemm_testing import DEV, TOL, assert_close

from vllm_frontier.quantization.fp4_formats import dequantize, quantize
from vllm_frontier.quantization.fp4_ops import fp4_fused_experts, fp4_linear
from vllm_frontier.quantization.w4a16_gemm import (
    GemmConfig,
    default_config,
    ref_w4a16_gemm,
    ref_w4a16_grouped_gemm,
    w4a16_gemm,
    w4a16_grouped_gemm,
)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (5, 40, 96), (16, 64, 512), (33, 17, 64)],
                         ids=lambda v: str(v))
def test_w4a16_gemm_matches_reference(fmt, dtype, M, N, K):
    if K % 32 and fmt == "mxfp4":
        pytest.skip("K not a multiple of 32")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    q = quantize(torch.randn(N, K, generator=g), fmt)
    q.packed, q.scales, q.global_scale = q.packed.to(DEV), q.scales.to(DEV), q.global_scale.to(DEV)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    assert_close(w4a16_gemm(x, q), ref_w4a16_gemm(x, q))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("cfg", [GemmConfig(16, 32, 32, 3, 4, 1), GemmConfig(16, 16, 64, 2, 4, 1),
                                 GemmConfig(32, 64, 128, 1, 4, 1)], ids=["splitk3", "splitk2", "bigtile"])
def test_w4a16_gemm_configs_and_strided_x(fmt, cfg):
    g = torch.Generator().manual_seed(7)
    q = quantize(torch.randn(48, 160, generator=g) * 100, fmt)
    x = torch.randn(160, 6, generator=g).T  # non-contiguous [6, 160]
    assert_close(w4a16_gemm(x, q, cfg), ref_w4a16_gemm(x, q))


def test_w4a16_gemm_exact_on_representable_weights():
    # weights that are exactly FP4 values times power-of-two scales and integer x: the fp32 result is exact
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (24, 64), generator=g)
    vals = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])[codes]
    vals[:, 0] = 6.0  # every 32-block's amax is 6: MX scale 2^0, so the values are stored exactly
    vals[:, 32] = 6.0
    q = quantize(vals, "mxfp4")
    assert torch.equal(dequantize(q), vals)
    x = torch.randint(-4, 5, (3, 64), generator=g).float()
    assert torch.equal(w4a16_gemm(x, q), x @ vals.T)


def test_w4a16_gemm_validation():
    q = quantize(torch.randn(8, 64), "nvfp4")
    with pytest.raises(ValueError, match="K = 32"):
        w4a16_gemm(torch.randn(2, 32), q)
    with pytest.raises(ValueError, match="dtype"):
        w4a16_gemm(torch.randn(2, 64).double(), q)
    with pytest.raises(ValueError, match="block_k"):
        w4a16_gemm(torch.randn(2, 64), q, GemmConfig(16, 32, 48, 1, 4, 1))
    assert w4a16_gemm(torch.randn(0, 64), q).shape == (0, 8)


def test_default_config_is_valid():
    for K in (32, 64, 96, 4096, 7168):
        cfg = default_config(1, 4096, K, 16, torch.device("cpu"))
        assert cfg.block_k % 16 == 0 and cfg.block_k >= 32 and cfg.split_k >= 1


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grouped_gemm_matches_reference(fmt, dtype):
    g = torch.Generator().manual_seed(11)
    E, N, K = 4, 40, 64
    q = quantize(torch.randn(E, N, K, generator=g) * torch.tensor([1.0, 10, 0.1, 3])[:, None, None], fmt)
    # expert 1 empty, expert 3 has more than one 16-row block, 2 trailing rows belong to nobody
    offsets = torch.tensor([0, 3, 3, 5, 25], dtype=torch.int32)
    x = torch.randn(27, K, generator=g).to(dtype)
    y = w4a16_grouped_gemm(x, q, offsets)
    assert_close(y[:25], ref_w4a16_grouped_gemm(x, q, offsets)[:25])


def test_grouped_gemm_validation():
    q = quantize(torch.randn(2, 8, 32), "mxfp4")
    with pytest.raises(ValueError, match="expert_offsets"):
        w4a16_grouped_gemm(torch.randn(3, 32), q, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="3-D"):
        w4a16_grouped_gemm(torch.randn(3, 32), quantize(torch.randn(8, 32), "mxfp4"), torch.zeros(3))


# ---------------------------------------------------------------------------------------- fp4_ops
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp4_linear_any_leading_shape_and_bias(backend):
    q = quantize(torch.randn(24, 64), "nvfp4")
    x = torch.randn(2, 3, 64)
    b = torch.randn(24)
    y = fp4_linear(x, q, b, backend=backend)
    ref = x @ dequantize(q).T + b
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # fp32 on both sides, different order


_ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}


def _naive_moe(x, w13, w2, topk_w, topk_ids, expert_map=None, on_input=False, activation="silu"):
    W13, W2 = dequantize(w13), dequantize(w2)
    act = _ACT[activation]
    out = torch.zeros_like(x)
    inter = W13.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            xt = x[t] * topk_w[t, j] if on_input else x[t]
            h = W13[e] @ xt
            o = W2[e] @ (act(h[:inter]) * h[inter:])
            out[t] += o if on_input else topk_w[t, j] * o
    return out


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fused_experts_matches_naive_loop(backend, fmt, activation):
    g = torch.Generator().manual_seed(5)
    E, H, inter, T, k = 6, 64, 32, 7, 2
    w13 = quantize(torch.randn(E, 2 * inter, H, generator=g) / 8, fmt)
    w2 = quantize(torch.randn(E, H, inter, generator=g) / 6, fmt)
    x = torch.randn(T, H, generator=g) * 2  # wide enough that the three activations differ visibly
    topk_ids = torch.randint(0, E, (T, k), generator=g)
    topk_w = torch.rand(T, k, generator=g)
    got = fp4_fused_experts(x, w13, w2, topk_w, topk_ids, backend=backend, activation=activation)
    want = _naive_moe(x, w13, w2, topk_w, topk_ids, activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    other = "gelu" if activation == "silu" else "silu"  # the activation really is the one asked for
    assert (want - _naive_moe(x, w13, w2, topk_w, topk_ids, activation=other)).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_experts_expert_map_and_router_weight_on_input(backend):
    g = torch.Generator().manual_seed(9)
    E_global, E, H, inter, T = 8, 3, 32, 32, 5
    w13 = quantize(torch.randn(E, 2 * inter, H, generator=g) / 6, "nvfp4")
    w2 = quantize(torch.randn(E, H, inter, generator=g) / 6, "nvfp4")
    expert_map = torch.full((E_global,), -1, dtype=torch.int32)
    expert_map[torch.tensor([1, 4, 6])] = torch.tensor([0, 1, 2], dtype=torch.int32)
    x = torch.randn(T, H, generator=g)
    topk_ids = torch.randint(0, E_global, (T, 1), generator=g)
    topk_ids[0, 0] = 4
    topk_ids[1, 0] = 0  # not local: contributes nothing
    topk_w = torch.rand(T, 1, generator=g)
    got = fp4_fused_experts(x, w13, w2, topk_w, topk_ids, expert_map=expert_map,
                            apply_router_weight_on_input=True, backend=backend)
    ref = _naive_moe(x, w13, w2, topk_w, topk_ids, expert_map, on_input=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert (got[1] == 0).all()


# ------------------------------------------------------------------------ Triton scale decode branches
def _hand_weight(fmt, scale_bytes, N=4):
    """A [N, 64] weight whose codes run through all 16 values and whose block scales are the given bytes."""
    from vllm_frontier.quantization.fp4_formats import FP4Tensor, GROUP_SIZE, pack_fp4

    K = 64
    codes = (torch.arange(N * K) % 16).to(torch.uint8).reshape(N, K)
    nb = K // GROUP_SIZE[fmt]
    scales = torch.tensor(scale_bytes, dtype=torch.uint8).repeat(N * nb)[: N * nb].reshape(N, nb)
    g = torch.tensor(1.0 if fmt == "mxfp4" else 0.75)
    return FP4Tensor(fmt, pack_fp4(codes), scales, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt,scale_bytes,what", [
    ("nvfp4", [0x00, 0x00, 0x00, 0x00], "zero"),
    ("nvfp4", [0x01, 0x03, 0x07, 0x00], "e4m3-subnormal"),  # 2^-9, 3 * 2^-9, 7 * 2^-9, 0
    ("nvfp4", [0x08, 0x7E, 0x01, 0x38], "normal-and-subnormal"),  # 2^-6, 448, 2^-9, 1
    ("mxfp4", [0x00, 0x01], "e8m0-smallest"),  # 2^-127 (an fp32 subnormal) and 2^-126
    ("mxfp4", [0x7F, 0x00], "e8m0-one-and-smallest"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_triton_decode_zero_and_subnormal_scales(fmt, scale_bytes, what, dtype):
    q = _hand_weight(fmt, scale_bytes)
    q = type(q)(q.fmt, q.packed.to(DEV), q.scales.to(DEV), q.global_scale.to(DEV))
    # x large where scales are tiny, so tiny-scale blocks still give outputs well above fp32 noise
    # (fp16 cannot hold such x: there the 2^-127 blocks must give zeros within fp16's smallest subnormal)
    big = 2.0**100 if fmt == "mxfp4" and dtype == torch.float32 else 1.0
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * big).to(DEV).to(dtype)
    got = w4a16_gemm(x, q)
    want = (x.double() @ dequantize(q).double().T)
    assert torch.isfinite(got).all()
    if what == "zero":
        assert (got == 0).all()
    else:
        assert want.abs().max() > 0
    tol = TOL[dtype] * want.abs().max() + (2.0**-24 if dtype == torch.float16 else 0.0)
    assert ((got.double() - want).abs() <= tol).all(), (got, want)
