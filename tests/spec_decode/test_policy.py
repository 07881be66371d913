"""The adaptive draft-length rule without an engine: E(k), T(B, k), the window, the cost fit, the table."""

from __future__ import annotations

import random

import pytest

from vllm_frontier.plugins.features import Features
from vllm_frontier.spec_decode import speculative_config
from vllm_frontier.spec_decode.policy import (AcceptanceWindow, CostModel, DraftLengthPolicy, PolicyConfig,
                                              best_k, expected_tokens, step_cost)


def test_expected_tokens_is_one_plus_prefix_products():
    a = [0.9, 0.5, 0.2]
    assert expected_tokens(a, 0) == 1.0
    assert expected_tokens(a, 1) == pytest.approx(1.9)
    assert expected_tokens(a, 3) == pytest.approx(1 + 0.9 + 0.45 + 0.09)
    assert expected_tokens([1.0] * 4, 4) == 5.0


def test_step_cost_counts_verified_and_drafter_tokens():
    # B=2, k=3: F + 2*4*(1+rho) + 2*2*rho
    assert step_cost(2, 3, 10.0, 0.5) == pytest.approx(10 + 8 * 1.5 + 4 * 0.5)
    assert step_cost(1, 0, 0.0, 0.5) == pytest.approx(1.5)


def test_best_k_falls_with_batch_and_with_acceptance():
    acc = [0.9, 0.85, 0.8]
    ks = [best_k(acc, b, fixed_cost=64.0, draft_cost=0.5, max_k=3) for b in (1, 16, 256)]
    assert ks[0] == 3 and ks == sorted(ks, reverse=True) and ks[-1] < 3
    assert best_k([0.0] * 3, 1, 64.0, 0.5, 3) == 0  # useless drafts are not made
    assert best_k([0.3] * 3, 1, 64.0, 0.5, 3) < best_k([0.9] * 3, 1, 64.0, 0.5, 3)


def test_best_k_stays_within_cap_and_ties_pick_the_smaller_k():
    assert best_k([1.0] * 8, 1, 1e6, 0.0, 2) == 2
    # no fixed cost, free drafts, zero acceptance: every k gives the same E/T ratio per token... k=0 is best
    assert best_k([0.0] * 4, 4, 0.0, 0.0, 4) == 0


def test_window_counts_reached_and_accepted_per_position():
    w = AcceptanceWindow(max_k=3, window_steps=10)
    w.observe(1, [(3, 0), (3, 2), (3, 3), (2, 1)])
    # position 1 reached by all 4 (3 accepted), position 2 by 3 drafts whose pos 1 was accepted (2 accepted),
    # position 3 by the two 3-draft requests that accepted 2 (one accepted), the 2-draft request never reaches it
    assert w.reached == [4, 3, 2] and w.accepted == [3, 2, 1]
    with pytest.raises(ValueError, match="within"):
        w.observe(2, [(1, 2)])


def test_window_expires_old_steps_and_unseen_positions_return_to_prior():
    w = AcceptanceWindow(max_k=2, window_steps=5)
    w.observe(1, [(2, 0)] * 10)
    est = w.estimates(first_prior=0.5, prior_strength=2.0)
    assert est[0] == pytest.approx(1.0 / 12) and est[1] == pytest.approx(est[0])  # pos 2 unseen: prior = pos 1
    w.observe(6, [])  # step 1 leaves the window
    assert w.reached == [0, 0] and w.estimates(0.5, 2.0) == [0.5, 0.5]


def test_cost_model_recovers_fixed_cost_and_keeps_prior_without_spread():
    cm = CostModel(prior=64.0, window=64, min_points=12)
    for u in [10] * 20:
        cm.observe(u, 0.1)
    assert cm.fixed_cost() == 64.0  # all steps alike: no fit
    rng = random.Random(0)
    cm = CostModel(prior=64.0, window=64, min_points=12)
    for _ in range(64):
        u = rng.choice([2, 4, 8, 16, 32, 64])
        cm.observe(u, (20.0 + u) * 1e-3 * (1 + rng.uniform(-0.01, 0.01)))  # F = 20 token units
    assert cm.fixed_cost() == pytest.approx(20.0, rel=0.15)  # 1 % timing noise, 64 points


