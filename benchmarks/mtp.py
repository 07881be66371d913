"""MTP speculative decoding on vLLM (CPU here): acceptance per draft position, tokens per target forward, and
output tokens/s of the adaptive draft length vs no speculation and vs fixed k = 1, 2, 3, at batch 1 and 16.

    python benchmarks/mtp.py --json benchmarks/results/mtp_cpu.json            # embedded trained model, V3 view
    python benchmarks/mtp.py --view v32 --json ...                            # V3.2 view through the DSA backend
    python benchmarks/mtp.py --model DIR --json ...                           # any checkpoint with MTP layers

Two engines, one after the other, each in a fresh subprocess (`vllm.LLM`, float32, eager, greedy):
1. plain: no speculation;
2. MTP with cap K = 3 and `PinnedDraftScheduler`: a pin file switches between `adaptive` and fixed k = 0, 1,
   2, 3 between runs inside the one engine (fixed k = the vLLM per-step draft length held constant; for k = 3
   that is exactly vLLM's fixed `num_speculative_tokens=3`; k = 0 is the floor of what the adaptive rule
   can reach inside vLLM 0.32, whose MTP proposer still runs its first pass when asked for no drafts, to
   keep the drafter's KV cache in sync). The adaptive rule keeps its measurements across runs (as a
   serving engine would), so later rounds see the cost points of earlier ones.
Every (mode, batch) run generates `--tokens` tokens per prompt (`ignore_eos`; batch 1: `--batch1-prompts`
prompts one after the other, times summed), `--rounds` times, modes
interleaved so machine-load drift hits them alike; the median is reported. Agree first: every MTP run's
token ids must equal the plain engine's (greedy, float32), recorded as `lossless`.

Metrics per (mode, batch), from the scheduler's counters (`FRONTIER_MTP_STATS`, deltas per run):
- `acceptance_per_pos`: conditional acceptance a_i (accepted at position i / drafts that reached i);
- `acceptance_per_pos_unconditional`: accepted at i / decode request-steps with >= i drafts (vLLM's view);
- `tokens_per_target_forward`: decode tokens / decode request-steps (1 for the plain engine);
- `tok_s`: output tokens / wall seconds of the generate call (prompts are short; prefill included);
- ratios: `tok_s` over plain, and adaptive over each fixed k.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n\"\"\"Utils",
           "with open(path) as f:\n", "try:\n    import json\n", "def __init__(self, name):\n", "return [x for x in",
           "class Node:\n    def __init__(self", "if __name__ == '__main__':\n", "    def __repr__(self):\n",
           "from collections import", "raise ValueError(", "def test_", "    for key, value in", "import sys\n"]
FIXED = (0, 1, 2, 3)   # 0: the MTP engine drafting nothing (vLLM still runs the drafter's first pass)
PINNED_CLS = "vllm_frontier.spec_decode.scheduler.PinnedDraftScheduler"


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=max(spec["batches"]), compilation_config={"custom_ops": ["-rotary_embedding"]})
    if spec["mtp"]:
        kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": max(FIXED)},
                  scheduler_cls=PINNED_CLS)
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    pin, stats = Path(spec["pin"]), Path(spec["stats"])

    def read_stats():
        return json.loads(stats.read_text()) if stats.is_file() else None

    runs = []
    for rnd in range(spec["rounds"]):
        for batch in spec["batches"]:
            prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
            # batch 1: several prompts one after the other (one prompt alone measures one continuation)
            groups = [[p] for p in PROMPTS[:spec["batch1_prompts"]]] if batch == 1 else [prompts]
            for mode in spec["modes"]:
                if spec["mtp"]:
                    pin.write_text(mode)
                before = read_stats()
                ids, dt = [], 0.0
                for group in groups:
                    t = time.perf_counter()
                    outs = llm.generate(group, params, use_tqdm=False)
                    dt += time.perf_counter() - t
                    ids += [list(o.outputs[0].token_ids) for o in outs]
                runs.append({"round": rnd, "batch": batch, "mode": mode, "seconds": dt,
                             "tokens": sum(len(x) for x in ids), "token_ids": ids,
                             "stats_before": before, "stats_after": read_stats()})
    Path(out_path).write_text(json.dumps(runs))


def run_engine(model: str, mtp: bool, args, env_extra: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "mtp": mtp, "tokens": args.tokens, "rounds": args.rounds,
                "batch1_prompts": args.batch1_prompts,
                "batches": args.batches, "modes": ["adaptive", *map(str, FIXED)] if mtp else ["none"],
                "pin": f"{tmp}/pin", "stats": f"{tmp}/stats.json"}
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        env.update(env_extra, FRONTIER_MTP_PIN_FILE=spec["pin"], FRONTIER_MTP_STATS=spec["stats"])
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [sys.executable, __file__, "--_worker", f"{tmp}/spec.json", f"{tmp}/out.json"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"engine worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(f"{tmp}/out.json").read_text())


def _delta(run: dict) -> dict | None:
    a, b = run["stats_after"], run["stats_before"]
    if a is None:
        return None

    def d(key):
        return [x - y for x, y in zip(a[key], b[key])] if b else list(a[key])

    def s(key):
        return a[key] - (b[key] if b else 0)

    return {"reached": d("reached_per_pos"), "accepted": d("accepted_per_pos"), "k_hist": d("k_histogram"),
            "steps": s("decode_request_steps"), "tokens": s("decode_tokens")}


def summarize(plain: list[dict], mtp: list[dict], batches: list[int]) -> dict:
    ref = {(r["batch"], r["round"]): r["token_ids"] for r in plain}
    out: dict = {}
    for batch in batches:
        rows = {}
        base = statistics.median(r["tokens"] / r["seconds"] for r in plain if r["batch"] == batch)
        rows["none"] = {"tok_s": base, "tokens_per_target_forward": 1.0}
        for mode in ["adaptive", *map(str, FIXED)]:
            rs = [r for r in mtp if r["batch"] == batch and r["mode"] == mode]
            ds = [_delta(r) for r in rs]
            reached = [sum(x) for x in zip(*(d["reached"] for d in ds))]
            accepted = [sum(x) for x in zip(*(d["accepted"] for d in ds))]
            steps = sum(d["steps"] for d in ds)
            hist = [sum(x) for x in zip(*(d["k_hist"] for d in ds))]
            # request-steps that drafted >= i tokens: those that reached i plus those stopped before i
            tok_s = statistics.median(r["tokens"] / r["seconds"] for r in rs)
            rows[mode] = {
                "tok_s": tok_s,
                "speedup_vs_none": tok_s / base,
                "tokens_per_target_forward": sum(d["tokens"] for d in ds) / steps if steps else None,
                "acceptance_per_pos": [a / n if n else None for a, n in zip(accepted, reached)],
                "accepted_per_pos": accepted, "reached_per_pos": reached,
                "decode_request_steps": steps, "engine_steps_by_k": hist,
                "lossless": all(r["token_ids"] == ref[(batch, r["round"])] for r in rs),
                "seconds": [round(r["seconds"], 3) for r in rs],
            }
        for k in FIXED:
            rows["adaptive"][f"speedup_vs_k{k}"] = rows["adaptive"]["tok_s"] / rows[str(k)]["tok_s"]
        out[f"batch_{batch}"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory with MTP layers (default: the embedded trained model)")
    p.add_argument("--view", choices=("v3", "v32"), default="v3", help="embedded model view (v32 uses --plugin dsa)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch1-prompts", type=int, default=4,
                   help="batch 1 runs this many prompts one after the other (default 4)")
    p.add_argument("--timeout", type=float, default=3000.0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker(*args._worker)
        return 0
    if args.tokens < 2 or args.rounds < 1 or not args.batches or min(args.batches) < 1:
        p.error("--tokens >= 2, --rounds >= 1 and batch sizes >= 1 are required")
    if not 1 <= args.batch1_prompts <= len(PROMPTS):
        p.error(f"--batch1-prompts must be in [1, {len(PROMPTS)}]")
    from harness import Report

    if args.model:
        model = args.model
    else:
        from vllm_frontier.models.embedded import embedded_model_path

        model = str(embedded_model_path(args.view))
    cfg = json.loads((Path(model) / "config.json").read_text())
    if not cfg.get("num_nextn_predict_layers"):
        p.error(f"{model} has no MTP layers (num_nextn_predict_layers is 0 or missing)")
    env = {"FRONTIER_DSA": "1"} if "index_topk" in cfg else {}
    report = Report(args.json, meta={"model": model, "view": args.view if not args.model else None,
                                     "tokens": args.tokens, "batches": args.batches, "rounds": args.rounds,
                                     "batch1_prompts": args.batch1_prompts,
                                     "cap_K": max(FIXED), "dtype": "float32", "env": env,
                                     "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()})
    with report.section("mtp") as rec:
        t = time.monotonic()
        plain = run_engine(model, False, args, env)
        rec["plain_engine_seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        mtp = run_engine(model, True, args, env)
        rec["mtp_engine_seconds"] = round(time.monotonic() - t, 1)
        rec["results"] = summarize(plain, mtp, args.batches)
        rec["lossless"] = all(r["lossless"] for b in rec["results"].values() for m, r in b.items() if m != "none")
        rec["loadavg_end"] = os.getloadavg()
    report.write()
    print(json.dumps(report.data["sections"]["mtp"].get("results"), indent=1)[:6000])
    return 0 if report.data["sections"]["mtp"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
