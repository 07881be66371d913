"""`FrontierCpuPlatform`: vLLM's CPU platform plus the hooks our features need (see `platform_hooks`).

Imports of vLLM layers stay inside methods (this module loads while `current_platform` is being resolved).
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from .platform_hooks import FrontierPlatformHooks


class FrontierCpuPlatform(FrontierPlatformHooks, CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from . import exit_on_feature_error, settings
        from .cpu_memory import size_kv_cache

        if settings().any:
            exit_on_feature_error(lambda: size_kv_cache(vllm_config))