def test_cost_model_separates_the_drafting_cost_at_one_batch_size():
    # vLLM CPU's shape: a step that drafts costs a fixed extra D per position on top of its tokens. All steps at one
    # batch size (no spread: F + D stays the prior), k = 1 steps and k = 0 probes: F and D come out so that
    # the two measured step times are reproduced exactly at that batch size.
    beta, F, D, B, rho = 1e-3, 30.0, 90.0, 16, 0.5
    cm = CostModel(prior=64.0, window=64, min_points=12)
    u1, u0 = step_cost(B, 1, 0.0, rho), step_cost(B, 0, 0.0, rho)
    t1, t0 = beta * (F + D + u1), beta * (F + u0)
    for _ in range(40):
        cm.observe(u1, t1, k=1)
    assert cm.costs() == (64.0, 0.0)  # no plain step measured yet: no drafting cost
    for _ in range(6):
        cm.observe(u0, t0, k=0)
    fixed, drafting = cm.costs()
    assert fixed + drafting == pytest.approx(64.0) and drafting > 0
    ratio = step_cost(B, 1, fixed, rho, drafting) / step_cost(B, 0, fixed, rho, drafting)
    assert ratio == pytest.approx(t1 / t0, rel=1e-9)
    # with spread (batch sizes vary), F and D are both recovered
    rng = random.Random(3)
    cm = CostModel(prior=64.0, window=256, min_points=12)
    for _ in range(200):
        b, k = rng.choice([1, 2, 4, 8, 16]), rng.choice([0, 1, 2, 3])
        u = step_cost(b, k, 0.0, rho)
        cm.observe(u, beta * (F + k * D + u) * (1 + rng.uniform(-0.01, 0.01)), k=k)
    fixed, drafting = cm.costs()
    assert fixed + drafting == pytest.approx(F + D, rel=0.1)
    assert drafting == pytest.approx(D, rel=0.15)


def test_each_drafted_position_pays_the_drafting_cost():
    # vLLM CPU's shape: every drafter forward has its own fixed cost, so k = 2 costs two of them, not one
    assert step_cost(1, 2, 10.0, 0.5, 30.0) - step_cost(1, 1, 10.0, 0.5, 30.0) == pytest.approx(30.0 + 2.0)
    assert step_cost(4, 3, 10.0, 0.5, 30.0) == pytest.approx(10.0 + 90.0 + 4 * 4 * 1.5 + 4 * 2 * 0.5)
    # plain step 11 units, k = 1 step 44 (3x, as measured at batch 1): at 90 % acceptance no k pays
    assert best_k([0.9, 0.9, 0.9], 1, 10.0, 0.5, 3, drafting_cost=30.0) == 0


def test_a_large_drafting_cost_turns_speculation_off_even_at_full_acceptance():
    # every draft accepted, but a drafting step costs 2.5x a plain one (measured at batch 1 on vLLM CPU)
    assert best_k([1.0, 1.0, 1.0], 1, 10.0, 0.5, 3) == 3
    assert best_k([1.0, 1.0, 1.0], 1, 10.0, 0.5, 3, drafting_cost=30.0) == 0
    assert best_k([1.0, 1.0, 1.0], 1, 10.0, 0.5, 3, drafting_cost=5.0) == 3


def test_probes_measure_the_class_the_rule_does_not_run():
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, probe_every=64, probe_min_points=4))
    # drafting, no plain step measured: a k = 0 probe every 8 steps, then every 64 once 4 are measured
    probes = [s for s in range(1, 65) if pol.probe(s, 2) is not None]
    assert probes == list(range(8, 65, 8)) and all(pol.probe(s, 2) == 0 for s in probes)
    for _ in range(4):
        pol.cost.observe(10.0, 0.01, k=0)
    assert [s for s in range(1, 129) if pol.probe(s, 2) is not None] == [64, 128]
    # not drafting: k = 1 on two consecutive steps (one drafts, the next verifies)
    pol2 = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, probe_every=64, probe_min_points=4))
    for _ in range(4):
        pol2.cost.observe(10.0, 0.01, k=1)
    got = [(s, k) for s in range(1, 1200) if (k := pol2.probe(s, 0)) is not None]
    # k = 1 on two consecutive steps; the interval doubles after each probe while the rule keeps not drafting
    assert got == [(64, 1), (65, 1), (192, 1), (193, 1), (448, 1), (449, 1), (960, 1), (961, 1)]
    for s in range(1200, 5000):   # capped at probe_max_every
        pol2.probe(s, 0)
    assert pol2._idle_every == pol2.config.probe_max_every
    pol2.probe(5000, 2)   # the rule drafts again: back to probe_every
    assert pol2._idle_every == 64


