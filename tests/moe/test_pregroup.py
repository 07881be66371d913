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
    assert p.expert_to_rank == (0, 1, 0, 1)  # 0 first on rank 0, then 2 beside it, 1 and 3 on rank 1


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
    # a rank no token reaches still counts in the mean: loads [8, 0] -> 8 / 4
    assert placement_stats(tokens((0, 1, 4)), p)["load_imbalance"] == 2.0
    assert placement_stats(torch.tensor([[2]]), p)["load_imbalance"] == 2.0  # one routed token
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


# ---- the `vllm-frontier spec-moe-placement` command ------------------------------------------
def _trace_file(tmp_path):
    from vllm_frontier.moe.traces import RoutingTraces

    layer = tokens((0, 1, 10), (2, 3, 10), (0, 2, 6))
    ids = torch.stack([layer, layer.flip(1)]).long()  # 2 layers
    return RoutingTraces(ids, 4).save(tmp_path / "t.pt")


def test_cli_writes_one_placement_per_layer(tmp_path, capsys):
    import json

    from vllm_frontier.moe.placement import load_placements
    from vllm_frontier.moe.pregroup import main

    out = tmp_path / "p.json"
    assert main(["--traces", str(_trace_file(tmp_path)), "--ranks", "2", "--out", str(out),
                 "--max-imbalance", "2.0", "--first-moe-layer", "3"]) == 0
    placements = load_placements(out)
    assert sorted(placements) == [3, 4]
    assert groups(placements[3]) == groups(placements[4]) == [(0, 1), (2, 3)]
    doc = json.loads(out.read_text())
    assert doc["meta"] == {"traces": str(tmp_path / "t.pt"), "trace_tokens": 26, "max_imbalance": 2.0}
    text = capsys.readouterr().out
    assert text.count("layer 3: ") == 1 and text.count("layer 4: ") == 1
    assert "(linear placement: {" in text and text.rstrip().endswith(f"wrote {out}")


def test_cli_default_cap_is_1_1(tmp_path):
    from vllm_frontier.moe.placement import load_placements
    from vllm_frontier.moe.pregroup import main

    out = tmp_path / "p.json"
    assert main(["--traces", str(_trace_file(tmp_path)), "--ranks", "2", "--out", str(out)]) == 0
    p = load_placements(out)
    assert sorted(p) == [0, 1]  # first MoE layer 0 by default
    assert p[0] == pregroup(tokens((0, 1, 10), (2, 3, 10), (0, 2, 6)), 4, 2, max_imbalance=1.1)


