"""DeepSeek-style router: gate scores -> top-k expert ids and weights (torch only).

Supports DeepSeek-V2 (softmax scores, optional group-limited selection by the
group's max score) and DeepSeek-V3 (sigmoid scores + ``e_score_correction_bias``
for selection only, group score = sum of the group's top-2).  Selection is a
stable descending sort, so ties go to the lower expert id on every shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_frontier.moe.experts import rowwise_linear, row_blocked


@dataclass(frozen=True)
class RouterConfig:
    """Routing hyper-parameters, named as in HF DeepSeek configs.

    Attributes:
        top_k: experts per token (``num_experts_per_tok``).
        scoring_func: ``"softmax"`` (V2) or ``"sigmoid"`` (V3).
        n_group / topk_group: group-limited routing; ``n_group=1`` disables it.
        norm_topk_prob: renormalise the k weights to sum to 1.
        routed_scaling_factor: multiplies the k weights.
    """

    top_k: int
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(
                f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}"
            )
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"need 1 <= topk_group <= n_group, got topk_group={self.topk_group}, "
                f"n_group={self.n_group}"
            )


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; ties -> lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route(
    x: torch.Tensor,
    gate: torch.Tensor,
    cfg: RouterConfig,
    e_score_correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        x: ``[T, H]`` hidden states.
        gate: ``[E, H]`` router weight.
        cfg: routing hyper-parameters.
        e_score_correction_bias: ``[E]`` added to the scores for selection only.

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int64)``; slot order is the
        selection order (best first).  Row ``t`` depends only on ``x[t]``.
    """
    num_experts = gate.shape[0]
    if cfg.top_k > num_experts:
        raise ValueError(f"top_k={cfg.top_k} exceeds the number of experts {num_experts}")
    if num_experts % cfg.n_group:
        raise ValueError(f"{num_experts} experts do not split into n_group={cfg.n_group}")
    if x.dim() != 2 or x.shape[1] != gate.shape[1]:
        raise ValueError(f"x must be [T, {gate.shape[1]}], got {tuple(x.shape)}")
    return row_blocked(lambda b: _route_block(b, gate, cfg, e_score_correction_bias), x)


def _route_block(
    x: torch.Tensor,
    gate: torch.Tensor,
    cfg: RouterConfig,
    e_score_correction_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = gate.shape[0]
    logits = rowwise_linear(x, gate).float()
    if cfg.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        scores = logits.sigmoid()
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if cfg.n_group > 1:
        t = x.shape[0]
        grouped = choice.view(t, cfg.n_group, num_experts // cfg.n_group)
        if e_score_correction_bias is not None:
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_score = grouped.max(dim=-1).values
        keep = _stable_topk(group_score, cfg.topk_group)
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(
            ~group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, num_experts), float("-inf")
        )
    topk_ids = _stable_topk(choice, cfg.top_k)
    topk_weights = scores.gather(1, topk_ids)
    if cfg.norm_topk_prob and cfg.top_k > 1:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * cfg.routed_scaling_factor
    return topk_weights, topk_ids
