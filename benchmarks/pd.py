"""P/D handoff on real vLLM CPU engines: FrontierPDConnector vs vLLM's ExampleConnector, and wire bytes.

    .venv/bin/python benchmarks/pd.py                       # ~10 min on 2 shared cores
    .venv/bin/python benchmarks/pd.py --lengths 128 512 --reps 3 --out /tmp/pd.json

One prefill and one decode instance (tiny DeepSeek-V3, `--dtype`, default bfloat16 so the raw wire row
is the 1152 B MLA row) are started with FrontierPDConnector, measured, stopped, then started again with
ExampleConnector (KV through files in a temporary directory) and measured with the same client code and
prompts, in the same run. Per request (one at a time, unique prompts so nothing is a local cache hit):

  sequential driver (both connectors): POST prefill (max_tokens=1) -> wait -> POST decode (stream);
  concurrent driver (ours only; what `vllm-frontier router` does): prefill and decode sent together,
      the decode pulls the KV layer by layer while the prefill computes.

  TTFT      = first streamed token from the decode instance - send of the prefill request
  TPOT      = (last token - first token) / (tokens - 1)
  handoff   = first decode token - prefill response (sequential driver: KV move + one decode step)
  KV B/s    = prompt KV bytes / handoff, with prompt KV bytes = tokens x layers x raw row bytes
  ours only: transfer B/s = frontier_pd_recv_bytes / frontier_pd_recv_wall (pulls alone)

Each instance's compute threads get their own half of the machine's cores (VLLM_CPU_OMP_THREADS_BIND), as
prefill and decode instances would have their own machines; vLLM's automatic binding would put both workers
on the same core. The two connectors run one after the other on this machine (two engines at a time); the load average
is recorded around each timed phase because other work on a shared machine moves absolute times.
Before timing, each connector's decode output is checked against a colocated run (greedy token ids).
Wire bytes: the same prompts sent with wire "raw" and "fp8"; bytes per token per layer from the decode
instance's frontier_pd_recv_bytes counter. Writes JSON (`--out`, default benchmarks/results/pd/pd.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Report  # noqa: E402
from serving import VllmServer, free_port  # noqa: E402

from vllm_frontier.models.tiny_factory import make_tiny_model  # noqa: E402

SECRET = "pd-bench"
COMMON = ["--max-num-seqs", "8", "--enforce-eager"]


def words(n: int, seed: int) -> str:
    vocab = ["def", "return", "value", "for", "in", "range", "self", "print", "class", "import",
             "if", "else", "while", "yield", "lambda", "None", "True", "data", "list", "dict"]
    return " ".join(vocab[(i * 7 + seed * 13 + i // 3 + (i * seed) % 5) % len(vocab)] for i in range(n))


def metric(srv: VllmServer, name: str) -> float:
    txt = requests.get(srv.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in txt.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def model_name(srv) -> str:
    return requests.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def plain_ids(srv, prompt, max_tokens) -> tuple[list[int], int]:
    r = requests.post(srv.url + "/v1/completions", json={
        "model": model_name(srv), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 1, "return_tokens_as_token_ids": True}, timeout=600).json()
    return [int(t.split(":")[1]) for t in r["choices"][0]["logprobs"]["tokens"]], r["usage"]["prompt_tokens"]


def stream_decode(srv, prompt, max_tokens, kv_params) -> tuple[list[int], float | None, float | None]:
    """(token ids, first token time, last token time) of a streamed greedy completion."""
    body = {"model": model_name(srv), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    if kv_params:
        body["kv_transfer_params"] = kv_params
    ids, first, last = [], None, None
    with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            ch = json.loads(line[6:]).get("choices") or []
            toks = (ch[0].get("logprobs") or {}).get("tokens") if ch else None
            if toks:
                now = time.perf_counter()
                first = first or now
                last = now
                ids += [int(t.split(":")[1]) for t in toks]
    return ids, first, last


def prefill(srv, prompt, kv_params) -> float:
    body = {"model": model_name(srv), "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if kv_params:
        body["kv_transfer_params"] = kv_params
    r = requests.post(srv.url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter()


def start_pair(model, dtype, kv_cfg, env, tries=3):
    """Start P then D; a KV port taken by another process meanwhile is retried with a new one."""
    for attempt in range(tries):
        try:
            return _start_pair(model, dtype, kv_cfg, env)
        except Exception as e:  # ServerError
            if "cannot bind the KV listener" not in str(e) or attempt == tries - 1:
                raise


def core_binding() -> list[str] | None:
    """OpenMP cores of (prefill, decode): one half of this machine's cores each, as P and D would have
    their own machines. vLLM's automatic binding would put both workers' threads on the same cores."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return [",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half: 2 * half]))]


