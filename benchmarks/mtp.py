"""MTP speculative decoding on vLLM (CPU here), V3 and V3.2 views of the embedded model side by side: output
tokens/s of the MTP engine at pinned k = 0, 1, 2, 3 and under the adaptive draft length vs the plain engine,
acceptance per draft position, and acceptance in the first drafting steps after a pause vs steady drafting.

    python benchmarks/mtp.py --json benchmarks/results/mtp/mtp_cpu.json     # embedded trained model, v3 + v32
    python benchmarks/mtp.py --views v3 --batches 1,16 ...                   # one view, fewer batch sizes
    python benchmarks/mtp.py --model DIR --json ...                          # any checkpoint with MTP layers
    python benchmarks/mtp.py --preset mid --json ...                         # random weights, realistic size

Per view, two engines alive side by side in one subprocess (`vllm.LLM`, float32, eager, greedy), the pair
started `--repeats` times:
1. plain: no speculation;
2. MTP: cap K = 3, `PinnedDraftScheduler` and the drafter-skipping worker (`SkippingMTPProposer`: a step
   that drafts nothing runs no drafter forward; the skipped positions are replayed when drafting resumes).
   A pin carried by the requests (`SamplingParams.extra_args`) switches between fixed k = 0..3, the pause
   cycle (`--pause-cycle`, e.g. eight steps at k = 0 then eight at k = 2) and `adaptive` between runs inside
   the one engine. Pinned steps teach the rule
   nothing: under `adaptive` it knows only what its own steps measured (probes included), kept across runs
   as in a serving engine; `--adaptive-warmup` untimed adaptive runs per batch size come first (its first
   minutes; default 1).
Every run generates `--tokens` tokens per prompt (`ignore_eos`; batch 1: `--batch1-prompts` prompts one
after the other, times summed). Per round and batch size the MTP modes run in an order rotated every round.
`--concurrent` (default): each MTP run goes at the same time as a plain run of the same prompts, each engine
on its own half of the CPUs with all its processes (EngineCore, worker and its OpenMP threads) and this
process's threads that serve it (the thread submitting its requests, its output thread), so each engine pays
for all of its own work and only for it. A mode's speedup in a round is the ratio of the pair's tokens/s;
the engines swap CPUs every round, and the report gives the geometric mean over rounds (which cancels a CPU
being faster than the other) with a bootstrap 95 % interval over swapped round pairs (`speedup_ci95`); with
`--repeats` > 1 the interval resamples the engine pairs too, and `speedup_per_engine_pair` lists each pair's
geometric mean (an engine's speed depends on its start: one pair's interval does not cover the next pair's).
`--control`: an A/A run, a second plain engine in the MTP engine's place (mode `control`): how far apart the
measure puts two identical engines, the yardstick for the MTP ratios.
Why: on this 2-core VM the speed of one engine drifts by 30-40 % over seconds to minutes and differs between
engine starts; two runs at the same time see the same drift. One CPU can still be faster than the other for
minutes (trial runs alternated round by round with the swap), hence the swap and the geometric mean.
`--no-concurrent`: one engine after the other; each MTP run between two plain runs (plain, k=0, plain, k=1,
plain, ...), with `--switch-gap` seconds of idle at every switch (vLLM's workers poll for work for 1 s after
their last step, on the core the other engine's workers use); a mode's speedup in a round is its tokens/s
over the mean of the two plain runs around it, the report gives the median over rounds.
3. (`--catch-up-contrast`) MTP with the catch-up pass switched off (`FRONTIER_MTP_CATCH_UP=0`, a test hook),
   pause cycle only, one more engine alone: the drafter's KV keeps the holes of the skipped steps, which
   shows what the catch-up is worth in acceptance after a pause.
Agree first: every MTP run's token ids must equal the plain engine's (greedy, float32): `lossless`.

Metrics per (view, batch, mode), from the scheduler's counters (its `stats()`, written into the step log when
the engine becomes idle, `mtp_step_log`; deltas per run):
- `tok_s` (median over rounds), `speedup_vs_none` (concurrent: geometric mean of the paired ratios, with
  `speedup_ci95`; else the median of the bracketed ratios; per round: `speedup_per_round`),
  `tokens_per_target_forward`;
- `tok_per_cpu_s`, `speedup_vs_none_cpu`: the same per CPU second of the processes of the engine that ran
  (its EngineCore and workers; one after the other also this one), a measure that other processes' load
  distorts less;
- `acceptance_per_pos`: conditional acceptance a_i (accepted at position i / drafts that reached i);
- pause cycle: `after_pause` (drafts of the first drafting step after a k = 0 stretch) vs `steady` (drafts
  of the 4th and later consecutive drafting steps), per position, with and without the catch-up;
- `slowest_step`: per run, [k, ms] of its slowest decode step (from the step log);
- `drafter`: the proposer's counters (skipped steps, catch-up passes and tokens); `rule_quiet_steps`: engine
  steps where the adaptive rule skipped its per-step work (`DraftLengthPolicy.quiet_until`);
- `speedup_vs_k<k>_paired` (adaptive, concurrent): geometric mean over rounds of adaptive's ratio to the plain
  engine over fixed k's ratio in the same round.
`targets` (wall time) and `targets_cpu_time` check: pinned k = 0 >= 0.97x plain; adaptive >= 0.97x plain at
every batch size, and > 1.0x where a fixed k beats plain (`fixed_k_beating_none` lists where).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import command_line, engine_script_args, run_worker  # noqa: E402
from mtp_step_log import read_log  # noqa: E402

PROMPTS = ["def main(argv):\n", "import os\n\nclass Config:\n", "for i in range(10):\n", "# Copyright\n\"\"\"Utils",
           "with open(path) as f:\n", "try:\n    import json\n", "def __init__(self, name):\n", "return [x for x in",
           "class Node:\n    def __init__(self", "if __name__ == '__main__':\n", "    def __repr__(self):\n",
           "from collections import", "raise ValueError(", "def test_", "    for key, value in", "import sys\n"]
FIXED = (0, 1, 2, 3)
CAP_K = max(FIXED)
PINNED_CLS = "mtp_step_log.PinnedStepLogScheduler"   # PinnedDraftScheduler + step times (mtp_step_log)
PLAIN_CLS = "mtp_step_log.StepLogScheduler"
DEFAULT_PAUSE = ",".join(["0"] * 8 + ["2"] * 8)
TARGET = 0.97


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import psutil
    from vllm import LLM, SamplingParams

    from vllm_frontier.spec_decode import executor_backend, worker_cls
    from vllm_frontier.spec_decode.scheduler import REQUEST_PIN_KEY

    control = spec.get("control", False)   # the "mtp" engine is a second plain engine (an A/A run)

    def make(mtp: bool):
        kw = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                  max_num_seqs=max(spec["batches"]), compilation_config={"custom_ops": ["-rotary_embedding"]})
        if mtp:
            kw.update(speculative_config={"method": "mtp", "num_speculative_tokens": CAP_K},
                      scheduler_cls=PINNED_CLS, worker_cls=worker_cls(),
                      distributed_executor_backend=executor_backend("mp"))
        else:
            kw.update(scheduler_cls=PLAIN_CLS)
        return LLM(**kw)

    from mtp_step_log import LOG_ENV

    concurrent = spec["concurrent"] and {"plain", "mtp"} <= set(spec["engines"])
    engines, engine_pids, known, logs, client_tids = {}, {}, set(), {}, {}
    for name in spec["engines"]:   # each engine's processes (EngineCore, workers), for its CPU seconds
        logs[name] = Path(f"{spec['step_log']}.{name}")
        os.environ[LOG_ENV] = str(logs[name])   # the engine core started now reads it
        before = {t.native_id for t in threading.enumerate()}
        engines[name] = make(name == "mtp" and not control)
        # this process's threads serving the engine (its output thread): placed with the engine
        client_tids[name] = [t.native_id for t in threading.enumerate() if t.native_id not in before]
        engine_pids[name] = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in known]
        known.update(engine_pids[name])
    placed: dict[str, set[int]] = {}

    def place(cpus: dict[str, set[int]]) -> dict:
        placed.update(cpus)
        return place_engines(engine_pids, cpus, client_tids)

    if concurrent:
        halves = split_cpus()
        placement = place({"plain": halves[0], "mtp": halves[1]})
    else:
        placement = pin_engine_cores(engine_pids) if spec["pin_cores"] else None

    def cpu_seconds(name: str) -> float:
        """CPU time of this process and the engine's: a cost measure that machine load distorts far less than
        wall time (other processes' time is not counted)."""
        total = 0.0
        # concurrent runs: this process serves both engines at once, its time is nobody's alone
        for pid in ([] if concurrent else [psutil.Process().pid]) + engine_pids[name]:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def params(pin: str | None = None, max_tokens: int = spec["tokens"]) -> SamplingParams:
        # the MTP engine's k comes with the requests (no pin file: a file read in the engine core's step loop
        # waits for the GIL, and the plain engine pays none)
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={REQUEST_PIN_KEY: pin} if pin is not None else None)

    last_stats: dict[str, dict | None] = {}   # the MTP scheduler's counters, from its step log (mtp_step_log)
    for name, llm in engines.items():
        llm.generate(PROMPTS[:2], params("0", 4), use_tqdm=False)  # warm-up

    def groups_of(batch: int) -> list[list[str]]:
        # batch 1: several prompts one after the other (one prompt alone measures one continuation)
        if batch == 1:
            return [[p] for p in PROMPTS[:spec["batch1_prompts"]]]
        return [(PROMPTS * (batch // len(PROMPTS) + 1))[:batch]]

    last = {"engine": None}

    def run(name: str, mode: str, batch: int, rnd: int) -> dict:
        llm = engines[name]
        if concurrent:   # this thread (it submits the requests and collects the outputs) on the engine's CPUs
            os.sched_setaffinity(0, placed[name])
        if not concurrent and last["engine"] not in (None, name):
            time.sleep(spec["switch_gap"])   # the other engine's workers stop polling for work
        last["engine"] = name
        is_mtp = name == "mtp" and not control
        run_params = params(spec["pins"][mode] if is_mtp else None)
        counters = rpc_of(llm, is_mtp, spec["worker_rpc"])
        c0 = counters()
        last_stats[name] = read_log(logs[name])[1] or last_stats.get(name)
        before = last_stats[name]
        ids, dt, cpu = [], 0.0, 0.0
        for group in groups_of(batch):
            t, c = time.perf_counter(), cpu_seconds(name)
            outs = llm.generate(group, run_params, use_tqdm=False)
            dt += time.perf_counter() - t
            cpu += cpu_seconds(name) - c
            ids += [list(o.outputs[0].token_ids) for o in outs]
        logged, stats = read_log(logs[name])
        last_stats[name] = stats or before
        steps = [t for _, k, t in logged if k >= 0]
        other = [t for _, k, t in logged if k < 0]
        return {"round": rnd, "batch": batch, "engine": name, "mode": mode, "seconds": dt, "cpu_seconds": cpu,
                "tokens": sum(len(x) for x in ids), "token_ids": ids, "decode_steps": len(steps),
                "step_median_s": statistics.median(steps) if steps else None, "step_sum_s": sum(steps),
                "other_steps": len(other), "other_steps_s": sum(other),
                "slowest_step": max(((t, k) for _, k, t in logged if k >= 0), default=None),
                "stats_before": before if is_mtp else None, "stats_after": last_stats[name] if is_mtp else None,
                "counters_before": c0, "counters_after": counters()}

    runs = []
    modes = list(spec["modes"])
    if "mtp" in engines and "adaptive" in modes and not control:
        for _ in range(spec["adaptive_warmup"]):
            for batch in spec["batches"]:   # the rule's first minutes in a serving engine: not timed
                run("mtp", "adaptive", batch, -1)
    for rnd in range(spec["rounds"]):
        order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]   # rotated: no mode always first
        if concurrent:   # the engines swap CPUs every round: neither keeps the faster one
            place({"plain": halves[rnd % 2], "mtp": halves[1 - rnd % 2]})
        for batch in spec["batches"]:
            if concurrent:
                # plain and MTP run the same prompts at the same time, each on its own CPUs: a slower
                # machine slows both, and the ratio of their times sees none of it
                for mode in order:
                    got = {}
                    threads = [threading.Thread(target=lambda n=n, m=m: got.__setitem__(n, run(n, m, batch, rnd)))
                               for n, m in (("plain", "none"), ("mtp", mode))]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    if len(got) < 2:
                        raise RuntimeError(f"a concurrent run failed (mode {mode}, batch {batch})")
                    plain, r = got["plain"], got["mtp"]
                    r["bracket"] = [plain["tokens"] / plain["seconds"]] * 2
                    r["bracket_cpu"] = [plain["tokens"] / plain["cpu_seconds"]] * 2
                    r["bracket_step_s"] = [plain["step_median_s"]] * 2
                    r["concurrent"] = True
                    runs += [plain, r]
                continue
            if "plain" not in engines:
                runs += [run("mtp", mode, batch, rnd) for mode in order]
                continue
            # each MTP run between two plain runs: its speedup is over their mean (drift hits both sides)
            prev = run("plain", "none", batch, rnd)
            runs.append(prev)
            for mode in order:
                r = run("mtp", mode, batch, rnd)
                after = run("plain", "none", batch, rnd)
                r["bracket"] = [prev["tokens"] / prev["seconds"], after["tokens"] / after["seconds"]]
                r["bracket_cpu"] = [prev["tokens"] / prev["cpu_seconds"], after["tokens"] / after["cpu_seconds"]]
                r["bracket_step_s"] = [prev["step_median_s"], after["step_median_s"]]
                runs += [r, after]
                prev = after
    Path(out_path).write_text(json.dumps({"runs": runs, "placement": placement}))


def rpc_of(llm, is_mtp: bool, worker_rpc: str):
    """What a run calls on its engine's worker before and after it (`--worker-rpc`): the MTP proposer's
    counters (`mtp`, `both`), the same round trip to the plain engine's worker (`both`: vLLM's `check_health`,
    answered None), or nothing (`off`, or the plain engine under `mtp`)."""
    if worker_rpc == "off" or not (is_mtp or worker_rpc == "both"):
        return lambda: None
    method = "frontier_mtp_counters" if is_mtp else "check_health"
    return lambda: llm.collective_rpc(method)[0]


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def split_cpus() -> tuple[set[int], set[int]]:
    """This machine's CPUs in two equal halves (concurrent runs: one per engine)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:2 * half])


def place_engines(engine_pids: dict[str, list[int]], cpus: dict[str, set[int]],
                  client_tids: dict[str, list[int]]) -> dict:
    """Every thread of every process of each engine (EngineCore, workers with their OpenMP threads) and this
    process's threads serving it (``client_tids``) onto that engine's CPUs: each engine pays for all of its
    own work, and only for it. Returns the placement."""
    for name, pids in engine_pids.items():
        for tid in [t for pid in pids for t in _threads(pid)] + client_tids.get(name, []):
            try:
                os.sched_setaffinity(tid, cpus[name])
            except OSError:
                pass
    import psutil

    def name_of(pid: int) -> str:
        try:
            return f"{pid} {psutil.Process(pid).name()} ({len(_threads(pid))} threads)"
        except psutil.NoSuchProcess:
            return f"{pid} (gone)"

    return {"concurrent": True, "cpus": {name: sorted(c) for name, c in cpus.items()},
            "processes": {name: [name_of(pid) for pid in pids] for name, pids in engine_pids.items()},
            "client_threads": client_tids}


def pin_engine_cores(engine_pids: dict[str, list[int]]) -> dict:
    """Every thread of the engines' non-worker processes (EngineCore, helpers) and of this one onto the CPUs
    that vLLM's CPU workers are not bound to (vLLM binds each worker's OpenMP threads and reserves the rest
    for the engine core, but leaves the engine core itself unbound, so where it runs differs between engine
    starts). Returns the placement: CPUs per process, as bound."""
    import psutil

    worker_cpus: set[int] = set()
    workers: set[int] = set()
    for pids in engine_pids.values():
        for pid in pids:
            for tid in _threads(pid):
                cpus = os.sched_getaffinity(tid)
                if len(cpus) < os.cpu_count():   # a bound OpenMP thread: this process is a worker
                    worker_cpus |= cpus
                    workers.add(pid)
    rest = set(range(os.cpu_count())) - worker_cpus
    if not worker_cpus or not rest:
        return {"bound": False, "worker_cpus": sorted(worker_cpus)}
    placed = {}
    for pid in [os.getpid(), *(p for pids in engine_pids.values() for p in pids if p not in workers)]:
        for tid in _threads(pid):
            try:
                os.sched_setaffinity(tid, rest)
            except OSError:
                pass
        try:
            placed[f"{pid} {psutil.Process(pid).name()}"] = sorted(rest)
        except psutil.NoSuchProcess:
            pass
    return {"bound": True, "worker_cpus": sorted(worker_cpus), "others": placed}


def run_engines(model: str, engines: list[str], modes: dict[str, str], args, env_extra: dict,
                placements: list) -> list[dict]:
    """``engines`` ("plain", "mtp" or both, alive side by side, started in this order) in one subprocess;
    ``modes``: MTP run name -> pin text. Appends where their processes ran to ``placements``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "engines": engines, "tokens": args.tokens, "rounds": args.rounds,
                "batch1_prompts": args.batch1_prompts, "batches": args.batches, "switch_gap": args.switch_gap,
                "modes": list(modes), "pins": modes,
                "step_log": f"{tmp}/steps.jsonl", "pin_cores": args.pin_cores, "concurrent": args.concurrent,
                "control": args.control, "adaptive_warmup": args.adaptive_warmup, "worker_rpc": args.worker_rpc}
        # the engine core imports mtp_step_log from this folder (run_worker puts it on PYTHONPATH)
        out = run_worker(__file__, spec, tmp, env_extra, args.timeout)
        placements.append({"engines": engines, "placement": out["placement"]})
        return out["runs"]


