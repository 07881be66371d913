"""Single-process unit tests: batch invariance, routing, placement file, shuffle planning."""

from __future__ import annotations

import pytest
import torch

from vllm_frontier.moe.experts import MoEWeights, bi_linear, swiglu_mlp
from vllm_frontier.moe.placement import ExpertPlacement, load_placements, save_placements
from vllm_frontier.moe.reference import reference_moe
from vllm_frontier.moe.routing import RouterConfig, route
from vllm_frontier.moe.shuffle import (
    NO_PREDICTION,
    TokenTablePredictor,
    TransitionPredictor,
    best_ranks,
    contiguous_ranks,
    plan_token_ranks,
    prediction_accuracy,
    worst_ranks,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h,i", [(48, 40), (60, 100), (7, 3)], ids=lambda v: str(v))
def test_expert_math_is_batch_invariant(h, i, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, h, generator=g).to(dtype)
    w13 = torch.randn(2 * i, h, generator=g).to(dtype)
    w2 = torch.randn(h, i, generator=g).to(dtype)
    full = swiglu_mlp(x, w13, w2)
    full_lin = bi_linear(x, w13)
    for trial in range(30):
        n = int(torch.randint(0, 140, (1,), generator=g))
        idx = torch.randperm(203, generator=g)[:n]
        assert torch.equal(swiglu_mlp(x[idx], w13, w2), full[idx]), (trial, n)
        assert torch.equal(bi_linear(x[idx], w13), full_lin[idx]), (trial, n)


@pytest.mark.parametrize(
    "cfg",
    [
        RouterConfig(top_k=2),
        RouterConfig(top_k=4, scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
        RouterConfig(top_k=3, n_group=2, topk_group=1, norm_topk_prob=False),
    ],
    ids=["softmax-k2", "sigmoid-grouped-k4", "softmax-grouped-k3-unnorm"],
)
def test_routing_batch_invariant_and_valid(cfg):
    w = MoEWeights.random(16, 32, 8, with_bias=cfg.scoring_func == "sigmoid", seed=1)
    x = torch.randn(150, 32, generator=torch.Generator().manual_seed(2))
    tw, ti = route(x, w.gate, cfg, w.e_score_correction_bias)
    assert tw.dtype == torch.float32 and ti.dtype == torch.int64 and ti.shape == (150, cfg.top_k)
    assert all(len(set(row)) == cfg.top_k for row in ti.tolist())  # distinct experts per token
    if cfg.n_group > 1:  # all chosen experts lie in at most topk_group groups
        groups = ti // (16 // cfg.n_group)
        assert all(len(set(row)) <= cfg.topk_group for row in groups.tolist())
    if cfg.norm_topk_prob:
        torch.testing.assert_close(tw.sum(1), torch.full((150,), cfg.routed_scaling_factor))
    for n in (1, 5, 63, 64, 65):
        tw2, ti2 = route(x[-n:], w.gate, cfg, w.e_score_correction_bias)
        assert torch.equal(ti2, ti[-n:]) and torch.equal(tw2, tw[-n:])


def test_route_rejects_bad_config():
    with pytest.raises(ValueError, match="scoring_func"):
        RouterConfig(top_k=2, scoring_func="relu")
    with pytest.raises(ValueError, match="topk_group"):
        RouterConfig(top_k=2, n_group=2, topk_group=3)
    w = MoEWeights.random(6, 8, 4)
    with pytest.raises(ValueError, match="n_group"):
        route(torch.zeros(2, 8), w.gate, RouterConfig(top_k=2, n_group=4, topk_group=1))


def test_reference_matches_naive_loop():
    """The reference equals a per-token loop written from the formula (fp32 tolerance)."""
    cfg = RouterConfig(top_k=2, routed_scaling_factor=1.5)
    w = MoEWeights.random(8, 24, 16, shared_intermediate_size=12, seed=4)
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(3))
    out = reference_moe(x, w, cfg)
    tw, ti = route(x, w.gate, cfg)
    for t in range(9):
        def mlp(v, a, b):
            h = a @ v
            return b @ (torch.nn.functional.silu(h[: b.shape[1]]) * h[b.shape[1]:])
        want = mlp(x[t], w.shared_w13, w.shared_w2)
        for j in range(2):
            want = want + tw[t, j] * mlp(x[t], w.w13[ti[t, j]], w.w2[ti[t, j]])
        # different summation order and matmul kernels: fp32 rounding, values O(1)
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


def test_placement_validation_and_file(tmp_path):
    p = ExpertPlacement((1, 0, 0, 1), 2)
    assert p.local_experts(0) == [1, 2] and p.local_experts(1) == [0, 3]
    assert p.local_index(torch.tensor([0, 1, 2, 3])).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="evenly"):
        ExpertPlacement.linear(6, 4)
    with pytest.raises(ValueError, match="must hold"):
        ExpertPlacement((0, 0, 0, 1), 2)
    with pytest.raises(ValueError, match="outside"):
        ExpertPlacement((0, 2, 1, 1), 2)
    path = save_placements(tmp_path / "p.json", {0: p, 3: ExpertPlacement.linear(4, 2)}, {"src": "test"})
    back = load_placements(path)
    assert back == {0: p, 3: ExpertPlacement.linear(4, 2)}
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="regenerate"):
        load_placements(tmp_path / "bad.json")


