"""EP layer over real gloo process groups (2 and 4 ranks) vs the single-process reference.

Equality is bit-for-bit (torch.equal): the expert math is batch-invariant and
the EP layer sums in the reference's order, so any difference is a bug.
"""

from __future__ import annotations

import pytest
import torch

from vllm_frontier.moe.dispatch import ByteCounters
from vllm_frontier.moe.ep_layer import EPMoELayer
from vllm_frontier.moe.experts import MoEWeights
from vllm_frontier.moe.launch import run_distributed
from vllm_frontier.moe.placement import ExpertPlacement
from vllm_frontier.moe.reference import reference_moe
from vllm_frontier.moe.routing import RouterConfig, route
from vllm_frontier.moe.shuffle import (
    best_ranks,
    plan_from_scores,
    plan_token_ranks,
    rank_presence,
    worst_ranks,
)

E, H, I, IS = 8, 48, 40, 24

CONFIGS = {
    "v2-softmax-k2": RouterConfig(top_k=2, scoring_func="softmax"),
    "v3-sigmoid-k3-grouped": RouterConfig(
        top_k=3, scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5
    ),
}


def _weights(cfg_name: str) -> MoEWeights:
    return MoEWeights.random(
        E, H, I, shared_intermediate_size=IS, with_bias=cfg_name.startswith("v3"), seed=3
    )


def _placement(kind: str, n: int) -> ExpertPlacement:
    if kind == "linear":
        return ExpertPlacement.linear(E, n)
    # a scrambled placement: experts interleaved across ranks
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(7)).tolist()
    ranks = [0] * E
    for i, e in enumerate(perm):
        ranks[e] = i % n
    return ExpertPlacement(tuple(ranks), n)


def _tokens(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    # ranks hold different, odd token counts; one rank holds none when n == 4
    counts = [13, 0, 7, 21][:n] if n == 4 else [13, 6]
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(counts[rank], H, generator=g).to(dtype)


CASES = [
    (cfg_name, placement_kind, dtype)
    for cfg_name in CONFIGS
    for placement_kind in ("linear", "scrambled")
    for dtype in (torch.float32, torch.bfloat16)
]


def _dp_worker(rank, n):
    """All DP-style cases in one spawn (process start-up dominates on 2 cores)."""
    results = {}
    for cfg_name, placement_kind, dtype in CASES:
        cfg = CONFIGS[cfg_name]
        w = _weights(cfg_name)
        w = MoEWeights(
            *(t.to(dtype) if t is not None else t for t in (w.gate, w.w13, w.w2, w.shared_w13, w.shared_w2)),
            e_score_correction_bias=w.e_score_correction_bias,
        )
        placement = _placement(placement_kind, n)
        layer = EPMoELayer(w, cfg, placement)
        x = _tokens(rank, n, dtype)
        out = layer.forward(x)
        results[(cfg_name, placement_kind, dtype)] = (
            out, reference_moe(x, w, cfg, placement), reference_moe(x, w, cfg, None),
            layer.counters.as_dict(),
        )
    return results


@pytest.mark.parametrize("n", [2, 4], ids=lambda n: f"ranks{n}")
def test_dp_style_equals_reference(n):
    results = run_distributed(_dp_worker, n)
    for case in CASES:
        per_rank = [r[case] for r in results]
        for rank, (out, ref, ref_plain, counters) in enumerate(per_rank):
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert torch.equal(out, ref), f"{case} rank {rank}: max diff {(out - ref).abs().max()}"
            if case[2] == torch.float32:
                # another placement only re-associates fp32 sums of O(1) values: ~1e-6 relative
                torch.testing.assert_close(out, ref_plain, rtol=1e-5, atol=1e-5)
            assert counters["calls"] == 1
        sent = sum(c["dispatch_sent"] for *_, c in per_rank)
        recv = sum(c["dispatch_recv"] for *_, c in per_rank)
        assert sent == recv and sent > 0, case  # each cross-rank byte counted on both ends
        # one partial row back per pair, in x.dtype like the dispatched row
        assert sum(c["combine_sent"] for *_, c in per_rank) == sent, case


MODES = ("plain", "oracle", "all-wrong", "skewed", "scored")


def _replicated_worker(rank, n):
    return {
        (cfg_name, mode): _replicated_case(rank, n, cfg_name, mode)
        for cfg_name in CONFIGS
        for mode in MODES
    }


def _replicated_case(rank, n, cfg_name, mode):
    cfg = CONFIGS[cfg_name]
    w = _weights(cfg_name)
    placement = _placement("scrambled", n)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, H, generator=g)  # same on every rank
    _, topk_ids = route(x, w.gate, cfg, w.e_score_correction_bias)
    best = best_ranks(topk_ids, placement)
    if mode == "plain":
        token_ranks = None
    elif mode == "oracle":  # every prediction right
        token_ranks = plan_token_ranks(best, n, capacity_factor=float(n))
    elif mode == "all-wrong":  # every token on the rank holding the fewest of its experts
        token_ranks = plan_token_ranks(worst_ranks(topk_ids, placement), n, capacity_factor=float(n))
        assert (token_ranks != best).all()  # no token lands on its target rank
    elif mode == "skewed":  # everything predicted on rank 0: the capacity spills it over
        token_ranks = plan_token_ranks(torch.zeros_like(best), n, capacity_factor=1.0)
    elif mode == "scored":  # noisy rank scores through the score planner at the exact capacity
        noise = torch.rand(topk_ids.shape[0], n, generator=torch.Generator().manual_seed(11))
        token_ranks = plan_from_scores(rank_presence(topk_ids, placement) + noise, 1.0)
    layer = EPMoELayer(w, cfg, placement, counters=ByteCounters())
    out = layer.forward_replicated(x, token_ranks)
    ref = reference_moe(x, w, cfg, placement)
    return out, ref, layer.counters.as_dict(), token_ranks


