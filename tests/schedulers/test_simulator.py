"""Cluster simulator and trace generator: invariants (nothing lost), cost-model shape, controller in the loop."""

from __future__ import annotations

import math
import statistics

import pytest

from vllm_frontier.schedulers.controller import ControllerConfig, RatioController
from vllm_frontier.schedulers.cost_model import (
    CPU_TINY_DEEPSEEK, GPU_OPT13B_A100 as GPU, DecodeCost, PrefillCost, fit_decode, fit_prefill,
)
from vllm_frontier.schedulers.simulator import SimConfig, percentile, simulate
from vllm_frontier.schedulers.traces import WORKLOADS, Phase, Request, make_trace, mix_at, phase_at, phase_starts


def test_trace_is_deterministic_sorted_and_clipped():
    a = make_trace("shifting", 20, 60, max_len=2048, seed=3)
    b = make_trace("shifting", 20, 60, max_len=2048, seed=3)
    assert a == b and len(a) > 0
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
    assert all(r.prompt_len + r.output_len <= 2048 and r.prompt_len >= 1 and r.output_len >= 1 for r in a)
    assert [r.rid for r in a] == list(range(len(a)))


@pytest.mark.parametrize("arrivals", ["poisson", "bursty"])
def test_trace_rate_matches(arrivals):
    # 4000 s = ~160 burst/calm cycles: the long-run rate is within 10% (bursty counts vary a lot over fewer)
    tr = make_trace("chat", 5, 4000, arrivals=arrivals, seed=1)
    assert len(tr) / 4000 == pytest.approx(5, rel=0.1)


def test_bursty_arrivals_are_burstier_than_poisson():
    def cv_counts(tr):
        counts = [0] * 200
        for r in tr:
            counts[int(r.arrival_s)] += 1
        return statistics.pstdev(counts) / statistics.mean(counts)
    assert cv_counts(make_trace("chat", 20, 200, arrivals="bursty", seed=2)) > \
        1.5 * cv_counts(make_trace("chat", 20, 200, arrivals="poisson", seed=2))


def test_shifting_mix_shifts():
    tr = make_trace("shifting", 30, 300, seed=0)
    first = [r for r in tr if r.arrival_s < 100]
    mid = [r for r in tr if 100 <= r.arrival_s < 200]
    assert statistics.mean(r.prompt_len for r in first) > 3 * statistics.mean(r.prompt_len for r in mid)
    assert statistics.mean(r.output_len for r in mid) > 3 * statistics.mean(r.output_len for r in first)
    assert mix_at(WORKLOADS["shifting"], 300, 150) == WORKLOADS["shifting"][1].mix
    assert phase_starts(WORKLOADS["shifting"], 300) == [0.0, 100.0, 200.0]
    assert [phase_at(WORKLOADS["shifting"], 300, t) for t in (-1, 0, 99.9, 100, 200, 400)] == [0, 0, 0, 1, 2, 2]


def test_trace_validation():
    with pytest.raises(ValueError):
        make_trace("nope", 1, 1)
    with pytest.raises(ValueError):
        make_trace("chat", 0, 1)
    with pytest.raises(ValueError):
        make_trace("chat", 1, 1, arrivals="bursty", burst_factor=10, burst_fraction=0.2)


def test_cost_models_are_convex_and_fit_recovers_coefficients():
    p = GPU.prefill
    # convex: two halves cost less than one prompt of the sum (beyond the intercept)
    assert p.batch_s([2000]) - p.a > p.batch_s([1000, 1000]) - p.a
    assert p.expected_s(800, 800 ** 2 + 400 ** 2) > p.expected_s(800, 800 ** 2)
    true = PrefillCost(0.02, 1e-4, 3e-8)
    lens = [16, 64, 128, 256, 512, 1024, 2048]
    fit = fit_prefill(lens, [true.batch_s([x]) for x in lens])
    assert (fit.a, fit.b, fit.c) == pytest.approx((true.a, true.b, true.c), rel=1e-6)
    dtrue = DecodeCost(0.015, 2e-4, 1e-6)
    bs, ctx = [1, 2, 4, 8, 16, 32], [100, 900, 300, 5000, 2000, 30000]
    dfit = fit_decode(bs, ctx, [dtrue.step_s(b, c) for b, c in zip(bs, ctx)])
    assert (dfit.a, dfit.b, dfit.c) == pytest.approx((dtrue.a, dtrue.b, dtrue.c), rel=1e-6)
    # negative coefficients are dropped, not returned
    f2 = fit_prefill([10, 20, 30, 40], [0.05, 0.04, 0.03, 0.02])
    assert min(f2.a, f2.b, f2.c) >= 0
    # DistServe's large-batch set takes over at batch 95
    assert GPU.decode.coeffs(94) != GPU.decode.coeffs(95)


def _run(n, n_prefill, rate=8.0, dur=40.0, controller=None, workload="mixed", **kw):
    tr = make_trace(workload, rate, dur, max_len=GPU.max_len, seed=5)
    cfg = SimConfig(GPU, n, n_prefill, slo_ttft_s=1.0, slo_tpot_s=0.1, **kw)
    return tr, simulate(cfg, tr, controller)