def _delta(run: dict) -> dict | None:
    a, b = run["stats_after"], run["stats_before"]
    if a is None:
        return None

    def d(key):
        return [x - y for x, y in zip(a[key], b[key])] if b else list(a[key])

    def d2(key):
        return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a[key], b[key])] if b else a[key]

    def s(key):   # a counter an older scheduler did not keep counts 0
        return a.get(key, 0) - (b.get(key, 0) if b else 0)

    ca, cb = run.get("counters_after"), run.get("counters_before")
    drafter = {k: ca[k] - (cb or {}).get(k, 0) for k in ca} if ca else None
    return {"reached": d("reached_per_pos"), "accepted": d("accepted_per_pos"), "k_hist": d("k_histogram"),
            "run_reached": d2("run_reached_per_pos"), "run_accepted": d2("run_accepted_per_pos"),
            "steps": s("decode_request_steps"), "tokens": s("decode_tokens"), "quiet": s("quiet_steps"),
            "drafter": drafter}


def _sum(rows):
    return [sum(x) for x in zip(*rows)]


def _rates(accepted, reached):
    return [round(a / n, 4) if n else None for a, n in zip(accepted, reached)]


def geo_mean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def swap_pair_ci(ratios: list[float], draws: int = 2000) -> list[float] | None:
    """95 % bootstrap interval of the geometric mean of ``ratios`` (in round order), resampling the pairs of
    consecutive rounds (each pair saw both CPU placements); None with fewer than 3 pairs."""
    pairs = [geo_mean(ratios[i:i + 2]) for i in range(0, len(ratios) - 1, 2)]
    if len(pairs) < 3:
        return None
    rng = random.Random(0)
    means = sorted(geo_mean(rng.choices(pairs, k=len(pairs))) for _ in range(draws))
    return [round(means[int(0.025 * draws)], 4), round(means[int(0.975 * draws) - 1], 4)]


