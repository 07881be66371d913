"""Lossless MTP inside real vLLM CPU engines (tiny float32 models): greedy token ids with MTP drafting equal
the plain engine's, for the V3 view (plain vLLM MLA) and the V3.2 view (through the DSA backend), under the
adaptive draft length, a fixed k = 3, a per-step cycling k (varied draft lengths, drafts trimmed before
verification) and a cycle with pauses (drafter skipped, then caught up), with the drafter-skipping worker
that `--plugin mtp` installs. Two engines per view, one at a time: plain, then MTP with `PinnedDraftScheduler` whose pin
file switches the draft-length mode between request batches.
"""

from __future__ import annotations

import json

import pytest

from serving import VllmServer

from vllm_frontier.spec_decode.scheduler import write_pin

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-num-seqs", "8"]
# vLLM CPU's rotary custom op is wrong for 3-D inputs; the native path is exact (see the facts doc).
EXACT_ROPE = ["-cc", '{"custom_ops": ["-rotary_embedding"]}']
PINNED = ["--scheduler-cls", "vllm_frontier.spec_decode.scheduler.PinnedDraftScheduler"]
PROMPTS = ["def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n",
           "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(",
           "x", "while True:\n    line = input()\n"]
# the last mode pauses and resumes drafting inside every request (k = 0 steps run no drafter; the skipped
# positions are replayed when drafting resumes)
MODES = ("adaptive", "3", "3,0,1,2,1", "2,0,0,0,2,2")
N_TOKENS = 24


def greedy(srv: VllmServer) -> list[list[int]]:
    out = srv.complete(PROMPTS, max_tokens=N_TOKENS, return_token_ids=True, ignore_eos=True)
    return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]


def counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + "{"))


def run_views(model, tmp_path, plugin: list[str]) -> dict:
    with VllmServer(model, args=COMMON + EXACT_ROPE + plugin) as srv:
        plain = greedy(srv)
    pin, stats = tmp_path / "pin", tmp_path / "stats.json"
    env = {"FRONTIER_MTP": "1", "FRONTIER_MTP_PIN_FILE": str(pin), "FRONTIER_MTP_STATS": str(stats)}
    out = {"plain": plain, "log": None}
    with VllmServer(model, args=COMMON + EXACT_ROPE + plugin + PINNED, env=env) as srv:
        for mode in MODES:
            write_pin(pin, mode)
            out[mode] = greedy(srv)
            out[mode + ":stats"] = json.loads(stats.read_text())
            out[mode + ":drafts"] = counter(srv.metrics(), "vllm:spec_decode_num_draft_tokens_total")
        out["log"] = srv.log_text()
    return out


@pytest.fixture(scope="module")
def v3(tiny_models, tmp_path_factory):
    return run_views(tiny_models("deepseek_v3", mtp_layers=1), tmp_path_factory.mktemp("mtp_v3"), [])


@pytest.fixture(scope="module")
def v32(tiny_models, tmp_path_factory):
    model = tiny_models("deepseek_v32", mtp_layers=1)
    return run_views(model, tmp_path_factory.mktemp("mtp_v32"), ["--plugin", "dsa"])


def check(res: dict) -> None:
    assert "speculative_config" in res["log"] and "adaptive MTP draft length" in res["log"]
    assert "MTP drafter skips steps that draft nothing" in res["log"]
    assert all(len(t) == N_TOKENS for t in res["plain"])
    for mode in MODES:
        assert res[mode] == res["plain"], f"greedy ids differ with MTP, draft mode {mode}"
    # drafts were really verified in every mode (vLLM's counter grows), and the cycle really varied k
    assert res["3:drafts"] > res["adaptive:drafts"] >= 0 and res["3,0,1,2,1:drafts"] > res["3:drafts"]
    hist_fixed = res["3:stats"]["k_histogram"]
    hist_cycle = [a - b for a, b in zip(res["3,0,1,2,1:stats"]["k_histogram"], hist_fixed)]
    assert sum(1 for h in hist_cycle if h > 0) == 4, hist_cycle


def test_mtp_lossless_v3_view(v3):
    check(v3)


def test_mtp_lossless_v32_view_through_dsa(v32):
    check(v32)
    assert "vllm-frontier features: dsa, mtp" in v32["log"]
