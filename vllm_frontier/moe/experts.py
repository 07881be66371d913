"""Expert weights and batch-invariant expert math (torch only, no vLLM).

Why batch-invariant: expert parallelism changes *which* tokens share a matmul
call (a rank sees a different subset than the single-process reference does).
CPU BLAS picks different kernels for different row counts, so ``x[idx] @ W``
is not bit-equal to ``(x @ W)[idx]`` for small row counts (measured: 1e-6
differences at 1..7 rows in fp32).  Here every row is its own 1-row GEMM of the
same shape, and all per-row math runs on fixed zero-padded blocks of
:data:`ROW_BLOCK` rows, so a row's result depends only on that row.  This costs
about 3x a plain GEMM on CPU; it is what makes "lossless" testable as
bit-for-bit equality.  This is what makes "lossless" testable as
bit-for-bit equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROW_BLOCK = 64
"""Rows per call in :func:`row_blocked`.  Every op then sees a ``[64, D]`` tensor, whose
element count is a multiple of every SIMD width, so no element takes ATen's scalar
tail path (whose ``exp`` differs from the vectorised one in the last bit)."""


def row_blocked(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """Apply a row-wise ``fn`` to fixed ``[ROW_BLOCK, ...]`` zero-padded blocks of ``x``.

    ``fn`` maps ``[ROW_BLOCK, *D]`` to a tensor (or tuple of tensors) with leading
    dim ``ROW_BLOCK``; results are trimmed and concatenated, so row ``i`` of the
    result depends only on ``x[i]``.  ``x`` may have 0 rows.
    """
    m = x.shape[0]
    pad = (-m) % ROW_BLOCK if m else ROW_BLOCK
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    pieces = []
    for start in range(0, x.shape[0], ROW_BLOCK):
        out = fn(x[start:start + ROW_BLOCK])
        keep = max(0, min(ROW_BLOCK, m - start))
        pieces.append(tuple(o[:keep] for o in out) if isinstance(out, tuple) else out[:keep])
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*pieces))
    return torch.cat(pieces)


def bi_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T``.

    Args:
        x: ``[M, K]`` activations (any float dtype; M may be 0).
        weight: ``[N, K]`` weight, same dtype as ``x``.

    Returns:
        ``[M, N]`` in ``x.dtype``; row ``i`` depends only on ``x[i]``.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"bi_linear expects x [M, K] and weight [N, K], got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return row_blocked(lambda b: rowwise_linear(b, weight), x)


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` as one 1-row GEMM per row (a batched matmul).

    A plain ``[M, K] @ [K, N]`` GEMM may compute a row with a different micro-kernel
    depending on its position in the tile grid (measured: K=7 rows differ in the last
    bit), so each row is its own GEMM of identical shape.
    """
    return torch.bmm(x.unsqueeze(1), weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)).squeeze(1)


def swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """DeepSeek expert MLP ``down(silu(gate(x)) * up(x))``, batch-invariant.

    Args:
        x: ``[M, H]``.
        w13: ``[2*I, H]``: gate_proj rows first, then up_proj rows (vLLM's w13 layout).
        w2: ``[H, I]`` down_proj.

    Returns:
        ``[M, H]`` in ``x.dtype``.
    """
    inter = w2.shape[1]
    if w13.shape[0] != 2 * inter or w13.shape[1] != x.shape[1] or w2.shape[0] != x.shape[1]:
        raise ValueError(
            f"expert shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )

    def block(b: torch.Tensor) -> torch.Tensor:
        h = rowwise_linear(b, w13)
        return rowwise_linear(F.silu(h[:, :inter]) * h[:, inter:], w2)

    return row_blocked(block, x)


@dataclass
class MoEWeights:
    """Full (unsharded) weights of one DeepSeek-style MoE layer.

    Attributes:
        gate: ``[E, H]`` router weight.
        w13: ``[E, 2*I, H]`` routed experts' gate_proj ‖ up_proj.
        w2: ``[E, H, I]`` routed experts' down_proj.
        shared_w13: ``[2*Is, H]`` shared expert(s) gate ‖ up, or None.
        shared_w2: ``[H, Is]`` shared expert down, or None.
        e_score_correction_bias: ``[E]`` fp32 (DeepSeek-V3 noaux routing), or None.
    """

    gate: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    shared_w13: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None
    e_score_correction_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @staticmethod
    def random(
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        shared_intermediate_size: int | None = None,
        with_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> "MoEWeights":
        """Random weights (scaled like an initialised layer) for tests and benchmarks."""
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape: int, fan_in: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) / fan_in**0.5).to(dtype)

        e, h, i = num_experts, hidden_size, intermediate_size
        shared_w13 = shared_w2 = None
        if shared_intermediate_size:
            shared_w13 = rnd(2 * shared_intermediate_size, h, fan_in=h)
            shared_w2 = rnd(h, shared_intermediate_size, fan_in=shared_intermediate_size)
        bias = (torch.randn(e, generator=g) * 0.1) if with_bias else None
        return MoEWeights(
            gate=rnd(e, h, fan_in=h),
            w13=rnd(e, 2 * i, h, fan_in=h),
            w2=rnd(e, h, i, fan_in=i),
            shared_w13=shared_w13,
            shared_w2=shared_w2,
            e_score_correction_bias=bias,
        )