def pair_cluster_ci(ratios_by_pair: list[list[float]], draws: int = 2000) -> list[float] | None:
    """95 % bootstrap interval of the geometric mean of paired ratios measured on several engine pairs
    (``ratios_by_pair``: one list per pair, in round order): resamples the engine pairs, then the swapped round
    pairs inside each, so that a pair's own offset (engines started differently) widens the interval as it
    should. One engine pair: `swap_pair_ci`."""
    if len(ratios_by_pair) == 1:
        return swap_pair_ci(ratios_by_pair[0], draws)
    clusters = [[geo_mean(rs[i:i + 2]) for i in range(0, len(rs) - 1, 2)] for rs in ratios_by_pair]
    clusters = [c for c in clusters if c]
    if len(clusters) < 2:
        return None
    rng = random.Random(0)
    means = []
    for _ in range(draws):
        picked = rng.choices(clusters, k=len(clusters))
        means.append(geo_mean([x for c in picked for x in rng.choices(c, k=len(c))]))
    means.sort()
    return [round(means[int(0.025 * draws)], 4), round(means[int(0.975 * draws) - 1], 4)]


def mode_row(rs: list[dict], ref: dict) -> dict:
    row = {
        "tok_s": statistics.median(r["tokens"] / r["seconds"] for r in rs),
        "tok_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in rs),
        "lossless": all(r["token_ids"] == ref[r["batch"]] for r in rs),
        "seconds": [round(r["seconds"], 3) for r in rs],
        # where a run's time went: decode-only engine steps (their median and sum), the other steps
        "step_median_ms": [round(1e3 * r["step_median_s"], 3) if r.get("step_median_s") else None for r in rs],
        "decode_steps_s": [round(r.get("step_sum_s", 0.0), 3) for r in rs],
        "other_steps_s": [round(r.get("other_steps_s", 0.0), 3) for r in rs],
        # the run's slowest decode step [k, ms]: a drafting step that costs a whole run's time shows here
        "slowest_step": [[r["slowest_step"][1], round(1e3 * r["slowest_step"][0], 1)] if r.get("slowest_step")
                         else None for r in rs],
    }
    ds = [_delta(r) for r in rs]
    if all(ds):   # the MTP scheduler's counters (none for the second plain engine of a control run)
        reached, accepted = _sum(d["reached"] for d in ds), _sum(d["accepted"] for d in ds)
        steps = sum(d["steps"] for d in ds)
        run_reached = [_sum(d["run_reached"][b] for d in ds) for b in range(len(ds[0]["run_reached"]))]
        run_accepted = [_sum(d["run_accepted"][b] for d in ds) for b in range(len(ds[0]["run_accepted"]))]
        drafter = {k: sum(d["drafter"][k] for d in ds) for k in ds[0]["drafter"]} if ds[0]["drafter"] else None
        row.update({
            "tokens_per_target_forward": sum(d["tokens"] for d in ds) / steps if steps else None,
            "acceptance_per_pos": _rates(accepted, reached), "accepted_per_pos": accepted,
            "reached_per_pos": reached,
            # drafts of the 1st, 2nd, 3rd, >= 4th consecutive drafting step
            "acceptance_by_drafting_run": [_rates(a, n) for a, n in zip(run_accepted, run_reached)],
            "reached_by_drafting_run": run_reached,
            "decode_request_steps": steps, "engine_steps_by_k": _sum(d["k_hist"] for d in ds), "drafter": drafter,
            # engine steps where the adaptive rule was quiet (`DraftLengthPolicy.quiet_until`): no timing, no
            # table refresh, no probe check
            "rule_quiet_steps": sum(d["quiet"] for d in ds)})
    if all("bracket" in r for r in rs):
        # per run: tokens/s over the plain run beside it (concurrent) or over the mean of the plain runs just
        # before and after it (one after the other)
        ratios = [r["tokens"] / r["seconds"] / statistics.mean(r["bracket"]) for r in rs]
        ratios_cpu = [r["tokens"] / r["cpu_seconds"] / statistics.mean(r["bracket_cpu"]) for r in rs]
        if all(r.get("concurrent") for r in rs):
            # the engines swap CPUs every round and one CPU can be faster than the other for minutes: the
            # geometric mean over rounds cancels that (exactly for an even number of rounds, while it holds),
            # and the spread of the geometric means of swapped round pairs gives its 95 % interval
            # several engine pairs (--repeats): the interval resamples the pairs too (each pair has its own
            # offset: an engine's speed depends on its start)
            by_pair: dict[int, list[float]] = {}
            for r, x in zip(rs, ratios):
                by_pair.setdefault(r.get("pair", 0), []).append(x)
            row.update(speedup_vs_none=geo_mean(ratios), speedup_vs_none_cpu=geo_mean(ratios_cpu),
                       speedup_ci95=pair_cluster_ci(list(by_pair.values())))
            if len(by_pair) > 1:
                row["speedup_per_engine_pair"] = [round(geo_mean(v), 4) for v in by_pair.values()]
        else:
            row.update(speedup_vs_none=statistics.median(ratios), speedup_vs_none_cpu=statistics.median(ratios_cpu))
        row.update(speedup_per_round=[round(x, 4) for x in ratios],
                   speedup_per_round_cpu=[round(x, 4) for x in ratios_cpu])
        # the median decode step of the run over the mean of the plain runs' around it: what one engine step
        # costs next to a plain one (for k = 0 the inverse is the speedup, robust to a run's hiccups)
        steps = [r["step_median_s"] / statistics.mean(r["bracket_step_s"]) for r in rs
                 if r.get("step_median_s") and all(r["bracket_step_s"])]
        if steps:
            row.update(step_cost_vs_plain=statistics.median(steps),
                       step_cost_vs_plain_per_round=[round(x, 4) for x in steps])
    return row


