"""The shipped checkpoint: present, small, named as vLLM loads it, and actually trained."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_frontier.models import embedded_model_path
from vllm_frontier.models.reference import DeepseekReference
from vllm_frontier.models.tiny_factory import checkpoint_shapes


def test_paths_and_validation():
    assert (embedded_model_path("v32") / "config.json").is_file()
    assert (embedded_model_path("v3") / "config.json").is_file()
    assert embedded_model_path() == embedded_model_path("v32")
    with pytest.raises(ValueError, match="v32"):
        embedded_model_path("v4")


def test_stored_size_is_within_budget():
    root = embedded_model_path("v32").parent
    size = sum(os.path.getsize(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert size <= 25 * 2**20, f"embedded checkpoint is {size / 2**20:.1f} MiB, budget 25 MiB"


@pytest.mark.parametrize("view", ["v32", "v3"])
def test_weight_names_are_the_vllm_checkpoint_names(view):
    from safetensors import safe_open

    d = embedded_model_path(view)
    cfg = json.loads((d / "config.json").read_text())
    names = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                names[k] = tuple(s.get_slice(k).get_shape())
    want = dict(checkpoint_shapes(cfg))
    # the MTP layer's embedding copy is optional: vLLM's MTP loader takes model.embed_tokens.weight
    want.pop(f"model.layers.{cfg['num_hidden_layers']}.embed_tokens.weight")
    assert names == want


def test_trained_quality_on_heldout_text():
    from tokenizers import Tokenizer

    from vllm_frontier.models.corpus import read_split
    from vllm_frontier.models.train import eval_windows, token_stream
    from vllm_frontier.models.train_eval import evaluate_reference

    d = embedded_model_path("v32")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    stream = token_stream(read_split("heldout"), tok, tok.token_to_id("<|eos|>"))
    model = DeepseekReference.from_pretrained(d)
    m = evaluate_reference(model, eval_windows(stream, 2, 512))
    # A random model scores ~vocab_size (2048) or worse; the trained one is far below (train_report.json).
    assert m["perplexity"] < m["vocab_size"] / 4
    assert m["top1_accuracy"] > 0.01           # random: 1 / 2048
    assert m["mtp_next_next_top1_accuracy"] > 0.01
    # a random selection recalls ~mean(64 / (t + 1)) ~ 0.27 of the dense top-64 over t in [64, 512)
    assert m["indexer_recall"] > 0.4