def _start_pair(model, dtype, kv_cfg, env):
    ports = [free_port(), free_port()]
    srvs = []
    binding = core_binding()
    for i, p in enumerate(ports):
        e = {**env, "FRONTIER_PD_PORT": str(p), "VLLM_CPU_KVCACHE_SPACE": "1"}
        if binding:
            e["VLLM_CPU_OMP_THREADS_BIND"] = binding[i]
        srvs.append(VllmServer(model, args=["--dtype", dtype, "--kv-transfer-config", json.dumps(kv_cfg), *COMMON],
                               env=e))
    try:
        for s in srvs:  # one after the other: two starts at once crowd the 2 cores
            s.start()
    except Exception:
        for s in srvs:
            s.stop()
        raise
    return srvs[0], srvs[1], ports[0]


def run_driver(P, D, cases, make_params, concurrent=False) -> dict:
    """Time each case; returns lists of TTFT/TPOT/handoff seconds and the token ids."""
    ttft, tpot, handoff, kvbps, outs = [], [], [], [], []
    for prompt, ntok, kv_bytes in cases:
        pp, dp = make_params()
        t0 = time.perf_counter()
        if concurrent:
            import threading

            box = {}
            th = threading.Thread(target=lambda: box.setdefault("t", prefill(P, prompt, pp)))
            th.start()
            ids, first, last = stream_decode(D, prompt, ntok, dp)
            th.join()
            t_p = box["t"]
        else:
            t_p = prefill(P, prompt, pp)
            ids, first, last = stream_decode(D, prompt, ntok, dp)
        outs.append(ids)
        ttft.append(first - t0)
        if len(ids) > 1:
            tpot.append((last - first) / (len(ids) - 1))
        if not concurrent:
            handoff.append(first - t_p)
            kvbps.append(kv_bytes / (first - t_p))
    return {"ttft_s": ttft, "tpot_s": tpot, "handoff_s": handoff, "kv_bytes_per_s": kvbps, "ids": outs}