def test_best_and_worst_ranks():
    p = ExpertPlacement.linear(8, 4)  # rank r holds 2r, 2r+1
    ids = torch.tensor([[0, 1], [2, 7], [7, 2], [5, 4]])
    assert best_ranks(ids, p).tolist() == [0, 1, 3, 2]
    worst = worst_ranks(ids, p)
    assert (worst != best_ranks(ids, p)).all()
    counts = [[int(p.rank_of(e) == worst[t]) for e in ids[t]] for t in range(4)]
    assert counts == [[0, 0], [0, 0], [0, 0], [0, 0]]


def test_plan_token_ranks_capacity_and_fill():
    pred = torch.tensor([0, 0, 0, 0, 0, 1, NO_PREDICTION, 2])
    out = plan_token_ranks(pred, 4, capacity_factor=1.0)  # cap = 2
    assert torch.bincount(out, minlength=4).tolist() == [2, 2, 2, 2]
    assert out[:2].tolist() == [0, 0] and out[5].item() == 1 and out[7].item() == 2
    assert plan_token_ranks(pred, 4, capacity_factor=4.0)[:5].tolist() == [0] * 5
    assert contiguous_ranks(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        plan_token_ranks(torch.tensor([5]), 4)


def test_predictors_learn_a_deterministic_mapping():
    p = ExpertPlacement.linear(8, 4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (400,), generator=g)
    # token v always routes to experts (v % 8, (v + 1) % 8); the next layer copies the previous
    ids = torch.stack([tokens % 8, (tokens + 1) % 8], dim=1)
    table = TokenTablePredictor(64, p).fit(tokens, ids)
    pred = table.predict(tokens)
    assert prediction_accuracy(pred, ids, p)["best"] == 1.0
    unseen = table.predict(torch.tensor([60, 63]))
    assert unseen.tolist() == [NO_PREDICTION, NO_PREDICTION]
    trans = TransitionPredictor(8, p).fit(ids, ids)
    acc = prediction_accuracy(trans.predict(ids), ids, p)
    assert acc["hit"] == 1.0 and acc["covered"] == 1.0


def test_pregroup_recovers_planted_clusters_and_balances():
    from vllm_frontier.moe.pregroup import placement_stats, pregroup

    # 16 experts in 4 planted clusters of 4 (scrambled ids); each token picks 2 experts of one cluster
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(16, generator=g)
    clusters = perm.view(4, 4)
    which = torch.randint(0, 4, (3000,), generator=g)
    picks = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(3000)])
    ids = clusters[which.unsqueeze(1), picks]
    p = pregroup(ids, 16, 4)
    stats = placement_stats(ids, p)
    assert stats["distinct_ranks"] == 1.0 and stats["local_all"] == 1.0
    assert stats["load_imbalance"] <= 1.1
    assert placement_stats(ids, ExpertPlacement.linear(16, 4))["distinct_ranks"] > 1.3
    # one expert per rank: nothing to group, the linear placement comes back
    assert pregroup(ids, 16, 16) == ExpertPlacement.linear(16, 16)
    with pytest.raises(ValueError, match="evenly"):
        pregroup(ids, 16, 3)


def test_trace_file_roundtrip_and_synthetic_shape(tmp_path):
    from vllm_frontier.moe.traces import RoutingTraces, load_traces, synthetic_skewed_traces

    tr = synthetic_skewed_traces(num_layers=2, num_tokens=500, num_experts=32, top_k=4, seed=1)
    assert tr.topk_ids.shape == (2, 500, 4) and tr.token_ids.shape == (500,)
    assert all(len(set(r)) == 4 for r in tr.topk_ids[0].tolist())  # distinct experts per token
    back = load_traces(tr.save(tmp_path / "t.pt"))
    assert torch.equal(back.topk_ids, tr.topk_ids) and torch.equal(back.token_ids, tr.token_ids)
    a, b = tr.split(0.4)
    assert a.num_tokens == 200 and b.num_tokens == 300
    with pytest.raises(ValueError, match="expert ids"):
        RoutingTraces(torch.tensor([[[0, 40]]]), 32)
    torch.save({"format": "x"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="record one"):
        load_traces(tmp_path / "bad.pt")
