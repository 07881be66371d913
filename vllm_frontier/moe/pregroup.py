"""Speculative expert pre-grouping: place co-activated experts on the same rank, balanced.

Offline step over recorded routing traces of one layer (``topk_ids [T, k]``):

1. co-activation ``C[e, f]`` = tokens that chose both e and f; load ``L[e]`` = tokens that chose e;
2. greedy seed: experts in descending load, each to the non-full rank with the most
   co-activation with the experts already there, among ranks whose load stays under
   ``max_imbalance`` x the mean (least-loaded rank if none);
3. local search: repeatedly apply the expert swap between two ranks that most increases the
   within-rank co-activation, keeping every rank's load under the cap (or not worse than
   before), until no swap helps.

Within-rank co-activation is the pairwise proxy for "a token's experts span few ranks",
which is what dispatch traffic counts; :func:`placement_stats` reports the exact figure.
Torch only, no vLLM.
"""

from __future__ import annotations

import torch

from vllm_frontier.moe.placement import ExpertPlacement


def coactivation(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C [E, E] float64 with zero diagonal, L [E] float64)`` from ``topk_ids [T, k]``."""
    t, k = topk_ids.shape
    onehot = torch.zeros((t, num_experts), dtype=torch.float64)
    onehot.scatter_(1, topk_ids.long(), 1.0)
    c = onehot.t() @ onehot
    load = c.diagonal().clone()
    c.fill_diagonal_(0.0)
    return c, load


def placement_stats(topk_ids: torch.Tensor, placement: ExpertPlacement) -> dict[str, float]:
    """Exact trace statistics of a placement.

    Returns:
        ``distinct_ranks``: mean number of ranks a token's experts span;
        ``local_all``: fraction of tokens whose experts all sit on one rank;
        ``load_imbalance``: max rank load / mean rank load (1.0 = perfect).
    """
    ranks = placement.rank_of(topk_ids)
    t = ranks.shape[0]
    present = torch.zeros((t, placement.num_ranks), dtype=torch.bool)
    present.scatter_(1, ranks, True)
    distinct = present.sum(1).double()
    load = torch.bincount(ranks.flatten(), minlength=placement.num_ranks).double()
    return {
        "distinct_ranks": distinct.mean().item() if t else 0.0,
        "local_all": (distinct == 1).double().mean().item() if t else 0.0,
        "load_imbalance": (load.max() / load.mean()).item() if load.sum() > 0 else 1.0,
    }


def pregroup(
    topk_ids: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    *,
    max_imbalance: float = 1.1,
    max_swaps: int | None = None,
) -> ExpertPlacement:
    """Compute a co-activation-aware, load-balanced placement from one layer's traces.

    Args:
        topk_ids: ``[T, k]`` expert ids recorded for this layer.
        num_experts: E (a multiple of ``num_ranks``).
        num_ranks: EP size N.
        max_imbalance: cap on a rank's load as a multiple of the mean rank load.
        max_swaps: bound on local-search steps (default 2 * num_experts).

    Returns:
        The placement (deterministic in its inputs).
    """
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_ranks} ranks")
    if max_imbalance < 1.0:
        raise ValueError(f"max_imbalance must be >= 1.0, got {max_imbalance}")
    per = num_experts // num_ranks
    if per == 1 or num_ranks == 1:
        return ExpertPlacement.linear(num_experts, num_ranks)
    c, load = coactivation(topk_ids, num_experts)
    cap = load.sum().item() / num_ranks * max_imbalance

    rank_of = torch.full((num_experts,), -1, dtype=torch.long)
    rank_load = torch.zeros(num_ranks, dtype=torch.float64)
    rank_size = torch.zeros(num_ranks, dtype=torch.long)
    for e in sorted(range(num_experts), key=lambda i: (-load[i].item(), i)):
        open_ = rank_size < per
        fits = open_ & (rank_load + load[e] <= cap)
        if fits.any():
            aff = torch.zeros(num_ranks, dtype=torch.float64)
            placed = rank_of >= 0
            aff.index_add_(0, rank_of[placed], c[e, placed])
            aff = torch.where(fits, aff - 1e-9 * rank_load, torch.full_like(aff, -float("inf")))
            r = int(aff.argmax())
        else:
            r = int(torch.where(open_, rank_load, torch.full_like(rank_load, float("inf"))).argmin())
        rank_of[e] = r
        rank_load[r] += load[e]
        rank_size[r] += 1

    # A[e, r] = co-activation of e with the experts on rank r
    onehot = torch.nn.functional.one_hot(rank_of, num_ranks).double()
    a = c @ onehot
    for _ in range(2 * num_experts if max_swaps is None else max_swaps):
        own = a.gather(1, rank_of.unsqueeze(1)).squeeze(1)  # [E]
        a_to = a[:, rank_of]  # a_to[e, f] = A[e, rank(f)]
        gain = (a_to - c) + (a_to - c).t() - own.unsqueeze(1) - own.unsqueeze(0)
        l_e, l_f = load.unsqueeze(1), load.unsqueeze(0)
        new_re = rank_load[rank_of].unsqueeze(1) - l_e + l_f  # e's rank after the swap
        new_rf = rank_load[rank_of].unsqueeze(0) - l_f + l_e
        old_max = torch.maximum(rank_load[rank_of].unsqueeze(1), rank_load[rank_of].unsqueeze(0))
        ok = torch.maximum(new_re, new_rf) <= torch.clamp(old_max, min=cap) + 1e-9
        ok &= rank_of.unsqueeze(1) != rank_of.unsqueeze(0)
        gain = torch.where(ok, gain, torch.full_like(gain, -float("inf")))
        best = int(gain.argmax())
        e, f = divmod(best, num_experts)
        if gain[e, f] <= 1e-9:
            break
        re, rf = int(rank_of[e]), int(rank_of[f])
        a[:, re] += c[:, f] - c[:, e]
        a[:, rf] += c[:, e] - c[:, f]
        rank_load[re] += load[f] - load[e]
        rank_load[rf] += load[e] - load[f]
        rank_of[e], rank_of[f] = rf, re
    return ExpertPlacement(tuple(rank_of.tolist()), num_ranks)


def main(argv: list[str] | None = None) -> int:
    """``vllm-frontier spec-moe-placement``: write a pre-grouped placement file from routing traces."""
    import argparse
    import sys

    from vllm_frontier.moe.placement import save_placements
    from vllm_frontier.moe.traces import load_traces

    ap = argparse.ArgumentParser(
        prog="vllm-frontier spec-moe-placement",
        description="Pre-group co-activated experts per MoE layer from recorded routing traces "
        "(python benchmarks/spec_moe.py --record-traces MODEL_DIR) and write the placement file "
        "that FRONTIER_SPEC_MOE_PLACEMENT loads.",
    )
    ap.add_argument("--traces", required=True, help="routing-trace file")
    ap.add_argument("--ranks", type=int, required=True, help="EP size the placement is for")
    ap.add_argument("--out", required=True, help="placement file to write (JSON)")
    ap.add_argument("--max-imbalance", type=float, default=1.1,
                    help="cap on a rank's routed load as a multiple of the mean (>= 1)")
    ap.add_argument("--first-moe-layer", type=int, default=0,
                    help="decoder index of the first MoE layer (the model's first_k_dense_replace)")
    args = ap.parse_args(argv)
    try:
        traces = load_traces(args.traces)
    except (OSError, ValueError) as e:
        print(f"vllm-frontier spec-moe-placement: error: {e}", file=sys.stderr)
        return 2
    if args.ranks < 1 or traces.num_experts % args.ranks:
        ap.error(f"--ranks must divide the {traces.num_experts} experts of the traces")
    if not args.max_imbalance >= 1.0:
        ap.error("--max-imbalance must be >= 1")
    if args.first_moe_layer < 0:
        ap.error("--first-moe-layer must be >= 0")
    placements = {}
    for layer in range(traces.num_layers):
        ids = traces.topk_ids[layer]
        p = pregroup(ids, traces.num_experts, args.ranks, max_imbalance=args.max_imbalance)
        stats = placement_stats(ids, p)
        base = placement_stats(ids, ExpertPlacement.linear(traces.num_experts, args.ranks))
        placements[args.first_moe_layer + layer] = p
        print(f"layer {args.first_moe_layer + layer}: {stats} (linear placement: {base})")
    path = save_placements(args.out, placements, {
        "traces": str(args.traces), "trace_tokens": traces.num_tokens, "max_imbalance": args.max_imbalance})
    print(f"wrote {path}")
    return 0
