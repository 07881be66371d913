"""Speculative token shuffling: decide, before gating, which EP rank runs each token.

The shuffle rides on a collective that places tokens anyway (the attention
all-reduce / reduce-scatter of tensor parallelism: every rank already holds, or
is about to receive, every token's hidden state).  Choosing *which* rank takes
which token therefore costs no extra bytes; a good choice turns most dispatch
pairs into local copies.  A token whose prediction is wrong is simply
dispatched to the ranks that really hold its experts (the correcting transfer),
so the result never changes: only the traffic does.

Predictors (fit on recorded routing traces, torch only):

* :class:`TokenTablePredictor`: per token id, the rank that most often held most
  of its experts (the paper's token -> expert table, folded onto ranks).
* :class:`TransitionPredictor`: from the previous layer's experts of the same
  token, the rank that most often held most of its experts at this layer.

:func:`plan_token_ranks` turns per-token predictions into a placement with a
per-rank capacity, so a skewed prediction cannot pile every token on one rank.
"""

from __future__ import annotations

import math

import torch

from vllm_frontier.moe.placement import ExpertPlacement

NO_PREDICTION = -1
"""Value in a predicted-rank tensor meaning "no prediction for this token"."""


def rank_scores(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """Score of running each token on each rank: experts held there, ties to the earliest slot.

    Args:
        topk_ids: ``[T, k]`` global expert ids, best slot first.

    Returns:
        ``[T, N]`` int64, ``count * (k + 1) + (k - first slot held there)``; all
        scores of a row are distinct.
    """
    ranks = placement.rank_of(topk_ids)  # [T, k]
    t, k = ranks.shape
    counts = torch.zeros((t, placement.num_ranks), dtype=torch.long)
    counts.scatter_add_(1, ranks, torch.ones_like(ranks))
    first_slot = torch.full((t, placement.num_ranks), k, dtype=torch.long)
    first_slot.scatter_reduce_(1, ranks, torch.arange(k).expand(t, k), reduce="amin")
    # ranks holding none of the token's experts: break ties by rank id (lower is better)
    none_tiebreak = -torch.arange(placement.num_ranks).expand(t, -1) - k - 1
    return torch.where(counts > 0, counts * (k + 1) + (k - first_slot), none_tiebreak)


def best_ranks(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """The rank holding the most of each token's experts (ties: the rank of the earliest slot).

    Args:
        topk_ids: ``[T, k]`` global expert ids, best slot first.

    Returns:
        ``[T]`` int64 ranks: running the token there needs the fewest remote pairs.
    """
    return rank_scores(topk_ids, placement).argmax(dim=1)


def worst_ranks(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """The rank holding the fewest of each token's experts (the all-wrong prediction)."""
    return rank_scores(topk_ids, placement).argmin(dim=1)


def contiguous_ranks(num_tokens: int, num_ranks: int) -> torch.Tensor:
    """Plain (unshuffled) placement: token t runs on rank ``t * N // T`` (contiguous chunks)."""
    if num_tokens == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.arange(num_tokens) * num_ranks // num_tokens


def plan_token_ranks(
    predicted: torch.Tensor, num_ranks: int, capacity_factor: float = 1.5
) -> torch.Tensor:
    """Place tokens on their predicted ranks, at most ``ceil(T/N * capacity_factor)`` per rank.

    Deterministic in its inputs, so every rank computes the same plan.

    Args:
        predicted: ``[T]`` int64 predicted rank or :data:`NO_PREDICTION`.
        num_ranks: EP world size N.
        capacity_factor: >= 1; 1.0 forces an exactly balanced split.

    Returns:
        ``[T]`` int64 rank per token.  Tokens without a prediction, and overflow
        tokens (the later ones of an over-full rank), fill the remaining
        capacity in ascending rank order.
    """
    if capacity_factor < 1.0:
        raise ValueError(f"capacity_factor must be >= 1.0, got {capacity_factor}")
    t = predicted.shape[0]
    if t == 0:
        return predicted.clone().long()
    if ((predicted < NO_PREDICTION) | (predicted >= num_ranks)).any():
        raise ValueError(f"predicted ranks must lie in [0, {num_ranks}) or be {NO_PREDICTION}")
    cap = math.ceil(t / num_ranks * capacity_factor)
    out = torch.full((t,), NO_PREDICTION, dtype=torch.long)
    load = torch.zeros(num_ranks, dtype=torch.long)
    for r in range(num_ranks):
        mine = (predicted == r).nonzero().flatten()[:cap]
        out[mine] = r
        load[r] = mine.numel()
    left = (out == NO_PREDICTION).nonzero().flatten()
    if left.numel():
        free = (cap - load).clamp(min=0)
        fill = torch.repeat_interleave(torch.arange(num_ranks), free)[: left.numel()]
        out[left] = fill
    return out


def _rank_votes(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    return torch.nn.functional.one_hot(best_ranks(topk_ids, placement), placement.num_ranks)


class TokenTablePredictor:
    """token id -> rank, learned from traces (counts of each token's best rank)."""

    def __init__(self, vocab_size: int, placement: ExpertPlacement, min_count: int = 1):
        self.placement = placement
        self.min_count = min_count
        self.counts = torch.zeros((vocab_size, placement.num_ranks), dtype=torch.long)

    def fit(self, token_ids: torch.Tensor, topk_ids: torch.Tensor) -> "TokenTablePredictor":
        """Accumulate ``token_ids [T]`` with their routing ``topk_ids [T, k]`` at this layer."""
        self.counts.index_add_(0, token_ids.long(), _rank_votes(topk_ids, self.placement))
        return self

    def predict(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` predicted ranks; tokens seen fewer than ``min_count`` times get NO_PREDICTION."""
        ids = token_ids.long()
        inside = ids < self.counts.shape[0]
        rows = self.counts[ids.clamp(max=self.counts.shape[0] - 1)]
        pred = rows.argmax(dim=1)
        seen = inside & (rows.sum(dim=1) >= self.min_count)
        return torch.where(seen, pred, torch.full_like(pred, NO_PREDICTION))


class TransitionPredictor:
    """previous layer's experts -> rank at this layer, learned from traces."""

    def __init__(self, num_prev_experts: int, placement: ExpertPlacement):
        self.placement = placement
        self.counts = torch.zeros((num_prev_experts, placement.num_ranks), dtype=torch.float64)

    def fit(self, prev_topk_ids: torch.Tensor, topk_ids: torch.Tensor) -> "TransitionPredictor":
        """Accumulate pairs (``prev_topk_ids [T, k']`` at layer L-1, ``topk_ids [T, k]`` at L)."""
        votes = _rank_votes(topk_ids, self.placement).double()  # [T, N]
        for j in range(prev_topk_ids.shape[1]):
            self.counts.index_add_(0, prev_topk_ids[:, j].long(), votes)
        return self

    def predict(self, prev_topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` predicted ranks (row-normalised votes of the previous experts, summed)."""
        probs = self.counts / self.counts.sum(dim=1, keepdim=True).clamp(min=1.0)
        score = probs[prev_topk_ids.long()].sum(dim=1)  # [T, N]
        pred = score.argmax(dim=1)
        known = score.sum(dim=1) > 0
        return torch.where(known, pred, torch.full_like(pred, NO_PREDICTION))


def prediction_accuracy(predicted: torch.Tensor, topk_ids: torch.Tensor, placement: ExpertPlacement) -> dict[str, float]:
    """How good a rank prediction is against the real routing.

    Returns:
        ``best``: fraction of tokens placed on their :func:`best_ranks` rank (or one
        with as many experts); ``hit``: fraction whose rank holds at least one of
        their experts; ``covered``: fraction that had a prediction at all.
    """
    t = topk_ids.shape[0]
    if t == 0:
        return {"best": 0.0, "hit": 0.0, "covered": 0.0}
    ranks = placement.rank_of(topk_ids)
    counts = torch.zeros((t, placement.num_ranks), dtype=torch.long)
    counts.scatter_add_(1, ranks, torch.ones_like(ranks))
    has = predicted != NO_PREDICTION
    safe = predicted.clamp(min=0)
    got = counts.gather(1, safe.unsqueeze(1)).squeeze(1)
    best = (got == counts.max(dim=1).values) & has
    hit = (got > 0) & has
    return {
        "best": best.float().mean().item(),
        "hit": hit.float().mean().item(),
        "covered": has.float().mean().item(),
    }
