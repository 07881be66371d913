"""Token-placement predictors, the score planner, trace files v2, and recording from the embedded model."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

from vllm_frontier.moe.placement import ExpertPlacement
from vllm_frontier.moe.shuffle import (
    NO_PREDICTION,
    LookaheadPredictor,
    TokenTablePredictor,
    TransitionPredictor,
    chain_scores,
    plan_from_scores,
    plan_token_ranks,
    prediction_accuracy,
    rank_presence,
)
from vllm_frontier.moe.traces import RoutingTraces, load_traces

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRACE_FILE = ROOT / "benchmarks" / "results" / "spec_moe" / "spec_moe_traces_v3.pt"
MODEL_DIR = ROOT / "vllm_frontier" / "models" / "embedded" / "v3"


def test_rank_presence_and_table_votes_every_rank_holding_an_expert():
    p = ExpertPlacement.linear(8, 4)  # rank r holds 2r, 2r+1
    ids = torch.tensor([[0, 7], [0, 1], [3, 2]])
    assert rank_presence(ids, p).tolist() == [[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]
    tokens = torch.tensor([5, 5, 9, 5])
    table = TokenTablePredictor(16, p).fit(tokens, torch.tensor([[0, 7], [0, 7], [3, 2], [1, 6]]))
    sc = table.scores(torch.tensor([5, 9, 4, 99]))
    # token 5: rank 0 in all three occurrences, rank 3 in all three (experts 7, 7, 6)
    assert sc[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert sc[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert sc[2].sum() == 0 and sc[3].sum() == 0  # unseen, outside the vocabulary
    assert table.predict(torch.tensor([5, 9, 4, 99])).tolist() == [0, 1, NO_PREDICTION, NO_PREDICTION]


def test_transition_scores_average_the_previous_experts():
    p = ExpertPlacement.linear(4, 2)  # rank 0: 0, 1; rank 1: 2, 3
    prev = torch.tensor([[0, 1], [0, 2]])
    cur = torch.tensor([[0, 1], [2, 3]])
    tr = TransitionPredictor(4, p).fit(prev, cur)
    # expert 0: rank 0 once, rank 1 once; expert 1: rank 0; expert 2: rank 1; expert 3: never seen
    assert tr.scores(torch.tensor([[1, 3]])).tolist() == [[0.5, 0.0]]
    assert tr.scores(torch.tensor([[0, 2]])).tolist() == [[0.25, 0.75]]
    assert tr.predict(torch.tensor([[3, 3], [2, 2]])).tolist() == [NO_PREDICTION, 1]


def test_lookahead_folds_predicted_experts_onto_the_placement():
    grouped = ExpertPlacement((1, 0, 1, 0), 2)
    look = LookaheadPredictor(grouped)
    pred = torch.tensor([[0, 2], [1, 2], [3, 1]])
    assert look.scores(pred).tolist() == [[0, 1], [1, 1], [1, 0]]
    assert look.predict(pred).tolist() == [1, 0, 0]  # tie [1, 2]: the earliest slot's rank
    real = torch.tensor([[2, 0], [0, 2], [1, 3]])
    assert prediction_accuracy(look.predict(pred), real, grouped)["best"] == pytest.approx(2 / 3)


def test_chain_takes_the_first_predictor_with_a_prediction():
    a = torch.tensor([[0.0, 0.0], [0.2, 0.8], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert chain_scores(a, b, c).tolist() == [[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]]
    with pytest.raises(ValueError):
        chain_scores()


def test_plan_from_scores_falls_back_to_the_next_best_rank():
    # 6 tokens, 3 ranks, cap 2: four tokens want rank 0; their second choices differ
    scores = torch.tensor([
        [0.9, 0.5, 0.0],   # confident, lead 0.4
        [0.6, 0.0, 0.55],  # lead 0.05: loses rank 0, goes to rank 2
        [0.9, 0.0, 0.1],   # lead 0.8
        [0.6, 0.5, 0.0],   # lead 0.1: loses rank 0, goes to rank 1
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0],   # no prediction: its home rank (2) if free
    ], dtype=torch.float64)
    out = plan_from_scores(scores, 1.0, home=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out.tolist() == [0, 2, 0, 1, 1, 2]
    # the first-choice planner sends the overflow to an arbitrary free rank instead
    first = plan_token_ranks(scores.argmax(1), 3, capacity_factor=1.0)
    assert first.tolist() != out.tolist()
    hits = lambda r: sum(scores[t, r[t]].item() > 0 for t in range(5))  # noqa: E731
    assert hits(out) == 5 and hits(first) < 5


def test_plan_from_scores_capacity_and_determinism():
    g = torch.Generator().manual_seed(3)
    for t, n, cf in ((257, 8, 1.5), (64, 4, 1.0), (5, 8, 1.0), (100, 1, 1.0)):
        scores = (torch.rand(t, n, generator=g) > 0.7).double() * torch.rand(t, n, generator=g)
        scores[:, 0] += 0.5  # everyone prefers rank 0: the cap must spill them
        out = plan_from_scores(scores, cf)
        assert out.shape == (t,) and out.min() >= 0 and out.max() < n
        assert torch.bincount(out, minlength=n).max().item() <= math.ceil(t / n * cf)
        assert torch.equal(out, plan_from_scores(scores.clone(), cf))
    assert plan_from_scores(torch.zeros(0, 4)).numel() == 0
    with pytest.raises(ValueError):
        plan_from_scores(torch.zeros(3, 2), 0.5)


def test_trace_v2_roundtrip_compact_and_v1_compat(tmp_path):
    g = torch.Generator().manual_seed(0)
    topk = torch.randint(0, 8, (2, 30, 2), generator=g)
    pred = torch.randint(0, 8, (2, 30, 2), generator=g)
    tr = RoutingTraces(topk, 8, torch.randint(0, 2048, (30,), generator=g), {"m": 1}, pred)
    path = tr.save(tmp_path / "t.pt")
    doc = torch.load(path, weights_only=False)
    assert doc["version"] == 2 and doc["topk_ids"].dtype == torch.int16
    back = load_traces(path)
    assert back.topk_ids.dtype == torch.int64 and torch.equal(back.predicted_topk_ids, pred)
    assert torch.equal(back.token_ids, tr.token_ids)
    a, b = back.split(0.5)
    assert torch.equal(b.predicted_topk_ids, pred[:, 15:]) and torch.equal(a.slice(2, 4).topk_ids, topk[:, 2:4])
    # a version-1 file (no predictions) still loads
    torch.save({"format": "vllm-frontier/routing-traces", "version": 1, "topk_ids": topk, "token_ids": None,
                "num_experts": 8, "meta": {}}, tmp_path / "v1.pt")
    old = load_traces(tmp_path / "v1.pt")
    assert old.predicted_topk_ids is None and torch.equal(old.topk_ids, topk)
    torch.save({**doc, "version": 3}, tmp_path / "v3.pt")
    with pytest.raises(ValueError, match="record one"):
        load_traces(tmp_path / "v3.pt")
    with pytest.raises(ValueError, match="predicted_topk_ids"):
        RoutingTraces(topk, 8, None, {}, pred[:, :3])
    with pytest.raises(ValueError, match="predicted expert ids"):
        RoutingTraces(topk, 8, None, {}, pred + 8)


def _spec_moe_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import spec_moe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return spec_moe


def test_recorded_traces_match_the_embedded_model():
    """The committed trace file re-records identically, and its lookahead ids are layer 0's gate on the
    layer's input (the token embeddings), computed here independently of the recording hook."""
    from vllm_frontier.models.reference import DeepseekReference

    committed = load_traces(TRACE_FILE)
    assert committed.num_experts == 8 and committed.top_k == 2 and committed.num_layers == 2
    assert committed.predicted_topk_ids is not None and committed.meta["corpus"] == "heldout"
    fresh = _spec_moe_module().record_traces(str(MODEL_DIR), 256, 256)
    assert fresh.num_tokens == 256
    assert torch.equal(fresh.token_ids, committed.token_ids[:256])
    assert torch.equal(fresh.topk_ids, committed.topk_ids[:, :256])
    assert torch.equal(fresh.predicted_topk_ids, committed.predicted_topk_ids[:, :256])
    model = DeepseekReference.from_pretrained(MODEL_DIR).eval()
    layer0 = model.main_layers[0]
    with torch.no_grad():
        h = model.model.embed_tokens(fresh.token_ids)
        _, want, _ = layer0.mlp.route(layer0.post_attention_layernorm(h))
    assert torch.equal(fresh.predicted_topk_ids[0], want)
    # the lookahead is a prediction, not the routing itself
    assert not torch.equal(fresh.predicted_topk_ids, fresh.topk_ids)


def test_benchmark_variants_are_lossless_on_two_ranks():
    """The benchmark's measured path on the recorded traces: every variant bit-equal to plain EP with the same
    placement, analytic pair count equal to the layer's byte counters."""
    spec_moe = _spec_moe_module()
    tr = load_traces(TRACE_FILE).slice(0, 2048)
    train, test = tr.split(0.5)
    fits = [spec_moe.fit_layer(train, layer, 2, 1.1) for layer in range(2)]
    args = spec_moe.argparse.Namespace(steps=1, batch=128, capacity=1.5, hidden=32, inter=8, planner="scores")
    m = spec_moe.measure(test, fits, 2, args)
    assert m["lossless_all_ranks"] and m["analytic_matches_measured"]
    assert "spec[chain]" in m["variants"] and "shuffle[lookahead]" in m["variants"]
    assert m["spec[chain]"]["bytes_sent_total"] < m["plain"]["bytes_sent_total"]
