"""The `vllm.platform_plugins` entry point.

vLLM's CPU platform refuses sparse attention and owns the serve parser hook, so on CPU we activate a
`CpuPlatform` subclass (`platform_cpu.FrontierCpuPlatform`) that behaves exactly like the built-in one until
a feature toggle is on; on CUDA a `CudaPlatform` subclass adds the `--plugin` flag and the DSA/MLA backend
choice. Elsewhere (ROCm, XPU, TPU, Zen CPU) we activate nothing and vLLM picks its own platform.

This module must not import vLLM layers at import time: it runs while `vllm.platforms.current_platform`
is being resolved.
"""

from __future__ import annotations


def activate() -> str | None:
    """Return our platform class's qualname where vLLM would pick its CPU or CUDA platform, else None."""
    import vllm.platforms as platforms

    if platforms.cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform":
        return "vllm_frontier.plugins.platform_cpu.FrontierCpuPlatform"
    if platforms.cuda_platform_plugin() == "vllm.platforms.cuda.CudaPlatform":
        return "vllm_frontier.plugins.platform_cuda.FrontierCudaPlatform"
    return None
