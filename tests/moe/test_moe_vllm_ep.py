"""The speculative EP MoE inside real vLLM CPU engines: DP=2+EP and TP=2+EP with `--plugin spec_moe` give the
single engine's greedy tokens (float32, embedded trained model), with plain, speculative (pre-grouped placement +
token shuffle), worst-case (every token run on a rank holding the fewest of its experts) and, for TP, local
dispatch (no all-to-all: each rank runs its experts on every token); the byte counters come out of the workers'
logs.

Stock vLLM 0.32 cannot run either configuration on CPU (DP+EP raises in `all_gatherv`, TP+EP's CPU experts
kernel ignores `expert_map`; see the facts doc). One engine at a time (~3 GiB per worker).

Equality criterion: every prompt's tokens equal the single engine's, except that a prompt may switch at a
position where the single engine itself is at a near-tie (top-2 log-probability margin < NEAR_TIE) to the
single engine's second choice, after which it is not compared. Stock vLLM's own TP=2 (no EP) differs from its
TP=1 on this model that way: float32 sums in a different order.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving import REPO, VllmServer

from vllm_frontier.moe.vllm_adapter import counters_from_log

pytestmark = pytest.mark.slow

MODEL = REPO / "vllm_frontier" / "models" / "embedded" / "v3"
TRACES = REPO / "benchmarks" / "results" / "spec_moe" / "spec_moe_traces_v3.pt"
COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-num-seqs", "8",
          "-cc", '{"custom_ops": ["-rotary_embedding"]}']
EP = ["--plugin", "spec_moe", "--enable-expert-parallel"]
PROMPTS = ["def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n",
           "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(",
           "The city council met on Tuesday to discuss the",
           "while True:\n    line = input()\n",
           "In the beginning of the nineteenth century, the",
           "x = [i * i for i in range(10)]\nprint("]
N_TOKENS = 16
NEAR_TIE = 0.05


def greedy(srv: VllmServer) -> list[dict]:
    """Per prompt (one request at a time, so every engine batches alike): token ids and top-2 log-probs."""
    out = []
    for p in PROMPTS:
        c = srv.complete(p, max_tokens=N_TOKENS, logprobs=2, return_token_ids=True, ignore_eos=True,
                         return_tokens_as_token_ids=True)["choices"][0]
        tops = [sorted(((int(k.split(":")[1]), v) for k, v in d.items()), key=lambda kv: -kv[1])
                for d in c["logprobs"]["top_logprobs"]]
        out.append({"ids": c["token_ids"], "top": tops})
    return out


def compare(ref: list[dict], got: list[dict]) -> tuple[int, list[str]]:
    """(prompts token-identical, problems): a difference is allowed only at a near-tie of the reference."""
    exact, problems = 0, []
    for i, (r, g) in enumerate(zip(ref, got)):
        j = next((j for j, (a, b) in enumerate(zip(r["ids"], g["ids"])) if a != b), None)
        if j is None:
            exact += len(r["ids"]) == len(g["ids"]) == N_TOKENS
            continue
        top = r["top"][j]
        margin = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
        if not (margin < NEAR_TIE and len(top) > 1 and g["ids"][j] == top[1][0]):
            problems.append(f"prompt {i}: token {j} is {g['ids'][j]}, single engine {r['ids'][j]} "
                            f"(its top-2 {top}, margin {margin:.4f})")
    return exact, problems


@pytest.fixture(scope="module")
def reference():
    with VllmServer(MODEL, args=COMMON) as srv:
        return greedy(srv)


@pytest.fixture(scope="module")
def placement_ep2(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_moe") / "placement_ep2.json"
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "spec-moe-placement", "--traces", str(TRACES),
                        "--ranks", "2", "--out", str(path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return path


def run_ep(parallel: list[str], dispatch: str, placement=None) -> tuple[list[dict], dict]:
    # two CPU workers on a one-NUMA-node machine: `vllm-frontier serve` names their cores itself
    env = {"FRONTIER_SPEC_MOE_DISPATCH": dispatch, "FRONTIER_SPEC_MOE_LOG_EVERY": "1"}
    if placement is not None:
        env["FRONTIER_SPEC_MOE_PLACEMENT"] = str(placement)
    with VllmServer(MODEL, args=COMMON + EP + parallel, env=env) as srv:
        got = greedy(srv)
        log = srv.log_text()
    assert "vllm-frontier features: spec_moe" in log
    return got, counters_from_log(log)


RESULTS: dict[str, tuple[list[dict], dict]] = {}

CASES = [("tp2", ["--tensor-parallel-size", "2"], "plain", False),
         ("tp2", ["--tensor-parallel-size", "2"], "speculative", True),
         ("tp2", ["--tensor-parallel-size", "2"], "worst", True),
         ("tp2", ["--tensor-parallel-size", "2"], "local", True),
         ("dp2", ["--data-parallel-size", "2"], "plain", False),
         ("dp2", ["--data-parallel-size", "2"], "speculative", True)]


@pytest.mark.parametrize("name,parallel,dispatch,pregrouped", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_ep_engine_equals_single_engine(reference, placement_ep2, name, parallel, dispatch, pregrouped):
    got, counters = run_ep(parallel, dispatch, placement_ep2 if pregrouped else None)
    RESULTS[f"{name}-{dispatch}"] = (got, counters)
    exact, problems = compare(reference, got)
    print(f"{name} {dispatch}: {exact}/{len(PROMPTS)} prompts token-identical to the single engine; "
          f"counters {counters}")
    assert problems == []
    assert exact >= len(PROMPTS) // 2
    # both EP ranks ran our dispatch and moved tokens between them
    assert len(counters) == 2, counters
    for c in counters.values():
        assert c["calls"] > 0 and c["tokens"] > 0
        if dispatch == "local":  # no all-to-all: vLLM's all-reduce sums the ranks' partial rows
            assert c["dispatch_sent"] == c["combine_recv"] == c["meta_sent"] == 0
        else:
            assert c["dispatch_sent"] > 0 and c["combine_recv"] > 0


def _local_fraction(key: str) -> float:
    counters = RESULTS[key][1].values()
    return sum(c["tokens_all_local"] for c in counters) / sum(c["tokens"] for c in counters)


def _bytes(key: str) -> int:
    return sum(c["dispatch_sent"] + c["combine_sent"] for c in RESULTS[key][1].values())


def test_speculative_dispatch_moves_fewer_bytes():
    """TP=2: the pre-grouped placement and the shuffle keep more tokens local than plain EP, the worst case
    fewer; every mode gave the same tokens (above)."""
    needed = ("tp2-plain", "tp2-speculative", "tp2-worst")
    if not all(k in RESULTS for k in needed):
        pytest.skip("runs after the TP=2 engine tests")
    local = {k: _local_fraction(k) for k in needed}
    sent = {k: _bytes(k) for k in needed}
    print("tokens with every expert local:", local, "dispatch+combine bytes sent:", sent)
    assert local["tp2-speculative"] > local["tp2-plain"] > local["tp2-worst"]
    assert sent["tp2-speculative"] < sent["tp2-plain"] < sent["tp2-worst"]
