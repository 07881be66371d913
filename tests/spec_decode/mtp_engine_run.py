"""Engine side of `test_mtp_skip.py`: one offline vLLM engine (plain or MTP with the drafter-skipping worker),
greedy generation under each pinned draft-length mode, then JSON with token ids and counters.

    python mtp_engine_run.py SPEC.json OUT.json      (SPEC: model, mtp, modes, prompts, max_tokens, pin, stats)

A separate process per engine: one engine at a time, and nothing of it left in the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import executor_backend, worker_cls
    from vllm_frontier.spec_decode.scheduler import write_pin

    kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=8,
              compilation_config={"custom_ops": ["-rotary_embedding"]})
    if spec["mtp"]:
        kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": 3},
                  scheduler_cls="vllm_frontier.spec_decode.scheduler.PinnedDraftScheduler", worker_cls=worker_cls(),
                  distributed_executor_backend=executor_backend("mp"))
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    pin, stats = Path(spec["pin"]), Path(spec["stats"])

    def snapshot():
        if not spec["mtp"]:
            return None
        return {"counters": llm.collective_rpc("frontier_mtp_counters")[0],
                "stats": json.loads(stats.read_text()) if stats.is_file() else None}

    out = {}
    for mode in spec["modes"]:
        if spec["mtp"]:
            write_pin(pin, mode)
        before = snapshot()
        res = llm.generate(spec["prompts"], params, use_tqdm=False)
        out[mode] = {"ids": [list(o.outputs[0].token_ids) for o in res], "before": before, "after": snapshot()}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
