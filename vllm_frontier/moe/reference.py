"""Single-process reference DeepSeek MoE layer: the oracle for the EP layer.

Math per token t with routed slots j = 0..k-1 (expert e_j, weight w_j)::

    c_j   = cast_x( w_j * expert_{e_j}(x_t) )            (fp32 product, cast to x.dtype)
    P_r   = sum over slots j with rank(e_j) == r, in slot order, of c_j   (fp32 sum)
    routed = sum over ranks r = 0..N-1 in order of cast_x(P_r)            (fp32 sum)
    out_t = cast_x( routed + shared(x_t) )

The grouping by rank is the order the EP layer sums in (each rank pre-reduces
its experts' contributions before the combine).  With ``placement=None`` (one
rank) it is the plain slot-order sum.  Different placements differ only by fp32
re-association (tests bound that separately).
"""

from __future__ import annotations

import torch

from vllm_frontier.moe.experts import MoEWeights, swiglu_mlp
from vllm_frontier.moe.placement import ExpertPlacement
from vllm_frontier.moe.routing import RouterConfig, route


def expert_partials(
    x: torch.Tensor,
    slot_experts: torch.Tensor,
    slot_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the selected experts' outputs per row, in slot order.

    Args:
        x: ``[R, H]`` rows.
        slot_experts: ``[R, k]`` int, index into ``w13``/``w2`` per slot, -1 = slot not here.
        slot_weights: ``[R, k]`` float32 routing weights.
        w13: ``[E_l, 2*I, H]``; w2: ``[E_l, H, I]``.

    Returns:
        ``[R, H]`` in ``x.dtype``: ``sum_j cast_x(w_j * expert(x))`` accumulated in fp32.
    """
    r, k = slot_experts.shape
    contrib = torch.zeros((r, k, x.shape[1]), dtype=torch.float32)
    for e in torch.unique(slot_experts[slot_experts >= 0]).tolist():
        rows, slots = (slot_experts == e).nonzero(as_tuple=True)
        y = swiglu_mlp(x[rows], w13[e], w2[e]).float()
        contrib[rows, slots] = (y * slot_weights[rows, slots].unsqueeze(1)).to(x.dtype).float()
    acc = torch.zeros((r, x.shape[1]), dtype=torch.float32)
    for j in range(k):
        acc = acc + contrib[:, j]
    return acc.to(x.dtype)


def shared_expert(x: torch.Tensor, weights: MoEWeights) -> torch.Tensor | None:
    """Shared expert output ``[T, H]`` (x.dtype), or None if the layer has none."""
    if weights.shared_w13 is None or weights.shared_w2 is None:
        return None
    return swiglu_mlp(x, weights.shared_w13, weights.shared_w2)


def finish(routed_fp32: torch.Tensor, shared: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``cast(routed + shared)``: the last step shared by reference and EP layer."""
    if shared is not None:
        routed_fp32 = routed_fp32 + shared.float()
    return routed_fp32.to(dtype)


def reference_moe(
    x: torch.Tensor,
    weights: MoEWeights,
    cfg: RouterConfig,
    placement: ExpertPlacement | None = None,
    *,
    routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference MoE forward for all tokens in one process.

    Args:
        x: ``[T, H]`` hidden states.
        weights: full layer weights.
        cfg: router config.
        placement: summation grouping (see module docstring); None = one rank.
        routing: optional precomputed ``(topk_weights, topk_ids)`` to skip the gate.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    if x.dim() != 2 or x.shape[1] != weights.hidden_size:
        raise ValueError(f"x must be [T, {weights.hidden_size}], got {tuple(x.shape)}")
    if routing is None:
        routing = route(x, weights.gate, cfg, weights.e_score_correction_bias)
    topk_w, topk_ids = routing
    if placement is None:
        placement = ExpertPlacement.linear(weights.num_experts, 1)
    ranks = placement.rank_of(topk_ids)
    routed = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32)
    for r in range(placement.num_ranks):
        slot_experts = torch.where(ranks == r, topk_ids, torch.full_like(topk_ids, -1))
        routed = routed + expert_partials(x, slot_experts, topk_w, weights.w13, weights.w2).float()
    return finish(routed, shared_expert(x, weights), x.dtype)
