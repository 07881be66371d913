"""Goodput of P/D deployments in the cluster simulator: colocated, static ratios, and the ratio controller.

    .venv/bin/python benchmarks/dopd.py                      # 8, 32, 128 instances (tens of minutes)
    .venv/bin/python benchmarks/dopd.py --sizes 8 --duration 120 --slo-kind tbt-p90   # quick look
    .venv/bin/python benchmarks/dopd.py --sizes --validate-distserve   # DistServe's OPT-13B chatbot point only

For each cluster size N and each policy, a binary search finds the goodput: the highest arrival rate
(requests/s, whole cluster) at which >= 90% of requests meet both the TTFT and the TPOT SLO (DistServe's
definition; the decode SLO is the mean TPOT or the P90 / P99 time between tokens, `--slo-kind`). Policies:
colocated (every instance prefills and decodes, chunked prefill, best of the `--chunks` budgets under the
SLO at the first size, reused for the others), colocated prefill-first (vLLM without chunked prefill: a
step prefills whole prompts whenever one is queued and fits, and decodes otherwise), static P:D = 1:1, 1:2, 2:1 (rounded to N), the best static split found by search (every N/16-th
split, then halving steps around the best; a split is searched fully only if it beats the best so far), and
the `RatioController` starting at 1:1, and the phase oracle (a reference, not a policy: it knows the mix
schedule and runs each phase's best split; `--no-oracle` skips it, it is the slowest part). Every rate tried
is kept, so the JSON holds attainment vs rate curves. Also reported: P90 TTFT of the controller vs static
1:1 at static 1:1's goodput with its floor (every prompt prefilled alone), and the controller's ratio over
time against the workload mix (PNG).

Instance costs: `--profile` (default: DistServe's current A100-80GB OPT-13B profile with its 2 ms step
overhead and 66,144-token KV; see `vllm_frontier/schedulers/cost_model.py`); KV: `--kv paged` (default,
vLLM's pages with recompute preemption) or `reserve`. `--validate-distserve` adds DistServe's OPT-13B
chatbot point (1 prefill instance at TP2 + 1 decode at TP1) against the number DistServe's simulator gives. Workload: `--workload` from `traces.WORKLOADS` (default
``shifting``: prefill-heavy -> decode-heavy -> prefill-heavy), Poisson or bursty arrivals.
Writes ``--out`` (JSON) and the same path with ``.png`` (needs matplotlib; skipped with a note if absent).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header  # noqa: E402

from vllm_frontier.schedulers.controller import ControllerConfig, RatioController  # noqa: E402
from vllm_frontier.schedulers.cost_model import PROFILES, InstanceProfile  # noqa: E402
from vllm_frontier.schedulers.simulator import SLO_KINDS, SimConfig, SimResult, percentile, simulate  # noqa: E402
from vllm_frontier.schedulers.traces import KINDS, WORKLOADS, make_trace, phase_at, phase_starts  # noqa: E402

GOAL = 0.9  # SLO attainment that defines goodput


class Bench:
    def __init__(self, args: argparse.Namespace, prof: InstanceProfile) -> None:
        self.args, self.prof = args, prof
        self._traces: dict[float, list] = {}
        self.sims = 0
        self.best_chunk: int | None = None

    def trace(self, rate: float):
        key = round(rate, 6)
        if key not in self._traces:
            if len(self._traces) > 4:
                self._traces.clear()
            self._traces[key] = make_trace(self.args.workload, rate, self.args.duration, arrivals=self.args.arrivals,
                                           max_len=self.prof.max_len, seed=self.args.seed)
        return self._traces[key]

    def controller(self) -> RatioController:
        a = self.args
        pre, dec = self.prof.with_overhead()
        return RatioController(ControllerConfig(
            slo_ttft_s=a.slo_ttft, slo_tpot_s=a.slo_tpot, prefill=pre, decode=dec, kv_paged=a.kv == "paged",
            kv_capacity_tokens=self.prof.kv_capacity_tokens, horizon_s=a.horizon,
            spare_to_prefill=a.spare_to_prefill, slo_kind=a.slo_kind), history=100000)

    def run(self, n: int, policy: dict, rate: float) -> tuple[SimResult, RatioController | None]:
        a = self.args
        ctrl = self.controller() if policy["kind"] == "controller" else (
            ScheduledSplit(policy["schedule"]) if policy["kind"] == "schedule" else None)
        cfg = SimConfig(self.prof, n, policy.get("n_prefill"), a.slo_ttft, a.slo_tpot,
                        chunk_tokens=policy.get("chunk", self.best_chunk or 2048),
                        colocated=policy.get("mode", "chunked"),
                        interval_s=a.interval, slo_kind=a.slo_kind,
                        kv=a.kv, block_size=a.block_size)
        self.sims += 1
        return simulate(cfg, self.trace(rate), ctrl), ctrl

    def point(self, n: int, policy: dict, rate: float, curve: list) -> bool:
        res, _ = self.run(n, policy, rate)
        att = res.attainment()
        curve.append({"rate": rate, "attainment": att, "ttft_p90_s": _num(res.ttft_p(90)),
                      "tpot_p90_s": _num(res.tpot_p(90)), "preemptions": res.preemptions,
                      "attainment_by_kind": {k: res.attainment(kind=k) for k in SLO_KINDS}})
        return att >= GOAL

    def goodput(self, n: int, policy: dict, curve: list, lo: float | None = None, hi: float | None = None,
                meets=None) -> float:
        """Binary search of the highest rate with attainment >= GOAL in [lo, hi] (0 if lo already fails).

        `meets(rate) -> bool` replaces the policy's simulation (the phase oracle's search)."""
        a = self.args
        lo = a.min_rate * n if lo is None else lo
        hi = a.max_rate * n if hi is None else hi
        if meets is None:
            def meets(rate: float) -> bool:
                return self.point(n, policy, rate, curve)
        return self.search(meets, lo, hi, a.tol)

    @staticmethod
    def search(meets, lo: float, hi: float, tol: float) -> float:
        """Geometric bisection: the highest rate in [lo, hi] that `meets` (0 if lo fails), to `tol` relative."""
        if not meets(lo):
            return 0.0
        if meets(hi):
            return hi
        while hi / lo - 1 > tol:
            mid = math.sqrt(lo * hi)
            if meets(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def oracle_point(self, n: int, rate: float, splits: list[int], curve: list) -> bool:
        """The phase oracle at one rate. Phase by phase, in order, every split in `splits` is tried for that
        phase after the splits already chosen for the earlier ones (so what a phase inherits, e.g. the long
        decodes of a code phase, is part of the choice), and the split with the best attainment over the
        requests arriving in the phase is kept; switches happen at the phase starts, then the finished
        schedule is rerun with the switches `--oracle-leads` seconds earlier (the best kept).
        It knows the mix schedule in advance, which no controller does, and it keeps one split per phase:
        a reference for what re-roling can gain on this workload and cost model, not a policy and not a
        strict bound (a controller may also adapt within a phase)."""
        phases, duration = WORKLOADS[self.args.workload], self.args.duration
        bounds = phase_starts(phases, duration)
        phase_of = [phase_at(phases, duration, r.arrival_s) for r in self.trace(rate)]

        def run(picks: list[int], lead: float) -> SimResult:
            sched = [(0.0, picks[0])] + [(max(0.0, t0 - lead), p) for t0, p in zip(bounds[1:], picks[1:])]
            return self.run(n, {"kind": "schedule", "n_prefill": picks[0], "schedule": sched}, rate)[0]

        def phase_att(res: SimResult, k: int) -> float:
            return res.attainment([rec for rec, ph in zip(res.records, phase_of) if ph == k])

        picks: list[int] = []
        for k in range(len(bounds)):
            prev = picks[-1] if picks else n // 2
            scored = [(phase_att(run(picks + [p], 0.0), k), -abs(p - prev), p) for p in splits]
            picks.append(max(scored)[2])
        best = None
        for lead in self.args.oracle_leads:
            res = run(picks, lead)
            if best is None or res.attainment() > best[0]:
                best = (res.attainment(), lead, res)
        att, lead, res = best
        curve.append({"rate": rate, "attainment": att, "ttft_p90_s": _num(res.ttft_p(90)),
                      "tpot_p90_s": _num(res.tpot_p(90)), "phase_splits": picks, "lead_s": lead,
                      "phase_attainment": [round(phase_att(res, k), 4) for k in range(len(bounds))]})
        return att >= GOAL


@dataclass(frozen=True)
class _Scheduled:
    n_prefill: int
    changed: bool


class ScheduledSplit:
    """Stands in for the `RatioController` in the simulator: applies a fixed ``[(t, n_prefill), ...]``
    schedule at the first control tick at or after each time (the phase oracle's schedules)."""

    def __init__(self, schedule: list[tuple[float, int]]) -> None:
        self.schedule = sorted(schedule)

    def step(self, x) -> _Scheduled:
        due = [p for t, p in self.schedule if t <= x.t]
        target = due[-1] if due else x.n_prefill
        return _Scheduled(target, target != x.n_prefill)


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def static_split(n: int, p: int, d: int) -> int:
    return min(n - 1, max(1, round(n * p / (p + d))))


def bench_size(b: Bench, n: int, log) -> dict:
    a = b.args
    out: dict = {"n_instances": n, "policies": {}}

    def record(name: str, policy: dict, lo: float | None = None) -> float:
        curve: list = []
        t0 = time.time()
        g = b.goodput(n, policy, curve, lo)
        out["policies"][name] = {"policy": policy, "goodput_rps": g, "goodput_per_instance_rps": g / n,
                                 "curve": sorted(curve, key=lambda c: c["rate"])}
        log(f"N={n} {name}: goodput {g:.2f} req/s ({g / n:.3f}/instance) [{time.time() - t0:.0f}s]")
        return g

    # Colocated: best chunk budget (searched at the first size only; larger sizes reuse it).
    best_c, best_cg = None, -1.0
    for chunk in (a.chunks if b.best_chunk is None else [b.best_chunk]):
        g = record(f"colocated-chunk{chunk}", {"kind": "colocated", "chunk": chunk})
        if g > best_cg:
            best_c, best_cg = chunk, g
    out["policies"]["colocated"] = dict(out["policies"][f"colocated-chunk{best_c}"])
    b.best_chunk = best_c
    # vLLM without chunked prefill (the baseline DistServe and DOPD compared against): prefill-first steps.
    record("colocated-prefill-first", {"kind": "colocated", "mode": "prefill-first"})
    for name, (p, d) in {"static-1:1": (1, 1), "static-1:2": (1, 2), "static-2:1": (2, 1)}.items():
        record(name, {"kind": "static", "n_prefill": static_split(n, p, d)})
    # Best static split: every split for small N, a grid then its neighbourhood for large N. A split only
    # gets a full search if it meets the goal just above the best goodput so far.
    best_p = max(((v["policy"]["n_prefill"], v["goodput_rps"]) for k, v in out["policies"].items()
                  if k.startswith("static-")), key=lambda t: t[1])[0]
    best_g = max(v["goodput_rps"] for k, v in out["policies"].items() if k.startswith("static-"))
    step = max(1, n // 16)
    tried = {v["policy"]["n_prefill"] for k, v in out["policies"].items() if k.startswith("static-")}

    def try_split(p: int) -> None:
        nonlocal best_p, best_g
        if p in tried or not 1 <= p <= n - 1:
            return
        tried.add(p)
        curve: list = []
        probe = best_g * (1 + a.tol)
        if probe > 0 and not b.point(n, {"kind": "static", "n_prefill": p}, probe, curve):
            return
        g = b.goodput(n, {"kind": "static", "n_prefill": p}, curve, lo=probe if probe > 0 else None)
        if g > best_g:
            best_p, best_g = p, g

    for p in range(step, n, step):
        try_split(p)
    st = step // 2
    while st >= 1:  # halve the step around the best split
        centre = best_p
        try_split(centre - st)
        try_split(centre + st)
        st //= 2
    log(f"N={n} best static split P{best_p}:D{n - best_p}, searched {len(tried)} splits")
    record("static-best", {"kind": "static", "n_prefill": best_p})
    record("controller", {"kind": "controller", "n_prefill": n // 2})

    pol = out["policies"]
    g_ctrl = pol["controller"]["goodput_rps"]
    if a.oracle:
        curve = []
        t0 = time.time()
        splits = list(range(max(1, n // 16), n, max(1, n // 16)))
        g_static, g_col = pol["static-best"]["goodput_rps"], pol["colocated"]["goodput_rps"]
        lo = max(a.min_rate * n, 0.8 * g_static)
        hi = max(lo * 1.05, 1.6 * max(g_static, g_col, g_ctrl))
        g = b.goodput(n, {}, curve, lo=lo, hi=hi, meets=lambda rate: b.oracle_point(n, rate, splits, curve))
        at = [c for c in curve if c["rate"] == g]
        pol["phase-oracle"] = {"policy": {"kind": "phase-oracle", "splits_tried": splits,
                                          "leads_s": a.oracle_leads},
                               "goodput_rps": g, "goodput_per_instance_rps": g / n,
                               "phase_splits_at_goodput": at[0]["phase_splits"] if at else None,
                               "curve": sorted(curve, key=lambda c: c["rate"])}
        log(f"N={n} phase-oracle: goodput {g:.2f} req/s, phase splits "
            f"{pol['phase-oracle']['phase_splits_at_goodput']} [{time.time() - t0:.0f}s]")
        out["oracle_vs_best_static"] = g / g_static if g_static else None
        out["oracle_vs_colocated"] = g / g_col if g_col else None
        out["controller_vs_oracle"] = g_ctrl / g if g else None
    g_pf = pol["colocated-prefill-first"]["goodput_rps"]
    out["controller_vs_prefill_first"] = g_ctrl / g_pf if g_pf else None
    out["controller_vs_colocated"] = g_ctrl / pol["colocated"]["goodput_rps"] if pol["colocated"]["goodput_rps"] else None
    out["controller_vs_best_static"] = g_ctrl / pol["static-best"]["goodput_rps"] if pol["static-best"]["goodput_rps"] else None
    # P90 TTFT at static 1:1's goodput rate.
    r11 = pol["static-1:1"]["goodput_rps"] or a.min_rate * n
    s11, _ = b.run(n, {"kind": "static", "n_prefill": n // 2}, r11)
    sc, ctrl = b.run(n, {"kind": "controller", "n_prefill": n // 2}, r11)
    out["ttft_p90_at_static11_goodput"] = {
        "rate_rps": r11, "static-1:1_s": _num(s11.ttft_p(90)), "controller_s": _num(sc.ttft_p(90)),
        "reduction": (1 - sc.ttft_p(90) / s11.ttft_p(90)) if s11.ttft_p(90) > 0 else None,
        # No policy goes below this: every prompt prefilled alone on an idle instance (no queue, no batch).
        "floor_s": percentile([b.prof.prefill.batch_s([r.prompt_len]) for r in b.trace(r11)], 90),
    }
    # Ratio over time at the controller's goodput.
    rc, ctrl = b.run(n, {"kind": "controller", "n_prefill": n // 2}, max(g_ctrl, a.min_rate * n))
    trace = b.trace(max(g_ctrl, a.min_rate * n))
    bins = []
    width = a.duration / 48
    for k in range(48):
        t0 = k * width
        rs = [r for r in trace if t0 <= r.arrival_s < t0 + width]
        bins.append({"t": t0 + width / 2,
                     "prefill_heavy_frac": sum(1 for r in rs if r.kind == "summarize") / len(rs) if rs else None,
                     "mean_prompt": sum(r.prompt_len for r in rs) / len(rs) if rs else None,
                     "mean_output": sum(r.output_len for r in rs) / len(rs) if rs else None})
    out["ratio_timeline"] = {"rate_rps": max(g_ctrl, a.min_rate * n),
                             "changes": [list(x) for x in rc.ratio_timeline], "mix": bins,
                             "attainment": rc.attainment()}
    # What re-roling costs at that rate: how long a moved instance keeps serving its old role.
    out["drain_at_controller_goodput"] = {
        d: {"moves": len(xs), "mean_s": sum(xs) / len(xs) if xs else None, "p90_s": _num(percentile(xs, 90)),
            "max_s": max(xs) if xs else None}
        for d in ("decode->prefill", "prefill->decode")
        for xs in [[x for _, dd, x in rc.drains if dd == d]]}
    out["preemptions_at_controller_goodput"] = rc.preemptions
    return out


# DistServe's simulator README (github.com/LLMServe/DistServe simdistserve/README.md at 82831f1): OPT-13B on
# ShareGPT, one node of 4 A100-80GB, TTFT SLO 200 ms and TPOT SLO 100 ms at 90 % each, 300 requests: best per-GPU
# rate 1.56 with prefill TP=2 and decode TP=1 (one prefill and one decode instance: 3 GPUs).
DISTSERVE_POINT = {"source": "DistServe simdistserve/README.md (github.com/LLMServe/DistServe at 82831f1)",
                   "model": "facebook/opt-13b", "workload": "ShareGPT", "slo_ttft_s": 0.2, "slo_tpot_s": 0.1,
                   "percent": 90, "requests": 300, "placement": "prefill TP2 + decode TP1 (3 GPUs)",
                   "goodput_per_gpu_rps": 1.56}


def distserve_validation(args: argparse.Namespace, log) -> dict:
    """Per-GPU goodput of DistServe's OPT-13B chatbot placement (1 prefill instance at TP2 + 1 decode at TP1)
    in this simulator, against the number DistServe's simulator gives for it. Our `chat` length mix stands in
    for ShareGPT. Both of DistServe's criteria are reported (P90 TTFT <= 0.2 s and P90 mean-TPOT <= 0.1 s, each
    separately, over 300 requests) and ours (>= 90 % of requests meeting both), over 300 requests
    and over a 10x longer trace, each at 3 seeds, with KV reserved and paged."""
    tp1, tp2 = PROFILES["gpu-opt13b-a100-distserve"], PROFILES["gpu-opt13b-a100-distserve-tp2"]
    gpus = tp2.tensor_parallel + tp1.tensor_parallel
    ttft, tpot = DISTSERVE_POINT["slo_ttft_s"], DISTSERVE_POINT["slo_tpot_s"]
    rows = []
    for n_req in (300, 3000):
        for kv in ("reserve", "paged"):
            for crit in ("distserve-p90s", "joint-90%"):
                per_seed = []
                for seed in range(3):
                    def meets(rate: float) -> bool:
                        trace = make_trace("chat", rate, n_req / rate, max_len=tp1.max_len, seed=seed)
                        res = simulate(SimConfig(tp1, 2, 1, ttft, tpot, kv=kv, prefill_profile=tp2), trace)
                        if crit == "joint-90%":
                            return res.attainment() >= GOAL
                        return res.ttft_p(90) <= ttft and res.tpot_p(90) <= tpot
                    g = Bench.search(meets, 0.5, 12.0, 0.01)
                    per_seed.append(g / gpus)
                rows.append({"requests": n_req, "kv": kv, "criterion": crit, "per_gpu_rps_by_seed": per_seed,
                             "per_gpu_rps_mean": sum(per_seed) / len(per_seed)})
                log(f"DistServe point: {n_req} requests, kv {kv}, {crit}: {[round(x, 2) for x in per_seed]} req/s/GPU "
                    f"(DistServe {DISTSERVE_POINT['goodput_per_gpu_rps']})")
    return {"distserve": DISTSERVE_POINT, "ours": rows, "workload": "chat (stand-in for ShareGPT)",
            "prefill_profile": tp2.name, "decode_profile": tp1.name}


def tp_reroling(b: Bench, gpus: int, log) -> dict:
    """Per-role tensor parallelism under re-roling: `gpus` GPUs as prefill instances at TP2 (DistServe's
    OPT-13B TP2 profile) and decode instances at TP1 (`--profile`, which must be DistServe's current TP1
    profile): every static split (p prefill, gpus - 2 p decode) and the controller re-roling in units of
    GPUs (`ControllerConfig.prefill_gpus` 2, `decode_gpus` 1: a prefill instance becomes two decode
    instances once it has drained, two drained decode instances one prefill instance), starting near half
    the GPUs on each role."""
    a = b.args
    tp1, tp2 = b.prof, PROFILES["gpu-opt13b-a100-distserve-tp2"]
    if tp1.name != "gpu-opt13b-a100-distserve":
        raise SystemExit("--tp-reroling needs --profile gpu-opt13b-a100-distserve (the TP1 of its TP2 profile)")
    gp, gd = tp2.tensor_parallel, tp1.tensor_parallel
    pre, _ = tp2.with_overhead()
    _, dec = tp1.with_overhead()

    def run(p: int, rate: float, controller: bool):
        ctrl = RatioController(ControllerConfig(
            slo_ttft_s=a.slo_ttft, slo_tpot_s=a.slo_tpot, prefill=pre, decode=dec, kv_paged=a.kv == "paged",
            kv_capacity_tokens=tp1.kv_capacity_tokens, horizon_s=a.horizon, slo_kind=a.slo_kind,
            prefill_gpus=gp, decode_gpus=gd), history=100000) if controller else None
        cfg = SimConfig(tp1, p + (gpus - p * gp) // gd, p, a.slo_ttft, a.slo_tpot,
                        chunk_tokens=b.best_chunk or 256, interval_s=a.interval, slo_kind=a.slo_kind, kv=a.kv,
                        block_size=a.block_size, prefill_profile=tp2)
        b.sims += 1
        return simulate(cfg, b.trace(rate), ctrl)

    out: dict = {"gpus": gpus, "prefill_profile": tp2.name, "decode_profile": tp1.name, "static": {}}
    lo, hi = a.min_rate * gpus, a.max_rate * gpus
    for p in range(1, (gpus - gd) // gp + 1):
        g = Bench.search(lambda r: run(p, r, False).attainment() >= GOAL, lo, hi, a.tol)
        out["static"][p] = {"n_prefill": p, "n_decode": (gpus - p * gp) // gd, "goodput_rps": g}
        log(f"TP2 prefill / TP1 decode, {gpus} GPUs: static P{p}:D{(gpus - p * gp) // gd} goodput {g:.2f} req/s")
    start = max(1, round(gpus / 2 / gp))
    g = Bench.search(lambda r: run(start, r, True).attainment() >= GOAL, lo, hi, a.tol)
    best = max(out["static"].values(), key=lambda v: v["goodput_rps"])
    res = run(start, max(g, lo), True)
    out.update({"controller": {"start_n_prefill": start, "goodput_rps": g,
                               "changes_at_goodput": [list(c) for c in res.ratio_timeline],
                               "gpus_at_start": res.gpus,
                               "drains_at_goodput": [list(d) for d in res.drains]},
                "static_best": best,
                "controller_vs_best_static": g / best["goodput_rps"] if best["goodput_rps"] else None})
    log(f"TP2 prefill / TP1 decode, {gpus} GPUs: controller goodput {g:.2f} req/s (best static "
        f"P{best['n_prefill']}:D{best['n_decode']} {best['goodput_rps']:.2f}); splits at its goodput "
        f"{[tuple(c[1:]) for c in res.ratio_timeline]}")
    return out


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed: PNG skipped"
    sizes = result["sizes"]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 8.5), squeeze=False)
    for col, res in enumerate(sizes):
        ax = axes[0][col]
        for name in ("colocated", "colocated-prefill-first", "static-1:1", "static-1:2", "static-2:1", "static-best", "controller",
                     "phase-oracle"):
            if name not in res["policies"]:
                continue
            p = res["policies"][name]
            xs = [c["rate"] for c in p["curve"]]
            ys = [c["attainment"] for c in p["curve"]]
            label = f"{name} ({p['goodput_rps']:.1f}/s)"
            if name == "static-best":
                label = f"static-best P{p['policy']['n_prefill']} ({p['goodput_rps']:.1f}/s)"
            ax.plot(xs, ys, "o-" if name == "controller" else ".-", label=label, lw=2 if name == "controller" else 1)
        ax.axhline(GOAL, color="grey", ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("arrival rate (req/s, cluster)")
        ax.set_ylabel(f"SLO attainment (TTFT and {result['config'].get('slo_kind', 'tpot-mean')})")
        ax.set_title(f"N = {res['n_instances']} instances")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        tl = res["ratio_timeline"]
        ch = tl["changes"]
        end = result["config"]["duration_s"]
        ts = [c[0] for c in ch] + [end]
        fr = [c[1] / (c[1] + c[2]) for c in ch] + [ch[-1][1] / (ch[-1][1] + ch[-1][2])]
        ax.step(ts, fr, where="post", label="prefill share of instances (controller)")
        mx = [(m["t"], m["prefill_heavy_frac"]) for m in tl["mix"] if m["prefill_heavy_frac"] is not None]
        ax.plot([m[0] for m in mx], [m[1] for m in mx], "--", label="summarisation share of arrivals")
        ax.set_xlim(0, end)
        ax.set_ylim(0, 1)
        ax.set_xlabel("time (s)")
        ax.set_title(f"ratio over time at {tl['rate_rps']:.0f} req/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['config']['profile']}, {result['config']['workload']} workload, "
                 f"SLO TTFT {result['config']['slo_ttft_s']} s / "
                 f"{result['config'].get('slo_kind', 'tpot-mean')} {result['config']['slo_tpot_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu-opt13b-a100-distserve", choices=sorted(PROFILES))
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 32, 128])
    ap.add_argument("--workload", default="shifting", choices=sorted(WORKLOADS))
    ap.add_argument("--arrivals", default="poisson", choices=["poisson", "bursty"])
    ap.add_argument("--duration", type=float, default=240.0, help="trace length in simulated seconds")
    ap.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.1,
                    help="seconds: bound on the decode metric of --slo-kind")
    ap.add_argument("--slo-kind", default="tpot-mean", choices=SLO_KINDS,
                    help="decode SLO: a request's mean TPOT, or the P90 / P99 of its gaps between tokens")
    ap.add_argument("--kv", default="paged", choices=["paged", "reserve"],
                    help="KV model: vLLM's pages with recompute preemption, or prompt + output reserved at admission")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV page (--kv paged)")
    ap.add_argument("--interval", type=float, default=2.0, help="controller period, seconds")
    ap.add_argument("--horizon", type=float, default=10.0, help="controller forecast look-ahead, seconds")
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048],
                    help="colocated chunked-prefill budgets to try (the best is reported)")
    ap.add_argument("--min-rate", type=float, default=0.25, help="search floor, req/s per instance")
    ap.add_argument("--max-rate", type=float, default=8.0, help="search ceiling, req/s per instance")
    ap.add_argument("--tol", type=float, default=0.03, help="relative precision of the goodput search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spare-to-prefill", type=float, default=None,
                    help="controller: keep spare instances on prefill while the split pressure stays under this "
                    "(0..1]; default: plain pressure balancing")
    ap.add_argument("--no-oracle", dest="oracle", action="store_false",
                    help="skip the phase oracle (every split per rate: the slowest part at 128 instances)")
    ap.add_argument("--oracle-leads", type=float, nargs="+", default=[0.0, 5.0, 15.0, -10.0],
                    help="phase oracle: seconds before each phase start at which its split is applied "
                    "(negative: after; best kept)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dopd/dopd.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    ap.add_argument("--tp-reroling", type=int, nargs="+", metavar="GPUS", default=[],
                    help="also simulate these GPU counts with TP2 prefill and TP1 decode instances: every static "
                    "split and the controller re-roling in units of GPUs (needs the default --profile)")
    ap.add_argument("--validate-distserve", action="store_true",
                    help="also reproduce DistServe's OPT-13B chatbot point (1 prefill TP2 + 1 decode TP1) and compare")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.spare_to_prefill is not None and not 0 < args.spare_to_prefill <= 1:
        ap.error("--spare-to-prefill must be in (0, 1]")
    if args.plot_only:
        result = json.loads(args.out.read_text())
        note = plot(result, args.out.with_suffix(".png"))
        print(note or f"wrote {args.out.with_suffix('.png')}")
        return result
    prof = PROFILES[args.profile]
    b = Bench(args, prof)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    result = {
        "header": header(),
        "benchmark": "dopd",
        "host": {"python": platform.python_version(), "machine": platform.machine(), "simulated": True},
        "config": {"profile": prof.name, "profile_source": prof.source, "workload": args.workload,
                   "arrivals": args.arrivals, "duration_s": args.duration, "slo_ttft_s": args.slo_ttft,
                   "slo_tpot_s": args.slo_tpot, "slo_kind": args.slo_kind, "kv": args.kv,
                   "block_size": args.block_size, "goal_attainment": GOAL, "interval_s": args.interval,
                   "horizon_s": args.horizon, "seed": args.seed, "spare_to_prefill": args.spare_to_prefill,
                   "kinds": {k: {"prompt_median": p.median, "output_median": o.median} for k, (p, o) in KINDS.items()},
                   "phases": [{"fraction": ph.duration_s, "mix": dict(ph.mix)} for ph in WORKLOADS[args.workload]]},
        "sizes": [],
    }
    if args.validate_distserve:
        result["distserve_validation"] = distserve_validation(args, log)
    if args.tp_reroling:
        b.best_chunk = b.best_chunk or 256
        result["tp_reroling"] = [tp_reroling(b, g, log) for g in args.tp_reroling]
    for n in args.sizes:
        result["sizes"].append(bench_size(b, n, log))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    result["simulations"] = b.sims
    result["wall_s"] = time.time() - t0
    note = plot(result, args.out.with_suffix(".png")) if result["sizes"] else "no --sizes: no PNG"
    if note:
        result["png"] = note
        log(note)
    args.out.write_text(json.dumps(result, indent=1))
    for s in result["sizes"]:
        pol = s["policies"]
        log(f"N={s['n_instances']}: goodput colocated {pol['colocated']['goodput_rps']:.1f}, "
            f"1:1 {pol['static-1:1']['goodput_rps']:.1f}, 1:2 {pol['static-1:2']['goodput_rps']:.1f}, "
            f"2:1 {pol['static-2:1']['goodput_rps']:.1f}, best static {pol['static-best']['goodput_rps']:.1f} "
            f"(P{pol['static-best']['policy']['n_prefill']}), controller {pol['controller']['goodput_rps']:.1f} | "
            f"x colocated {s['controller_vs_colocated']}, x best static {s['controller_vs_best_static']}, "
            f"phase oracle {pol['phase-oracle']['goodput_rps'] if 'phase-oracle' in pol else float('nan'):.1f} | "
            f"P90 TTFT vs 1:1 at {s['ttft_p90_at_static11_goodput']['rate_rps']:.1f}/s: "
            f"{s['ttft_p90_at_static11_goodput']}")
    return result


if __name__ == "__main__":
    main()
