"""Shared helpers of the kernels package: backend dispatch and input validation.

Internal module: nothing here is public API.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

# Triton chooses the interpreter when a kernel is *decorated* (import time), so the
# flag is read once, here, when the package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = (None, "auto", "triton", "torch")

# FRONTIER_FORCE_TRITON=1 (with TRITON_INTERPRET=1 on CPU): backend None / "auto" runs the Triton kernels on any
# tensor, so a vLLM CPU engine takes the exact code path a GPU runs (tests of the GPU path).
FORCE_TRITON = os.environ.get("FRONTIER_FORCE_TRITON", "0") == "1"
if FORCE_TRITON:
    logging.getLogger("vllm.frontier.kernels").warning(
        "vllm-frontier kernels: FRONTIER_FORCE_TRITON=1, Triton kernels on every device (interpreter: %s)", INTERPRET)


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Decide whether an op runs its Triton kernel (True) or its torch reference (False).

    backend None / "auto": Triton when the first tensor is on CUDA (or FRONTIER_FORCE_TRITON=1, or a target is
    pinned by assume_target), else the torch reference.
    "triton": Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before import.
    "torch": the torch reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = tensors[0].is_cuda
    if backend in (None, "auto") and not (on_cuda or FORCE_TRITON or _PINNED_TARGET[0] is not None):
        return False
    if not on_cuda and not INTERPRET and _PINNED_TARGET[0] is None:
        raise RuntimeError(
            "Triton kernels on CPU tensors (backend='triton' or FRONTIER_FORCE_TRITON=1) need the Triton "
            "interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing vllm_frontier.kernels"
        )
    return True


# A CUDA target pinned by assume_target(): launchers then pick that GPU's configs for any tensor.
_PINNED_TARGET: list[tuple[int, int] | None] = [None]


@contextlib.contextmanager
def assume_target(capability: tuple[int, int] | None):
    """Make the launchers choose configs and code paths for CUDA compute capability ``capability`` (e.g.
    ``(8, 0)``), whatever device the tensors are on. Used by the offline compile check (launches intercepted)
    and by interpreter tests of the sm_80 code paths. None: the tensors' own device."""
    old = _PINNED_TARGET[0]
    _PINNED_TARGET[0] = None if capability is None else tuple(capability)
    try:
        yield
    finally:
        _PINNED_TARGET[0] = old


def current_device() -> torch.device:
    """The CUDA device in use, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def target_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the launch targets: the pinned one, the CUDA device's, or None (CPU interpreter)."""
    if _PINNED_TARGET[0] is not None:
        return _PINNED_TARGET[0]
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def compiles_for_gpu(device: torch.device) -> bool:
    """Whether a launch compiles for a GPU (a CUDA tensor, or a pinned target outside the interpreter): then
    bf16 dots and GPU tile sizes; under the interpreter fp32 dots (its bf16 arithmetic is wrong)."""
    return device.type == "cuda" or (_PINNED_TARGET[0] is not None and not INTERPRET)


def native_fp8(device: torch.device) -> bool:
    """Whether kernels may reinterpret bytes as Triton's ``float8e4nv``: only from sm_89 on (Triton refuses the
    type below). Elsewhere the kernels decode e4m3 codes with integer arithmetic (same values). The CPU
    interpreter supports the type."""
    cap = target_capability(device)
    return cap is None or cap >= (8, 9)


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
