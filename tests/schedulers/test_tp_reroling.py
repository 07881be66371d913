"""Re-roling with a different tensor-parallel size per role: prefill instances of 2 GPUs, decode instances of
1 (DistServe's OPT-13B placement). The controller splits GPUs, the simulator swaps whole instances."""

import dataclasses

import pytest
from toy_profile import profile as toy_profile

from vllm_frontier.schedulers.controller import ControllerConfig, LoadSample, RatioController
from vllm_frontier.schedulers.cost_model import DecodeCost, PrefillCost
from vllm_frontier.schedulers.simulator import SimConfig, simulate
from vllm_frontier.schedulers.traces import Request


class Fixed(RatioController):
    """The split rules alone: demand() answers the (need_p, need_d) pairs given, one per step."""

    def __init__(self, needs, **kw):
        super().__init__(ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.1, prefill=PrefillCost(0.01, 1e-4, 0.0),
                                          decode=DecodeCost(0.02, 1e-3, 0.0), feedback=False, confirm=1, **kw))
        self.needs = list(needs)

    def demand(self, x):
        return self.needs.pop(0)


def decide(needs, n_p, n_d, **kw):
    return Fixed(needs, prefill_gpus=2, decode_gpus=1, **kw).step(
        LoadSample(t=1.0, window_s=1.0, prompt_lens=(), completed=(), n_prefill=n_p, n_decode=n_d))


def test_the_controller_splits_gpus_not_instances():
    """1 prefill (2 GPUs) + 6 decode = 8 GPUs. Need (2.4, 3): splits (p, 8 - 2p) = (1, 6) 2.4, (2, 4) 1.2,
    (3, 2) 1.5: 2:4 is best, so one prefill instance more and two decode instances fewer."""
    d = decide([(2.4, 3.0)], 1, 6)
    assert d.changed and (d.n_prefill, d.n_decode) == (2, 4)
    assert d.pressure_before == pytest.approx(2.4) and d.pressure_after == pytest.approx(1.2)
    # need (0.5, 5.5) on 3 prefill + 2 decode (8 GPUs): 1:6 has pressure 0.917 > 0.9, so back to 1 prefill;
    # max_step_frac 0.25 of 8 GPUs = 2 GPUs: one prefill instance per decision
    d = decide([(0.5, 5.5)], 3, 2, max_step_frac=0.25)
    assert (d.n_prefill, d.n_decode) == (2, 4)
    # with identical instances (1 GPU each) the same numbers split 8 instances: 3:5 is best
    d = Fixed([(2.4, 3.0)]).step(LoadSample(t=1.0, window_s=1.0, prompt_lens=(), completed=(), n_prefill=1,
                                            n_decode=7))
    assert (d.n_prefill, d.n_decode) == (3, 5)


def test_gpu_counts_are_validated():
    with pytest.raises(ValueError, match="prefill_gpus and decode_gpus must be integers >= 1"):
        Fixed([], prefill_gpus=0)
    d = decide([(1.0, 1.0)], 1, 0, min_per_role=1)  # 2 GPUs: one prefill instance and no decode one fits
    assert not d.changed and d.reason == ("2 GPUs cannot hold 1 prefill instance(s) of 2 and decode instance(s) "
                                          "of 1 GPUs")


class Plan:
    """Stands in for the controller: the split to apply at each control tick (None: keep)."""

    def __init__(self, plan):
        self.plan = dict(plan)

    def step(self, x):
        p = self.plan.get(round(x.t, 6))
        return dataclasses.make_dataclass("D", ["n_prefill", "changed"])(p, p is not None and p != x.n_prefill)


def test_two_decode_instances_become_one_prefill_instance_once_both_drained():
    dec = toy_profile(kv_capacity=100_000)
    pre = dataclasses.replace(dec, name="toy-tp2", tensor_parallel=2)
    # 1 prefill (2 GPUs) + 3 decode: 5 GPUs. Requests 0 and 1 decode long, on decode instances 1 and 2 (the
    # least KV held, then the lowest index); at t = 2 the split goes to 2:1.
    reqs = [Request(0, 0.0, 10, 200, "x"), Request(1, 0.5, 10, 400, "x"), Request(2, 3.0, 10, 2, "x")]
    cfg = SimConfig(dec, 4, 1, 10.0, 10.0, prefill_profile=pre, interval_s=1.0, kv="paged")
    res = simulate(cfg, reqs, Plan({2.0: 2}))
    r0, r1, r2 = res.records
    assert res.gpus == 5
    # the two least busy decode instances leave: the idle instance 3 and instance 1 (one request each on 1
    # and 2: the lower index), so one prefill instance starts once request 0 has finished there
    assert [t for t, _, _ in res.ratio_timeline] == [0.0, 2.0]
    assert res.ratio_timeline[-1][1:] == (2, 1)
    d2p = sorted(x for t, d, x in res.drains if d == "decode->prefill")
    assert len(d2p) == 2
    # the unit leaves when its busier member has finished request 0 (rounded up to the 50 ms poll)
    assert d2p[1] == pytest.approx(r0.finish_s - 2.0, abs=0.05 + 1e-9)
    assert r1.finish_s > r0.finish_s  # request 1 kept decoding on the decode instance that stayed
    assert r2.ttft_s is not None and all(r.finish_s is not None for r in (r0, r1, r2))


def test_a_role_whose_instances_all_leave_keeps_serving_on_them_until_the_new_ones_start():
    """1 prefill (2 GPUs) + 2 decode: at t = 1 both decode instances leave for one prefill instance (a split no
    controller asks for, 2:0, but reachable while re-roled instances are still pending). Request 1 arrives
    after that: with no decode instance that stays, its decode goes to one of the leaving ones, which drains
    it before leaving."""
    dec = toy_profile(kv_capacity=100_000)
    pre = dataclasses.replace(dec, name="toy-tp2", tensor_parallel=2)
    reqs = [Request(0, 0.0, 10, 100, "x"), Request(1, 1.5, 10, 5, "x")]
    cfg = SimConfig(dec, 3, 1, 10.0, 10.0, prefill_profile=pre, interval_s=1.0, kv="paged")
    res = simulate(cfg, reqs, Plan({1.0: 2}))
    r0, r1 = res.records
    assert res.ratio_timeline[-1][1:] == (2, 0)
    assert r1.finish_s is not None and r1.n_tokens == 5
    d2p = [x for _, d, x in res.drains if d == "decode->prefill"]
    assert len(d2p) == 2 and min(d2p) >= r1.finish_s - 1.0 - 1e-9  # the unit left after request 1 was done
