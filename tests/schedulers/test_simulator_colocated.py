"""Colocated baselines: prefill-first without chunking (vLLM without chunked prefill) vs chunked prefill,
hand-computed on the toy profile (`toy_profile.py`: prefill ``0.1 + 0.001 sum(l) + 1e-8 sum(l^2)``
s, decode step ``0.01 + 0.001 B + 0.0001 ctx`` s)."""

import pytest
from toy_profile import approx, dstep
from toy_profile import profile as toy_profile

from vllm_frontier.schedulers.simulator import SimConfig, simulate
from vllm_frontier.schedulers.traces import Request


def profile(max_batch_tokens=2000):
    return toy_profile(kv_capacity=100_000, max_batch_tokens=max_batch_tokens)


REQS = [Request(0, 0.0, 10, 4, "x"), Request(1, 0.05, 1000, 1, "x")]
T0 = 0.1 + 0.01 + 1e-8 * 100  # request 0's prefill (request 1 arrives during it)


@pytest.mark.parametrize("kv", ["paged", "reserve"])
def test_prefill_first_stalls_the_decodes_for_a_whole_prompt(kv):
    a, b = simulate(SimConfig(profile(), 1, None, 10.0, 10.0, colocated="prefill-first", kv=kv), REQS).records
    assert a.first_token_s == approx(T0)
    # request 1 is queued when request 0 is ready to decode: a prefill-only step of the whole prompt first
    pf = 0.1 + 1.0 + 1e-8 * 1000 ** 2
    assert b.first_token_s == approx(T0 + pf) and b.finish_s == approx(T0 + pf)
    gaps = [pf + dstep(1, 11), dstep(1, 12), dstep(1, 13)]
    assert a.finish_s == approx(T0 + sum(gaps))
    assert a.tbt_p90_s == approx(gaps[0])


def test_chunked_shares_the_step_and_pays_one_intercept():
    a, b = simulate(SimConfig(profile(), 1, None, 10.0, 10.0, chunk_tokens=1000, kv="paged"), REQS).records
    mixed = (0.1 + 1.0 + 1e-8 * 1000 ** 2) + dstep(1, 11) - 0.01
    assert b.first_token_s == approx(T0 + mixed)
    assert a.finish_s == approx(T0 + mixed + dstep(1, 12) + dstep(1, 13))


def test_prefill_first_batches_queued_prompts_up_to_the_token_budget():
    # three 600-token prompts at t=0 with budget 1500: two in the first step, the third in the second,
    # before any decode step
    reqs = [Request(k, 0.0, 600, 2, "x") for k in range(3)]
    recs = simulate(SimConfig(profile(1500), 1, None, 10.0, 10.0, colocated="prefill-first", kv="paged"),
                    reqs).records
    p2 = 0.1 + 1.2 + 1e-8 * 2 * 600 ** 2
    p1 = 0.1 + 0.6 + 1e-8 * 600 ** 2
    assert [r.first_token_s for r in recs] == [approx(p2), approx(p2), approx(p2 + p1)]
    # then one decode step of all three (context 601 each) finishes them
    assert all(r.finish_s == approx(p2 + p1 + dstep(3, 3 * 601)) for r in recs)


def test_colocated_mode_is_validated():
    with pytest.raises(ValueError, match="colocated must be 'chunked' or 'prefill-first'"):
        SimConfig(profile(), 1, None, 1.0, 1.0, colocated="sarathi")