def measured_policy(per_draft: float) -> DraftLengthPolicy:
    """A policy whose cost model measured steps at batch 1..16 and k = 0..2 with F = 10 and D = per_draft."""
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, probe_every=64, probe_min_points=4,
                                         drafter_skips=True))
    for b in (1, 2, 4, 8, 16) * 8:
        for k in (0, 1, 2):
            u = pol.units(b, k)
            pol.cost.observe(u, 1e-3 * (10.0 + per_draft * k + u), k=k)
    return pol


def test_no_acceptance_probes_while_drafting_cannot_pay_even_at_full_acceptance():
    # vLLM CPU's shape: F = 10, a drafted position costs D = 30 on top (a k = 1 step is 3-4x a plain one)
    pol = measured_policy(30.0)
    fixed, drafting = pol.cost.costs()
    assert fixed == pytest.approx(10.0, rel=0.05) and drafting == pytest.approx(30.0, rel=0.05)
    assert not pol.drafting_can_pay(1) and not pol.drafting_can_pay(16)
    got = [s for s in range(1, 8500) if pol.probe(s, 0, batch=4) is not None]
    assert got == [4096, 4097, 8192, 8193]   # probe_hopeless_every at once, no doubling from 64
    # cheap drafting (D = 2): full acceptance would pay, so probes start at probe_every again
    pol2 = measured_policy(2.0)
    assert pol2.drafting_can_pay(4)
    assert [s for s in range(1, 200) if pol2.probe(s, 0, batch=4) is not None] == [64, 65, 192, 193]


def test_a_due_k1_probe_waits_for_a_short_replay_at_most_half_its_interval():
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, probe_every=64, probe_min_points=4))
    for _ in range(4):
        pol.cost.observe(10.0, 0.01, k=1)
    asked = []

    def replay_at(step):
        def replay():
            asked.append(step)
            return 40.0 if step < 70 else 3.0   # long-lived requests until step 70, then a new batch
        return replay

    got = [(s, k) for s in range(1, 72) if (k := pol.probe(s, 0, replay=replay_at(s))) is not None]
    assert got == [(70, 1), (71, 1)]     # due at 64, run at the first step with a short replay
    assert asked[0] == 64                    # the replay is read only once a probe is due
    # replay never short: the probe runs half an interval late (the interval doubled to 128 after the probe)
    got = [(s, k) for s in range(72, 400) if (k := pol.probe(s, 0, replay=lambda: 99.0)) is not None]
    assert got == [(70 + 128 + 64, 1), (70 + 128 + 65, 1)]
    # few measured drafting steps: probes every 8 steps whatever the replay (the rule needs the points)
    pol2 = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, probe_every=64, probe_min_points=4))
    got = [s for s in range(1, 40) if pol2.probe(s, 0, replay=lambda: 1e9) is not None]
    assert got == [8, 9, 16, 17, 24, 25, 32, 33]
    with pytest.raises(ValueError, match="probe_replay_per_request"):
        PolicyConfig(max_k=3, draft_cost=0.5, probe_replay_per_request=-1.0)