def summarize(runs: list[dict], contrast: list[dict], batches: list[int]) -> dict:
    plain = [r for r in runs if r["engine"] == "plain"]
    mtp = [r for r in runs if r["engine"] == "mtp" and r["round"] >= 0]
    ref = {}
    for r in plain:
        ref.setdefault(r["batch"], r["token_ids"])
    out: dict = {}
    for batch in batches:
        base = [r for r in plain if r["batch"] == batch]
        rows: dict = {"none": {"tok_s": statistics.median(r["tokens"] / r["seconds"] for r in base),
                               "tok_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in base),
                               "tokens_per_target_forward": 1.0,
                               "lossless": all(r["token_ids"] == ref[batch] for r in base),
                               "seconds": [round(r["seconds"], 3) for r in base],
                               "step_median_ms": [round(1e3 * r["step_median_s"], 3) if r.get("step_median_s")
                                                  else None for r in base],
                               "decode_steps_s": [round(r.get("step_sum_s", 0.0), 3) for r in base],
                               "other_steps_s": [round(r.get("other_steps_s", 0.0), 3) for r in base]}}
        for mode in dict.fromkeys(r["mode"] for r in mtp):
            rows[mode] = mode_row([r for r in mtp if r["batch"] == batch and r["mode"] == mode], ref)
        if contrast:
            rows["pause_no_catch_up"] = mode_row([r for r in contrast if r["batch"] == batch], ref)
        adaptive_vs_fixed(rows)
        if "pause" in rows:
            pause = {"after_pause": rows["pause"]["acceptance_by_drafting_run"][0],
                     "steady": rows["pause"]["acceptance_by_drafting_run"][-1]}
            if "2" in rows:
                pause["fixed_k2_all_steps"] = rows["2"]["acceptance_per_pos"]
            if contrast:
                pause["after_pause_no_catch_up"] = rows["pause_no_catch_up"]["acceptance_by_drafting_run"][0]
                pause["steady_no_catch_up"] = rows["pause_no_catch_up"]["acceptance_by_drafting_run"][-1]
            rows["pause_acceptance"] = pause
        out[f"batch_{batch}"] = rows
    return out