def summary(xs):
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "n": len(xs)} if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 360], help="prompt words (~2.5 tokens each; max-model-len is 1024)")
    ap.add_argument("--reps", type=int, default=4, help="requests per length and connector")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pd" / "pd.json"))
    args = ap.parse_args(argv)

    rep = Report(args.out, meta={**vars(args), "omp_cores_prefill_decode": core_binding()})
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    model = make_tiny_model("deepseek_v3", tmp / "model", dtype=args.dtype)
    cfg = json.loads((model / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    row_bytes = 576 * (2 if args.dtype == "bfloat16" else 4)
    results: dict = {}

    def cases(seed0):
        out = []
        for L in args.lengths:
            for r in range(args.reps):
                out.append((words(L, seed0 + 100 * L + r), args.max_tokens))
        return out

    # ---------------- ours
    with rep.section("frontier_pd") as rec:
        P, D, pport = start_pair(model, args.dtype,
                                 {"kv_connector": "FrontierPDConnector", "kv_role": "kv_both",
                                  "kv_load_failure_policy": "recompute"},
                                 {"FRONTIER_PD": "1", "FRONTIER_PD_SECRET": SECRET,
                                  "FRONTIER_PD_UNKNOWN_WAIT": "60"})
        try:
            addr = f"tcp://127.0.0.1:{pport}"

            def params(wire="raw"):
                tid = uuid.uuid4().hex
                return ({"frontier_pd": "produce", "transfer_id": tid, "wire": wire},
                        {"frontier_pd": "consume", "transfer_id": tid, "remote_addr": addr})

            # agree first: P/D output equals a colocated run on D
            cs = cases(1)
            want = [plain_ids(D, p, n) for p, n in cs[:: args.reps]]
            got = run_driver(P, D, [(p, n, 0) for p, n in cs[:: args.reps]], params)["ids"]
            rec["agrees_with_colocated"] = [g == w[0] for g, w in zip(got, want)]
            ntoks = {L: plain_ids(D, words(L, 7), 1)[1] for L in args.lengths}
            timed = [(p, n, ntoks[args.lengths[i // args.reps]] * layers * row_bytes)
                     for i, (p, n) in enumerate(cases(2))]
            b0, w0 = metric(D, "frontier_pd_recv_bytes_total"), metric(D, "frontier_pd_recv_wall_us_total")
            rec["loadavg_before"] = os.getloadavg()
            seq = run_driver(P, D, timed, params)
            rec["loadavg_after_sequential"] = os.getloadavg()
            plain_ids(D, "nudge", 1)  # connector counters flow with engine steps
            b1, w1 = metric(D, "frontier_pd_recv_bytes_total"), metric(D, "frontier_pd_recv_wall_us_total")
            conc = run_driver(P, D, [(p, n, k) for p, n, k in cases_with(timed, 3)], params, concurrent=True)
            results["frontier_seq"], results["frontier_conc"] = seq, conc
            rec["sequential"] = {k: summary(v) for k, v in seq.items() if k != "ids"}
            rec["concurrent"] = {k: summary(v) for k, v in conc.items() if k != "ids"}
            rec["transfer_bytes_per_s"] = (b1 - b0) / ((w1 - w0) * 1e-6) if w1 > w0 else None
            # wire bytes: raw vs fp8, same prompts
            wire = {}
            for enc in ("raw", "fp8"):
                plain_ids(D, "nudge", 1)
                before = metric(D, "frontier_pd_recv_bytes_total")
                toks = 0
                for L in args.lengths:
                    prompt = words(L, 900 + L + (enc == "fp8"))
                    n = plain_ids(D, prompt, 1)[1]
                    run_driver(P, D, [(prompt, 2, 0)], lambda: params(enc))
                    toks += n
                plain_ids(D, "nudge", 1)
                moved = metric(D, "frontier_pd_recv_bytes_total") - before
                wire[enc] = {"bytes": moved, "tokens": toks, "layers": layers,
                             "bytes_per_token_per_layer": moved / (toks * layers)}
            rec["wire"] = wire
            rec["kv_cache_usage_after"] = {"prefill": metric(P, "vllm:kv_cache_usage_perc"),
                                           "decode": metric(D, "vllm:kv_cache_usage_perc")}
        finally:
            P.stop()
            D.stop()

    # ---------------- vLLM's ExampleConnector (files), same client code and prompts
    with rep.section("example_connector") as rec:
        store = tmp / "example_kv"
        store.mkdir()
        P, D, _ = start_pair(model, args.dtype,
                             {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                              "kv_connector_extra_config": {"shared_storage_path": str(store)}}, {})
        try:
            cs = cases(1)
            want = [plain_ids(D, p + " x", n) for p, n in cs[:: args.reps]]  # fresh prompts: no stored KV
            got = run_driver(P, D, [(p + " x", n, 0) for p, n in cs[:: args.reps]], lambda: (None, None))["ids"]
            rec["agrees_with_colocated"] = [g == w[0] for g, w in zip(got, want)]
            ntoks = {L: plain_ids(D, words(L, 7) + " y", 1)[1] for L in args.lengths}
            timed = [(p + " z", n, ntoks[args.lengths[i // args.reps]] * layers * row_bytes)
                     for i, (p, n) in enumerate(cases(2))]
            h0 = metric(D, "vllm:external_prefix_cache_hits_total")
            q0 = metric(D, "vllm:external_prefix_cache_queries_total")
            rec["loadavg_before"] = os.getloadavg()
            seq = run_driver(P, D, timed, lambda: (None, None))
            rec["loadavg_after_sequential"] = os.getloadavg()
            rec["decode_external_hit_tokens"] = metric(D, "vllm:external_prefix_cache_hits_total") - h0
            rec["decode_external_query_tokens"] = metric(D, "vllm:external_prefix_cache_queries_total") - q0
            results["example_seq"] = seq
            rec["sequential"] = {k: summary(v) for k, v in seq.items() if k != "ids"}
            rec["storage_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        finally:
            P.stop()
            D.stop()

    with rep.section("comparison") as rec:
        fs, es = results["frontier_seq"], results["example_seq"]
        fc = results["frontier_conc"]
        med = statistics.median
        rec["ttft_median_s"] = {"frontier_sequential": med(fs["ttft_s"]), "frontier_concurrent": med(fc["ttft_s"]),
                                "example_connector": med(es["ttft_s"])}
        rec["tpot_median_s"] = {"frontier_sequential": med(fs["tpot_s"]), "example_connector": med(es["tpot_s"])}
        rec["handoff_median_s"] = {"frontier": med(fs["handoff_s"]), "example_connector": med(es["handoff_s"])}
        rec["kv_bytes_per_s_median"] = {"frontier": med(fs["kv_bytes_per_s"]),
                                        "example_connector": med(es["kv_bytes_per_s"])}
        rec["ttft_ratio_example_over_frontier_sequential"] = med(es["ttft_s"]) / med(fs["ttft_s"])
        per_len = {}
        for j, L in enumerate(args.lengths):
            sl = slice(j * args.reps, (j + 1) * args.reps)
            per_len[L] = {"frontier_seq_ttft": med(fs["ttft_s"][sl]), "frontier_conc_ttft": med(fc["ttft_s"][sl]),
                          "example_ttft": med(es["ttft_s"][sl])}
        rec["ttft_median_by_prompt_words"] = per_len
    rep.write()
    print(json.dumps(rep.data["sections"].get("comparison"), indent=2))
    return 0


def cases_with(timed, salt):
    """The same lengths and byte counts with fresh prompt text (no stale staging, no cache hits)."""
    return [(p + f" {salt}", n, k) for p, n, k in timed]


if __name__ == "__main__":
    sys.exit(main())
