"""Per-role tensor parallelism and DistServe's step overhead in the simulator, on DistServe's OPT-13B A100
profiles (TP=2 prefill beside TP=1 decode, as DistServe deploys the chatbot workload)."""

import pytest

from vllm_frontier.schedulers.cost_model import GPU_OPT13B_A100_DISTSERVE as TP1
from vllm_frontier.schedulers.cost_model import GPU_OPT13B_A100_DISTSERVE_TP2 as TP2
from vllm_frontier.schedulers.cost_model import DecodeCost, InstanceProfile, MixedCost, PrefillCost
from vllm_frontier.schedulers.simulator import SimConfig, simulate
from vllm_frontier.schedulers.traces import Request


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_tp2_prefill_and_tp1_decode_each_use_their_own_costs_plus_the_step_overhead():
    cfg = SimConfig(TP1, 2, 1, 1.0, 0.1, prefill_profile=TP2)
    res = simulate(cfg, [Request(0, 0.0, 500, 3, "x")])
    (r,) = res.records
    # prefill at TP2, DistServe's ms coefficients: 14.743 + 0.068577 * 500 + 2.4496e-6 * 500^2, + 2 ms + 1e-4 ms * 500
    ttft = (14.742973695171262 + 0.06857720739764 * 500 + 2.4495727400243586e-06 * 500 ** 2 + 2 + 1e-4 * 500) / 1e3
    assert r.ttft_s == approx(ttft)
    landed = ttft + 500 * TP1.kv_transfer_s_per_token
    # decode at TP1: 19.935 + 0.0006269 * ctx + 0.038507 * batch (ms), + 2 ms + 1e-4 ms * ctx, ctx 501 then 502
    def step(ctx):
        return (19.934702624895458 + 0.0006269356524350583 * ctx + 0.03850697740828398 + 2 + 1e-4 * ctx) / 1e3
    assert r.finish_s == approx(landed + step(501) + step(502))
    assert res.gpus == 3


def test_current_distserve_prefill_profile_and_capacity():
    # the TP1 prefill fit of DistServe's current profile JSON (ms): 18.103 + 0.10191 L + 7.1223e-6 L^2
    assert TP1.prefill.batch_s([1000]) == approx((18.10254647486372 + 101.9122572698738 + 7.122264314252114) / 1e3)
    assert (TP1.kv_capacity_tokens, TP2.kv_capacity_tokens, TP2.tensor_parallel) == (66_144, 163_008, 2)


def test_a_measured_mixed_cost_prices_hybrid_steps():
    prof = InstanceProfile(name="toy", prefill=PrefillCost(0.1, 0.001, 0.0), decode=DecodeCost(0.01, 0.001, 0.0001),
                           kv_capacity_tokens=100_000, max_batch_tokens=2000, kv_transfer_s_per_token=0.0,
                           max_len=4096, source="test", mixed=MixedCost(0.05, 0.002, 0.0, 0.003, 0.0),
                           step_overhead_s=0.001)
    reqs = [Request(0, 0.0, 10, 3, "x"), Request(1, 0.05, 1000, 1, "x")]
    a, b = simulate(SimConfig(prof, 1, None, 10.0, 10.0, chunk_tokens=1000), reqs).records
    t0 = 0.1 + 0.01 + 0.001  # request 0's prefill alone, + overhead
    hybrid = 0.05 + 0.002 * 1000 + 0.003 * 1 + 0.001  # the chunk of 1000 with one decode: the mixed fit
    assert b.first_token_s == approx(t0 + hybrid)
    assert a.finish_s == approx(t0 + hybrid + dstep_toy(12) + 0.001)


def dstep_toy(ctx):
    return 0.01 + 0.001 + 0.0001 * ctx


def test_prefill_profile_needs_a_disaggregated_deployment():
    with pytest.raises(ValueError, match="prefill_profile needs a disaggregated deployment"):
        SimConfig(TP1, 2, None, 1.0, 0.1, prefill_profile=TP2)


def test_with_overhead_folds_the_step_overhead_into_the_controller_costs():
    pre, dec = TP1.with_overhead()
    # prefill of 1000 tokens: DistServe's fit + 2 ms + 1e-4 ms x 1000 (ms)
    assert pre.batch_s([1000]) == approx((18.10254647486372 + 101.9122572698738 + 7.122264314252114 + 2 + 0.1) / 1e3)
    # decode step of 10 requests with 5000 context tokens, small and large batch sets
    assert dec.step_s(10, 5000) == approx(TP1.decode.step_s(10, 5000) + 2e-3 + 1e-7 * 5000)
    assert dec.step_s(100, 5000) == approx(TP1.decode.step_s(100, 5000) + 2e-3 + 1e-7 * 5000)
    plain = InstanceProfile(name="x", prefill=PrefillCost(1, 2, 3), decode=DecodeCost(4, 5, 6), kv_capacity_tokens=16,
                            max_batch_tokens=1, kv_transfer_s_per_token=0, max_len=1, source="t")
    assert plain.with_overhead() == (plain.prefill, plain.decode)
