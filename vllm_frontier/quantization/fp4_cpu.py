"""FP4 W4A16 on CPU: a small AVX-512 kernel (csrc/fp4_cpu.cpp) that decodes FP4 inside the dot product.

Imports torch only (never vllm). The kernel is a plain shared library built at first use with the machine's
g++ (`-O3 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512bf16`, a second or two), cached under
`$XDG_CACHE_HOME/vllm_frontier/fp4_cpu/<hash of source and flags>/`, and called through ctypes. If the CPU lacks
AVX512_BF16 or the build fails, `kernel_status()` says why (logged once) and callers use the torch path.

Layout: the kernel reads weights in the "chunk32" layout (`fp4_formats.to_chunk32`): per row, chunk c of 32
values is 16 bytes, byte j = code[32c + j] | code[32c + 16 + j] << 4 (the canonical layout pairs neighbours in
a byte). Scales and the global scale are the canonical ones.

Entry points, shapes as in `fp4_ops`:
- `cpu_linear(x [M, K], q [N, K] chunk32) -> [M, N]`, x bf16 or fp32, K % 32 == 0;
- `cpu_fused_experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights, topk_ids, ...) -> [T, H]`.
Both are also `torch.ops.frontier_fp4.*` custom ops, so a compiled (dynamo) model graph calls them opaquely.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from vllm_frontier.kernels.cpp_build import build_library, cpu_flags

from .fp4_formats import FP4Tensor

__all__ = [
    "kernel_status",
    "kernel_available",
    "cpu_linear",
    "cpu_fused_experts",
    "supports",
    "ACT_CODES",
]

logger = logging.getLogger("vllm.frontier.quantization")

_SRC = Path(__file__).resolve().parent / "csrc" / "fp4_cpu.cpp"
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-mfma", "-fno-math-errno"]
_CPU_FLAGS_NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_ABI = 1


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("FRONTIER_FP4_CPU_KERNEL", "1") == "0":
        return None, "disabled by FRONTIER_FP4_CPU_KERNEL=0"
    missing = [f for f in _CPU_FLAGS_NEEDED if f not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    try:
        lib = ctypes.CDLL(str(build_library(_SRC, _FLAGS, "fp4_cpu")))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch path, say why
        return None, f"building the kernel failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if lib.fp4_cpu_abi_version() != _ABI:
        return None, "stale kernel build (ABI mismatch)"
    P, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    for name in ("fp4_gemm_bf16", "fp4_gemm_f32"):
        getattr(lib, name).argtypes = [P, I64, I64, P, P, F, I64, I64, I, P]
        getattr(lib, name).restype = None
    for name in ("fp4_moe_bf16", "fp4_moe_f32"):
        getattr(lib, name).argtypes = [P, I64, I64, I64, I64, I64, P, P, P, P, P, P, P, P, I, I, I, P]
        getattr(lib, name).restype = None
    return lib, "AVX-512 BF16 kernel (csrc/fp4_cpu.cpp)"


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[bool, str]:
    """(available, reason): whether the CPU FP4 kernel runs here, and what it is or why it does not."""
    lib, why = _load()
    if lib is None:
        logger.warning("frontier_fp4: the CPU FP4 kernel is not available (%s); FP4 layers on CPU dequantize "
                       "each weight before its matmul (slower than bf16)", why)
    return lib is not None, why


def kernel_available() -> bool:
    return kernel_status()[0]


def supports(x_dtype: torch.dtype, k: int) -> bool:
    """Whether the kernel takes activations of `x_dtype` and a reduction size k (it needs k % 32 == 0)."""
    return x_dtype in (torch.bfloat16, torch.float32) and k % 32 == 0 and kernel_available()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _linear_impl(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                 group: int) -> torch.Tensor:
    lib, _ = _load()
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = packed.shape[0]
    out = torch.empty((M, N), dtype=x.dtype)
    fn = lib.fp4_gemm_bf16 if x.dtype == torch.bfloat16 else lib.fp4_gemm_f32
    fn(_ptr(x), x.stride(0), M, _ptr(packed), _ptr(scales), float(global_scale), N, K, group, _ptr(out))
    return out


def _experts_impl(x: torch.Tensor, w13_packed: torch.Tensor, w13_scales: torch.Tensor, w13_global: torch.Tensor,
                  w2_packed: torch.Tensor, w2_scales: torch.Tensor, w2_global: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, group: int, act: int,
                  weight_on_input: bool) -> torch.Tensor:
    lib, _ = _load()
    x = x.contiguous()
    T, H = x.shape
    E, I2 = w13_packed.shape[0], w13_packed.shape[1]
    tw = topk_weights.to(torch.float32).contiguous()
    ids = topk_ids.to(torch.int32).contiguous()
    g13 = w13_global.to(torch.float32).contiguous()
    g2 = w2_global.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    fn = lib.fp4_moe_bf16 if x.dtype == torch.bfloat16 else lib.fp4_moe_f32
    fn(_ptr(x), T, H, I2 // 2, E, ids.shape[1], _ptr(w13_packed), _ptr(w13_scales), _ptr(g13), _ptr(w2_packed),
       _ptr(w2_scales), _ptr(g2), _ptr(tw), _ptr(ids), group, act, int(weight_on_input), _ptr(out))
    return out


@torch.library.custom_op("frontier_fp4::cpu_linear", mutates_args=(), device_types="cpu")
def _linear_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
               group: int) -> torch.Tensor:
    return _linear_impl(x, packed, scales, global_scale, group)


@_linear_op.register_fake
def _(x, packed, scales, global_scale, group):
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.custom_op("frontier_fp4::cpu_fused_experts", mutates_args=(), device_types="cpu")
def _experts_op(x: torch.Tensor, w13_packed: torch.Tensor, w13_scales: torch.Tensor, w13_global: torch.Tensor,
                w2_packed: torch.Tensor, w2_scales: torch.Tensor, w2_global: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, group: int, act: int, weight_on_input: bool) -> torch.Tensor:
    return _experts_impl(x, w13_packed, w13_scales, w13_global, w2_packed, w2_scales, w2_global, topk_weights,
                         topk_ids, group, act, weight_on_input)


@_experts_op.register_fake
def _(x, *args):
    return torch.empty_like(x)


def cpu_linear(x: torch.Tensor, q: FP4Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T, W = q [N, K] in the chunk32 layout; x bf16 or fp32 (see `supports`)."""
    args = (x, q.packed, q.scales, q.global_scale, q.group_size)
    return _linear_op(*args) if torch.compiler.is_compiling() else _linear_impl(*args)


def cpu_fused_experts(x: torch.Tensor, w13: FP4Tensor, w2: FP4Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, *, activation: str, apply_router_weight_on_input: bool) -> torch.Tensor:
    """The routed sum of `fp4_ops.fp4_fused_experts` in one kernel call; topk_ids are LOCAL expert ids here
    (-1 or out of range: the assignment contributes nothing). w13 / w2 in the chunk32 layout."""
    args = (x, w13.packed, w13.scales, w13.global_scale, w2.packed, w2.scales, w2.global_scale, topk_weights,
            topk_ids, w13.group_size, ACT_CODES[activation], apply_router_weight_on_input)
    return _experts_op(*args) if torch.compiler.is_compiling() else _experts_impl(*args)
