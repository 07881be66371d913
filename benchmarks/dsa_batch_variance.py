"""Does DSA's greedy output depend on how requests are batched, on one colocated vLLM instance?

    python benchmarks/dsa_batch_variance.py --out benchmarks/results/dsa_batch_variance/dsa_batch_variance.json

The embedded V3.2 view (float32, our DSA backend on vLLM CPU) generates greedy continuations of five code
prompts, first each prompt alone, then all five in one batch, once with the model's top-k (64, below the
context after a few tokens) and once with the same weights and a top-k covering every position. vLLM's CPU
GEMMs are not batch-invariant in the last bits, and this small trained model has many near-tied logits, so
a last-bit difference can change a greedy token. P/D changes the batching too (the decode instance
recomputes the last prompt token alone instead of inside the prompt's batch): this measures how far greedy
equality can be expected at all on this model, independent of any KV transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Report, run_process_group  # noqa: E402

PROMPTS = [
    "def walk(tree, visit):\n    for node in tree.children:\n        visit(node)\n        walk(node, visit)\n\n"
    "class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self, k=1):\n        self.n += k\n",
    "import os\nimport sys\n\ndef main(argv):\n    paths = [p for p in argv[1:] if os.path.exists(p)]\n"
    "    for p in paths:\n        with open(p) as f:\n            data = f.read()\n        print(len(data))\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n"
    "    def pop(self):\n        return self.items.pop()\n    def __len__(self):\n        return len(",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n\n"
    "def load(path):\n    out = {}\n    with open(path) as f:\n        for line in f:\n            k, v = parse(",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n\nresult = []\n"
    "while len(result) < 5:\n    result.append(len(result) * 2)\nprint(result)\n\ndef square(x):\n    return",
]


def run(model_dir: str, tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    alone = [llm.generate([p], sp, use_tqdm=False)[0] for p in PROMPTS]
    batched = llm.generate(PROMPTS, sp, use_tqdm=False)
    a = [list(o.outputs[0].token_ids) for o in alone]
    b = [list(o.outputs[0].token_ids) for o in batched]
    return {"prompt_tokens": [len(o.prompt_token_ids) for o in alone],
            "identical": [x == y for x, y in zip(a, b)],
            "first_divergence": [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dsa_batch_variance/dsa_batch_variance.json"))
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        model, out = args._worker
        Path(out).write_text(json.dumps(run(model, args.tokens)))
        return 0
    src = ROOT / "vllm_frontier" / "models" / "embedded" / "v32"
    tmp = Path(tempfile.mkdtemp(prefix="dsa-bv-"))
    rep = Report(args.out, meta={"model": str(src), "tokens": args.tokens})
    for name, topk in (("topk_64", None), ("topk_covers_prompt", 1024)):
        with rep.section(name) as rec:
            model = src
            if topk is not None:  # same weights, top-k above every prompt length
                model = tmp / name
                shutil.copytree(src, model)
                cfg = json.loads((model / "config.json").read_text())
                cfg["index_topk"] = topk
                (model / "config.json").write_text(json.dumps(cfg))
            out = tmp / f"{name}.json"
            env = {**os.environ, "FRONTIER_DSA": "1"}
            returncode, stderr = run_process_group(
                [sys.executable, __file__, "--tokens", str(args.tokens), "--_worker", str(model), str(out)], env, 900)
            if returncode != 0:
                raise RuntimeError(f"engine failed ({returncode}):\n{stderr[-3000:]}")
            rec.update(json.loads(out.read_text()))
            print(name, rec["identical"], flush=True)
    rep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