@pytest.mark.parametrize("n_prefill", [None, 1, 2, 3], ids=["colocated", "1P3D", "2P2D", "3P1D"])
def test_no_request_lost_and_times_are_causal(n_prefill):
    tr, res = _run(4, n_prefill)
    assert len(res.records) == len(tr) and res.finished() == len(tr)
    for r in res.records:
        assert r.req.arrival_s <= r.first_token_s <= r.finish_s
        # a lone prefill is the fastest a first token can come
        assert r.ttft_s >= GPU.prefill.batch_s([r.req.prompt_len]) - 1e-9


def test_light_load_meets_slos_and_overload_does_not():
    _, light = _run(4, 2, rate=1.0)
    assert light.attainment() == 1.0
    _, heavy = _run(4, 2, rate=200.0, dur=20.0, drain_s=5.0)
    assert heavy.attainment() < 0.5
    assert heavy.finished() < len(heavy.records)  # unfinished ones are kept and count as misses


def test_lone_request_latency_matches_cost_model():
    tr = [Request(0, 0.0, 1000, 11, "chat")]
    res = simulate(SimConfig(GPU, 2, 1, 1.0, 0.1), tr)
    r = res.records[0]
    assert r.ttft_s == pytest.approx(GPU.prefill.batch_s([1000]))
    xfer = 1000 * GPU.kv_transfer_s_per_token
    steps = sum(GPU.decode.step_s(1, 1001 + k) for k in range(10))
    assert r.finish_s - r.first_token_s == pytest.approx(xfer + steps)


def test_controller_in_the_loop_tracks_the_shift_and_loses_nothing():
    ctrl = RatioController(ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.1, prefill=GPU.prefill,
                                            decode=GPU.decode, kv_capacity_tokens=GPU.kv_capacity_tokens))
    tr, res = _run(8, 4, rate=20.0, dur=150.0, controller=ctrl, workload="shifting")
    assert res.finished() == len(tr)
    tl = res.ratio_timeline
    assert tl[0] == (0.0, 4, 4) and all(p >= 1 and d >= 1 and p + d == 8 for _, p, d in tl)
    def prefill_at(t):
        return [p for (ts, p, _) in tl if ts <= t][-1]
    # prefill-heavy first third, decode-heavy second third
    assert prefill_at(45) > prefill_at(95), tl


def test_sim_config_validation():
    with pytest.raises(ValueError):
        SimConfig(GPU, 4, 4, 1.0, 0.1)
    with pytest.raises(ValueError):
        SimConfig(GPU, 4, 0, 1.0, 0.1)
    with pytest.raises(ValueError):
        simulate(SimConfig(CPU_TINY_DEEPSEEK, 2, 1, 1.0, 0.1), [Request(0, 0.0, 1000, 100, "chat")])


def test_percentile():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == 9
    assert math.isnan(percentile([], 90))


def test_reroled_instance_takes_prompts_while_it_drains_decodes():
    """Like the live InstancePool.acquire (fewest leases of the stage, a draining instance counting one
    more, then of any stage): a prefill instance still draining decodes gets the next prompt only when
    it has at least two prompts fewer queued than another."""
    from vllm_frontier.schedulers.simulator import RequestRecord, _Job, _Sim

    cfg_ = SimConfig(GPU, 3, 2, 1.0, 0.1)
    sim = _Sim(cfg_, [], None)
    clean, drainer = sim.instances[0], sim.instances[1]
    drainer.role = "prefill"  # re-roled from decode
    recs = [RequestRecord(Request(k, 0.0, 100, 50, "chat")) for k in range(8)]
    for r in recs[:3]:
        drainer.admit_q.append(_Job(r))  # three decodes still in flight (not admitted: no step runs)
    assert sim._pick_prefill() is clean  # no prompts anywhere: the instance without decodes
    clean.prefill_q.append(_Job(recs[3]))
    clean.queued_tokens = 100
    assert sim._pick_prefill() is clean  # 1 prompt vs 0 + 1: tie, then fewer decodes in flight (0 < 3)
    clean.prefill_q.append(_Job(recs[4]))
    clean.queued_tokens = 200
    assert sim._pick_prefill() is drainer  # 0 + 1 < 2 prompts queued, despite its 3 decodes
    drainer.prefill_q.append(_Job(recs[5]))
    drainer.queued_tokens = 100
    assert sim._pick_prefill() is clean  # 2 each (1 + 1 on the drainer): fewer decodes in flight wins


def test_reroled_instance_prefills_while_draining_in_the_loop():
    """A decode instance moved to prefill under load runs prompts before its decodes have finished."""
    from vllm_frontier.schedulers.simulator import _Sim

    trace = make_trace([Phase(1.0, {"code": 1.0})], 30, 20, max_len=GPU.max_len, seed=2)
    sim = _Sim(SimConfig(GPU, 4, 1, 1.0, 0.1), trace, None)
    seen = []

    def reroll():
        yield sim.env.timeout(10.0)
        moved = [i for i in sim.instances if i.role == "decode" and i.running]
        sim.apply(2)
        inst = next(i for i in sim.instances[1:] if i.role == "prefill")
        assert inst in moved and inst.running > 0  # still draining decodes
        while inst.running:
            seen.append(len(inst.prefill_q))
            yield sim.env.timeout(0.05)
    sim.env.process(reroll())
    res = sim.run()
    assert res.finished() == len(trace)
    assert max(seen) > 0  # prompts were queued on it while it still had decodes
