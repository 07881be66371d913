"""The CPU FP4 kernel (csrc/fp4_cpu.cpp through fp4_cpu) against the torch reference, its layout, its fallback.

Tolerances: fp32 x: the kernel and the reference sum the same exact products (code * block scale * x) in a
different order: 1e-5 relative to the output's magnitude. bf16 x: products of bf16 x and decoded weights are
exact in fp32 on both sides and both round the fp32 result once to bf16: one bf16 ulp (2^-8 relative) plus the
order difference. The kernel needs AVX512_BF16 (our CPU machines and CI have it); elsewhere these tests skip
with the reason and `test_fallback_*` covers what users get.
"""

import os
import subprocess
import sys

import pytest
import torch

from vllm_frontier.quantization import fp4_cpu
from vllm_frontier.quantization.fp4_formats import FP4Tensor, dequantize, from_chunk32, pack_fp4, quantize, to_chunk32
from vllm_frontier.quantization.fp4_ops import fp4_fused_experts, fp4_linear

AVAILABLE, WHY = fp4_cpu.kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU FP4 kernel unavailable here: {WHY}")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8 + 1e-5}


def assert_close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    r = ref.float()
    diff = (got.float() - r).abs()
    bad = diff > TOL[got.dtype] * (r.abs() + r.abs().max())  # order differences scale with the terms
    assert not bad.any(), f"max diff {diff.max().item():.3g} at {bad.nonzero()[0].tolist()}"


def test_chunk32_layout_hand_vector_and_round_trip():
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    codes[0, 32:] = 15 - codes[0, 32:]
    c32 = to_chunk32(pack_fp4(codes))
    # byte j of chunk c = code[32c + j] | code[32c + 16 + j] << 4
    assert c32[0, 3].item() == codes[0, 3].item() | (codes[0, 19].item() << 4)
    assert c32[0, 16 + 5].item() == codes[0, 37].item() | (codes[0, 53].item() << 4)
    assert torch.equal(from_chunk32(c32), pack_fp4(codes))
    q = quantize(torch.randn(3, 5, 64), "nvfp4")
    q32 = q.with_layout("chunk32")
    assert q32.layout == "chunk32" and torch.equal(dequantize(q32), dequantize(q))
    assert torch.equal(q32.with_layout("pairs").packed, q.packed)
    with pytest.raises(ValueError, match="K % 32"):
        to_chunk32(torch.zeros(2, 8, dtype=torch.uint8))


@needs_kernel
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (1, 33, 96), (3, 17, 64), (5, 40, 544), (8, 64, 512), (13, 7, 160)],
                         ids=lambda v: str(v))
