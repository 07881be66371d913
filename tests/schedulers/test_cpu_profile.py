"""The CPU profile is the fit its result file records, and a measured hybrid-step cost is used only when that
fit passed its held-out check; a profile's `MixedCost` prices the hybrid steps of the simulator."""

import dataclasses
import json
from pathlib import Path

from toy_profile import approx, dstep
from toy_profile import profile as toy_profile

from vllm_frontier.schedulers.cost_model import CPU_TINY_DEEPSEEK, MixedCost
from vllm_frontier.schedulers.simulator import SimConfig, simulate
from vllm_frontier.schedulers.traces import Request

V3 = Path(__file__).resolve().parents[2] / "benchmarks/results/dopd_profile_cpu/dopd_cpu_profile_v3.json"


def test_cpu_profile_is_the_v3_fit_and_uses_the_mixed_cost_only_if_it_passed():
    data = json.loads(V3.read_text())
    fit, check = data["fit"], data["mixed_check"]
    prof = CPU_TINY_DEEPSEEK
    assert (prof.prefill.a, prof.prefill.b, prof.prefill.c) == (fit["prefill"]["a"], fit["prefill"]["b"],
                                                                 fit["prefill"]["c"])
    assert (prof.decode.a, prof.decode.b, prof.decode.c) == (fit["decode"]["a"], fit["decode"]["b"], fit["decode"]["c"])
    assert prof.kv_capacity_tokens == data["kv_capacity_tokens"]
    e_mixed = check["held_out_fitted_mixed"]["mean_abs_rel"]
    passed = e_mixed <= fit["max_heldout_error"] and e_mixed <= check["held_out_summed_rule"]["mean_abs_rel"]
    assert passed == fit["mixed_passes"]
    assert (prof.mixed is not None) == passed
    if passed:
        assert prof.mixed == MixedCost(**fit["mixed"])
        # the held-out error the file reports is the error of these coefficients on its held-out points
        ctx = {(h["batch"], h["decode_prompt_len"], h["prompt_len"]): h["ctx_tokens"] for h in data["hybrid"]}
        pts = check["held_out_fitted_mixed"]["points"]
        rel = [abs(prof.mixed.step_s(p["prompt_len"], p["prompt_len"] ** 2, p["batch"],
                                     ctx[p["batch"], p["decode_prompt_len"], p["prompt_len"]]) - p["measured_s"])
               / p["measured_s"] for p in pts]
        assert sum(rel) / len(rel) == approx(e_mixed)


def test_a_measured_mixed_cost_prices_the_hybrid_step():
    # colocated, chunked: request 1's whole prompt (1000 tokens) shares request 0's first decode step
    mixed = MixedCost(a=0.2, b=0.002, c=0.0, d=0.05, e=0.001)
    prof = dataclasses.replace(toy_profile(kv_capacity=100_000, max_batch_tokens=2000), mixed=mixed)
    reqs = [Request(0, 0.0, 10, 4, "x"), Request(1, 0.05, 1000, 1, "x")]
    a, b = simulate(SimConfig(prof, 1, None, 10.0, 10.0, chunk_tokens=1000, kv="paged"), reqs).records
    t0 = 0.1 + 0.01 + 1e-8 * 100  # request 0's prefill alone: the prefill fit
    hybrid = 0.2 + 0.002 * 1000 + 0.05 * 1 + 0.001 * 11  # a + b L + d B + e ctx (ctx: 10 prompt + 1 token)
    assert b.first_token_s == approx(t0 + hybrid)
    # the decode steps after it: the decode fit again
    assert a.finish_s == approx(t0 + hybrid + dstep(1, 12) + dstep(1, 13))
