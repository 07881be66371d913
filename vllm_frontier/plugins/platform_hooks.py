"""The platform hooks our CPU and CUDA platform subclasses share (mixed in before vLLM's platform class).

With every toggle off each hook defers to vLLM's platform, so vLLM behaves as without the package, except
that the serve parser accepts `--plugin`.
"""

from __future__ import annotations

from .cli_flag import add_plugin_argument


class FrontierPlatformHooks:
    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        add_plugin_argument(parser)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        from . import attention_backend

        path = attention_backend(attn_selector_config)
        if path is not None:
            return path
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        super().register_triton_kernel_overrides()
        from . import register_kernel_overrides

        capability = cls.get_device_capability()
        register_kernel_overrides(cls.device_type, None if capability is None else tuple(capability))

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from . import resolve

        resolve(vllm_config)
