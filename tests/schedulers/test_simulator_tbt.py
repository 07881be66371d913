"""Per-token SLOs in the simulator: P90 / P99 of a request's gaps between tokens, against hand-computed
timelines on the toy profile of test_simulator_physics (prefill ``0.1 + 0.001 sum(l) + 1e-8 sum(l^2)`` s,
decode step ``0.01 + 0.001 B + 0.0001 ctx`` s, KV transfer 0.001 s per prompt token)."""

import pytest
from toy_profile import approx, dstep, profile

from vllm_frontier.schedulers.simulator import SLO_KINDS, RequestRecord, SimConfig, SimResult, simulate
from vllm_frontier.schedulers.traces import Request


def test_tbt_p90_sees_the_handoff_gap_that_the_mean_spreads_out():
    # prompt 100, 4 tokens: prefill 0.2001 s (token 1), KV lands 0.1 s later, then 3 decode steps
    (r,) = simulate(SimConfig(profile(), 2, 1, 10.0, 10.0), [Request(0, 0.0, 100, 4, "x")]).records
    gaps = [0.1 + dstep(1, 101), dstep(1, 102), dstep(1, 103)]
    assert r.tpot_s == approx(sum(gaps) / 3)  # 0.054533...
    # 3 gaps: nearest rank ceil(0.9 * 3) = 3 -> the largest, the handoff gap
    assert r.tbt_p90_s == approx(gaps[0]) and r.tbt_p99_s == approx(gaps[0])
    res = SimResult([r], slo_ttft_s=1.0, slo_tpot_s=0.06)
    assert res.attainment(kind="tpot-mean") == 1.0
    assert res.attainment(kind="tbt-p90") == 0.0 and res.attainment(kind="tbt-p99") == 0.0
    assert res.attainment(kind="tbt-p90", slo_tpot_s=0.1212) == 1.0


def test_p90_and_p99_take_different_ranks_of_twenty_gaps():
    (r,) = simulate(SimConfig(profile(), 2, 1, 10.0, 10.0), [Request(0, 0.0, 100, 21, "x")]).records
    # gaps: 0.1 + d1 (handoff), then d2 .. d20, with d_k = dstep(1, 100 + k) rising with the context
    # P90: rank ceil(18) = 18 of the 20 sorted gaps = d19; P99: rank ceil(19.8) = 20 = the handoff gap
    assert r.tbt_p90_s == approx(dstep(1, 119))
    assert r.tbt_p99_s == approx(0.1 + dstep(1, 101))


def test_colocated_prefill_chunk_shows_up_as_one_long_gap():
    # request 0 (prompt 10, 6 tokens) decodes; request 1 (prompt 1000) arrives while it does and is
    # chunked into request 0's steps: the step carrying the chunk is one long gap for request 0
    reqs = [Request(0, 0.0, 10, 6, "x"), Request(1, 0.05, 1000, 1, "x")]
    res = simulate(SimConfig(profile(), 1, None, 10.0, 10.0, chunk_tokens=1000), reqs)
    a, _ = res.records
    t0 = 0.1 + 0.01 + 1e-8 * 100  # prefill of request 0: token 1
    assert a.first_token_s == approx(t0)
    # the chunk is queued by then: step 1 mixes it with the decode (one intercept: the smaller one, 0.01)
    mixed = (0.1 + 1.0 + 1e-8 * 1000 ** 2) + dstep(1, 11) - 0.01
    gaps = [mixed, dstep(1, 12), dstep(1, 13), dstep(1, 14), dstep(1, 15)]
    assert a.finish_s == approx(t0 + sum(gaps))
    assert a.tbt_p90_s == approx(mixed) and a.tpot_s == approx(sum(gaps) / 5)
    assert a.tpot_s < 0.3 < a.tbt_p90_s


def test_one_token_requests_have_no_gaps_and_unfinished_ones_miss():
    one = RequestRecord(Request(0, 0.0, 10, 1, "x"), first_token_s=0.1, finish_s=0.1)
    one.set_token_times([0.1])
    assert one.tbt_p90_s == 0.0 and one.decode_metric("tbt-p99") == 0.0
    open_ = RequestRecord(Request(1, 0.0, 10, 5, "x"), first_token_s=0.1)
    assert all(open_.decode_metric(k) == float("inf") for k in SLO_KINDS)


def test_slo_kind_is_validated_with_a_one_line_error():
    with pytest.raises(ValueError, match="slo_kind must be one of tpot-mean, tbt-p90, tbt-p99"):
        SimConfig(profile(), 2, 1, 1.0, 1.0, slo_kind="p95")
    res = SimResult([], slo_ttft_s=1.0, slo_tpot_s=0.1)
    with pytest.raises(ValueError, match="slo_kind"):
        res.attainment(kind="mean")


def test_the_run_attains_under_its_own_kind():
    reqs = [Request(0, 0.0, 100, 4, "x")]
    mean = simulate(SimConfig(profile(), 2, 1, 1.0, 0.06), reqs)
    tbt = simulate(SimConfig(profile(), 2, 1, 1.0, 0.06, slo_kind="tbt-p90"), reqs)
    assert mean.attainment() == 1.0 and tbt.attainment() == 0.0
