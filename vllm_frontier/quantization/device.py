"""Whether FP4 (`frontier_fp4`) pays for itself on this machine: for `--plugin all` to decide. Imports torch only.

CPU: it pays when the AVX-512 BF16 kernel (`fp4_cpu`) runs: decode then reads 4.5 bits per weight instead of
16 and beats bf16 (benchmarks/fp4.py --decode, results in benchmarks/results/fp4/). Without the kernel (no
AVX512_BF16, no compiler, FRONTIER_FP4_CPU_KERNEL=0) every matmul first dequantizes its whole weight: decode
measured ~0.07x of bf16, so it does not pay.
CUDA: FP4 keeps weights 3.5x smaller; linear layers run the decode-layout GEMM (`w4a16_decode_gemm`, weights
permuted at load). On an H200 it runs at 1.12-1.33x of bf16's matmul at M = 1 for NVFP4 and 0.73-0.82x for MXFP4
(benchmarks/gpu_check.py, benchmarks/results/gpu_check/gpu_check_h200.json): too little to make a lossy format
the default, so `--plugin all` leaves FP4 off there (`--plugin fp4` still switches it on).
"""

from __future__ import annotations

import torch

__all__ = ["pays_on_this_device"]


def pays_on_this_device() -> tuple[bool, str]:
    """(pays, why): whether switching FP4 on by default helps on the device vLLM will use here, and why."""
    if torch.cuda.is_available():
        from .fp4_ops import triton_available

        if triton_available(torch.device("cuda")):
            return False, ("CUDA: the W4A16 decode GEMM ran at 1.12-1.33x of bf16 at M=1 for NVFP4, 0.73-0.82x "
                           "for MXFP4 on an H200 (benchmarks/results/gpu_check/gpu_check_h200.json): too little "
                           "for a lossy default; `--plugin fp4` switches FP4 on for 3.5x smaller weights")
        return False, "CUDA without an importable Triton: FP4 would dequantize every weight before its matmul"
    from .fp4_cpu import kernel_status

    ok, why = kernel_status()
    if ok:
        return True, f"CPU: {why} decodes FP4 inside the matmul; batch-1 decode is faster than bf16"
    return False, f"CPU: the FP4 kernel is unavailable ({why}); the fallback dequantizes every weight before " \
                  "its matmul (decode ~0.07x of bf16)"
