"""Speculative token shuffling: decide, before gating, which EP rank runs each token.

The shuffle rides on a collective that places tokens anyway (the attention
all-reduce / reduce-scatter of tensor parallelism: every rank already holds, or
is about to receive, every token's hidden state).  Choosing *which* rank takes
which token therefore costs no extra bytes; a good choice turns most dispatch
pairs into local copies.  A token whose prediction is wrong is simply
dispatched to the ranks that really hold its experts (the correcting transfer),
so the result never changes: only the traffic does.

Predictors (torch only).  Each gives per-token rank scores ``[T, N]`` (a row of
zeros = no prediction) and a single predicted rank; every one uses only
information that exists before the layer's attention output is reduced, i.e.
before the collective the shuffle rides on:

* :class:`TokenTablePredictor`: per token id, how often each rank held at least
  one of its experts in the traces (the paper's token -> expert table, folded
  onto ranks).  Needs only the token id.
* :class:`TransitionPredictor`: from the previous layer's experts of the same
  token, how often each rank held one of its experts at this layer.  The
  previous layer's routing is known once that layer's gate has run, before
  this layer's attention starts.
* :class:`LookaheadPredictor`: no fitting; layer L's own gate applied to layer
  L's residual-stream *input* (before its attention), see the class docstring.
* :func:`chain_scores`: per token, the first predictor that has a prediction.

:func:`plan_token_ranks` turns per-token predictions into a placement with a
per-rank capacity, so a skewed prediction cannot pile every token on one rank;
:func:`plan_from_scores` does the same from rank scores and sends a token whose
first choice is full to its next-best rank instead of an arbitrary one.
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


def rank_presence(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """``[T, N]`` float64: 1.0 where the rank holds at least one of the token's experts.

    Running a token on rank r saves exactly one remote pair iff r holds one of its
    experts, so votes of this kind estimate the probability that a rank saves a pair.
    """
    ranks = placement.rank_of(topk_ids)
    out = torch.zeros((ranks.shape[0], placement.num_ranks), dtype=torch.float64)
    out.scatter_(1, ranks, 1.0)
    return out


def _argmax_or_none(scores: torch.Tensor) -> torch.Tensor:
    pred = scores.argmax(dim=1)
    return torch.where(scores.sum(dim=1) > 0, pred, torch.full_like(pred, NO_PREDICTION))


class TokenTablePredictor:
    """token id -> rank, learned from traces.

    For every token id, counts how often each rank held at least one of that token's
    experts (:func:`rank_presence`).  Available as soon as the token id is known.
    """

    def __init__(self, vocab_size: int, placement: ExpertPlacement, min_count: int = 1):
        self.placement = placement
        self.min_count = min_count
        self.counts = torch.zeros((vocab_size, placement.num_ranks), dtype=torch.float64)
        self.seen = torch.zeros(vocab_size, dtype=torch.long)

    def fit(self, token_ids: torch.Tensor, topk_ids: torch.Tensor) -> "TokenTablePredictor":
        """Accumulate ``token_ids [T]`` with their routing ``topk_ids [T, k]`` at this layer."""
        ids = token_ids.long()
        self.counts.index_add_(0, ids, rank_presence(topk_ids, self.placement))
        self.seen.index_add_(0, ids, torch.ones_like(ids))
        return self

    def scores(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T, N]`` float64 fraction of a token's occurrences in which each rank held one of its
        experts; a zero row for tokens seen fewer than ``min_count`` times (or outside the vocabulary)."""
        ids = token_ids.long()
        inside = ids < self.counts.shape[0]
        safe = ids.clamp(max=self.counts.shape[0] - 1)
        seen = self.seen[safe]
        rows = self.counts[safe] / seen.clamp(min=1).unsqueeze(1)
        keep = inside & (seen >= self.min_count)
        return torch.where(keep.unsqueeze(1), rows, torch.zeros_like(rows))

    def predict(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` predicted ranks; tokens seen fewer than ``min_count`` times get NO_PREDICTION."""
        return _argmax_or_none(self.scores(token_ids))


class TransitionPredictor:
    """previous layer's experts -> rank at this layer, learned from traces.

    The previous MoE layer's routing exists once its gate has run, which is before
    this layer's attention starts, so the placement can be decided in time.
    """

    def __init__(self, num_prev_experts: int, placement: ExpertPlacement):
        self.placement = placement
        self.counts = torch.zeros((num_prev_experts, placement.num_ranks), dtype=torch.float64)
        self.seen = torch.zeros(num_prev_experts, dtype=torch.float64)

    def fit(self, prev_topk_ids: torch.Tensor, topk_ids: torch.Tensor) -> "TransitionPredictor":
        """Accumulate pairs (``prev_topk_ids [T, k']`` at layer L-1, ``topk_ids [T, k]`` at L)."""
        votes = rank_presence(topk_ids, self.placement)  # [T, N]
        for j in range(prev_topk_ids.shape[1]):
            col = prev_topk_ids[:, j].long()
            self.counts.index_add_(0, col, votes)
            self.seen.index_add_(0, col, torch.ones(col.shape[0], dtype=torch.float64))
        return self

    def scores(self, prev_topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T, N]``: per previous expert, the fraction of its tokens whose experts here sat on each
        rank, averaged over the token's previous experts (zero row when none was seen)."""
        probs = self.counts / self.seen.clamp(min=1.0).unsqueeze(1)
        return probs[prev_topk_ids.long()].mean(dim=1)

    def predict(self, prev_topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` predicted ranks (NO_PREDICTION when no previous expert was seen in the fit)."""
        return _argmax_or_none(self.scores(prev_topk_ids))


class LookaheadPredictor:
    """Layer L's own gate applied to layer L's residual-stream input, before its attention.

    In a decoder layer ``h' = h + attn(norm1(h))``; the gate then routes
    ``norm2(h')``.  The lookahead routes ``norm2(h)`` with the same gate (same
    weights, bias and top-k rule), i.e. it assumes one attention block moves the
    hidden state little.  ``h`` is the attention's input, present on every rank
    that runs the attention before the attention's output collective (the one the
    shuffle rides on), so the placement can be decided in time; with sequence
    parallelism each rank predicts its own tokens and the ``[T]`` predicted ranks
    travel with the attention's input all-gather.  Nothing is fitted: the
    predicted expert ids (recorded in the trace file as ``predicted_topk_ids``)
    are folded onto ranks by the placement.
    """

    def __init__(self, placement: ExpertPlacement):
        self.placement = placement

    def scores(self, predicted_topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T, N]``: 1.0 where the rank holds one of the predicted experts."""
        return rank_presence(predicted_topk_ids, self.placement)

    def predict(self, predicted_topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T]``: the rank holding the most predicted experts (ties: earliest slot)."""
        return best_ranks(predicted_topk_ids, self.placement)


def chain_scores(*scores: torch.Tensor) -> torch.Tensor:
    """Per token, the first of ``scores`` (each ``[T, N]``) whose row is not all zero (float64 out)."""
    if not scores:
        raise ValueError("chain_scores needs at least one score tensor")
    out = scores[-1].double()
    for s in reversed(scores[:-1]):
        has = s.sum(dim=1) > 0
        out = torch.where(has.unsqueeze(1), s.double(), out)
    return out


def plan_from_scores(
    scores: torch.Tensor, capacity_factor: float = 1.5, home: torch.Tensor | None = None
) -> torch.Tensor:
    """Place tokens by rank scores, at most ``ceil(T/N * capacity_factor)`` per rank.

    Rounds: every unplaced token proposes its highest-scoring rank among those not yet
    full; a rank accepts proposals up to its free capacity, most confident first (higher
    score, then larger lead over the token's next-best open rank, then lower token
    index).  So a token whose first choice is full goes to its next-best rank rather
    than to an arbitrary free one.  Deterministic in its inputs, so every rank computes
    the same plan.

    Args:
        scores: ``[T, N]`` (higher = better; a zero row = no prediction).
        capacity_factor: >= 1; 1.0 forces an exactly balanced split.
        home: ``[T]`` rank to prefer among equal scores (e.g. the contiguous chunk), or None.

    Returns:
        ``[T]`` int64 rank per token.
    """
    if capacity_factor < 1.0:
        raise ValueError(f"capacity_factor must be >= 1.0, got {capacity_factor}")
    t, n = scores.shape
    if t == 0:
        return torch.zeros(0, dtype=torch.long)
    s = scores.double().clone()
    if home is not None:
        s[torch.arange(t), home.long()] += 1e-9
    # ties between ranks: the lower rank id wins
    s = s - 1e-12 * torch.arange(n, dtype=torch.float64)
    cap = math.ceil(t / n * capacity_factor)
    out = torch.full((t,), NO_PREDICTION, dtype=torch.long)
    load = torch.zeros(n, dtype=torch.long)
    while True:
        left = (out == NO_PREDICTION).nonzero().flatten()
        if left.numel() == 0:
            break
        sl = s[left].masked_fill((load >= cap).unsqueeze(0), -float("inf"))
        top = sl.topk(min(2, n), dim=1)
        want, best = top.indices[:, 0], top.values[:, 0]
        lead = (best - top.values[:, 1]) if n > 1 else torch.zeros_like(best)
        lead = torch.nan_to_num(lead, posinf=1e300)
        for r in want.unique().tolist():
            cand = (want == r).nonzero().flatten()
            # most confident first: score desc, lead desc, token index asc (stable sorts, last key first)
            cand = cand[lead[cand].argsort(descending=True, stable=True)]
            cand = cand[best[cand].argsort(descending=True, stable=True)]
            take = cand[: cap - int(load[r])]
            out[left[take]] = r
            load[r] += take.numel()
    return out


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
