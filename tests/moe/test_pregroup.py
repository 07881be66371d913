"""Expert pre-grouping: the greedy seed, the local search and the load cap, each on a case where it
alone decides the answer (so a test cannot pass on the seed alone)."""

import pytest
import torch

from vllm_frontier.moe.placement import ExpertPlacement
from vllm_frontier.moe.pregroup import coactivation, placement_stats, pregroup


def tokens(*groups):
    """``tokens((0, 1, 10), (2, 3, 4))``: 10 tokens choosing experts 0 and 1, 4 choosing 2 and 3."""
    rows = []
    for *experts, n in groups:
        rows += [list(experts)] * n
    return torch.tensor(rows, dtype=torch.int32)


def groups(p: ExpertPlacement):
    by = {}
    for e, r in enumerate(p.expert_to_rank):
        by.setdefault(r, []).append(e)
    return sorted(tuple(v) for v in by.values())


def rank_loads(ids, p):
    _, load = coactivation(ids, len(p.expert_to_rank))
    out = [0.0] * p.num_ranks
    for e, r in enumerate(p.expert_to_rank):
        out[r] += load[e].item()
    return out


def test_coactivation_by_hand():
    ids = tokens((0, 1, 3), (1, 2, 2), (0, 2, 1))
    c, load = coactivation(ids, 4)
    assert load.tolist() == [4.0, 5.0, 3.0, 0.0]
    assert c.tolist() == [[0, 3, 1, 0], [3, 0, 2, 0], [1, 2, 0, 0], [0, 0, 0, 0]]
    assert c.dtype == load.dtype == torch.float64


# {0,1} x10, {2,3} x10, {0,2} x6: loads 16, 10, 16, 10. The greedy seed places by load: 0, then 2
# (it shares 6 tokens with 0, and the loose cap lets it join), which fills rank 0 with {0, 2}: within-
# rank co-activation 6. One swap (1 <-> 2) gives {0,1},{2,3}: 20.
TRAP = tokens((0, 1, 10), (2, 3, 10), (0, 2, 6))


def test_greedy_seed_alone_is_fooled():
    p = pregroup(TRAP, 4, 2, max_imbalance=2.0, max_swaps=0)
    assert groups(p) == [(0, 2), (1, 3)]


def test_local_search_finds_the_better_grouping():
    p = pregroup(TRAP, 4, 2, max_imbalance=2.0)
    assert groups(p) == [(0, 1), (2, 3)]
    assert placement_stats(TRAP, p)["local_all"] == pytest.approx(20 / 26)
    assert pregroup(TRAP, 4, 2, max_imbalance=2.0, max_swaps=1) == p  # one swap is enough


def test_tight_cap_keeps_heavy_partners_apart():
    # {0,1} x30 would be the best group but holds 60 of 64 routed tokens; the cap (1.1 x 32 = 35.2)
    # forbids it in the seed and in every swap
    ids = tokens((0, 1, 30), (2, 3, 2))
    p = pregroup(ids, 4, 2)
    assert groups(p) in ([(0, 2), (1, 3)], [(0, 3), (1, 2)])
    assert max(rank_loads(ids, p)) <= 1.1 * 32
    # with the cap lifted the co-activated pair is grouped
    assert groups(pregroup(ids, 4, 2, max_imbalance=2.0)) == [(0, 1), (2, 3)]


def test_swaps_do_not_break_a_cap_the_seed_met():
    # 6 experts on 2 ranks; {0,1,2} is the co-activated triple but 0 and 1 are each about a third of
    # all load, so together they exceed the cap; the search must improve grouping within the cap
    ids = tokens((0, 1, 12), (1, 2, 4), (0, 2, 4), (3, 4, 8), (4, 5, 8), (0, 5, 4))
    _, load = coactivation(ids, 6)
    cap = load.sum().item() / 2 * 1.1
    seed = pregroup(ids, 6, 2, max_swaps=0)
    best = pregroup(ids, 6, 2)
    assert max(rank_loads(ids, seed)) <= cap and max(rank_loads(ids, best)) <= cap
    c, _ = coactivation(ids, 6)

    def within(p):
        r = torch.tensor(p.expert_to_rank)
        return (c * (r[:, None] == r[None, :])).sum().item() / 2

    assert within(best) >= within(seed)


def test_swap_that_lowers_an_overloaded_max_is_allowed():
    # one expert carries most tokens: no placement meets the cap, the seed puts it on the least loaded
    # rank; swaps may still regroup as long as the largest rank load does not grow
    ids = tokens((0, 1, 40), (2, 3, 5), (1, 2, 1))
    p = pregroup(ids, 4, 2)
    _, load = coactivation(ids, 4)
    assert max(rank_loads(ids, p)) <= max(rank_loads(ids, pregroup(ids, 4, 2, max_swaps=0)))


def test_placement_stats_by_hand():
    ids = tokens((0, 1, 3), (0, 2, 1))
    p = ExpertPlacement((0, 0, 1, 1), 2)
    s = placement_stats(ids, p)
    # tokens {0,1} sit on rank 0 (1 rank), {0,2} span 2 ranks: mean 1.25, local 3/4;
    # rank loads: 0 -> 7 routed, 1 -> 1: max / mean = 7 / 4
    assert s == {"distinct_ranks": 1.25, "local_all": 0.75, "load_imbalance": 1.75}
    empty = placement_stats(torch.zeros((0, 2), dtype=torch.int32), p)
    assert empty == {"distinct_ranks": 0.0, "local_all": 0.0, "load_imbalance": 1.0}


def test_trivial_layouts_and_validation():
    ids = tokens((0, 1, 3), (2, 3, 3))
    assert pregroup(ids, 4, 4) == ExpertPlacement.linear(4, 4)
    assert pregroup(ids, 4, 1) == ExpertPlacement.linear(4, 1)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        pregroup(ids, 4, 3)
    with pytest.raises(ValueError, match="evenly over 0 ranks"):
        pregroup(ids, 4, 0)
    with pytest.raises(ValueError, match="max_imbalance must be >= 1.0"):
        pregroup(ids, 4, 2, max_imbalance=0.99)
    pregroup(ids, 4, 2, max_imbalance=1.0)  # exactly 1 is allowed


def test_ties_go_to_the_least_loaded_rank_and_the_result_is_deterministic():
    # no co-activation across the two pairs' members at all: the seed spreads the heaviest experts
    ids = tokens((0, 1, 5), (2, 3, 5))
    p = pregroup(ids, 4, 2, max_imbalance=2.0)
    assert groups(p) == [(0, 1), (2, 3)]
    assert pregroup(ids, 4, 2, max_imbalance=2.0) == p
