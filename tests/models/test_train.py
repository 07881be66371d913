"""The training recipe end to end on a smoke-sized run, and its pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_frontier.models import train as train_mod
from vllm_frontier.models.reference import DeepseekReference


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_train")
    threads = torch.get_num_threads()
    try:
        assert train_mod.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_run_writes_two_views_sharing_weights(quick_run):
    v32, v3 = quick_run / "v32", quick_run / "v3"
    c32 = json.loads((v32 / "config.json").read_text())
    c3 = json.loads((v3 / "config.json").read_text())
    assert c32["architectures"] == ["DeepseekV32ForCausalLM"] and c32["index_topk"] == 64
    assert c3["architectures"] == ["DeepseekV3ForCausalLM"] and c3["model_type"] == "deepseek_v3"
    assert not [k for k in c3 if k.startswith("index_")]
    assert c3["num_nextn_predict_layers"] == 1
    # one stored copy of the shared weights
    assert (v3 / "model.safetensors").is_symlink()
    assert (v3 / "model.safetensors").resolve() == (v32 / "model.safetensors").resolve()
    m32 = DeepseekReference.from_pretrained(v32)
    m3 = DeepseekReference.from_pretrained(v3)
    sd32, sd3 = m32.hf_state_dict(), m3.hf_state_dict()
    assert set(sd3) == {k for k in sd32 if ".indexer." not in k}
    assert any(".indexer." in k for k in sd32)
    for k in sd3:
        assert torch.equal(sd3[k], sd32[k]), k
    # the MTP output head is DeepSeek-V3's shared head: the main lm_head
    assert torch.equal(sd32["model.layers.2.shared_head.head.weight"], sd32["lm_head.weight"])
    tok = json.loads((v32 / "tokenizer_config.json").read_text())
    assert "chat_template" in tok


def test_quick_run_report(quick_run):
    rep = json.loads((quick_run / "train_report.json").read_text())
    assert len(rep["history"]["pretrain"]) == 3 and len(rep["history"]["indexer"]) == 2
    for rec in rep["history"]["pretrain"]:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["mtp_loss"])
    m = rep["heldout_reference_metrics"]
    assert 1.0 < m["perplexity"] < 4 * m["vocab_size"]
    assert 0.0 <= m["indexer_recall"] <= 1.0
    assert set(m["indexer_recall_per_layer"]) == {"0", "1", "2"}


@pytest.mark.slow
def test_training_is_deterministic(quick_run, tmp_path):
    threads = torch.get_num_threads()
    try:
        train_mod.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for name in ("model.safetensors", "indexer.safetensors", "tokenizer.json"):
        assert (tmp_path / "v32" / name).read_bytes() == (quick_run / "v32" / name).read_bytes(), name


def test_indexer_kl_is_zero_only_for_the_target():
    from vllm_frontier.models.reference import ReferenceOutput

    g = torch.Generator().manual_seed(0)
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = torch.randn(1, 2, T, T, generator=g).masked_fill(~causal, float("-inf"))
    probs = logits.softmax(-1)
    target = probs.sum(1) / 2
    perfect = target.log().masked_fill(~causal, float("-inf"))
    out = ReferenceOutput(logits=None, hidden=None, attn_probs=[probs], index_scores=[perfect])
    assert train_mod.indexer_kl(out).item() == pytest.approx(0.0, abs=1e-6)
    out.index_scores = [torch.zeros(1, T, T).masked_fill(~causal, float("-inf"))]
    assert train_mod.indexer_kl(out).item() > 1e-3


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--seq-len", "2"], ["--threads", "0"]])
def test_cli_rejects_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit):
        train_mod.main(argv + ["--out", str(tmp_path)])


# -- MTP self-distillation (`vllm-frontier distill-mtp`) ---------------------------------------------------

def _torch_greedy(v3_dir, prompts, total_len):
    """The distillation's generator without vLLM: greedy continuations by the reference model."""
    model = DeepseekReference.from_pretrained(v3_dir)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            while ids.shape[1] < total_len:
                nxt = model(ids, sparse=False, mtp=False).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            out.append(ids[0].tolist())
    return out


def test_distillation_changes_only_the_mtp_module(quick_run, tmp_path):
    from vllm_frontier.models import distill_mtp

    threads = torch.get_num_threads()
    dc = distill_mtp.DistillConfig(steps=3, batch=2, seq_len=64, gen_sequences=4, eval_sequences=2,
                                   indexer_steps=2, eval_windows=2, train_files=20)
    try:
        rep = distill_mtp.run(quick_run, tmp_path, dc, log=lambda *_: None, generate=_torch_greedy)
    finally:
        torch.set_num_threads(threads)
    before = DeepseekReference.from_pretrained(quick_run / "v32").hf_state_dict()
    after = DeepseekReference.from_pretrained(tmp_path / "v32").hf_state_dict()
    assert set(before) == set(after)
    mtp = "model.layers.2."
    for k in before:
        if not k.startswith(mtp):
            assert torch.equal(before[k], after[k]), k      # the served model's own weights, bit for bit
    changed = {k for k in before if k.startswith(mtp) and not torch.equal(before[k], after[k])}
    assert f"{mtp}eh_proj.weight" in changed and f"{mtp}self_attn.indexer.wk.weight" in changed
    assert not [k for k in changed if ".shared_head.head." in k or "embed_tokens" in k]   # shared, frozen
    assert len(rep["history"]["distill"]) == 3 and len(rep["history"]["indexer"]) == 2
    for which in ("before", "after"):
        for v in rep["mtp_main_top1_agreement"][which].values():
            assert 0.0 <= v <= 1.0
    written = json.loads((tmp_path / "train_report.json").read_text())
    assert written["mtp_distill"]["final"] == rep["final"]
    assert written["history"] == json.loads((quick_run / "train_report.json").read_text())["history"]  # kept


def test_distillation_teaches_the_mtp_module_the_main_models_next_token():
    from vllm_frontier.models import distill_mtp
    from vllm_frontier.models.reference import ModelConfig
    from vllm_frontier.models.tiny_factory import tiny_config

    torch.manual_seed(0)
    model = DeepseekReference(ModelConfig.from_hf(tiny_config("deepseek_v3", mtp_layers=1, vocab_size=64)))
    train_mod.init_weights(model, seed=0)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (8, 24), generator=g)
    corpus = data.reshape(-1)
    dc = distill_mtp.DistillConfig(steps=60, batch=4, seq_len=24, lr=3e-3, warmup=5)
    agree0 = distill_mtp.mtp_agreement(model, data)
    with torch.no_grad():
        o = model(data, sparse=False)
        loss0 = distill_mtp.distill_loss(o.logits, o.mtp_logits, dc.hard_weight).item()
    main_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.layers.2.")}
    hist = distill_mtp.distill(model, corpus, data, dc, log=lambda *_: None)
    with torch.no_grad():
        o = model(data, sparse=False)
        loss1 = distill_mtp.distill_loss(o.logits, o.mtp_logits, dc.hard_weight).item()
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    for k, v in main_before.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert distill_mtp.mtp_agreement(model, data) > agree0 + 0.1
    assert len(hist) == 60


def test_distill_cli_rejects_bad_arguments(tmp_path):
    from vllm_frontier.models import distill_mtp

    with pytest.raises(SystemExit):
        distill_mtp.main(["--steps", "0", "--model", str(tmp_path)])
    with pytest.raises(SystemExit):          # no v32/ view there
        distill_mtp.main(["--model", str(tmp_path)])
