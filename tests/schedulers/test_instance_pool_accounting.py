"""InstancePool: lease choice (per-stage count, then total, then rotation), served accounting,
health, the snapshot window, with hand-checked expectations."""

import threading

import pytest

from vllm_frontier.schedulers.instance_pool import (
    InstancePool, NoInstanceAvailable, Role, Stage,
)

A, B, C = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"


def test_role_accepts():
    assert Role.BOTH.accepts(Stage.PREFILL) and Role.BOTH.accepts(Stage.DECODE)
    assert Role.PREFILL.accepts(Stage.PREFILL) and not Role.PREFILL.accepts(Stage.DECODE)
    assert Role.DECODE.accepts(Stage.DECODE) and not Role.DECODE.accepts(Stage.PREFILL)


def test_equal_instances_rotate():
    pool = InstancePool([(A, "both"), (B, "both"), (C, "both")])
    picks = []
    for _ in range(6):
        with pool.lease("decode") as inst:
            picks.append(inst.url)
    # every instance idle at each lease: the rotation alone decides, and it visits all three in turn
    assert picks[:3] == picks[3:] and sorted(picks[:3]) == [A, B, C]


def test_fewest_leases_of_the_stage_wins_over_rotation():
    pool = InstancePool([(A, "both"), (B, "both"), (C, "both")])
    first = pool.acquire("prefill").url
    second = pool.acquire("prefill").url
    third = pool.acquire("prefill").url
    assert sorted([first, second, third]) == [A, B, C]
    # one prompt each; release one: it is the only one with none, whatever the rotation says
    pool.release(second, "prefill")
    assert pool.acquire("prefill").url == second
    assert [pool.inflight(u, "prefill") for u in (A, B, C)] == [1, 1, 1]


def test_stage_count_first_then_total_then_rotation():
    # each expectation below is the opposite of what the rotation alone would pick
    pool = InstancePool([(A, "both"), (B, "both")])
    pool.acquire("decode", exclude=[B])  # A: 1 decode; rotation counter 1
    # prefill: 0 prompts each -> total in flight decides: B (0) over A (1). rotation (counter 2) favours A
    assert pool.acquire("prefill").url == B
    # prefill again: A has 0 prompts, B 1 -> A, although A has 1 decode and rotation (3) favours B
    assert pool.acquire("prefill").url == A
    assert pool.inflight(A) == 2 and pool.inflight(B) == 1
    assert (pool.inflight(A, "prefill"), pool.inflight(A, "decode")) == (1, 1)


def test_release_counts_served_only_when_ok():
    pool = InstancePool([(A, "both")])
    for stage, ok in [("prefill", True), ("prefill", False), ("decode", True), ("decode", True)]:
        pool.acquire(stage)
        pool.release(A, stage, ok=ok)
    (s,) = pool.snapshot().instances
    assert (s.served_prefill, s.served_decode, s.inflight_prefill, s.inflight_decode) == (1, 2, 0, 0)
    assert pool.get(A).served == {Stage.PREFILL: 1, Stage.DECODE: 2}


def test_lease_context_counts_an_exception_as_not_served():
    pool = InstancePool([(A, "both")])
    with pytest.raises(RuntimeError):
        with pool.lease("decode"):
            assert pool.inflight(A, "decode") == 1
            raise RuntimeError("instance died")
    with pool.lease("decode"):
        pass
    assert pool.inflight(A) == 0 and pool.get(A).served[Stage.DECODE] == 1


def test_release_of_a_removed_instance_is_ignored():
    pool = InstancePool([(A, "both"), (B, "both")])
    inst = pool.acquire("decode", exclude=[B])
    pool.remove(A)
    pool.release(inst.url, "decode")  # no KeyError, nothing counted elsewhere
    assert pool.urls() == [B] and pool.get(B).served[Stage.DECODE] == 0


def test_completed_and_failed_requests():
    pool = InstancePool()
    for ok in (True, True, False, True, False):
        pool.record_done(ok)
    snap = pool.snapshot()
    assert (snap.completed, snap.failed) == (3, 2)


def test_health_counts_consecutive_failures():
    pool = InstancePool([(A, "decode"), (B, "decode")])
    pool.mark_down(A, "refused")
    pool.mark_down(A, "refused again")
    inst = pool.get(A)
    assert (inst.healthy, inst.down_reason, inst.failures) == (False, "refused again", 2)
    assert [i.url for i in pool.candidates("decode")] == [B]
    assert [pool.acquire("decode").url for _ in range(3)] == [B, B, B]
    pool.mark_up(A)
    assert (inst.healthy, inst.down_reason, inst.failures) == (True, None, 0)
    assert pool.acquire("decode").url == A  # B holds 3 leases
    snap = {i.url: i.healthy for i in pool.snapshot().instances}
    assert snap == {A: True, B: True}


def test_candidates_follow_roles_health_and_exclusion():
    pool = InstancePool([(A, "prefill"), (B, "decode"), (C, "both")])
    assert [i.url for i in pool.candidates("prefill")] == [A, C]
    assert [i.url for i in pool.candidates(Stage.DECODE)] == [B, C]
    assert [i.url for i in pool.candidates("decode", exclude=[C + "/"])] == [B]
    with pytest.raises(NoInstanceAvailable, match="no healthy instance accepts the prefill stage"):
        pool.acquire("prefill", exclude=[A, C])


