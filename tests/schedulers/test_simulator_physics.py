"""Simulator physics against hand-computed timelines.

A toy profile with round coefficients makes every step time a short sum:
prefill ``0.1 + 0.001 sum(l) + 1e-8 sum(l^2)`` s, decode step ``0.01 + 0.001 B + 0.0001 ctx`` s,
KV transfer 0.001 s per prompt token. Each expected time below is written out step by step."""

import math

import pytest
from toy_profile import approx, dstep, profile

from vllm_frontier.schedulers.simulator import RequestRecord, SimConfig, SimResult, percentile, simulate
from vllm_frontier.schedulers.traces import Request


def disagg(reqs, **kw):
    return simulate(SimConfig(profile(**kw), 2, 1, 10.0, 10.0), reqs).records


def test_prefill_batches_whole_prompts_up_to_the_token_budget():
    # three 400-token prompts, budget 1000: the first step takes two (800), the third waits
    recs = disagg([Request(k, 0.0, 400, 1, "x") for k in range(3)])
    step1 = 0.1 + 0.001 * 800 + 1e-8 * (2 * 400**2)  # 0.9032
    step2 = 0.1 + 0.001 * 400 + 1e-8 * 400**2  # 0.5016
    assert [r.first_token_s for r in recs] == [approx(step1), approx(step1), approx(step1 + step2)]
    # one output token: it is the prefill's; the request ends when its KV lands on the decode side
    assert recs[0].finish_s == approx(step1 + 0.4) and recs[0].tpot_s == 0.0


def test_a_prompt_over_the_budget_is_prefilled_whole_in_its_own_step():
    recs = disagg([Request(0, 0.0, 1500, 1, "x")])
    assert recs[0].ttft_s == approx(0.1 + 1.5 + 1e-8 * 1500**2)


def _two_on_one_decoder(kv_capacity):
    # two 100-token prompts prefilled together: 0.1 + 0.2 + 1e-8 * 2e4 = 0.3002 s; their KV lands
    # at 0.3002 + 0.1; each needs 100 + 3 = 103 KV tokens and 2 decode steps (token 1 came from prefill)
    return disagg([Request(0, 0.0, 100, 3, "x"), Request(1, 0.0, 100, 3, "x")], kv_capacity=kv_capacity)


def test_decode_batches_both_when_their_kv_fits():
    a, b = _two_on_one_decoder(206)  # 103 + 103 = 206 fits exactly
    landed = 0.3002 + 0.1
    # batch 2, context 2 x 101 then 2 x 102 (each step adds one token per request)
    end = landed + dstep(2, 202) + dstep(2, 204)
    assert a.first_token_s == approx(0.3002) and a.finish_s == approx(end) and b.finish_s == approx(end)
    # TPOT: (finish - first token) over the output_len - 1 tokens after the first
    assert a.tpot_s == approx((end - 0.3002) / 2)


def test_decode_admission_waits_for_kv_capacity():
    a, b = _two_on_one_decoder(205)  # one token short: the second waits for the first to finish
    landed = 0.3002 + 0.1
    end_a = landed + dstep(1, 101) + dstep(1, 102)
    end_b = end_a + dstep(1, 101) + dstep(1, 102)  # the first's context is freed with it
    assert a.finish_s == approx(end_a) and b.finish_s == approx(end_b)
    assert b.tpot_s == approx((end_b - 0.3002) / 2)


def test_a_request_larger_than_the_kv_capacity_still_runs_alone():
    (r,) = disagg([Request(0, 0.0, 100, 3, "x")], kv_capacity=50)
    assert r.finish_s == approx(0.1 + 0.1 + 1e-4 + 0.1 + dstep(1, 101) + dstep(1, 102))


def test_decode_goes_to_the_instance_with_the_most_free_kv():
    # 1 prefill + 2 decode instances, prompts prefilled one per step (budget 100 tokens):
    # r0 (100 + 60 KV tokens) lands on decoder 1, r1 (100 + 50) on the emptier decoder 2, and r2 on
    # decoder 2 again (150 < 160 held by decoder 1), so r0 decodes alone all the way
    reqs = [Request(0, 0.0, 100, 60, "x"), Request(1, 0.0, 100, 50, "x"), Request(2, 0.0, 10, 2, "x")]
    r0, r1, r2 = simulate(SimConfig(profile(max_batch_tokens=100), 3, 1, 10.0, 10.0), reqs).records
    landed = 0.1 + 0.1 + 1e-8 * 100**2 + 0.1
    assert r0.finish_s == approx(landed + sum(dstep(1, 101 + k) for k in range(59)))
    # r1 shares its steps with r2 for one step, so it ends later than it would alone
    alone = r1.first_token_s + 0.1 + sum(dstep(1, 101 + k) for k in range(49))
    assert r1.finish_s > alone + 1e-4


