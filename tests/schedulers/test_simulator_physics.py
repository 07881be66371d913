"""Simulator physics against hand-computed timelines.

A toy profile with round coefficients makes every step time a short sum:
prefill ``0.1 + 0.001 sum(l) + 1e-8 sum(l^2)`` s, decode step ``0.01 + 0.001 B + 0.0001 ctx`` s,
KV transfer 0.001 s per prompt token. Each expected time below is written out step by step."""

import math

import pytest

from vllm_frontier.schedulers.cost_model import DecodeCost, InstanceProfile, PrefillCost
from vllm_frontier.schedulers.simulator import RequestRecord, SimConfig, SimResult, percentile, simulate
from vllm_frontier.schedulers.traces import Request


def profile(kv_capacity=10_000, max_batch_tokens=1000):
    return InstanceProfile(
        name="toy", prefill=PrefillCost(0.1, 0.001, 1e-8), decode=DecodeCost(0.01, 0.001, 0.0001),
        kv_capacity_tokens=kv_capacity, max_batch_tokens=max_batch_tokens, kv_transfer_s_per_token=0.001,
        max_len=4096, source="test")


def dstep(batch, ctx):
    return 0.01 + 0.001 * batch + 0.0001 * ctx


def approx(x):
    return pytest.approx(x, abs=1e-9)


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
    recs = [rec(0.5, 0.05), rec(1.0, 0.1), rec(1.01, 0.05), rec(0.5, 0.11), rec(None, 0)]
    res = SimResult(recs, slo_ttft_s=1.0, slo_tpot_s=0.1)
    assert res.attainment() == approx(2 / 5)  # the SLO itself counts as met
    assert res.attainment(recs[:2]) == 1.0 and res.attainment([]) == 1.0
    assert res.finished() == 4
    assert res.ttft_p(50) == approx(1.0) and res.ttft_p(100) == math.inf
    assert res.tpot_p(25) == approx(0.05)


def test_percentile_nearest_rank():
    xs = [5, 1, 4, 2, 3]
    assert [percentile(xs, q) for q in (0, 20, 21, 40, 50, 90, 100)] == [1, 1, 2, 2, 3, 5, 5]


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
