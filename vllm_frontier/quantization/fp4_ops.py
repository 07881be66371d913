"""Device dispatch for FP4 weight-only compute: the Triton kernels on CUDA (linear layers in the decode layout of
`w4a16_decode_gemm`, experts in the pairs layout), the AVX-512 kernel on CPU (`fp4_cpu`, weights in the chunk32
layout), a torch path for anything else.

Imports torch (and triton when present), never vllm. The torch path dequantizes a weight to the activation
dtype just before its matmul and drops it right after, so only the FP4 bytes stay resident; it is the
reference and the fallback (no AVX512_BF16, a failed kernel build, fp16 activations, K % 32 != 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp4_formats import FP4Tensor, dequantize
from .fp4_decode_layout import FP4Decode, unpermute_fp4

__all__ = ["fp4_linear", "fp4_fused_experts", "triton_available", "ACTIVATIONS", "BACKENDS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on `device` (a CUDA device and an importable triton)."""
    if device.type != "cuda":
        return False
    try:
        from . import w4a16_gemm  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ("auto", "triton", "cpu", "torch")


def _backend(backend: str, x: torch.Tensor, q: FP4Tensor) -> str:
    """The backend that runs: "auto" picks Triton on CUDA, the CPU kernel for chunk32 weights it supports."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if triton_available(x.device):
        return "triton"
    if x.device.type == "cpu" and q.layout == "chunk32":
        from . import fp4_cpu

        if fp4_cpu.supports(x.dtype, q.shape[-1]):
            return "cpu"
    return "torch"


def fp4_linear(x: torch.Tensor, q: FP4Tensor | FP4Decode, bias: torch.Tensor | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T (+ bias) with W [N, K] in FP4. x: [..., K] -> y: [..., N] in x.dtype.

    q: an FP4Tensor (any layout) or an FP4Decode (the decode kernel's layout, `permute_fp4`).
    backend: "auto" (Triton on CUDA, the CPU kernel for a chunk32 weight, torch otherwise), "triton" (also
        under TRITON_INTERPRET=1), "cpu" (chunk32 weight, bf16/fp32 x), "torch".
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(q, FP4Decode):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} unknown; choose one of {', '.join(BACKENDS)}")
        if backend == "triton" or (backend == "auto" and triton_available(x2.device)):
            from .w4a16_decode_gemm import w4a16_decode_gemm

            y = w4a16_decode_gemm(x2, q)
        else:  # the decode layout is a GPU layout: anything else dequantizes its canonical form
            y = F.linear(x2, dequantize(unpermute_fp4(q), x.dtype))
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])
    which = _backend(backend, x2, q)
    if which == "triton":
        from .w4a16_gemm import w4a16_gemm

        y = w4a16_gemm(x2, q.with_layout("pairs"))
    elif which == "cpu":
        from .fp4_cpu import cpu_linear

        y = cpu_linear(x2, q.with_layout("chunk32"))
    else:
        y = F.linear(x2, dequantize(q, x.dtype))
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def _expert(q: FP4Tensor, e: int) -> FP4Tensor:
    return FP4Tensor(q.fmt, q.packed[e], q.scales[e], q.global_scale[e], q.layout)


def _act_and_mul(h: torch.Tensor, activation: str) -> torch.Tensor:
    d = h.shape[-1] // 2
    gate, up = h[..., :d], h[..., d:]
    if activation == "silu":
        a = F.silu(gate)
    elif activation == "gelu":
        a = F.gelu(gate)
    elif activation == "gelu_tanh":
        a = F.gelu(gate, approximate="tanh")
    else:
        raise ValueError(f"activation {activation!r} unsupported; choose one of {', '.join(ACTIVATIONS)}")
    return a * up


def fp4_fused_experts(x: torch.Tensor, w13: FP4Tensor, w2: FP4Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, *, expert_map: torch.Tensor | None = None,
                      apply_router_weight_on_input: bool = False, activation: str = "silu",
                      backend: str = "auto") -> torch.Tensor:
    """Routed experts with FP4 weights: out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].

    Args:
        x: [T, H] activations.
        w13: FP4Tensor [E, 2I, H]: gate rows [:I], up rows [I:] of each local expert.
        w2: FP4Tensor [E, H, I].
        topk_weights: [T, k] router weights; topk_ids: [T, k] global expert ids.
        expert_map: optional int [E_global] global -> local expert id, -1 where the expert is not local
            (those assignments contribute nothing here).
        apply_router_weight_on_input: scale x by the router weight before the experts (and not after).
        activation: gated activation, one of ACTIVATIONS.
        backend: "auto" (Triton grouped GEMM on CUDA, the CPU kernel for chunk32 weights, else a per-expert
            torch loop), "triton", "cpu", "torch".
    Returns:
        [T, H] in x.dtype (the routed sum only: no shared experts, no routed scaling factor).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} unsupported; choose one of {', '.join(ACTIVATIONS)}")
    which = _backend(backend, x, w13)
    if which == "cpu" and w2.shape[-1] % 32 == 0:
        from .fp4_cpu import cpu_fused_experts

        ids = topk_ids if expert_map is None else expert_map.to(torch.int32)[topk_ids.long()]
        return cpu_fused_experts(x, w13.with_layout("chunk32"), w2.with_layout("chunk32"), topk_weights, ids,
                                 activation=activation, apply_router_weight_on_input=apply_router_weight_on_input)
    if which == "cpu":
        which = "torch"
    T, H = x.shape
    E = w13.packed.shape[0]
    k = topk_ids.shape[1]
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    flat = ids.reshape(-1)
    valid = flat >= 0
    sort_key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.argsort(sort_key, stable=True)
    counts = torch.bincount(sort_key, minlength=E + 1)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    token = order // k
    rows = x[token]
    w_sorted = topk_weights.reshape(-1)[order].to(torch.float32)
    if apply_router_weight_on_input:
        rows = (rows.float() * w_sorted[:, None]).to(x.dtype)
    if which == "triton":
        from .w4a16_gemm import w4a16_grouped_gemm

        h = w4a16_grouped_gemm(rows, w13.with_layout("pairs"), offsets)
        a = _act_and_mul(h, activation).contiguous()
        o = w4a16_grouped_gemm(a, w2.with_layout("pairs"), offsets)
        keep = torch.arange(flat.numel(), device=x.device) < offsets[E]
        o = torch.where(keep[:, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    else:
        o = torch.zeros((flat.numel(), H), dtype=x.dtype, device=x.device)
        offs = offsets.tolist()
        for e in range(E):
            a0, b0 = offs[e], offs[e + 1]
            if b0 == a0:
                continue
            h = F.linear(rows[a0:b0], dequantize(_expert(w13, e), x.dtype))
            o[a0:b0] = F.linear(_act_and_mul(h, activation), dequantize(_expert(w2, e), x.dtype))
    o = o.float()
    if not apply_router_weight_on_input:
        o = o * w_sorted[:, None]
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    out.index_add_(0, token, o)
    return out.to(x.dtype)
