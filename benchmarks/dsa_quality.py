"""Held-out quality of the embedded trained model through vLLM: dense vs DSA top-k, and FP8 vs bf16 latent KV.

    python benchmarks/dsa_quality.py --json benchmarks/results/dsa_quality/dsa_quality.json

One engine per configuration (`vllm_frontier.models.train_eval.run_vllm`, a fresh subprocess each, so the
feature toggles apply), all on the same held-out windows (`--seq-len` tokens each, 1024 by default):
  dense        : the V3 view (same weights, no indexer) on vLLM's own CPU MLA backend
  dsa_topk_K   : the V3.2 view with `--plugin dsa` and index_topk = K (via hf_overrides)
  dsa_fp8_kv   : the V3.2 view with `--plugin dsa` and the 656-byte FP8 latent cache (`fp8_ds_mla`)
Perplexity deltas are relative to `dense` (and FP8 relative to the same top-k with the bf16/fp32 cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header  # noqa: E402

EXACT_ROPE = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topk", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from quality import heldout_windows, vllm_metrics

    from vllm_frontier.models.embedded import embedded_model_path
    from vllm_frontier.models.train_eval import run_vllm

    v3, v32 = embedded_model_path("v3"), embedded_model_path("v32")
    cfg = json.loads((v32 / "config.json").read_text())
    windows = heldout_windows(v32, a.windows, a.seq_len)
    base = {"enforce_eager": True, "max_model_len": a.seq_len + 16, **EXACT_ROPE}
    dsa_env = {"FRONTIER_DSA": "1"}
    configs = {"dense": (v3, base, {})}
    for k in a.topk:
        configs[f"dsa_topk_{k}"] = (v32, {**base, "hf_overrides": {"index_topk": k}}, dsa_env)
    k0 = a.topk[0]
    configs[f"dsa_topk_{k0}_fp8_kv"] = (v32, {**base, "hf_overrides": {"index_topk": k0},
                                               "kv_cache_dtype": "fp8_ds_mla"}, dsa_env)
    results: dict = {"header": header(), "meta": {"model": str(v32), "trained_index_topk":
                              cfg.get("index_topk"), "seq_len": a.seq_len, "windows": len(windows),
                              "dtype": a.dtype}, "configs": {}}
    for name, (model, engine_args, env) in configs.items():
        t = time.monotonic()
        res = run_vllm(model, windows, dtype=a.dtype, engine_args=engine_args, env=env, timeout=3600)
        m = vllm_metrics(res)
        m["seconds"] = round(time.monotonic() - t, 1)
        results["configs"][name] = m
        print(f"{name:>24}: ppl {m['perplexity']:.4f}  top1 {m['top1_accuracy']:.4f}  ({m['seconds']}s)", flush=True)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=2))
    dense = results["configs"]["dense"]["perplexity"]
    deltas = {n: m["perplexity"] / dense - 1 for n, m in results["configs"].items() if n != "dense"}
    fp8 = results["configs"][f"dsa_topk_{k0}_fp8_kv"]["perplexity"]
    deltas[f"fp8_kv_vs_same_topk"] = fp8 / results["configs"][f"dsa_topk_{k0}"]["perplexity"] - 1
    results["perplexity_delta_vs_dense"] = {k: round(v, 5) for k, v in deltas.items() if math.isfinite(v)}
    print(json.dumps(results["perplexity_delta_vs_dense"], indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
