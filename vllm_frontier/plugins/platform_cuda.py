"""`FrontierCudaPlatform`: vLLM's CUDA platform plus `--plugin` and our DSA/MLA backend choice."""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform

from .platform_hooks import FrontierPlatformHooks


class FrontierCudaPlatform(FrontierPlatformHooks, CudaPlatform):
    pass
