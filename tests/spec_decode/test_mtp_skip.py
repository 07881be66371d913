"""The drafter-skipping MTP proposer inside real vLLM CPU engines, on the embedded trained model (V3 view,
so acceptance means something): a step pinned to k = 0 runs no drafter forward at all (counted by a forward
hook on the drafter model) and runs as a plain step (no speculative metadata, plain sampler), drafting
resumes after pauses inside one request with the skipped positions replayed first, acceptance right after
a pause is at its steady level, greedy token ids equal the plain engine's in every mode (pinned k = 0, a k
cycle with pauses, fixed k = 3, adaptive), and the rule learns from its own steps only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "with open(path) as f:\n"]
# pauses and resumes inside every request: 2 drafting steps, 4 skipped, 6 drafting (steady from the 4th on)
PAUSE = "2,2,0,0,0,0,2,2,2,2,2,2"
MODES = ["0", PAUSE, "3", "adaptive"]
MAX_TOKENS = 48
RUNNER = Path(__file__).with_name("mtp_engine_run.py")


def run_engine(tmp: Path, mtp: bool) -> dict:
    from vllm_frontier.models.embedded import embedded_model_path

    spec = {"model": str(embedded_model_path("v3")), "mtp": mtp, "modes": MODES if mtp else ["plain"],
            "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "pin": str(tmp / "pin"), "stats": str(tmp / "stats.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    env.update(FRONTIER_MTP_PIN_FILE=spec["pin"], FRONTIER_MTP_STATS=spec["stats"])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([sys.executable, str(RUNNER), str(tmp / "spec.json"), str(tmp / "out.json")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    plain = run_engine(tmp_path_factory.mktemp("plain"), mtp=False)
    mtp = run_engine(tmp_path_factory.mktemp("mtp"), mtp=True)
    return plain["plain"]["ids"], mtp


def delta(run: dict, key: str) -> int:
    return run["after"]["counters"][key] - run["before"]["counters"][key]


def test_greedy_ids_equal_plain_in_every_mode(engines):
    plain, mtp = engines
    assert all(len(t) == MAX_TOKENS for t in plain)
    for mode in MODES:
        assert mtp[mode]["ids"] == plain, f"greedy ids differ with MTP, draft mode {mode}"


def test_k0_steps_run_no_drafter_forward(engines):
    _, mtp = engines
    run = mtp["0"]
    assert delta(run, "drafter_forwards") == 0
    assert delta(run, "skipped_steps") >= MAX_TOKENS - 1 and delta(run, "drafting_steps") == 0
    # every one of them ran as a plain step (no speculative metadata, plain sampler; worker.plain_step)
    assert delta(run, "plain_steps") == delta(run, "skipped_steps")
    # the hook counts: at fixed k = 3 each drafting step is 3 drafter forwards (first pass + 2 chained),
    # plus the catch-up pass of what the k = 0 run before it skipped
    run = mtp["3"]
    fwd = delta(run, "drafter_forwards")
    assert fwd == 3 * delta(run, "drafting_steps") + delta(run, "catch_up_passes") and fwd > 0


def test_pauses_inside_a_request_are_caught_up_and_acceptance_returns_at_once(engines):
    _, mtp = engines
    run = mtp[PAUSE]
    assert delta(run, "skipped_steps") > 0 and delta(run, "drafting_steps") > 0
    # every k = 0 step runs plain, the first after drafting too (the scheduler drops drafts a k = 0 step would
    # verify), and the positions of plain steps are caught up like the others
    assert delta(run, "plain_steps") == delta(run, "skipped_steps")
    # one catch-up pass per resume (the skipped positions of the 4 requests fit one pass)
    assert delta(run, "catch_up_passes") > 0 and delta(run, "caught_up_tokens") >= 4 * delta(run, "catch_up_passes")
    before, after = run["before"]["stats"], run["after"]["stats"]

    def rate(bucket: int) -> tuple[float, int]:
        acc = after["run_accepted_per_pos"][bucket][0] - before["run_accepted_per_pos"][bucket][0]
        n = after["run_reached_per_pos"][bucket][0] - before["run_reached_per_pos"][bucket][0]
        return acc / n, n

    first, n_first = rate(0)     # drafts made in the first drafting step after a pause
    steady, n_steady = rate(3)   # drafts of the 4th and later consecutive drafting steps
    assert n_first >= 8 and n_steady >= 8
    # steady first-position acceptance of these prompts is ~0.4 (drafts are useful); the first drafts after a
    # pause are as good within sampling noise (16-20 drafts): the skipped positions were replayed
    assert steady > 0.25 and first >= steady - 0.15, (first, steady)


def test_pinned_steps_teach_the_rule_nothing_and_adaptive_steps_do(engines):
    _, mtp = engines
    # every mode before "adaptive" was pinned: the rule still holds its priors (no acceptance outcome, no
    # timed step), as an engine that never ran pinned would
    before = mtp["adaptive"]["before"]["stats"]
    assert before["steps"] > 0 and before["draft_tokens_verified"] > 0   # pinned drafting did run
    assert before["window_acceptance_estimate"] == [0.5, 0.5, 0.5]
    assert before["step_time_cells"] == {} and before["measured_cost_ratios"] == {}
    after = mtp["adaptive"]["after"]["stats"]
    assert after["window_acceptance_estimate"] != [0.5, 0.5, 0.5]   # the adaptive run's own drafts were counted
    # its steps were timed (schedule() to schedule()): drafting steps and plain ones (the rule's k = 0 or its
    # probes), spread over batch-size cells as the 4 requests finish at different steps
    cells = [(int(k), ms, n) for ks in after["step_time_cells"].values() for k, (ms, n) in ks.items()]
    plain = [c for c in cells if c[0] == 0]
    drafting = [c for c in cells if c[0] > 0]
    assert plain and drafting, after["step_time_cells"]
    # on vLLM CPU a drafting step takes longer than a plain one (about 3x on this model): the best-sampled
    # cell of each kind (batch size matters little here next to the drafter's passes)
    assert max(drafting, key=lambda c: c[2])[1] > max(plain, key=lambda c: c[2])[1], after["step_time_cells"]
    # where a cell has enough points to anchor the rule's costs, it anchors them above a plain step
    ratios = after["measured_cost_ratios"]
    assert all(r > 1.0 for ks in ratios.values() for r in ks.values()), ratios