def test_mixed_step_pays_one_intercept_colocated():
    """Colocated: A decodes while B's prompt arrives; the step that carries both pays the prefill and
    the decode step minus one intercept (min(0.1, 0.01) = 0.01)."""
    reqs = [Request(0, 0.0, 100, 3, "x"), Request(1, 0.22, 50, 2, "x")]
    a, b = simulate(SimConfig(profile(), 1, None, 10.0, 10.0, chunk_tokens=1000), reqs).records
    t1 = 0.1 + 0.1 + 1e-8 * 100**2  # A's prefill: 0.2001
    t2 = t1 + dstep(1, 101)  # A's first decode step; B arrived during it
    t3 = t2 + (0.1 + 0.05 + 1e-8 * 50**2) + dstep(1, 102) - 0.01  # mixed: B's prefill + A's 2nd step
    t4 = t3 + dstep(1, 51)  # B's one decode step
    assert a.first_token_s == approx(t1) and a.finish_s == approx(t3)
    assert b.first_token_s == approx(t3) and b.ttft_s == approx(t3 - 0.22)
    assert b.finish_s == approx(t4) and b.tpot_s == approx(t4 - t3)


def test_colocated_prompt_is_chunked_and_each_chunk_attends_its_prefix():
    (r,) = simulate(SimConfig(profile(), 1, None, 10.0, 10.0, chunk_tokens=1000),
                    [Request(0, 0.0, 2500, 1, "x")]).records
    # chunks 1000, 1000, 500; the quadratic term of a chunk is (end^2 - start^2)
    steps = [0.1 + 1.0 + 1e-8 * 1000**2, 0.1 + 1.0 + 1e-8 * (2000**2 - 1000**2),
             0.1 + 0.5 + 1e-8 * (2500**2 - 2000**2)]
    assert r.ttft_s == approx(sum(steps))


def test_request_record_latencies():
    rec = RequestRecord(Request(0, 1.0, 10, 5, "x"))
    assert rec.ttft_s == math.inf and rec.tpot_s == math.inf
    rec.first_token_s = 1.5
    assert rec.ttft_s == 0.5 and rec.tpot_s == math.inf
    rec.finish_s = 2.3
    assert rec.tpot_s == approx(0.8 / 4)
    one = RequestRecord(Request(1, 0.0, 10, 1, "x"), first_token_s=0.1, finish_s=0.1)
    assert one.tpot_s == 0.0


def test_attainment_counts_both_slos_and_unfinished_as_misses():
    def rec(ttft, tpot):
        r = RequestRecord(Request(0, 0.0, 10, 3, "x"))
        if ttft is not None:
            r.first_token_s, r.finish_s = ttft, ttft + 2 * tpot
        return r
    # binary fractions, so the boundary values are exact
    recs = [rec(0.5, 0.0625), rec(1.0, 0.125), rec(1.25, 0.0625), rec(0.5, 0.25), rec(None, 0)]
    res = SimResult(recs, slo_ttft_s=1.0, slo_tpot_s=0.125)
    assert recs[1].tpot_s == 0.125
    assert res.attainment() == approx(2 / 5)  # the SLOs themselves count as met
    assert res.attainment(recs[:2]) == 1.0 and res.attainment([]) == 1.0
    assert res.finished() == 4
    assert res.ttft_p(50) == approx(1.0) and res.ttft_p(100) == math.inf
    assert res.tpot_p(25) == approx(0.0625)


def test_percentile_nearest_rank():
    xs = [5, 1, 4, 2, 3]
    assert [percentile(xs, q) for q in (0, 20, 21, 40, 50, 90, 100)] == [1, 1, 2, 2, 3, 5, 5]
    big = list(range(200))  # rank ceil(q / 100 * n): 180th and 200th values
    assert percentile(big, 90) == 179 and percentile(big, 100) == 199 and percentile(big, 0.5) == 0


def test_unfinished_requests_are_kept_after_the_drain():
    # one decoder, 60 requests of 1000 + 1000 tokens arriving at once, drain 1 s: most cannot finish
    reqs = [Request(k, 0.0, 1000, 1000, "x") for k in range(60)]
    res = simulate(SimConfig(profile(), 2, 1, 10.0, 10.0, drain_s=1.0), reqs)
    assert len(res.records) == 60 and res.finished() == 0
    assert all(r.finish_s is None for r in res.records)


def test_ratio_timeline_starts_with_the_initial_split():
    res = simulate(SimConfig(profile(), 5, 2, 10.0, 10.0), [Request(0, 0.0, 10, 2, "x")])
    assert res.ratio_timeline == [(0.0, 2, 3)]
    res = simulate(SimConfig(profile(), 2, None, 10.0, 10.0), [Request(0, 0.0, 10, 2, "x")])
    assert res.ratio_timeline == []


