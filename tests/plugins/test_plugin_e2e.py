"""End-to-end on CPU with real vLLM engines: the plugin serves, and with no toggles changes nothing.

Three engines, one at a time: plain vLLM (our entry points filtered out with VLLM_PLUGINS), `vllm-frontier serve`
with no toggles, and vLLM's own OpenAI server module with `--plugin dsa` on a model without an indexer (the
flag is accepted by vLLM's parser through our platform hook; DSA stays off and says why).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from serving import VllmServer, server_env

pytestmark = pytest.mark.slow

PROMPTS = ["def add(a, b):\n    return", "import os\nimport", "class Stack:\n    def"]
COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]
VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def _greedy(srv: VllmServer) -> list[list[int]]:
    out = srv.complete(PROMPTS, max_tokens=12, return_token_ids=True)
    return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]


@pytest.fixture(scope="module")
def v3_model(tiny_models):
    return tiny_models("deepseek_v3", mtp_layers=1)


@pytest.fixture(scope="module")
def plain_tokens(v3_model):
    # vLLM without our general or platform plugin: only its own lora resolver is allowed to load.
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver"}
    with VllmServer(v3_model, args=COMMON, env=env, command=VLLM_SERVER) as srv:
        return _greedy(srv)


def test_frontier_serve_without_toggles_equals_plain_vllm(v3_model, plain_tokens):
    with VllmServer(v3_model, args=COMMON) as srv:
        ours = _greedy(srv)
        # the OpenAI API works: completions and chat (the factory's tokenizer has a chat template)
        chat = requests.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": srv.model_name(), "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat["choices"][0]["message"]["content"] is not None
        log = srv.log_text()
    assert ours == plain_tokens
    assert all(len(t) == 12 for t in ours)
    assert log.count("vllm-frontier features: none (plugin inactive)") >= 3, "one line per process (API, core, worker)"


def test_plugin_flag_through_vllm_parser_dsa_stays_off_without_indexer(v3_model, plain_tokens):
    with VllmServer(v3_model, args=COMMON + ["--plugin", "dsa"], command=VLLM_SERVER) as srv:
        ours = _greedy(srv)
        log = srv.log_text()
    # the flag reached vLLM's config path, which turned DSA off for this model and said why; every process then
    # reports the feature set it actually runs with
    assert "dsa stays off: the model has no lightning indexer" in log
    assert "vllm-frontier features: none (plugin inactive)" in log
    assert ours == plain_tokens


def test_vllm_parser_rejects_bad_plugin_value_in_one_line(v3_model):
    r = subprocess.run(VLLM_SERVER + [str(v3_model), "--plugin", "bogus"], capture_output=True, text=True,
                       env=server_env(), timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["vllm-frontier: error: --plugin: unknown name 'bogus'; valid names: all, dsa, mla, fp4, "
                      "fp4=nvfp4, fp4=mxfp4, mtp, mtp=K, spec_moe, pd"], r.stderr[-3000:]
