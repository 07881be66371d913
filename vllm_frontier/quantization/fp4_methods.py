"""vLLM quantize methods of `frontier_fp4` (see `fp4_config`): FP4 linear layers and FP4 routed experts.

Imported lazily by `FrontierFP4Config.get_quant_method`, so registering the config stays cheap.

Streaming quantization at load: the methods create their full-precision weights on the meta device and hand
the layer to vLLM's layerwise loading (`uses_meta_device` + `initialize_online_processing`, the mechanism of
vLLM's own online FP8/MXFP4 methods): the loader buffers a layer's checkpoint tensors until all have arrived,
materializes that one layer, loads it and calls `process_weights_after_loading`, which quantizes (in row
chunks) and drops the bf16 weight. Peak memory while loading is the FP4 model plus about one layer in bf16,
never the whole bf16 model.

On CPU with the AVX-512 kernel available (`fp4_cpu`), weights are stored in its chunk32 layout. On CUDA, linear
layers are permuted once, here, into the layout of the decode GEMM (`w4a16_decode_gemm.permute_fp4`, used for every
M); experts keep the pairs layout of the grouped GEMM.
"""

from __future__ import annotations

import logging

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from .fp4_cpu import cpu_fused_experts, cpu_linear
from .fp4_formats import GROUP_SIZE, FP4Tensor, quantize_chunked
from .fp4_ops import fp4_fused_experts, fp4_linear, triton_available
from .fp4_decode_layout import FP4Decode, permute_fp4

logger = logging.getLogger("vllm.frontier.quantization")


def _kernel_layout(weight: torch.Tensor) -> str:
    """The layout the device's kernel reads: chunk32 for the CPU kernel (when it runs here), decode for a linear
    layer's weight on CUDA (the decode GEMM), else pairs (the experts' grouped GEMM, the torch fallback)."""
    if weight.device.type == "cuda" and weight.dim() == 2 and triton_available(weight.device):
        return "decode"
    if weight.device.type == "cpu" and weight.shape[-1] % 32 == 0:
        from .fp4_cpu import kernel_available

        if kernel_available():
            return "chunk32"
    return "pairs"


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its growing mmap threshold in the
    heap): without this the bf16 layers quantized and dropped one by one still count in the worker's RSS."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _replace_with_fp4(layer: torch.nn.Module, name: str, fmt: str) -> None:
    """Quantize parameter `name`, drop it, and register `<stem>_packed`, `_scale`, `_global_scale` (pairs / chunk32
    layouts) or `<stem>_packed` (int32 words), `_scale`, `_post`, `_exp_bias` (the decode layout)."""
    stem = name[: -len("_weight")] if name.endswith("_weight") else name
    w = getattr(layer, name).data
    layout = _kernel_layout(w)
    q = quantize_chunked(w, fmt)
    delattr(layer, name)
    del w
    if layout == "decode":
        d = permute_fp4(q)
        if d.exact:  # else (MXFP4 block scales spanning > 24 binades) the pairs kernel, exact for any scales
            # `<stem>_packed` holds the int32 words (vLLM's MLA finds kv_b_proj's device through `weight_packed`)
            for suffix, t in (("packed", d.words), ("scale", d.scales), ("post", d.post), ("exp_bias", d.exp_bias)):
                layer.register_parameter(f"{stem}_{suffix}", torch.nn.Parameter(t, requires_grad=False))
            setattr(layer, f"{stem}_fp4_layout", layout)
            setattr(layer, f"{stem}_fp4_kb", (d.k, d.kb))
            return
        layout = "pairs"
    q = q.with_layout(layout)
    for suffix, t in (("packed", q.packed), ("scale", q.scales), ("global_scale", q.global_scale)):
        layer.register_parameter(f"{stem}_{suffix}", torch.nn.Parameter(t.contiguous(), requires_grad=False))
    setattr(layer, f"{stem}_fp4_layout", layout)


def _fp4_of(layer: torch.nn.Module, stem: str, fmt: str) -> FP4Tensor | FP4Decode:
    if getattr(layer, f"{stem}_fp4_layout") == "decode":
        k, kb = getattr(layer, f"{stem}_fp4_kb")
        return FP4Decode(fmt, getattr(layer, f"{stem}_packed"), getattr(layer, f"{stem}_scale"),
                         getattr(layer, f"{stem}_post"), getattr(layer, f"{stem}_exp_bias"), k, kb)
    return FP4Tensor(fmt, getattr(layer, f"{stem}_packed"), getattr(layer, f"{stem}_scale"),
                     getattr(layer, f"{stem}_global_scale"), getattr(layer, f"{stem}_fp4_layout"))