@pytest.mark.parametrize("kw,match", [
    (dict(n_instances=0, n_prefill=None), "n_instances"),
    (dict(n_instances=3, n_prefill=3), r"\[1, 2\]"),
    (dict(n_instances=3, n_prefill=1, chunk_tokens=0), "chunk_tokens"),
    (dict(n_instances=3, n_prefill=1, interval_s=0), "interval_s"),
    (dict(n_instances=3, n_prefill=1, drain_s=-1), "drain_s"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SimConfig(profile(), slo_ttft_s=1.0, slo_tpot_s=1.0, **kw)


def test_over_long_request_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="max_len=4096"):
        simulate(SimConfig(profile(), 2, 1, 1.0, 1.0), [Request(7, 0.0, 4000, 97, "x")])
    simulate(SimConfig(profile(), 2, 1, 1.0, 1.0), [Request(7, 0.0, 4000, 96, "x")])  # exactly max_len


# ---- internals: conservation, the controller's view, re-roling ---------------------------------
from vllm_frontier.schedulers.controller import RatioDecision  # noqa: E402
from vllm_frontier.schedulers.simulator import _Job, _Sim  # noqa: E402


def test_every_counter_returns_to_zero_and_the_run_ends_when_the_work_does():
    reqs = [Request(k, 0.05 * k, 50 + 37 * k, 2 + (k * 7) % 9, "x") for k in range(12)]
    for cfg in (SimConfig(profile(kv_capacity=400), 3, 1, 10.0, 10.0),
                SimConfig(profile(kv_capacity=400), 2, None, 10.0, 10.0, chunk_tokens=64)):
        sim = _Sim(cfg, reqs, None)
        res = sim.run()
        assert res.finished() == 12
        for inst in sim.instances:
            assert (inst.queued_tokens, inst.queued_sq, inst.kv_used, inst.kv_pending, inst.ctx) == (0, 0, 0, 0, 0)
            assert not inst.prefill_q and not inst.admit_q and not inst.finish_heap
        last = max(r.finish_s for r in res.records)
        assert last < sim.env.now <= last + 1.0  # checked once a second, not run to the drain deadline


def test_queued_prefill_work_is_counted_per_instance():
    sim = _Sim(SimConfig(profile(), 2, 1, 10.0, 10.0), [], None)
    inst = sim.instances[0]
    for k, n in enumerate((30, 40)):
        inst.enqueue_prefill(_Job(RequestRecord(Request(k, 0.0, n, 2, "x"))))
    assert (inst.queued_tokens, inst.queued_sq) == (70, 30**2 + 40**2)
    dec = sim.instances[1]
    dec.enqueue_decode(_Job(RequestRecord(Request(5, 0.0, 30, 4, "x"))))
    dec.enqueue_decode(_Job(RequestRecord(Request(6, 0.0, 10, 2, "x"))))
    assert dec.kv_pending == 34 + 12 and dec.draining_decodes == 2


def test_decode_target_counts_pending_kv():
    sim = _Sim(SimConfig(profile(), 3, 1, 10.0, 10.0), [], None)
    a, b = sim.instances[1], sim.instances[2]
    a.kv_used, b.kv_pending = 100, 150
    assert sim._pick_decode() is a
    a.kv_pending = 60
    assert sim._pick_decode() is b


def test_one_token_request_does_not_hold_up_the_admission_queue():
    # both land together on the only decoder; the first needs no decode step, the second still runs
    a, b = disagg([Request(0, 0.0, 100, 1, "x"), Request(1, 0.0, 100, 3, "x")])
    landed = 0.3002 + 0.1
    assert a.finish_s == approx(landed)
    assert b.finish_s == approx(landed + dstep(1, 101) + dstep(1, 102))


def test_reroling_picks_the_least_busy_decoders_and_least_queued_prefillers():
    sim = _Sim(SimConfig(profile(), 5, 2, 10.0, 10.0), [], None)
    p0, p1, d0, d1, d2 = sim.instances
    rec = RequestRecord(Request(0, 0.0, 10, 5, "x"))
    d0.admit_q.extend(_Job(rec) for _ in range(3))  # 3 in flight, none running yet
    d1.finish_heap.extend((9, k, _Job(rec)) for k in range(2))  # 2 running
    d2.finish_heap.append((9, 0, _Job(rec)))
    d2.admit_q.extend(_Job(rec) for _ in range(2))  # 3 in flight
    sim.apply(3)
    assert [i.role for i in sim.instances] == ["prefill", "prefill", "decode", "prefill", "decode"]
    p0.queued_tokens, p1.queued_tokens, d1.queued_tokens = 50, 10, 30
    sim.apply(1)  # two prefillers back to decode: the least queued (p1, then d1)
    assert [i.role for i in sim.instances] == ["prefill", "decode", "decode", "decode", "decode"]
    sim.apply(1)
    assert sim.timeline == [(0.0, 2, 3), (0.0, 3, 2), (0.0, 1, 4), (0.0, 1, 4)]


class Recorder:
    """A controller that records its samples and answers with a fixed split at one step."""

    def __init__(self, move_at=None, to=None):
        self.samples, self.move_at, self.to = [], move_at, to

    def step(self, x):
        self.samples.append(x)
        changed = len(self.samples) == self.move_at
        n_p = self.to if changed else x.n_prefill
        return RatioDecision(n_p, x.n_prefill + x.n_decode - n_p, changed, "test", 0, 0, 0, 0, 0)


def test_controller_sees_the_window_it_was_given():
    # 1 prefill + 1 decode, interval 1 s. r0 (100 tokens) and r1 (10 tokens, 1000 output) are prefilled
    # together and decode; r2 (2000 tokens) starts a 2.14 s prefill at 0.5; r3 (300) queues behind it.
    reqs = [Request(0, 0.0, 100, 3, "x"), Request(1, 0.0, 10, 1000, "x"),
            Request(2, 0.5, 2000, 2, "x"), Request(3, 0.9, 300, 2, "x")]
    ctrl = Recorder()
    res = simulate(SimConfig(profile(), 2, 1, 10.0, 10.0, interval_s=1.0, drain_s=3.0), reqs, ctrl)
    r0, r1 = res.records[:2]
    s1, s2 = ctrl.samples[:2]
    assert (s1.t, s1.window_s, s1.n_prefill, s1.n_decode) == (1.0, 1.0, 1, 1)
    assert s1.prompt_lens == (100, 10, 2000, 300) and s1.completed == ((100, 3),)
    assert (s1.queued_prefill_tokens, s1.queued_prefill_sq_tokens) == (2300, 2000**2 + 300**2)
    assert s1.running_decode == 1  # r1 decodes on
    assert s1.ttft_p90_s == approx(max(r0.ttft_s, r1.ttft_s)) and s1.tpot_p90_s == approx(r0.tpot_s)
    assert (s2.t, s2.prompt_lens, s2.completed, s2.ttft_p90_s, s2.tpot_p90_s) == (2.0, (), (), None, None)
    assert s2.queued_prefill_tokens == 2300  # r2's prefill step has not ended


def test_controller_p90_is_the_nearest_rank_of_the_window():
    # ten prompts prefilled one per step (budget 10 tokens), two output tokens each: distinct TTFTs/TPOTs
    reqs = [Request(k, 0.0, 10 * (k + 1), 2, "x") for k in range(10)]
    ctrl = Recorder()
    res = simulate(SimConfig(profile(max_batch_tokens=10), 2, 1, 10.0, 10.0, interval_s=1.9, drain_s=25.0),
                   reqs, ctrl)
    ttfts = sorted(r.ttft_s for r in res.records)
    tpots = sorted(r.tpot_s for r in res.records)
    assert len(set(ttfts)) == 10 and len(set(tpots)) == 10
    s = ctrl.samples[0]
    assert s.ttft_p90_s == ttfts[8] and s.tpot_p90_s == tpots[8]  # rank ceil(0.9 * 10) = 9


def test_controller_decision_re_roles_instances():
    reqs = [Request(k, 0.3 * k, 100, 5, "x") for k in range(10)]
    ctrl = Recorder(move_at=1, to=2)
    sim = _Sim(SimConfig(profile(), 4, 1, 10.0, 10.0, interval_s=1.0), reqs, ctrl)
    res = sim.run()
    assert res.ratio_timeline == [(0.0, 1, 3), (1.0, 2, 2)]
    assert [i.role for i in sim.instances].count("prefill") == 2
    assert res.finished() == 10


def test_a_reroled_decoder_reports_how_long_it_drained():
    # A (100 tokens, 60 out) is prefilled alone (0.2001 s), B (arrives at 0.01) next (to 0.4002); A lands at
    # 0.3001 on decoder 1, B at 0.5002 on decoder 2 (more free KV). At the 1 s tick both decoders run one
    # request; decoder 1 (lowest index) turns prefill and drains A: 59 steps dstep(1, 100 + k) from 0.3001
    reqs = [Request(0, 0.0, 100, 60, "x"), Request(1, 0.01, 100, 30, "x")]
    res = simulate(SimConfig(profile(), 3, 1, 10.0, 10.0, interval_s=1.0), reqs, Recorder(move_at=1, to=2))
    a_done = 0.3001 + sum(dstep(1, 100 + k) for k in range(1, 60))
    assert res.records[0].finish_s == approx(a_done) and res.records[1].finish_s < 1.2
    assert res.drains == [(1.0, "decode->prefill", approx(a_done - 1.0))]
