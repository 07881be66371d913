"""The GPU path inside real vLLM CPU engines: FRONTIER_FORCE_TRITON=1 with TRITON_INTERPRET=1 makes every kernel
call of our backends (latent / indexer cache writes, indexer logits and top-k, sparse and dense MLA over the
paged cache) run its Triton kernel, through the same metadata builders and block tables a GPU uses. Greedy
tokens must equal the torch-path engine's and prompt logprobs agree to float32 rounding (tiny float32 models).
With MTP, the drafter's layer runs the same sparse kernels and the target verifies several tokens per request
in one step; both engines must have drafted.

Not covered here (they need a GPU): tile configs, bf16 dots, CUDA graphs, compile (see test_gpu_compile.py).
"""

from __future__ import annotations

import pytest
import torch

from serving import VllmServer, draft_tokens
from test_dsa_e2e import COMMON, EXACT_ROPE, greedy, prompt_logprobs

pytestmark = pytest.mark.slow

TRITON_PATH = {"FRONTIER_FORCE_TRITON": "1", "TRITON_INTERPRET": "1"}
CASES = {
    # (model, plugin, extra args): V3.2 with index_topk 16 below the ~120-token prompt; dense MLA; the FP8 cache
    "v32_sparse": ("v32_sparse", "dsa", []),
    "v32_sparse_fp8_ds_mla": ("v32_sparse", "dsa", ["--kv-cache-dtype", "fp8_ds_mla"]),
    "v3_dense_mla": ("dense", "mla", []),
    "v32_sparse_mtp": ("v32_mtp", "dsa,mtp", []),
}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    from vllm_frontier.models.tiny_factory import dense_v3_view

    v32_sparse = tiny_models("deepseek_v32", index_topk=16)
    return {"v32_sparse": v32_sparse, "dense": dense_v3_view(v32_sparse, tmp_path_factory.mktemp("dense_view")),
            "v32_mtp": tiny_models("deepseek_v32", mtp_layers=1, index_topk=16)}


@pytest.fixture(scope="module")
def long_ids(models):
    from tokenizers import Tokenizer

    from test_dsa_e2e import LONG_TEXT

    ids = Tokenizer.from_file(str(models["v32_sparse"] / "tokenizer.json")).encode(LONG_TEXT).ids
    assert len(ids) > 64
    return ids


def _run(model, plugin, extra, long_ids, env=None):
    with VllmServer(model, args=COMMON + EXACT_ROPE + ["--plugin", plugin] + extra, env=env) as srv:
        out = {"tokens": greedy(srv, 6), "logprobs": prompt_logprobs(srv, long_ids)}
        return {**out, "log": srv.log_text(), "drafts": draft_tokens(srv.metrics())}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_equals_torch_path(case, models, long_ids):
    name, plugin, extra = CASES[case]
    torch_path = _run(models[name], plugin, extra, long_ids)
    triton_path = _run(models[name], plugin, extra, long_ids, env=TRITON_PATH)
    assert "FRONTIER_FORCE_TRITON=1, Triton kernels on every device (interpreter: True)" in triton_path["log"]
    assert "FRONTIER_FORCE_TRITON" not in torch_path["log"]
    assert triton_path["tokens"] == torch_path["tokens"]
    delta = (triton_path["logprobs"] - torch_path["logprobs"]).abs()
    print(f"{case}: Triton vs torch path, max |dlogp| {delta.max():.3g} over {len(delta)} positions")
    assert delta.max().item() < 1e-3
    assert torch.isfinite(triton_path["logprobs"]).all()
    if "mtp" in plugin:
        assert triton_path["drafts"] > 0 and torch_path["drafts"] > 0, (triton_path["drafts"], torch_path["drafts"])
