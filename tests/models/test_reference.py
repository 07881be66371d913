"""The torch reference model: checkpoint names, math conventions, causality, sparse attention, MTP, routing."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_frontier.models.reference import (
    DeepseekReference,
    ModelConfig,
    apply_rope,
    indexer_target_distribution,
    rope_cos_sin,
    stable_topk_indices,
)
from vllm_frontier.models.tiny_factory import checkpoint_shapes, random_weights, tiny_config


def _model(arch="deepseek_v32", mtp_layers=1, seed=0, **overrides) -> tuple[DeepseekReference, dict]:
    cfg = tiny_config(arch, mtp_layers=mtp_layers, vocab_size=300, **overrides)
    m = DeepseekReference(ModelConfig.from_hf(cfg))
    w = random_weights(cfg, seed)
    # Random factory weights: a std large enough that attention and routing are far from uniform.
    w = {k: (v * 5 if v.dim() == 2 and "embed" not in k else v) for k, v in w.items()}
    m.load_hf_state_dict(w)
    return m.eval(), cfg


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v32"])
def test_state_dict_names_are_the_checkpoint_names(arch):
    cfg = tiny_config(arch, mtp_layers=1)
    m = DeepseekReference(ModelConfig.from_hf(cfg))
    ours = {k: tuple(v.shape) for k, v in m.hf_state_dict().items()}
    theirs = dict(checkpoint_shapes(cfg))
    # The factory writes the MTP layer's own embed_tokens copy; the reference reads it when present and
    # falls back to the main embedding otherwise, so it is not a parameter of a freshly built model.
    theirs.pop("model.layers.2.embed_tokens.weight")
    assert ours == theirs


def test_load_rejects_a_wrong_checkpoint():
    m, cfg = _model()
    sd = m.hf_state_dict()
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        m.load_hf_state_dict(sd)
    sd = m.hf_state_dict()
    del sd["model.layers.1.mlp.gate.weight"]
    with pytest.raises(ValueError, match="missing"):
        m.load_hf_state_dict(sd)


def test_stable_topk_tie_rule_and_padding():
    s = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 3.0, 0.5]])
    assert stable_topk_indices(s, 3).tolist() == [[1, 2, 4]]           # ties: lower position first
    assert stable_topk_indices(s, 5).tolist() == [[1, 2, 4, 0, 5]]
    assert stable_topk_indices(s, 6).tolist() == [[1, 2, 4, 0, 5, -1]]  # -inf is never selected
    assert stable_topk_indices(s, 8).tolist() == [[1, 2, 4, 0, 5, -1, -1, -1]]
    with pytest.raises(ValueError):
        stable_topk_indices(s, 0)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_rope_is_a_rotation_by_position(interleaved):
    g = torch.Generator().manual_seed(0)
    d = 64
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    pos = torch.tensor([3, 10, 103, 110])
    cos, sin = rope_cos_sin(pos, d, 10000.0)
    qr = apply_rope(q.expand(4, d), cos, sin, interleaved=interleaved)
    kr = apply_rope(k.expand(4, d), cos, sin, interleaved=interleaved)
    # norm preserved, and q.k depends only on the position difference (10-3 == 110-103)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qr[1] @ kr[0], qr[3] @ kr[2], rtol=1e-4, atol=1e-4)
    # pair layout: interleaved rotates (x0, x1) by the first frequency (1 rad per position at i=0)
    e0 = torch.zeros(d)
    e0[0] = 1.0
    c1, s1 = rope_cos_sin(torch.tensor([1]), d, 10000.0)
    r = apply_rope(e0[None], c1, s1, interleaved=interleaved)[0]
    partner = 1 if interleaved else d // 2
    assert r[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert r[partner].item() == pytest.approx(math.sin(1.0), abs=1e-6)


def test_outputs_are_causal():
    m, _ = _model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (1, 24), generator=g)
    ids2 = ids.clone()
    ids2[0, 15:] = torch.randint(3, 300, (9,), generator=g)
    for sparse in (False, True):
        a, b = m(ids, sparse=sparse), m(ids2, sparse=sparse)
        torch.testing.assert_close(a.logits[:, :15], b.logits[:, :15], rtol=0, atol=1e-5)
        # MTP position i reads token i+1: positions < 14 are unaffected by tokens >= 15
        torch.testing.assert_close(a.mtp_logits[:, :14], b.mtp_logits[:, :14], rtol=0, atol=1e-5)
        assert not torch.allclose(a.logits[:, 15:], b.logits[:, 15:])


def test_sparse_attention_equals_dense_until_the_topk_is_full():
    k = 8
    m, _ = _model(index_topk=k)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    # return_attn=True takes the explicit-softmax path that sparse attention uses (SDPA sums differently)
    dense, sparse = m(ids, sparse=False, return_attn=True), m(ids, sparse=True)
    # query t has t + 1 keys: all selected while t + 1 <= k
    torch.testing.assert_close(dense.logits[:, :k], sparse.logits[:, :k], rtol=0, atol=1e-5)
    assert (dense.logits[:, k:] - sparse.logits[:, k:]).abs().max() > 1e-3
    # the selection itself: k valid entries from t = k - 1 on, t + 1 before; never a future key
    topk = sparse.topk_indices[0]
    t = torch.arange(20)[None, :, None]
    assert ((topk <= t) | (topk == -1)).all()
    assert ((topk >= 0).sum(-1) == torch.clamp(torch.arange(20) + 1, max=k)).all()
    # a top-k that covers the whole context is dense attention
    big, _ = _model(index_topk=64)
    torch.testing.assert_close(big(ids, sparse=True).logits, big(ids, sparse=False, return_attn=True).logits,
                               rtol=0, atol=1e-5)


def test_indexer_score_matches_the_formula():
    m, cfg = _model()
    layer = m.model.layers[0]
    att = layer.self_attn
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    x = layer.input_layernorm(m.model.embed_tokens(ids))
    cos, sin = rope_cos_sin(torch.arange(6)[None], 64, cfg["rope_theta"])
    q_c = att.q_a_layernorm(att.q_a_proj(x))
    got = att.indexer.scores(x, q_c, cos, sin)[0]
    idx = att.indexer
    nh, hd = cfg["index_n_heads"], cfg["index_head_dim"]
    q = idx.wq_b(q_c)[0].view(6, nh, hd)
    k = torch.nn.functional.layer_norm(idx.wk(x)[0], (hd,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    w = idx.weights_proj(x)[0] / math.sqrt(hd) / math.sqrt(nh)
    for t in range(6):
        for s in range(6):
            if s > t:
                assert got[t, s] == float("-inf")
                continue
            # NeoX rope on the first 64 dims of each q head and of k
            qt = torch.cat([apply_rope(q[t, :, :64], cos[0, t], sin[0, t], interleaved=False), q[t, :, 64:]], -1)
            ks = torch.cat([apply_rope(k[s, :64], cos[0, s], sin[0, s], interleaved=False), k[s, 64:]], -1)
            want = (w[t] * (qt @ ks).relu()).sum()
            assert got[t, s].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_moe_routing_uses_biased_choice_and_unbiased_weights():
    m, cfg = _model()
    moe = m.model.layers[1].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, cfg["n_routed_experts"]))
    x = torch.randn(5, cfg["hidden_size"], generator=torch.Generator().manual_seed(4))
    w, ids, scores = moe.route(x)
    s = torch.sigmoid(x @ moe.gate.weight.T)
    want_ids = stable_topk_indices(s + moe.gate.e_score_correction_bias, cfg["num_experts_per_tok"])
    assert torch.equal(ids, want_ids)
    want_w = s.gather(1, want_ids)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True))
    out, trace = moe(x)
    manual = sum(w[:, j, None] * torch.stack([moe.experts[e](x[i]) for i, e in enumerate(ids[:, j].tolist())])
                 for j in range(ids.shape[1])) + moe.shared_experts(x)
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    assert torch.equal(trace, ids)


def test_mtp_ignores_the_token_at_position_zero_and_routing_traces_are_returned():
    m, cfg = _model()
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(5))
    ids2 = ids.clone()
    ids2[0, 1] = (ids[0, 1] + 7) % 300
    a, b = m(ids), m(ids2)
    # position 0's MTP input embedding (token 1) is zeroed, as vLLM does; h_0 does not see token 1
    # (1e-5: fp32 reductions over other positions' rows differ in order; a real dependence is >> 1e-3)
    torch.testing.assert_close(a.mtp_logits[:, 0], b.mtp_logits[:, 0], rtol=0, atol=1e-5)
    assert not torch.allclose(a.mtp_logits[:, 1], b.mtp_logits[:, 1])
    assert a.mtp_logits.shape == (1, 9, 300)
    # layer 0 is dense (first_k_dense_replace=1): MoE traces for layer 1 and the MTP layer 2
    assert a.routing_layers == [1, 2]
    assert a.routing[0].shape == (1, 10, cfg["num_experts_per_tok"])
    assert a.routing[1].shape == (1, 9, cfg["num_experts_per_tok"])
    assert ((a.routing[0] >= 0) & (a.routing[0] < cfg["n_routed_experts"])).all()


def test_token_logprobs_and_attention_probs():
    m, cfg = _model()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    lp = m.token_logprobs(ids, sparse=False)
    o = m(ids, sparse=False, return_attn=True)
    want = o.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want)
    assert len(o.attn_probs) == 3 and len(o.index_scores) == 3
    p = indexer_target_distribution(o.attn_probs[0])
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 12))
    assert (p.triu(1) == 0).all()


def test_config_validation():
    cfg = tiny_config("deepseek_v3")
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(dict(cfg, hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig.from_hf(dict(cfg, rope_scaling={"type": "yarn", "factor": 4.0}))
    m = DeepseekReference(ModelConfig.from_hf(cfg))
    with pytest.raises(ValueError, match="index_topk"):
        m(torch.zeros(1, 4, dtype=torch.long), sparse=True)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        m(torch.zeros(4, dtype=torch.long))