def test_set_role_returns_the_old_role_and_redirects_new_leases():
    pool = InstancePool([(A, "prefill"), (B, "decode")])
    assert pool.set_role(B, Role.BOTH) is Role.DECODE
    assert pool.get(B).role is Role.BOTH
    assert pool.set_role(A, "decode") is Role.PREFILL
    assert pool.acquire("prefill").url == B
    with pytest.raises(ValueError, match="role must be one of"):
        pool.set_role(A, "prefil")


def test_wait_drained_wakes_on_release():
    pool = InstancePool([(A, "both")])
    pool.acquire("decode")
    pool.acquire("prefill")
    done = []
    t = threading.Thread(target=lambda: done.append(pool.wait_drained(A, "decode", timeout=5)))
    t.start()
    pool.release(A, "prefill")  # the other stage: still waiting
    t.join(0.05)
    assert t.is_alive()
    pool.release(A, "decode")
    t.join(5)
    assert done == [True]


def test_acquire_does_not_wait_and_add_wakes_nobody_wrongly():
    pool = InstancePool()
    with pytest.raises(NoInstanceAvailable):
        pool.acquire("decode")
    pool.add(A + "/", "decode")
    assert pool.urls() == [A]
    with pytest.raises(ValueError, match="already in the pool"):
        pool.add(A, "both")


def test_urls_are_normalised():
    pool = InstancePool([("  https://h:9/ ", "both")])
    assert pool.urls() == ["https://h:9"]
    pool.set_kv_addr("https://h:9/", "tcp://h:1")
    assert pool.get("https://h:9").kv_addr == "tcp://h:1"
    with pytest.raises(KeyError, match="unknown instance"):
        pool.get("http://other:1")
    with pytest.raises(ValueError, match="must start with http"):
        pool.add("ftp://h:1", "both")


@pytest.mark.parametrize("w", [0, -1.0])
def test_window_must_be_positive(w):
    with pytest.raises(ValueError, match="window_s must be > 0"):
        InstancePool(window_s=w)


def test_snapshot_window_keeps_samples_at_the_horizon():
    now = [100.0]
    pool = InstancePool([(A, "both")], window_s=10, clock=lambda: now[0])
    pool.record_ttft(0.1, prompt_tokens=5)
    pool.record_tpot(0.01)
    now[0] = 105.0
    pool.record_ttft(0.2)  # no prompt length: no prompt sample
    pool.record_tpot(0.02)
    now[0] = 110.0  # the first samples are exactly window_s old: kept
    snap = pool.snapshot()
    assert (snap.ttft_s, snap.tpot_s, snap.prompt_tokens) == ((0.1, 0.2), (0.01, 0.02), (5,))
    assert (snap.t, snap.window_s) == (110.0, 10)
    now[0] = 110.5
    snap = pool.snapshot()
    assert (snap.ttft_s, snap.tpot_s, snap.prompt_tokens) == ((0.2,), (0.02,), ())


def test_waiting_counts_per_stage():
    pool = InstancePool()
    pool.waiting_changed("prefill", 2)
    pool.waiting_changed(Stage.DECODE, 1)
    pool.waiting_changed("prefill", -1)
    snap = pool.snapshot()
    assert (snap.waiting_prefill, snap.waiting_decode) == (1, 1)


def test_default_window_is_a_minute():
    now = [0.0]
    pool = InstancePool(clock=lambda: now[0])
    pool.record_tpot(1.0)
    now[0] = 60.0
    assert pool.snapshot().tpot_s == (1.0,)
    now[0] = 60.01
    assert pool.snapshot().tpot_s == ()


@pytest.mark.parametrize("n", [2, 4])
def test_rotation_visits_every_idle_instance_for_any_pool_size(n):
    urls = [f"http://127.0.0.1:{k + 1}" for k in range(n)]
    pool = InstancePool([(u, "decode") for u in urls])
    picks = []
    for _ in range(2 * n):
        with pool.lease("decode") as inst:
            picks.append(inst.url)
    assert sorted(picks[:n]) == urls and picks[n:] == picks[:n]


def test_leases_on_one_instance_add_up():
    pool = InstancePool([(A, "both")])
    for _ in range(3):
        pool.acquire("decode")
    pool.acquire("prefill")
    assert (pool.inflight(A, "decode"), pool.inflight(A, "prefill"), pool.inflight(A)) == (3, 1, 4)
    pool.release(A, "decode")
    assert pool.inflight(A, Stage.DECODE) == 2


def test_snapshot_reports_roles_and_health():
    pool = InstancePool([(A, "prefill"), (B, "both")])
    pool.mark_down(B, "x")
    snap = pool.snapshot()
    assert [(i.url, i.role, i.healthy) for i in snap.instances] == [(A, "prefill", True), (B, "both", False)]


def test_remove_of_an_unknown_instance_is_a_no_op():
    pool = InstancePool([(A, "both")])
    pool.remove(B)
    pool.remove(A + "/")
    assert pool.urls() == []


def test_url_normalisation_strips_only_slashes():
    pool = InstancePool([("http://HOSTX/", "both"), ("http://h:80//", "decode")])
    assert pool.urls() == ["http://HOSTX", "http://h:80"]


def test_window_may_be_below_a_second():
    now = [0.0]
    pool = InstancePool(window_s=0.5, clock=lambda: now[0])
    pool.record_ttft(0.1)
    now[0] = 0.6
    assert pool.snapshot().ttft_s == ()
