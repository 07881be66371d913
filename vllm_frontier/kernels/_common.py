"""Shared helpers of the kernels package: backend dispatch and input validation.

Internal module: nothing here is public API.
"""

from __future__ import annotations

import os

import torch

# Triton chooses the interpreter when a kernel is *decorated* (import time), so the
# flag is read once, here, when the package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = (None, "auto", "triton", "torch")


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Decide whether an op runs its Triton kernel (True) or its torch reference (False).

    backend None / "auto": Triton when the first tensor is on CUDA, else the torch reference.
    "triton": Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before import.
    "torch": the torch reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = tensors[0].is_cuda
    if backend in (None, "auto"):
        return on_cuda
    if not on_cuda and not INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing vllm_frontier.kernels"
        )
    return True


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()
