"""FP4 (NVFP4 / MXFP4) online weight quantization for vLLM: `--quantization frontier_fp4`.

vLLM-free parts: `fp4_formats` (the formats and torch references), `w4a16_gemm` (Triton kernels on the
canonical layout: any M, and the experts' grouped GEMM), `w4a16_decode_gemm` + `fp4_decode_layout` (the GEMM
built for decode, M <= 16, on weights permuted once at load; CUDA linear layers use it for every M),
`fp4_cpu` (the AVX-512 CPU kernel, csrc/fp4_cpu.cpp, built with g++ at first use), `fp4_ops` (device dispatch),
`device.pays_on_this_device()` (whether FP4 helps here, for `--plugin all`). The vLLM adapter is `fp4_config`
(+ `fp4_methods`), imported only by `register()`.
"""

from __future__ import annotations

__all__ = ["register", "QUANT_NAME"]

QUANT_NAME = "frontier_fp4"


def register() -> None:
    """Register the `frontier_fp4` quantization config with vLLM (idempotent, cheap).

    Changes nothing in vLLM unless a model is served with `--quantization frontier_fp4`.
    """
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if QUANT_NAME in QUANTIZATION_METHODS:
        return
    from .fp4_config import FrontierFP4Config

    register_quantization_config(QUANT_NAME)(FrontierFP4Config)