def adaptive_vs_fixed(rows: dict) -> None:
    """Adaptive over each fixed k that ran at one batch size (``rows``: mode -> row): `speedup_vs_k<k>` (median
    tokens/s over median tokens/s) and, where both have per-round ratios to the plain engine, `_paired` (their
    quotient per round, geometric mean: the unpaired ratio carries the drift between rounds)."""
    if "adaptive" not in rows:
        return
    ad = rows["adaptive"]
    for k in FIXED:
        if str(k) in rows:
            ad[f"speedup_vs_k{k}"] = ad["tok_s"] / rows[str(k)]["tok_s"]
            ra, rk = ad.get("speedup_per_round"), rows[str(k)].get("speedup_per_round")
            if ra and rk and len(ra) == len(rk):
                ad[f"speedup_vs_k{k}_paired"] = geo_mean([x / y for x, y in zip(ra, rk)])


def rescore(path: str, command: str) -> None:
    """Recompute the derived fields of a result file from what it recorded (`adaptive_vs_fixed`), in place."""
    doc = json.loads(Path(path).read_text())
    for sec in doc["sections"].values():
        for rows in (sec.get("results") or {}).values():
            adaptive_vs_fixed(rows)
    doc["meta"]["rescored_by"] = command
    Path(path).write_text(json.dumps(doc, indent=2))


