"""vLLM adapter: the `frontier_fp4` quantization config (online NVFP4 / MXFP4, weight-only W4A16).

vLLM builds `FrontierFP4Config()` with no arguments (NVFP4) when `--quantization frontier_fp4` is given for a
checkpoint without a quantization config (our `get_config_filenames()` is empty), once, in the API process, and
pickles it to the engine core and workers. With the fp4 feature on (`FRONTIER_FP4`, `--plugin fp4[=mxfp4]`) the
plugin's FP4 feature object builds it in the format asked for.

- Linear layers (`LinearBase`) get `FP4LinearMethod`: the bf16 weight is created on the meta device and
  quantized as soon as its layer has loaded (vLLM's layerwise online-quantization loading), then replaced by
  `weight_packed` / `weight_scale` / `weight_global_scale`. `apply` works for any input, including the
  identity matrix that MLA uses to read `kv_b_proj`'s weight.
- The routed experts (`RoutedExperts`) get `FP4MoEMethod`, same idea for `w13_weight` [E, 2I, H] and
  `w2_weight` [E, H, I]; the routed sum runs in `fp4_ops.fp4_fused_experts` (Triton grouped GEMM on CUDA,
  the AVX-512 kernel of `fp4_cpu` on CPU). Shared experts and the routed scaling factor stay with vLLM's MoE
  runner.
- On CPU, weights are kept in the CPU kernel's chunk32 layout when that kernel runs here (`fp4_cpu`).
- A layer whose K is not a multiple of the block size (16 / 32), or an MoE layer with biases or an
  unsupported activation, stays unquantized with one log line naming it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from .fp4_formats import FORMATS, GROUP_SIZE
from .fp4_ops import ACTIVATIONS

logger = logging.getLogger("vllm.frontier.quantization")

QUANT_NAME = "frontier_fp4"


class FrontierFP4Config(QuantizationConfig):
    """Online FP4 (NVFP4 / MXFP4) weight-only quantization of an unquantized checkpoint."""

    def __init__(self, fmt: str = "nvfp4"):
        super().__init__()
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise ValueError(f"frontier_fp4: unknown format {fmt!r}; choose one of {', '.join(FORMATS)} "
                             "(FRONTIER_FP4=nvfp4|mxfp4)")
        self.fmt = fmt
        logger.info("frontier_fp4: weights are quantized online to %s (weight-only, W4A16)", fmt)

    def __repr__(self) -> str:
        return f"FrontierFP4Config(fmt={self.fmt!r})"

    def get_name(self) -> str:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's tl.dot; bf16 activations need 80, a CUDA limit of the dtype rather than of FP4

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no file: vLLM calls FrontierFP4Config() for an unquantized checkpoint

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FrontierFP4Config":
        """From a checkpoint's `quantization_config` ({"quant_method": "frontier_fp4", "fmt": "nvfp4"})."""
        return cls(config.get("fmt") or "nvfp4")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase

        from .fp4_methods import FP4LinearMethod, FP4MoEMethod

        if isinstance(layer, LinearBase):
            return FP4LinearMethod(self.fmt, prefix)
        if isinstance(layer, RoutedExperts):
            moe = layer.moe_config
            group = GROUP_SIZE[self.fmt]
            act = getattr(moe.activation, "value", str(moe.activation))
            reason = None
            if moe.has_bias:
                reason = "expert biases are not supported"
            elif not moe.is_act_and_mul or act not in ACTIVATIONS:
                reason = f"activation {act!r} is not one of the gated {ACTIVATIONS}"
            elif moe.hidden_dim % group or moe.intermediate_size_per_partition % group:
                reason = (f"hidden {moe.hidden_dim} / intermediate {moe.intermediate_size_per_partition} are not "
                          f"multiples of the {self.fmt} block size {group}")
            if reason:
                logger.info("frontier_fp4: experts %s stay unquantized: %s", prefix, reason)
                return None
            return FP4MoEMethod(moe, self.fmt)
        return None