@pytest.mark.parametrize("argv,match", [
    (["--ranks", "3"], "--ranks must divide the 4 experts of the traces"),
    (["--ranks", "0"], "--ranks must divide the 4 experts"),
    (["--ranks", "2", "--max-imbalance", "0.9"], "--max-imbalance must be >= 1"),
    (["--ranks", "2", "--first-moe-layer", "-1"], "--first-moe-layer must be >= 0"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, match):
    from vllm_frontier.moe.pregroup import main

    with pytest.raises(SystemExit) as e:
        main(["--traces", str(_trace_file(tmp_path)), "--out", str(tmp_path / "p.json"), *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_cli_unreadable_traces_is_one_line(tmp_path, capsys):
    from vllm_frontier.moe.pregroup import main

    assert main(["--traces", str(tmp_path / "missing.pt"), "--ranks", "2", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-frontier spec-moe-placement: error: ") and err.count("\n") == 1


def single(*loads):
    """Tokens with one expert each (k = 1): no co-activation, only loads."""
    return torch.tensor([[e] for e, n in enumerate(loads) for _ in range(n)], dtype=torch.int32)


def test_seed_breaks_ties_towards_the_least_loaded_rank():
    # no co-activation: 0 (5) -> rank 0; 1 (4) -> rank 1 (less loaded); 2 (3) -> rank 1 (4 < 5); 3 -> rank 0
    assert pregroup(single(5, 4, 3, 2), 4, 2, max_imbalance=2.0).expert_to_rank == (0, 1, 1, 0)


def test_seed_may_fill_a_rank_exactly_to_the_cap():
    # loads 3 each, cap = 1.0 x 6: expert 1 joins its partner 0 on rank 0 at exactly the cap
    ids = tokens((0, 1, 3), (2, 3, 3))
    assert pregroup(ids, 4, 2, max_imbalance=1.0, max_swaps=0).expert_to_rank == (0, 0, 1, 1)


def test_seed_falls_back_to_the_least_loaded_open_rank_when_nothing_fits():
    # loads 30, 28, 25, 5 (total 88, cap 48.4): 0 -> r0, 1 -> r1, 2 fits nowhere -> r1 (28 < 30), 3 -> r0
    assert pregroup(single(30, 28, 25, 5), 4, 2).expert_to_rank == (0, 1, 1, 0)
    # 6 experts on 3 ranks, cap 1.1 x 68: 0 and 1 fit nowhere (to r0, then the emptier r1); 2 and 3 fill
    # r2; 4 fits nowhere and the least loaded rank (r2) is full, so the emptier open rank r1 takes it
    p = pregroup(single(100, 90, 5, 4, 3, 2), 6, 3)
    assert p.expert_to_rank == (0, 1, 2, 2, 1, 0)


def test_one_expert_per_rank_is_the_linear_placement_whatever_the_loads():
    ids = tokens((3, 2, 5), (1, 0, 1))
    assert pregroup(ids, 4, 4) == ExpertPlacement.linear(4, 4)
    assert pregroup(ids, 4, 1) == ExpertPlacement.linear(4, 1)


def _within(c, p):
    r = torch.tensor(p.expert_to_rank)
    return (c * (r[:, None] == r[None, :])).sum().item() / 2


@pytest.mark.parametrize("seed,e,n", [(0, 8, 2), (1, 8, 2), (2, 12, 3), (3, 12, 4), (4, 16, 4), (5, 9, 3)])
def test_local_search_ends_in_a_swap_optimum_that_respects_the_cap(seed, e, n):
    """Checked by brute force: no swap of two experts on different ranks raises the within-rank
    co-activation while keeping the loads allowed, and the result is never worse than the seed."""
    g = torch.Generator().manual_seed(seed)
    # clustered traffic with noise: tokens pick 2 experts, mostly from a hidden group
    hidden = torch.randperm(e, generator=g).view(n, e // n)
    t = 400
    grp = torch.randint(0, n, (t,), generator=g)
    pick = torch.stack([torch.randperm(e // n, generator=g)[:2] for _ in range(t)])
    ids = hidden[grp.unsqueeze(1), pick]
    noise = torch.rand(t, generator=g) < 0.3
    ids[noise, 1] = (ids[noise, 0] + 1 + torch.randint(0, e - 1, (int(noise.sum()),), generator=g)) % e
    c, load = coactivation(ids, e)
    cap = load.sum().item() / n * 1.1
    seed_p = pregroup(ids, e, n, max_swaps=0)
    p = pregroup(ids, e, n)
    assert _within(c, p) >= _within(c, seed_p)
    rl = rank_loads(ids, p)
    seed_max = max(rank_loads(ids, seed_p))
    assert max(rl) <= max(cap, seed_max) + 1e-9
    best = _within(c, p)
    ranks = list(p.expert_to_rank)
    for a in range(e):
        for b in range(a + 1, e):
            ra, rb = ranks[a], ranks[b]
            if ra == rb:
                continue
            new_a = rl[ra] - load[a].item() + load[b].item()
            new_b = rl[rb] - load[b].item() + load[a].item()
            if max(new_a, new_b) > max(cap, max(rl[ra], rl[rb])) + 1e-9:
                continue  # not an allowed swap
            sw = ranks[:]
            sw[a], sw[b] = rb, ra
            assert _within(c, ExpertPlacement(tuple(sw), n)) <= best + 1e-9, (a, b)


@pytest.mark.parametrize("missing", ["--traces", "--ranks", "--out"])
def test_cli_required_arguments(tmp_path, capsys, missing):
    from vllm_frontier.moe.pregroup import main

    args = {"--traces": str(_trace_file(tmp_path)), "--ranks": "2", "--out": str(tmp_path / "p.json")}
    del args[missing]
    with pytest.raises(SystemExit) as e:
        main([x for kv in args.items() for x in kv])
    assert e.value.code == 2 and f"the following arguments are required: {missing}" in capsys.readouterr().err
