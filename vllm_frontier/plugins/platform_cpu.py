"""`FrontierCpuPlatform`: vLLM's CPU platform plus the hooks our features need (see `platform_hooks`).

Imports of vLLM layers stay inside methods (this module loads while `current_platform` is being resolved).
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from . import model_support
from .features import load_features
from .platform_hooks import FrontierPlatformHooks


class FrontierCpuPlatform(FrontierPlatformHooks, CpuPlatform):
    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        super().register_triton_kernel_overrides()
        model_support.register_cpu_kernel_overrides(load_features())
