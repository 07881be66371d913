"""Paged KV with recompute preemption in the simulator, against a hand-computed timeline on the toy profile
of test_simulator_physics (prefill ``0.1 + 0.001 sum(l) + 1e-8 sum(l^2)`` s, decode step
``0.01 + 0.001 B + 0.0001 ctx`` s, KV transfer 0.001 s per prompt token), pages of 4 tokens."""

import pytest
from toy_profile import approx, dstep, profile

from vllm_frontier.schedulers.simulator import SimConfig, _Sim, simulate
from vllm_frontier.schedulers.traces import Request, make_trace


def test_pages_admit_what_a_reservation_cannot_then_the_newest_is_preempted_and_recomputed():
    reqs = [Request(0, 0.0, 100, 3, "x"), Request(1, 0.0, 100, 3, "x")]
    # reservation: 103 + 103 > 204 tokens, so request 1 waits for request 0 to finish
    r0, r1 = simulate(SimConfig(profile(204), 2, 1, 10.0, 10.0), reqs).records
    assert r1.finish_s > r0.finish_s + dstep(1, 101)
    res = simulate(SimConfig(profile(204), 2, 1, 10.0, 10.0, kv="paged", block_size=4), reqs)
    a, b = res.records
    landed = 0.3002 + 0.1  # both prefilled in one step, KV shipped (0.1 s): 25 pages each, 50 of 51
    assert a.first_token_s == approx(0.3002) and b.first_token_s == approx(0.3002)
    # step 1 processes position 101 of both: a new page each, one free -> the newest (b) is preempted
    # (its 25 pages freed); no new prefill starts in a step that preempted: a decodes alone
    s1 = dstep(1, 101)
    # step 2: b's recompute (prompt + 1 token = 101) gets the 25 free pages: a chunk of 100 tokens beside
    # a's decode (one intercept); a finishes
    s2 = (0.1 + 0.1 + 1e-8 * 100 ** 2) + dstep(1, 102) - 0.01
    assert a.finish_s == approx(landed + s1 + s2)
    # step 3: the last recomputed token (a fresh page), b's second token; step 4: its third
    s3 = 0.1 + 0.001 + 1e-8 * (101 ** 2 - 100 ** 2)
    assert b.finish_s == approx(landed + s1 + s2 + s3 + dstep(1, 102))
    assert b.tpot_s == approx((b.finish_s - 0.3002) / 2)
    assert b.tbt_p90_s == approx(landed + s1 + s2 + s3 - 0.3002)
    assert res.preemptions == 1 and a.n_tokens == 3 and b.n_tokens == 3


@pytest.mark.parametrize("n_prefill", [1, None])
def test_under_kv_pressure_nothing_is_lost_and_every_page_comes_back(n_prefill):
    trace = make_trace("mixed", 10, 5, max_len=1024, seed=3)  # 50 requests
    cfg = SimConfig(profile(3000), 2, n_prefill, 10.0, 10.0, kv="paged", block_size=16, chunk_tokens=256,
                    drain_s=600)
    sim = _Sim(cfg, trace, None)
    res = sim.run()
    assert res.finished() == len(trace) and res.preemptions > 0
    # every output token came out once, preempted or not, in order
    assert all(r.n_tokens == r.req.output_len for r in res.records)
    assert all(r.tbt_p99_s >= r.tbt_p90_s >= 0 for r in res.records)
    for inst in sim.instances:
        assert (inst.blocks_used, inst.kv_used, inst.kv_pending, inst.ctx, inst.queued_tokens, inst.queued_sq) \
            == (0, 0, 0, 0, 0, 0)
        assert not any(inst.cross) and not inst.run_order


def test_paged_kv_config_is_validated():
    with pytest.raises(ValueError, match="kv must be 'reserve' or 'paged'"):
        SimConfig(profile(1000), 2, 1, 1.0, 1.0, kv="pages")
    with pytest.raises(ValueError, match="block_size"):
        SimConfig(profile(1000), 2, 1, 1.0, 1.0, kv="paged", block_size=0)