def targets(results: dict, key: str = "speedup_vs_none") -> dict:
    """The acceptance checks of the benchmark (module docstring), per batch size, on wall-time speedups
    (``key`` "speedup_vs_none") or CPU-time ones ("speedup_vs_none_cpu"); the checks of the modes that ran."""
    t: dict = {}
    for name, rows in results.items():
        row: dict = {}

        def spread(mode: str, ci_name: str, pairs_name: str) -> None:
            # wall time only: the 95 % interval and each engine pair's mean, where the run has them
            if key == "speedup_vs_none" and rows[mode].get("speedup_ci95"):
                row[ci_name] = rows[mode]["speedup_ci95"]
            if key == "speedup_vs_none" and rows[mode].get("speedup_per_engine_pair"):
                row[pairs_name] = rows[mode]["speedup_per_engine_pair"]

        if "control" in rows:   # A/A: two plain engines, how far apart the measure puts identical engines
            row["control_vs_plain"] = round(rows["control"][key], 4)
            spread("control", "control_vs_plain_ci95", "control_per_engine_pair")
        if "0" in rows:
            row.update({"k0_vs_plain": round(rows["0"][key], 4), "k0_at_least_0.97": rows["0"][key] >= TARGET})
            spread("0", "k0_vs_plain_ci95", "k0_per_engine_pair")
            if key == "speedup_vs_none" and rows["0"].get("step_cost_vs_plain"):
                step = 1.0 / rows["0"]["step_cost_vs_plain"]
                row.update({"k0_vs_plain_median_step": round(step, 4), "k0_median_step_at_least_0.97": step >= TARGET})
        fixed = {k: rows[str(k)][key] for k in FIXED if k > 0 and str(k) in rows}
        beating = [k for k, v in fixed.items() if v > 1.0]
        if fixed:
            row.update({"best_fixed_k": max(fixed, key=fixed.get), "best_fixed_vs_none": round(max(fixed.values()), 4),
                        "fixed_k_beating_none": beating})
        if "adaptive" in rows:
            ad = rows["adaptive"][key]
            spread("adaptive", "adaptive_vs_none_ci95", "adaptive_per_engine_pair")
            row.update({"adaptive_vs_none": round(ad, 4), "adaptive_at_least_0.97": ad >= TARGET,
                        "adaptive_above_1_where_fixed_beats": (ad > 1.0) if beating else None})
        t[name] = row
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory with MTP layers (default: the embedded trained model)")
    p.add_argument("--preset", choices=("mid", "dense"),
                   help="instead of the embedded model: random-weight checkpoints of the views at this size of the "
                        "tiny-model factory (mid: DeepSeek-V3-style MoE, ~0.65 B parameters; seed 0), built for "
                        "the run: speed and memory at a realistic layer size (acceptance is meaningless there)")
    p.add_argument("--views", default="v3,v32", help="embedded model views, comma-separated (v32 uses the DSA "
                   "backend; default v3,v32)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2, help="rounds of all modes inside one engine (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="plain/MTP engine pairs per view, one after the other")
    p.add_argument("--concurrent", action=argparse.BooleanOptionalAction, default=True,
                   help="run plain and MTP at the same time, each engine on its own half of the CPUs (swapped "
                        "every round), and compare each pair of runs (default on; off: one engine after the "
                        "other, each MTP run between two plain runs)")
    p.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                   help="bind the engine cores and this process to the CPUs vLLM keeps free of workers "
                        "(default on: the same placement for both engines)")
    p.add_argument("--switch-gap", type=float, default=1.2,
                   help="seconds of idle between runs of the two engines (vLLM's workers poll for work 1 s "
                        "after their last step, on the cores the other engine's workers use; default 1.2)")
    p.add_argument("--batch1-prompts", type=int, default=4,
                   help="batch 1 runs this many prompts one after the other (default 4)")
    p.add_argument("--modes", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   default=["0", "1", "2", "3", "pause", "adaptive"],
                   help="MTP runs: 0,1,2,3 (pinned k), pause (the pause cycle), adaptive (default: all)")
    p.add_argument("--pause-cycle", default=DEFAULT_PAUSE, help="pin cycle of the pause mode (k per step)")
    p.add_argument("--catch-up-contrast", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the pause cycle with the catch-up pass off (one more engine per view)")
    p.add_argument("--adaptive-warmup", type=int, default=1,
                   help="untimed adaptive runs per batch size before the rounds (the rule's first minutes in a "
                        "serving engine; default 1)")
    p.add_argument("--control", action="store_true",
                   help="A/A control: a second plain engine in the MTP engine's place (mode 'control'; --modes "
                        "ignored): how far apart the measure puts two identical engines")
    p.add_argument("--worker-rpc", choices=("mtp", "both", "off"), default="mtp",
                   help="round trips to the engines' workers around each run: mtp (default: the MTP engine's "
                        "drafter counters), both (the plain engine's worker gets a check_health round trip at "
                        "the same points), off (none: no drafter counters in the report)")
    p.add_argument("--rescore", metavar="FILE",
                   help="recompute the derived fields of a result file from its recorded rounds, run nothing")
    args = engine_script_args(p, argv, _worker, 3000.0)
    if args is None:   # a `run_worker` subprocess: its engine ran
        return 0
    if args.rescore:
        if not Path(args.rescore).is_file():
            p.error(f"--rescore: no such file {args.rescore}")
        rescore(args.rescore, command_line())
        return 0
    if args.tokens < 2 or args.rounds < 1 or args.repeats < 1 or not args.batches or min(args.batches) < 1:
        p.error("--tokens >= 2, --rounds >= 1, --repeats >= 1 and batch sizes >= 1 are required")
    if args.adaptive_warmup < 0:
        p.error("--adaptive-warmup must be >= 0")
    if args.concurrent and len(os.sched_getaffinity(0)) < 2:
        p.error("--concurrent needs 2 CPUs or more (one half per engine); pass --no-concurrent")
    if args.concurrent and args.rounds % 2:
        p.error("--concurrent needs an even --rounds (the engines swap CPUs every round)")
    if not 1 <= args.batch1_prompts <= len(PROMPTS):
        p.error(f"--batch1-prompts must be in [1, {len(PROMPTS)}]")
    if args.control:
        args.modes = ["control"]
    elif not args.modes or set(args.modes) - {"0", "1", "2", "3", "pause", "adaptive"}:
        p.error(f"--modes takes 0, 1, 2, 3, pause and adaptive, comma-separated; got {','.join(args.modes)!r}")
    if args.catch_up_contrast and "pause" not in args.modes:
        args.catch_up_contrast = False   # the contrast runs the pause cycle only
    try:
        cycle = [int(x) for x in args.pause_cycle.split(",")]
    except ValueError:
        p.error(f"--pause-cycle must be comma-separated draft lengths, got {args.pause_cycle!r}")
    if not (0 in cycle and any(k > 0 for k in cycle)) or max(cycle) > CAP_K:
        p.error(f"--pause-cycle needs k = 0 steps and drafting steps, each k in [0, {CAP_K}]")
    from harness import Report, embedded_views

    if args.model and args.preset:
        p.error("--model and --preset exclude each other")
    views = ["custom"] if args.model else embedded_views(p, args.views)
    models = {}
    built = tempfile.TemporaryDirectory(prefix="mtp-preset-") if args.preset else None
    for view in views:
        if args.model:
            models[view] = args.model
        elif built is not None:
            from vllm_frontier.models.tiny_factory import make_tiny_model

            print(f"building the {args.preset} random-weight checkpoint of the {view} view ...", flush=True)
            arch = {"v3": "deepseek_v3", "v32": "deepseek_v32"}[view]
            models[view] = str(make_tiny_model(arch, Path(built.name) / view, preset=args.preset, mtp_layers=1))
        else:
            from vllm_frontier.models.embedded import embedded_model_path

            models[view] = str(embedded_model_path(view))
        cfg = json.loads((Path(models[view]) / "config.json").read_text())
        if not cfg.get("num_nextn_predict_layers"):
            p.error(f"{models[view]} has no MTP layers (num_nextn_predict_layers is 0 or missing)")
    all_modes = {str(k): str(k) for k in FIXED} | {"pause": args.pause_cycle, "adaptive": "adaptive", "control": ""}
    modes = {m: all_modes[m] for m in args.modes}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    report = Report(args.json, meta={"commit": commit, "command": " ".join([sys.executable, *sys.argv]),
                                     "models": models, "preset": args.preset, "tokens": args.tokens,
                                     "batches": args.batches,
                                     "rounds": args.rounds, "repeats": args.repeats,
                                     "adaptive_warmup": args.adaptive_warmup,
                                     "concurrent": args.concurrent, "control": args.control,
                                     "worker_rpc": args.worker_rpc,
                                     "batch1_prompts": args.batch1_prompts, "pause_cycle": args.pause_cycle,
                                     "cap_K": CAP_K, "dtype": "float32", "cpus": os.cpu_count(),
                                     "loadavg_start": os.getloadavg()})
    for view, model in models.items():
        cfg = json.loads((Path(model) / "config.json").read_text())
        env = {"FRONTIER_DSA": "1"} if "index_topk" in cfg else {}
        with report.section(view) as rec:
            rec["env"] = env
            runs, contrast = [], []
            t = time.monotonic()
            placements: list = []
            for rep in range(args.repeats):
                order = ["plain", "mtp"] if rep % 2 == 0 else ["mtp", "plain"]   # started first: alternates
                for r in run_engines(model, order, modes, args, env, placements):
                    runs.append(r | {"round": r["round"] + rep * args.rounds if r["round"] >= 0 else -1,
                                     "pair": rep})
            if args.catch_up_contrast:
                env_off = env | {"FRONTIER_MTP_CATCH_UP": "0"}
                contrast = run_engines(model, ["mtp"], {"pause": args.pause_cycle}, args, env_off, placements)
            rec["placements"] = placements
            rec["engine_seconds"] = round(time.monotonic() - t, 1)
            rec["results"] = summarize(runs, contrast, args.batches)
            rec["targets"] = targets(rec["results"])
            rec["targets_cpu_time"] = targets(rec["results"], "speedup_vs_none_cpu")
            rec["lossless"] = all(r["lossless"] for b in rec["results"].values()
                                  for m, r in b.items() if isinstance(r, dict) and "lossless" in r)
            rec["loadavg_end"] = os.getloadavg()
    report.write()
    if built is not None:
        built.cleanup()
    for view in models:
        sec = report.data["sections"][view]
        print(view, sec["status"], "wall", json.dumps(sec.get("targets")), "cpu time",
              json.dumps(sec.get("targets_cpu_time")), "lossless", sec.get("lossless"))
    return 0 if all(report.data["sections"][v]["status"] == "ok" for v in models) else 1


if __name__ == "__main__":
    sys.exit(main())
