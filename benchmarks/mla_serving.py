"""Decode throughput of a model served by vLLM on CPU: our MLA backend (`--plugin mla`) vs vLLM's CPU_MLA.

    python benchmarks/mla_serving.py --json benchmarks/results/mla_serving/mla_serving_cpu.json [--model DIR]

Each configuration runs in a fresh subprocess (`vllm.LLM`, float32, eager), generates `--tokens` greedy tokens
for `--batch` prompts, and reports output tokens/s; the configurations alternate `--rounds` times in one run so
load drift on the machine hits both alike. The ratio (ours / CPU_MLA) is the number to read; absolute tokens/s
depend on the machine (its CPU is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n\"\"\"Utils",
           "with open(path) as f:\n", "try:\n    import json\n", "def __init__(self, name):\n", "return [x for x in"]


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              compilation_config={"custom_ops": ["-rotary_embedding"]})
    prompts = (PROMPTS * (spec["batch"] // len(PROMPTS) + 1))[: spec["batch"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(out_path).write_text(json.dumps({"tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                                          "token_ids": [list(o.outputs[0].token_ids) for o in outs]}))


def run(model: str, env: dict, batch: int, tokens: int) -> dict:
    from harness import run_process_group

    with tempfile.TemporaryDirectory() as td:
        spec, out = Path(td) / "spec.json", Path(td) / "out.json"
        spec.write_text(json.dumps({"model": model, "batch": batch, "tokens": tokens}))
        e = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        e.update(env)
        log = Path(td) / "log"
        returncode, text = run_process_group([sys.executable, __file__, "--worker", str(spec), str(out)], e, 1800,
                                             log=log)
        if returncode != 0:
            raise RuntimeError(text[-3000:])
        return json.loads(out.read_text())


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model's V3 view)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    model = a.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from vllm_frontier.models.embedded import embedded_model_path

        # the V3 view, as --help says: the embedded default model is the V3.2 view, which vLLM's CPU_MLA
        # backend (the first configuration) does not serve
        model = str(embedded_model_path("v3"))
    configs = {"vllm_cpu_mla": {"VLLM_PLUGINS": "lora_filesystem_resolver"}, "frontier_mla": {"FRONTIER_MLA": "1"}}
    samples: dict[str, list[float]] = {k: [] for k in configs}
    same_tokens = True
    for _ in range(a.rounds):
        outs = {}
        for name, env in configs.items():
            outs[name] = run(model, env, a.batch, a.tokens)
            samples[name].append(outs[name]["tokens_per_s"])
            print(f"{name}: {outs[name]['tokens_per_s']:.1f} tok/s", flush=True)
        same_tokens &= outs["vllm_cpu_mla"]["token_ids"] == outs["frontier_mla"]["token_ids"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    from harness import header  # beside this script; imported here so the engine workers skip it

    result = {"header": header(), "meta": {"model": model, "batch": a.batch, "tokens": a.tokens,
                       "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "tokens_per_s": samples, "median_tokens_per_s": med,
              "ratio_frontier_over_cpu_mla": med["frontier_mla"] / med["vllm_cpu_mla"],
              "greedy_tokens_identical": same_tokens}
    print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_frontier_over_cpu_mla",
                                             "greedy_tokens_identical")}, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