def test_table_with_drafting_cost_equals_brute_force():
    pol = DraftLengthPolicy(PolicyConfig(max_k=2, draft_cost=0.0))
    pol.window.observe(1, [(2, 1)] * 200)   # a_1 ~ 1, a_2 ~ 0
    for b in (1, 2, 4, 8, 16, 32, 64) * 4:   # F = 10, D = 30, at several batch sizes
        for k in (0, 1):
            u = step_cost(b, k, 0.0, 0.0)
            pol.cost.observe(u, 1e-3 * (10.0 + 30.0 * k + u), k=k)
    fixed, drafting = pol.cost.costs()
    assert fixed == pytest.approx(10.0, rel=0.05) and drafting == pytest.approx(30.0, rel=0.05)
    table = pol.table(64)
    brute = [best_k(pol.acceptance(), b, fixed, 0.0, 2, pol.config.tie_margin, drafting) for b in range(1, 65)]
    assert table[1:] == brute and table == [0] * 65   # D > F: one draft never pays, even when accepted
    rng = random.Random(5)
    for _ in range(40):   # random F, D, rho, acceptance: bisection equals evaluating every batch size
        k_max = rng.randint(1, 4)
        pol = DraftLengthPolicy(PolicyConfig(max_k=k_max, draft_cost=rng.choice([0.0, 0.1, 0.5])))
        pol.window.observe(1, [(k_max, rng.randint(0, k_max)) for _ in range(rng.randint(1, 30))])
        F, D = rng.choice([0.0, 5.0, 64.0, 400.0]), rng.choice([0.0, 3.0, 30.0, 300.0])
        for b in (1, 3, 9, 27, 81) * 6:
            for k in (0, 1):
                u = pol.units(b, k)
                pol.cost.observe(u, 1e-4 * (F + k * D + u), k=k)
        f, d = pol.cost.costs()
        brute = [best_k(pol.acceptance(), b, f, pol.config.draft_cost, k_max, pol.config.tie_margin, d)
                 for b in range(1, 301)]
        assert pol.table(300)[1:] == brute


def test_table_equals_brute_force_per_batch_size():
    rng = random.Random(1)
    for _ in range(30):
        k_max = rng.randint(1, 6)
        cfg = PolicyConfig(max_k=k_max, draft_cost=rng.choice([0.0, 0.1, 0.5, 1.0]),
                           fixed_cost=rng.choice([0.0, 4.0, 64.0, 500.0]))
        pol = DraftLengthPolicy(cfg)
        pol.window.observe(1, [(k_max, rng.randint(0, k_max)) for _ in range(rng.randint(1, 20))])
        acc = pol.acceptance()
        table = pol.table(300)
        brute = [best_k(acc, b, cfg.fixed_cost, cfg.draft_cost, k_max, cfg.tie_margin) for b in range(1, 301)]
        assert table[1:] == brute and table[0] == table[1]


def test_policy_converges_to_zero_on_useless_drafts_and_probes_again():
    # small fixed cost: a draft pays only above ~27 % acceptance (T(1,1)/T(1,0) = 7/5.5)
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5, fixed_cost=4.0, window_steps=16))
    assert pol.choose(1) >= 1  # optimistic prior
    step, ks = 0, []
    for step in range(1, 200):
        k = pol.choose(1)
        ks.append(k)
        pol.window.observe(step, [(k, 0)] if k else [])
    assert ks[-16:].count(0) >= 14  # mostly no drafting
    assert 0 < sum(1 for k in ks[50:] if k) <= len(ks[50:]) // 8  # but a probe once per window


def test_large_fixed_cost_makes_even_rare_acceptance_worth_one_draft():
    # F = 64 at batch 1: one more token costs 1.5 / 65.5 = 2.3 % of the step, so 5 % acceptance pays
    assert best_k([0.05, 0.05], 1, 64.0, 0.5, 2) == 1
    assert best_k([0.05, 0.05], 64, 64.0, 0.5, 2) == 0


def test_policy_with_perfect_drafts_keeps_the_cap():
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.5))
    for step in range(1, 50):
        k = pol.choose(1)
        pol.window.observe(step, [(k, k)])
    assert pol.choose(1) == 3 and pol.acceptance()[0] > 0.95


def test_config_rejects_bad_bounds():
    with pytest.raises(ValueError, match="max_k"):
        PolicyConfig(max_k=-1, draft_cost=0.5)
    with pytest.raises(ValueError, match="draft_cost"):
        PolicyConfig(max_k=2, draft_cost=-0.1)


def test_speculative_config_only_for_models_with_mtp_layers():
    assert speculative_config(Features(mtp=True), {"num_nextn_predict_layers": 0}) is None
    assert speculative_config(Features(mtp=True), {}) is None
    assert speculative_config(Features(mtp=True, mtp_k=2), {"num_nextn_predict_layers": 1}) == {
        "method": "mtp", "num_speculative_tokens": 2}