@pytest.mark.parametrize("n", [2, 4], ids=lambda n: f"ranks{n}")
def test_speculative_shuffle_is_lossless(n):
    results = run_distributed(_replicated_worker, n)
    for cfg_name in CONFIGS:
        by_mode = {m: [r[(cfg_name, m)] for r in results] for m in MODES}
        for mode, per_rank in by_mode.items():
            for rank, (out, ref, _, _) in enumerate(per_rank):
                assert torch.equal(out, ref), (
                    f"{cfg_name} {mode} rank {rank}: max diff {(out - ref).abs().max()}"
                )
        traffic = {m: sum(r[2]["dispatch_sent"] for r in res) for m, res in by_mode.items()}
        # right predictions never cost more than plain; all-wrong ones cost the most
        assert traffic["oracle"] <= traffic["plain"] <= traffic["all-wrong"], (cfg_name, traffic)
        assert traffic["oracle"] < traffic["all-wrong"], (cfg_name, traffic)
        if CONFIGS[cfg_name].top_k == 2:  # k=2 leaves room to gain at 2 and 4 ranks
            assert traffic["oracle"] < traffic["plain"], (cfg_name, traffic)
        # every token's output was gathered by every other rank: same bytes in all modes
        gathers = {sum(r[2]["gather_sent"] for r in res) for res in by_mode.values()}
        assert gathers == {37 * H * 4 * (n - 1)}, gathers
        # the skewed prediction respected the exact capacity (capacity_factor 1.0)
        ranks = by_mode["skewed"][0][3]
        assert torch.bincount(ranks, minlength=n).max().item() == -(-37 // n)
        scored = by_mode["scored"][0][3]
        assert torch.bincount(scored, minlength=n).max().item() <= -(-37 // n)
        assert all(torch.equal(r[3], scored) for r in by_mode["scored"])  # every rank planned the same
        assert traffic["scored"] < traffic["all-wrong"], (cfg_name, traffic)
