"""Speculative EP MoE inside vLLM engines: cross-rank bytes and output tokens/s, side by side.

Serves the embedded trained model (V3 view, float32) in each configuration, one engine at a time, and sends the
same workload (``--requests`` prompts from the model's held-out corpus, ``--concurrency`` in flight,
``--max-tokens`` greedy tokens each, after one warm-up round):

* ``single``: one worker, no plugin (the reference tokens);
* ``tp2-stock``: vLLM's own TP=2 without EP (experts sharded by TP; stock EP does not run on CPU);
* ``tp2-ep-plain`` / ``tp2-ep-spec`` / ``tp2-ep-local``: TP=2 + EP with ``--plugin spec_moe``, plain dispatch /
  pre-grouped placement + token shuffle / no all-to-all (each rank runs its experts on every token);
* ``dp2-ep-plain`` / ``dp2-ep-spec``: DP=2 + EP, same two dispatch settings.

Bytes are the workers' own counters (FRONTIER_SPEC_MOE_LOG_EVERY=1 log lines; dispatch + meta + combine sent to
other ranks), counted over the measured round only. On this 2-core machine the two workers of a TP/DP engine
share the cores with the API server, so tokens/s compares configurations, not hardware.

    python benchmarks/spec_moe_vllm.py --json benchmarks/results/spec_moe_vllm/spec_moe_vllm_cpu.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Report  # noqa: E402
from serving import VllmServer  # noqa: E402

from vllm_frontier.moe.vllm_adapter import counters_from_log  # noqa: E402

MODEL = ROOT / "vllm_frontier" / "models" / "embedded" / "v3"
TRACES = ROOT / "benchmarks" / "results" / "spec_moe" / "spec_moe_traces_v3.pt"
COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-num-seqs", "16",
          "-cc", '{"custom_ops": ["-rotary_embedding"]}']
EP = ["--plugin", "spec_moe", "--enable-expert-parallel"]


def configs(placement: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    spec = {"FRONTIER_SPEC_MOE_DISPATCH": "speculative", "FRONTIER_SPEC_MOE_PLACEMENT": str(placement)}
    plain = {"FRONTIER_SPEC_MOE_DISPATCH": "plain"}
    tp2, dp2 = ["--tensor-parallel-size", "2"], ["--data-parallel-size", "2"]
    return {
        "single": ([], {}),
        "tp2-stock": (tp2, {}),
        "tp2-ep-plain": (EP + tp2, plain),
        "tp2-ep-spec": (EP + tp2, spec),
        "tp2-ep-local": (EP + tp2, {"FRONTIER_SPEC_MOE_DISPATCH": "local"}),
        "dp2-ep-plain": (EP + dp2, plain),
        "dp2-ep-spec": (EP + dp2, spec),
    }


def heldout_prompts(n: int, chars: int = 120) -> list[str]:
    """``n`` line-start snippets from the held-out corpus files (deterministic)."""
    from vllm_frontier.models.corpus import read_split

    prompts = []
    for text in read_split("heldout"):
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 97):
            text = "".join(lines[i:i + 6])[:chars]
            if len(text.strip()) > 20:
                prompts.append(text)
            if len(prompts) == n:
                return prompts
    return prompts


def delta(before: dict, after: dict) -> dict[str, float]:
    keys = ("dispatch_sent", "meta_sent", "combine_sent", "tokens", "tokens_all_local", "comm_seconds", "calls")
    return {k: sum(after[p][k] - before.get(p, {}).get(k, 0) for p in after) for k in keys}


def run_round(srv: VllmServer, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, list]:
    def one(p):
        c = srv.complete(p, max_tokens=max_tokens, return_token_ids=True, ignore_eos=True)["choices"][0]
        return c["token_ids"]

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        out = list(ex.map(one, prompts))
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--only", nargs="*", help="run these configurations only")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    prompts = heldout_prompts(args.requests)
    report = Report(args.json, {"requests": len(prompts), "concurrency": args.concurrency,
                                "max_tokens": args.max_tokens, "model": "embedded v3, float32"})
    with tempfile.TemporaryDirectory() as tmp:
        placement = Path(tmp) / "placement_ep2.json"
        subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "spec-moe-placement", "--traces", str(TRACES),
                        "--ranks", "2", "--out", str(placement)], check=True, cwd=ROOT, capture_output=True)
        cfgs = configs(placement)
        unknown = set(args.only or []) - set(cfgs)
        if unknown:
            ap.error(f"unknown configuration(s) {sorted(unknown)}; valid: {', '.join(cfgs)}")
        ref = None
        results = {}
        for name, (extra, env) in cfgs.items():
            if args.only and name not in args.only:
                continue
            env = {**env, "FRONTIER_SPEC_MOE_LOG_EVERY": "1"} if env else {}
            with report.section(name) as rec, VllmServer(MODEL, args=COMMON + extra, env=env) as srv:
                run_round(srv, prompts[: args.concurrency], args.max_tokens, args.concurrency)  # warm-up
                before = counters_from_log(srv.log_text())
                seconds, toks = run_round(srv, prompts, args.max_tokens, args.concurrency)
                time.sleep(1)  # the last log lines reach the file
                after = counters_from_log(srv.log_text())
                n_out = sum(len(t) for t in toks)
                rec.update(seconds=round(seconds, 3), output_tokens=n_out, tokens_per_s=round(n_out / seconds, 2))
                if name == "single":
                    ref = toks
                elif ref is not None:
                    rec["prompts_identical_to_single"] = sum(a == b for a, b in zip(toks, ref))
                if after:
                    d = delta(before, after)
                    sent = d["dispatch_sent"] + d["meta_sent"] + d["combine_sent"]
                    rec.update(cross_rank_bytes_sent=sent, bytes_per_output_token=round(sent / n_out, 1),
                               moe_tokens=d["tokens"], fraction_tokens_all_local=round(
                                   d["tokens_all_local"] / max(d["tokens"], 1), 4),
                               comm_seconds=round(d["comm_seconds"], 3))
                results[name] = rec
                print(f"{name}: {rec}", flush=True)
        summary = report.data["sections"].setdefault("summary", {})
        for a, b in (("tp2-ep-spec", "tp2-ep-plain"), ("dp2-ep-spec", "dp2-ep-plain")):
            if a in results and b in results and results[b].get("cross_rank_bytes_sent"):
                summary[f"{a} bytes vs {b}"] = round(
                    results[a]["cross_rank_bytes_sent"] / results[b]["cross_rank_bytes_sent"] - 1, 4)
        for name, rec in results.items():
            for base in ("single", "tp2-stock"):
                if base in results and name != base and "tokens_per_s" in rec:
                    summary[f"{name} tokens/s vs {base}"] = round(rec["tokens_per_s"] / results[base]["tokens_per_s"], 3)
        report.write()
        print("summary:", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
