"""Whether FP4 (`frontier_fp4`) pays for itself on this machine: for `--plugin all` to decide. Imports torch only.

CPU: it pays when the AVX-512 BF16 kernel (`fp4_cpu`) runs: decode then reads 4.5 bits per weight instead of
16 and beats bf16 (benchmarks/fp4.py --decode, results in benchmarks/results/fp4/). Without the kernel (no
AVX512_BF16, no compiler, FRONTIER_FP4_CPU_KERNEL=0) every matmul first dequantizes its whole weight: decode
measured ~0.07x of bf16, so it does not pay.
CUDA: FP4 keeps weights 3.5x smaller; linear layers run the decode-layout GEMM (`w4a16_decode_gemm`, weights
permuted at load), which has not been timed on a GPU yet. The pairs-layout GEMM before it was not faster than
bf16's (0.87-1.02x at M = 1, 0.47-0.67x at M = 16 on an H100, benchmarks/results/fp4/fp4_gpu_h100.json). Until a
GPU run (benchmarks/gpu_check.py) shows the decode GEMM ahead of bf16, `--plugin all` leaves FP4 off there
(`--plugin fp4` still switches it on).
"""

from __future__ import annotations

import torch

__all__ = ["pays_on_this_device"]


def pays_on_this_device() -> tuple[bool, str]:
    """(pays, why): whether switching FP4 on by default helps on the device vLLM will use here, and why."""
    if torch.cuda.is_available():
        from .fp4_ops import triton_available

        if triton_available(torch.device("cuda")):
            return False, ("CUDA: the decode-layout W4A16 GEMM is not measured on a GPU yet (the previous kernel "
                           "reached 0.87-1.02x of bf16 at M=1 on an H100; benchmarks/gpu_check.py times it); "
                           "`--plugin fp4` switches FP4 on for 3.5x smaller weights")
        return False, "CUDA without an importable Triton: FP4 would dequantize every weight before its matmul"
    from .fp4_cpu import kernel_status

    ok, why = kernel_status()
    if ok:
        return True, f"CPU: {why} decodes FP4 inside the matmul; batch-1 decode is faster than bf16"
    return False, f"CPU: the FP4 kernel is unavailable ({why}); the fallback dequantizes every weight before " \
                  "its matmul (decode ~0.07x of bf16)"