def test_cpu_linear_matches_reference(fmt, dtype, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    q = quantize(torch.randn(N, K, generator=g) * 0.05, fmt)
    x = torch.randn(M, K, generator=g).to(dtype)
    got = fp4_linear(x, q.with_layout("chunk32"), backend="cpu")
    assert_close(got, (x.float() @ dequantize(q).T).to(dtype))


@needs_kernel
def test_cpu_linear_strided_x_leading_dims_bias_and_auto_dispatch():
    q = quantize(torch.randn(24, 64), "nvfp4").with_layout("chunk32")
    xs = torch.randn(2, 3, 128).to(torch.bfloat16)[..., :64]  # row stride 128
    b = torch.randn(24).to(torch.bfloat16)
    got = fp4_linear(xs, q, b)  # auto: a chunk32 weight on CPU runs the kernel
    ref = (xs.float() @ dequantize(q).T).to(torch.bfloat16) + b
    assert got.shape == (2, 3, 24)
    assert_close(got, ref)


@needs_kernel
def test_cpu_kernel_exact_on_identity():
    """MLA reads kv_b_proj's weight as apply(eye(K)): one product per output, so the result is exact."""
    q = quantize(torch.randn(48, 64), "nvfp4").with_layout("chunk32")
    got = fp4_linear(torch.eye(64), q, backend="cpu")
    assert got.dtype == torch.float32 and torch.equal(got, dequantize(q).T)


@needs_kernel
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("amax", [1e-41, 1e-44, 1.4e-45, 0.0], ids=lambda v: f"amax{v:g}")
def test_tiny_weights_stay_finite_through_the_kernel(fmt, amax):
    w = torch.full((4, 64), amax)
    w[1, 3] = -amax
    q = quantize(w, fmt)
    assert torch.isfinite(dequantize(q)).all()
    y = fp4_linear(torch.randn(2, 64), q.with_layout("chunk32"), backend="cpu")
    assert torch.isfinite(y).all()


def _moe_case(fmt, dtype, seed=5, E=6, H=64, inter=32, T=7, k=2):
    g = torch.Generator().manual_seed(seed)
    w13 = quantize(torch.randn(E, 2 * inter, H, generator=g) / 8, fmt)
    w2 = quantize(torch.randn(E, H, inter, generator=g) / 6, fmt)
    x = (torch.randn(T, H, generator=g) * 2).to(dtype)
    topk_ids = torch.randint(0, E, (T, k), generator=g)
    topk_w = torch.rand(T, k, generator=g)
    return x, w13, w2, topk_w, topk_ids


@needs_kernel
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_fused_experts_every_activation(fmt, dtype, activation):
    x, w13, w2, topk_w, topk_ids = _moe_case(fmt, dtype)
    ref = fp4_fused_experts(x.float(), w13, w2, topk_w, topk_ids, activation=activation, backend="torch")
    got = fp4_fused_experts(x, w13.with_layout("chunk32"), w2.with_layout("chunk32"), topk_w, topk_ids,
                            activation=activation, backend="cpu")
    assert got.dtype == dtype and torch.isfinite(got).all()
    # bf16: the kernel rounds x's expert GEMM outputs to bf16 as the unquantized path does (a few ulps overall)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < tol, err
    other = fp4_fused_experts(x.float(), w13, w2, topk_w, topk_ids, backend="torch",
                              activation="gelu" if activation == "silu" else "silu")
    other_err = (other - ref).abs().max() / ref.abs().max()
    assert other_err > max(3 * err, 1e-2)  # a wrong activation would be caught


@needs_kernel
def test_cpu_fused_experts_expert_map_and_router_weight_on_input():
    g = torch.Generator().manual_seed(9)
    E_global, E, H, inter, T = 8, 3, 64, 32, 5
    w13 = quantize(torch.randn(E, 2 * inter, H, generator=g) / 6, "nvfp4")
    w2 = quantize(torch.randn(E, H, inter, generator=g) / 6, "nvfp4")
    expert_map = torch.full((E_global,), -1, dtype=torch.int32)
    expert_map[torch.tensor([1, 4, 6])] = torch.tensor([0, 1, 2], dtype=torch.int32)
    x = torch.randn(T, H, generator=g)
    topk_ids = torch.randint(0, E_global, (T, 2), generator=g)
    topk_ids[1] = torch.tensor([0, 2])  # neither local: token 1 gets nothing
    topk_w = torch.rand(T, 2, generator=g)
    for on_input in (False, True):
        ref = fp4_fused_experts(x, w13, w2, topk_w, topk_ids, expert_map=expert_map,
                                apply_router_weight_on_input=on_input, backend="torch")
        got = fp4_fused_experts(x, w13.with_layout("chunk32"), w2.with_layout("chunk32"), topk_w, topk_ids,
                                expert_map=expert_map, apply_router_weight_on_input=on_input, backend="cpu")
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert (got[1] == 0).all()


@needs_kernel
def test_cpu_ops_are_opaque_to_dynamo():
    q = quantize(torch.randn(32, 64), "mxfp4").with_layout("chunk32")

    def f(x):
        return torch.relu(fp4_cpu.cpu_linear(x, q)) * 2

    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))


def test_fallback_when_the_kernel_is_off_says_why_and_stays_correct():
    code = (
        "import torch\n"
        "from vllm_frontier.quantization import fp4_cpu\n"
        "from vllm_frontier.quantization.fp4_formats import quantize, dequantize\n"
        "from vllm_frontier.quantization.fp4_ops import fp4_linear\n"
        "ok, why = fp4_cpu.kernel_status()\n"
        "assert not ok and 'FRONTIER_FP4_CPU_KERNEL=0' in why, why\n"
        "q = quantize(torch.randn(8, 64), 'nvfp4').with_layout('chunk32')\n"
        "x = torch.randn(2, 64)\n"
        "torch.testing.assert_close(fp4_linear(x, q), x @ dequantize(q).T, rtol=1e-5, atol=1e-5)\n"
        "from vllm_frontier.quantization.device import pays_on_this_device\n"
        "pays, reason = pays_on_this_device()\n"
        "assert not pays and 'FRONTIER_FP4_CPU_KERNEL=0' in reason, reason\n"
        "print('OK')\n")
    env = dict(os.environ, FRONTIER_FP4_CPU_KERNEL="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    assert "not available" in r.stderr  # the one log line


def test_failed_build_falls_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fp4_cpu._load.cache_clear()
    try:
        lib, why = fp4_cpu._load()
        if "AVX" in why or "lacks" in why:
            pytest.skip(f"kernel not buildable here anyway: {why}")
        assert lib is None and "building the kernel failed" in why
    finally:
        fp4_cpu._load.cache_clear()


def test_pays_on_this_device_is_a_bool_and_a_reason():
    from vllm_frontier.quantization.device import pays_on_this_device

    pays, reason = pays_on_this_device()
    assert isinstance(pays, bool) and reason
    if not torch.cuda.is_available():
        assert pays == AVAILABLE and WHY in reason  # on CPU: FP4 pays exactly when the kernel runs
