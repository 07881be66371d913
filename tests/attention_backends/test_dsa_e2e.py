"""DSA and MLA backends inside real vLLM CPU engines (tiny float32 models from the factory).

Engines, one at a time: plain vLLM on the dense V3 view (the baseline), `--plugin dsa` on the V3.2 model with
index_topk >= the context (must equal the dense view), `--plugin mla` on the dense view (must equal vLLM's
CPU_MLA), `--plugin dsa` with a small index_topk (prompt logprobs vs the project's torch reference, sparse),
and the FP8 (656-byte) latent cache (runs; its logprob delta is bounded and printed).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from serving import VllmServer, server_env

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]
# vLLM CPU's rotary custom op is wrong for 3-D inputs; the native path is exact (see the facts doc).
EXACT_ROPE = ["-cc", '{"custom_ops": ["-rotary_embedding"]}']
PLAIN = {"VLLM_PLUGINS": "lora_filesystem_resolver"}
VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
PROMPTS = ["def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n",
           "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(",
           "x"]
# ~120 tokens: longer than the small index_topk, so sparsity is active
LONG_TEXT = ("def walk(tree, visit):\n    for node in tree.children:\n        visit(node)\n        walk(node, visit)\n"
             "\n\nclass Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self, k=1):\n"
             "        self.n += k\n        return self.n\n") * 2


def greedy(srv: VllmServer, n: int = 10) -> list[list[int]]:
    out = srv.complete(PROMPTS, max_tokens=n, return_token_ids=True)
    return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]


def prompt_logprobs(srv: VllmServer, ids: list[int]) -> torch.Tensor:
    """log p(t_{i+1} | t_<=i) for i = 0..len-2, as vLLM computes them."""
    out = srv.complete(ids, max_tokens=1, prompt_logprobs=0)
    entries = out["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries, ids[1:])], dtype=torch.float64)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    from vllm_frontier.models.tiny_factory import dense_v3_view

    v32 = tiny_models("deepseek_v32", index_topk=2048)
    v32_sparse = tiny_models("deepseek_v32", index_topk=16)
    dense = dense_v3_view(v32, tmp_path_factory.mktemp("dense_view"))
    return {"v32": v32, "v32_sparse": v32_sparse, "dense": dense}


@pytest.fixture(scope="module")
def long_ids(models):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models["v32"] / "tokenizer.json"))
    ids = tok.encode(LONG_TEXT).ids
    assert len(ids) > 64
    return ids


@pytest.fixture(scope="module")
def dense_baseline(models, long_ids):
    with VllmServer(models["dense"], args=COMMON + EXACT_ROPE, env=PLAIN, command=VLLM_SERVER) as srv:
        return {"tokens": greedy(srv), "logprobs": prompt_logprobs(srv, long_ids)}


def test_dsa_serves_v32_and_equals_dense_view_when_topk_covers_context(models, dense_baseline, long_ids):
    with VllmServer(models["v32"], args=COMMON + EXACT_ROPE + ["--plugin", "dsa"]) as srv:
        tokens = greedy(srv)
        lp = prompt_logprobs(srv, long_ids)
        text = srv.complete("def f(", max_tokens=5)["choices"][0]["text"]
        log = srv.log_text()
    assert "vllm-frontier features: dsa" in log and "DSA sets the KV block size to 64" in log
    assert "vllm-frontier: sparse MLA (DSA) backend" in log
    assert isinstance(text, str) and len(text) > 0
    assert tokens == dense_baseline["tokens"]
    # index_topk (2048) >= context: sparse attention over all tokens is dense attention
    assert (lp - dense_baseline["logprobs"]).abs().max().item() < 1e-3


def test_mla_plugin_equals_vllm_cpu_mla(models, dense_baseline):
    with VllmServer(models["dense"], args=COMMON + EXACT_ROPE + ["--plugin", "mla"]) as srv:
        tokens = greedy(srv)
        log = srv.log_text()
    assert "vllm-frontier features: mla" in log
    assert "vllm-frontier: dense MLA backend" in log
    assert tokens == dense_baseline["tokens"]


def _fp8_indexer_scores(self, x, q_c, cos, sin):
    """The reference indexer's scores with vLLM's FP8 arithmetic: q quantized per 128 values and k per token
    (e4m3, power-of-two "ue8m0" scales, as DeepSeek-V3.2's indexer stores them), then dequantized."""
    from vllm_frontier.kernels.fp8 import dequantize_fp8_e4m3, quantize_fp8_e4m3
    from vllm_frontier.models.reference import apply_rope

    def fp8(t):
        v, sc = quantize_fp8_e4m3(t, 128, "ue8m0")
        return dequantize_fp8_e4m3(v, sc, 128)

    c = self.cfg
    B, T, _ = x.shape
    rd, inter = c.qk_rope_head_dim, c.indexer_rope_interleave
    q = self.wq_b(q_c).view(B, T, c.index_n_heads, c.index_head_dim).float()
    q = torch.cat((apply_rope(q[..., :rd], cos[:, :, None], sin[:, :, None], interleaved=inter), q[..., rd:]), -1)
    k = self.k_norm(self.wk(x).float())
    k = torch.cat((apply_rope(k[..., :rd], cos, sin, interleaved=inter), k[..., rd:]), dim=-1)
    w = self.weights_proj(x).float() * (c.index_head_dim ** -0.5) * (c.index_n_heads ** -0.5)
    s = torch.einsum("btjs,btj->bts", torch.einsum("btjd,bsd->btjs", fp8(q), fp8(k)).relu(), w)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def test_sparse_topk_matches_torch_reference(models, long_ids, monkeypatch):
    from vllm_frontier.models import reference

    with VllmServer(models["v32_sparse"], args=COMMON + EXACT_ROPE + ["--plugin", "dsa"]) as srv:
        lp_vllm = prompt_logprobs(srv, long_ids)
    ref = reference.DeepseekReference.from_pretrained(models["v32_sparse"])
    ids = torch.tensor([long_ids])
    with torch.no_grad():
        lp_dense = ref.token_logprobs(ids, sparse=False)[0].double()
        lp_sparse_fp32 = ref.token_logprobs(ids, sparse=True)[0].double()
        monkeypatch.setattr(reference.Indexer, "scores", _fp8_indexer_scores)
        lp_sparse = ref.token_logprobs(ids, sparse=True)[0].double()
    err = (lp_vllm - lp_sparse).abs()
    err_fp32_indexer = (lp_vllm - lp_sparse_fp32).abs()
    err_dense = (lp_vllm - lp_dense).abs()
    print(f"DSA (index_topk 16) vs torch reference, mean |dlogp| over {len(err)} positions: sparse with FP8 "
          f"indexer {err.mean():.3g} (max {err.max():.3g}), sparse with fp32 indexer {err_fp32_indexer.mean():.3g}, "
          f"dense {err_dense.mean():.3g}")
    # positions < index_topk see every token
    assert err[:15].max().item() < 1e-3
    # same selection arithmetic: equal up to float32 rounding (a rare exact tie may still order differently)
    assert err.median().item() < 1e-4
    assert err.mean().item() < 5e-3
    # sparsity is real: attending to every token gives clearly different logprobs
    assert err_dense[16:].mean().item() > 10 * err[16:].mean().item()


def test_fp8_latent_cache_runs_with_bounded_delta(models, dense_baseline, long_ids):
    args = COMMON + EXACT_ROPE + ["--plugin", "dsa", "--kv-cache-dtype", "fp8_ds_mla"]
    with VllmServer(models["v32"], args=args) as srv:
        lp = prompt_logprobs(srv, long_ids)
        tokens = greedy(srv)
    delta = (lp - dense_baseline["logprobs"]).abs()
    print(f"FP8 latent cache: mean |dlogp| = {delta.mean():.4g}, max = {delta.max():.4g}")
    assert all(len(t) == 10 for t in tokens)
    assert math.isfinite(delta.max().item())
    assert delta.mean().item() < 0.05


def test_mla_plugin_with_fp8_latent_cache(models, dense_baseline, long_ids):
    args = COMMON + EXACT_ROPE + ["--plugin", "mla", "--kv-cache-dtype", "fp8_ds_mla"]
    with VllmServer(models["dense"], args=args) as srv:
        lp = prompt_logprobs(srv, long_ids)
        tokens = greedy(srv)
        log = srv.log_text()
    delta = (lp - dense_baseline["logprobs"]).abs()
    print(f"MLA + FP8 latent cache: mean |dlogp| = {delta.mean():.4g}, max = {delta.max():.4g}")
    assert "vllm-frontier: dense MLA backend (kv cache fp8_ds_mla)" in log
    assert all(len(t) == 10 for t in tokens)
    # prompt logprobs come from the prefill (MHA on unquantized latents); decode reads the FP8 cache
    assert delta.max().item() < 1e-3


@pytest.mark.parametrize("override,needle", [
    ({"index_topk": 0}, "index_topk must be a positive integer"),
    ({"kv_lora_rank": 256}, "kv_lora_rank + qk_rope_head_dim = 576"),
])
def test_bad_models_fail_with_one_line(tiny_models, override, needle):
    model = tiny_models("deepseek_v32", **override)
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "serve", str(model), "--plugin", "dsa"],
                       capture_output=True, text=True, env=server_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]
