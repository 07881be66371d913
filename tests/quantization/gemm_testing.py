"""Shared by the W4A16 GEMM tests: the test device and the output check against a torch reference.

Tolerances relative to the output's magnitude: fp32 1e-5 (both sides accumulate in fp32, in another order);
fp16 one fp16 rounding of the output plus that order difference; bf16 likewise with bf16's rounding.
"""

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    scale = ref.float().abs().max().clamp(min=1.0)
    diff = (got.float() - ref.float()).abs()
    bad = diff > TOL[got.dtype] * (ref.float().abs() + scale)
    assert not bad.any(), f"max diff {diff.max().item():.3g} at {bad.nonzero()[0].tolist()}"