def test_a_skipped_drafter_makes_k0_cost_a_plain_step():
    # T(B, 0) loses the drafter's first pass (B rho) when the drafter is skipped; k > 0 is unchanged
    assert step_cost(16, 0, 10.0, 0.5) == pytest.approx(10 + 16 * 1.5)
    assert step_cost(16, 0, 10.0, 0.5, 30.0, drafter_skips=True) == pytest.approx(10 + 16)
    assert step_cost(16, 2, 10.0, 0.5, 30.0, drafter_skips=True) == step_cost(16, 2, 10.0, 0.5, 30.0)
    # the cheaper k = 0 can turn a marginal draft off: B = 1, F = 2, rho = 0.5: E(1) / T(1, 1) = 1.5 / 5
    # beats 1 / 3.5 (drafter run at k = 0) but not 1 / 3 (drafter skipped)
    assert best_k([0.5], 1, 2.0, 0.5, 1) == 1
    assert best_k([0.5], 1, 2.0, 0.5, 1, drafter_skips=True) == 0


def test_table_with_skipping_drafter_equals_brute_force():
    rng = random.Random(7)
    for _ in range(30):
        k_max = rng.randint(1, 4)
        pol = DraftLengthPolicy(PolicyConfig(max_k=k_max, draft_cost=rng.choice([0.0, 0.1, 0.5]), drafter_skips=True))
        pol.window.observe(1, [(k_max, rng.randint(0, k_max)) for _ in range(rng.randint(1, 30))])
        F, D = rng.choice([0.0, 5.0, 64.0]), rng.choice([0.0, 3.0, 30.0])
        for b in (1, 3, 9, 27, 81) * 6:
            for k in (0, 1):
                u = pol.units(b, k)
                pol.cost.observe(u, 1e-4 * (F + k * D + u), k=k)
        f, d = pol.cost.costs()
        brute = [best_k(pol.acceptance(), b, f, pol.config.draft_cost, k_max, pol.config.tie_margin, d, True)
                 for b in range(1, 301)]
        assert pol.table(300)[1:] == brute


def test_cost_fit_running_sums_equal_the_window_recomputed():
    # the fit reads running sums (O(1) per step); after many evictions they still equal the window's own sums
    from vllm_frontier.spec_decode.policy import _Sums

    rng = random.Random(5)
    sums = _Sums(64)
    for _ in range(3001):
        k = rng.choice([1, 2, 3])
        sums.append(rng.uniform(1, 400), rng.uniform(1e-3, 5e-2), k)
    assert len(sums) == 64
    fresh = _Sums(64)
    for pt in sums.points:
        fresh.append(*pt)
    for key in _Sums.KEYS:
        assert sums.sums[key] == pytest.approx(fresh.sums[key], rel=1e-9, abs=1e-12), key


def test_batch_buckets_tile_the_batch_sizes():
    from vllm_frontier.spec_decode.policy import batch_bucket, bucket_range

    seen = []
    for b in range(1, 1025):
        lo, hi = bucket_range(batch_bucket(b))
        assert lo <= b <= hi
        seen.append(batch_bucket(b))
    assert seen == sorted(seen) and set(seen) == set(range(max(seen) + 1))   # contiguous, in order
    assert [bucket_range(i) for i in range(8)] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (7, 8), (9, 12),
                                                   (13, 16)]


def test_step_times_keep_a_window_and_its_median():
    from vllm_frontier.spec_decode.policy import StepTimes

    st = StepTimes(cell_window=4)
    assert st.summary(0, 0) is None
    for t in (9.0, 1.0, 2.0, 3.0, 100.0):   # 9.0 leaves the window; the outlier 100 does not move the median
        st.observe(1, 0, t)
    assert st.summary(0, 0) == (2.5, 1.0, 4)
    st.observe(13, 2, 1.0)
    st.observe(16, 2, 3.0)
    assert st.summary(7, 2) == (2.0, 14.5, 2) and st.buckets() == {0, 7}
    st.observe(1, 0, float("nan"))
    st.observe(1, 0, -1.0)
    assert st.summary(0, 0)[2] == 4


