"""`Feature`: the one object per feature that the plugin layer loops over.

A feature object owns the decision and the wiring of one feature, for every launch path alike
(`vllm-frontier serve`, `vllm serve --plugin`, `python -m vllm.entrypoints.openai.api_server` with `FRONTIER_*`,
offline `LLM(...)` with `FRONTIER_*`), because all of them build a `VllmConfig` and vLLM calls the platform's
`check_and_update_config` on it:

- `applies(hf_config)`: None when the feature can serve this model, else the reason it stays off;
- `unmet(vllm_config)`: None when the deployment has what the feature needs (expert parallelism, a P/D secret),
  else the reason; a named feature then ends the launch with that reason, `--plugin all` leaves it off;
- `not_worth_it()`: None when the feature pays on this device, else why `--plugin all` leaves it off here
  (it stays available by name);
- `update_config(vllm_config)`: the vLLM config changes the feature needs (speculative config, KV-transfer
  config, quantization method, block size), made in vLLM's own config path;
- `register()`: what the feature hooks into vLLM in every process (custom ops, connector, quantization config);
- `register_kernel_overrides(device_type, capability)`: in each worker, torch replacements for vLLM Triton
  kernels the feature reaches where they cannot run (CPU; CUDA below sm_89 for FP8 kernels);
- `attention_backend(selector)`: the class path of our attention backend for a layer, or None.

Feature objects import their feature package only inside these methods, so a switched-off feature costs
nothing at vLLM start-up.
"""

from __future__ import annotations

from .features import Features


class Feature:
    """Base: a feature that needs nothing beyond its switch. Subclasses override what they need."""

    name: str = ""

    def __init__(self, settings: Features):
        self.settings = settings

    def applies(self, hf_config) -> str | None:
        return None

    def unmet(self, vllm_config) -> str | None:
        return None

    def not_worth_it(self) -> str | None:
        return None

    def update_config(self, vllm_config) -> None:
        pass

    def register(self) -> None:
        pass

    def register_kernel_overrides(self, device_type: str, capability: tuple[int, int] | None) -> None:
        """In each worker: replacements for vLLM Triton kernels this feature reaches that cannot run here."""

    def attention_backend(self, selector) -> str | None:
        return None


def text_config(hf_config):
    """The language model's config (multimodal configs nest it)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config