class FP4LinearMethod(LinearMethodBase):
    """Weight-only FP4 linear method: bf16 weight (on meta until its layer loads), FP4 after loading."""

    uses_meta_device = True

    def __init__(self, fmt: str, prefix: str):
        self.fmt = fmt
        self.prefix = prefix
        self.fallback: UnquantizedLinearMethod | None = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        group = GROUP_SIZE[self.fmt]
        if input_size_per_partition % group:
            logger.info("frontier_fp4: %s stays %s: its input size %d is not a multiple of the %s block size %d",
                        self.prefix, params_dtype, input_size_per_partition, self.fmt, group)
            self.fallback = UnquantizedLinearMethod()
            self.uses_meta_device = False
            return self.fallback.create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                input_size, output_size, params_dtype, **extra_weight_attrs)
        weight_loader = extra_weight_attrs.pop("weight_loader")
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype,
                             device="meta"),  # materialized by the layerwise loader when this layer loads
            input_dim=1, output_dim=0, weight_loader=weight_loader)
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        initialize_online_processing(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.fallback is not None:
            return self.fallback.process_weights_after_loading(layer)
        if getattr(layer, "fp4_format", None) is not None:
            return  # quantized already, as its weights finished loading
        _replace_with_fp4(layer, "weight", self.fmt)
        layer.fp4_format = self.fmt
        _return_freed_memory()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.apply(layer, x, bias)
        q = _fp4_of(layer, "weight", self.fmt)
        if q.layout == "chunk32" and x.dtype in (torch.bfloat16, torch.float32):
            # the CPU kernel (chunk32 is only chosen where it runs); straight call: cheap under dynamo too
            y = cpu_linear(x.reshape(-1, x.shape[-1]), q).reshape(*x.shape[:-1], q.shape[0])
            return y if bias is None else y + bias
        return fp4_linear(x, q, bias)


class FP4MoEMethod(FusedMoEMethodBase):
    """Weight-only FP4 routed experts (no modular kernel: `apply` computes the routed sum itself)."""

    uses_meta_device = True

    def __init__(self, moe: FusedMoEConfig, fmt: str):
        super().__init__(moe)
        self.fmt = fmt

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        group = GROUP_SIZE[self.fmt]
        if hidden_size % group or intermediate_size_per_partition % group:
            raise ValueError(f"frontier_fp4: experts of hidden {hidden_size} / intermediate "
                             f"{intermediate_size_per_partition} do not fit the {self.fmt} block size {group}")
        unpadded_hidden = self.moe.hidden_dim_unpadded or hidden_size
        unpadded_inter = self.moe.intermediate_size_per_partition_unpadded or intermediate_size_per_partition
        w13 = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size_per_partition, hidden_size,
                                             dtype=params_dtype, device="meta"), requires_grad=False)
        layer.register_parameter("w13_weight", w13)
        set_weight_attrs(w13, extra_weight_attrs)
        w13.weight_loader_numel = num_experts * 2 * unpadded_inter * unpadded_hidden
        w2 = torch.nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size_per_partition,
                                            dtype=params_dtype, device="meta"), requires_grad=False)
        layer.register_parameter("w2_weight", w2)
        set_weight_attrs(w2, extra_weight_attrs)
        w2.weight_loader_numel = num_experts * unpadded_hidden * unpadded_inter
        initialize_online_processing(layer)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        if getattr(layer, "fp4_format", None) is not None:
            return  # quantized already, as its weights finished loading
        _replace_with_fp4(layer, "w13_weight", self.fmt)
        _replace_with_fp4(layer, "w2_weight", self.fmt)
        layer.fp4_format = self.fmt
        _return_freed_memory()

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig | None:
        # Activations stay unquantized; the FP4 weights are used only by our own apply().
        return FusedMoEQuantConfig.make()

    def apply(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts, shared_experts_input) -> torch.Tensor:
        w13, w2 = _fp4_of(layer, "w13", self.fmt), _fp4_of(layer, "w2", self.fmt)
        if w13.layout == "chunk32" and w2.layout == "chunk32" and x.dtype in (torch.bfloat16, torch.float32):
            ids = topk_ids if layer.expert_map is None else layer.expert_map.to(torch.int32)[topk_ids.long()]
            return cpu_fused_experts(x, w13, w2, topk_weights, ids, activation=layer.activation.value,
                                     apply_router_weight_on_input=layer.apply_router_weight_on_input)
        return fp4_fused_experts(
            x, _fp4_of(layer, "w13", self.fmt), _fp4_of(layer, "w2", self.fmt), topk_weights, topk_ids,
            expert_map=layer.expert_map, apply_router_weight_on_input=layer.apply_router_weight_on_input,
            activation=layer.activation.value)
