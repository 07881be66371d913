"""InstancePool invariants: leasing follows roles and health, set_role drains."""

import threading

import pytest

from vllm_frontier.schedulers.instance_pool import InstancePool, NoInstanceAvailable, Role, Stage

P, D, B = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"


def test_lease_respects_roles_and_load():
    pool = InstancePool([(P, "prefill"), (D, "decode"), (B, "both")])
    got = {pool.acquire(Stage.PREFILL).url for _ in range(2)}
    assert got == {P, B}  # least-loaded among prefill-capable
    assert pool.acquire(Stage.DECODE).url == D  # B already holds one lease
    with pytest.raises(NoInstanceAvailable):
        pool.acquire("decode", exclude=[D, B])


def test_down_instance_leaves_rotation():
    pool = InstancePool([(P, "prefill"), (B, "both")])
    pool.mark_down(B, "connection refused")
    for _ in range(5):
        with pool.lease("prefill") as inst:
            assert inst.url == P
    pool.mark_up(B)
    assert {pool.acquire("prefill").url for _ in range(2)} == {P, B}


def test_set_role_drains_without_losing_inflight():
    pool = InstancePool([(P, "prefill"), (D, "decode")])
    inst = pool.acquire("prefill")
    assert inst.url == P
    assert pool.set_role(P, "decode") is Role.PREFILL
    with pytest.raises(NoInstanceAvailable):
        pool.acquire("prefill")  # no new prefill work on P
    assert pool.inflight(P, "prefill") == 1  # the old lease keeps running
    assert not pool.wait_drained(P, "prefill", timeout=0.01)
    t = threading.Timer(0.05, pool.release, args=(P, "prefill"))
    t.start()
    assert pool.wait_drained(P, "prefill", timeout=5)
    snap = pool.snapshot()
    assert {i.url: i.served_prefill for i in snap.instances}[P] == 1


def test_snapshot_window_drops_old_samples():
    now = [0.0]
    pool = InstancePool([(P, "both")], window_s=10, clock=lambda: now[0])
    pool.record_ttft(0.5, prompt_tokens=12)
    now[0] = 11.0
    pool.record_ttft(0.25)
    pool.record_tpot(0.01)
    snap = pool.snapshot()
    assert snap.ttft_s == (0.25,) and snap.tpot_s == (0.01,) and snap.prompt_tokens == ()


def test_bad_input_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match="http://"):
        InstancePool([("127.0.0.1:1", "prefill")])
    with pytest.raises(ValueError, match="role must be one of"):
        InstancePool([(P, "prefil")])


def test_prefill_lease_counts_prompts_not_the_decodes_an_instance_drains():
    pool = InstancePool([(P, "prefill"), (D, "decode")])
    pool.acquire("decode")  # two long decodes in flight on D
    pool.acquire("decode")
    pool.release(pool.acquire("prefill").url, "prefill")  # an earlier prompt: the rotation now favours D
    pool.set_role(D, "prefill")  # D drains those decodes and takes prompts at once, counted as one prompt more
    # each pick below is the opposite of what the rotation alone would choose
    assert pool.acquire("prefill").url == P  # 0 prompts on P < 0 + 1 on D
    assert pool.acquire("prefill").url == P  # 1 prompt on P, 0 + 1 on D: in flight 1 < 2 decides
    assert pool.acquire("prefill").url == D  # 0 + 1 < 2 prompts on P, despite D's decodes
    assert pool.inflight(D, "prefill") == 1
    assert pool.inflight(D, "decode") == 2  # the decodes keep running