def cpu_like_policy() -> DraftLengthPolicy:
    """A fit that prices a k = 1 step at batch 1 at ~1.45x a plain one (cheaper than the pooled fit on vLLM CPU
    said, 1.9x, so that the fit alone drafts beyond the rule's 10 % margin), acceptance 0.95 at every position."""
    pol = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.25, drafter_skips=True))
    pol.window.observe(1, [(3, 3)] * 19 + [(3, 0)])
    for b in (1, 2, 4, 8, 16) * 8:
        for k in (0, 1, 2):
            u = pol.units(b, k)
            pol.cost.observe(u, 1e-3 * (15.7 + 6.0 * k + u), k=k)
    return pol


def test_measured_step_times_overrule_the_pooled_fit_at_their_batch_size():
    pol = cpu_like_policy()
    assert pol.choose(1) > 0 and pol.drafting_can_pay(1)   # the fit alone drafts at batch 1
    for _ in range(4):   # measured at batch 1: a k = 1 step takes 2.8x a plain one
        pol.observe_step(1, 0, 4e-3)
        pol.observe_step(1, 1, 11.2e-3)
    assert pol.measured_ratios() == {"1-1": {1: 2.8}}
    pol.observe_step(5, 2, 9e-3)   # one point: shown among the timed cells, too few to anchor anything
    assert pol.step_time_cells() == {"1-1": {0: [4.0, 4], 1: [11.2, 4]}, "5-6": {2: [9.0, 1]}}
    assert pol.measured_ratios() == {"1-1": {1: 2.8}}
    assert pol.choose(1) == 0 and not pol.drafting_can_pay(1)
    # k = 2, 3 unmeasured: the measured k = 1 ratio carried by the fit's shape, so they cost more than k = 1
    costs = pol.step_costs(1, pol.cost.costs(), pol._anchor(0, pol._measured()))
    assert costs[1] / costs[0] == pytest.approx(2.8) and costs[0] < costs[1] < costs[2] < costs[3]
    # the nearest measured bucket answers for the others (batch 16 here), and the table follows
    assert pol.choose(16) == 0 and pol.table(16) == [0] * 17
    # cheap drafting measured at batch 9-12: drafts there, batch 1 keeps its own measurement
    for _ in range(4):
        pol.observe_step(10, 0, 10e-3)
        pol.observe_step(10, 1, 11e-3)
    table = pol.table(16)
    assert table[1] == 0 and all(k > 0 for k in table[5:17])


def test_an_anchor_halfway_between_buckets_is_the_larger_one():
    pol = cpu_like_policy()
    for b, ratio in ((1, 1.1), (3, 2.9)):
        for _ in range(4):
            pol.observe_step(b, 0, 1e-3)
            pol.observe_step(b, 1, ratio * 1e-3)
    assert pol._anchor(1, pol._measured()) == {1: (pytest.approx(2.9), 3.0)}
    assert pol.choose(2) == 0 and pol.choose(1) > 0


def test_a_drafting_step_measured_cheaper_than_a_plain_one_counts_as_one():
    pol = cpu_like_policy()
    for _ in range(4):
        pol.observe_step(1, 0, 2e-3)
        pol.observe_step(1, 1, 1e-3)   # noise: no step that drafts does less work than a plain one
    costs = pol.step_costs(1, pol.cost.costs(), pol._anchor(0, pol._measured()))
    assert costs[1] == pytest.approx(costs[0])


def test_a_drafting_step_is_priced_against_the_plain_steps_just_before_it():
    # probes measured a k = 1 step at 2.8x the plain steps around it; then the machine slows down 2x for the
    # plain steps that follow (a CPU host drifts): the measured ratio must not follow the drift
    pol = cpu_like_policy()
    for _ in range(2):
        for _ in range(8):
            pol.observe_step(1, 0, 4e-3)
        pol.observe_step(1, 1, 11.2e-3)
        pol.observe_step(1, 1, 11.2e-3)
    assert pol.measured_ratios() == {"1-1": {1: 2.8}}
    for _ in range(32):
        pol.observe_step(1, 0, 8e-3)
    assert pol.measured_ratios() == {"1-1": {1: 2.8}}   # unpaired medians would say 1.4x
    assert pol.choose(1) == 0   # at 2.8x no k pays, also at this policy's 0.95 acceptance
    # the next probe runs at the new speed: its ratio is paired with the slow plain steps
    pol.observe_step(1, 1, 22.4e-3)
    assert pol.times.ratio(0, 1)[0] == pytest.approx(2.8)
