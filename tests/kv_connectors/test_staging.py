"""StagingStore: the byte budget's accounting and its eviction order, the TTL, with a fake clock.

Payloads are plain byte buffers of chosen sizes, so every byte count below is hand-computed."""

import threading

import pytest

from vllm_frontier.kv_connectors.staging import Chunk, StagingStore


def chunk(nbytes, layer="L0"):
    return Chunk(layer, 0, 1, "raw", "uint8", nbytes, memoryview(bytearray(nbytes)))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def store(**kw):
    clock, evicted = Clock(), []
    st = StagingStore(clock=clock, on_evict=lambda t, r: evicted.append((t, r)), **kw)
    return st, clock, evicted


def test_nbytes_follows_add_release_and_restart():
    st, clock, _ = store(max_bytes=10_000)
    st.open("a")
    st.add("a", chunk(100)); st.add("a", chunk(30, "L1"))
    st.open("b"); st.add("b", chunk(7))
    assert st.nbytes == 137
    assert st.get("a").nbytes == 130 and [c.layer for c in st.get("a").chunks] == ["L0", "L1"]
    assert st.get("a").tid == "a" and st.get("b").tid == "b"
    st.open("a")  # a preempted prefill restarts: its old chunks are dropped
    assert st.nbytes == 7 and st.get("a").nbytes == 0 and st.get("a").chunks == []
    st.add("a", chunk(50))
    st.release("b")
    assert st.nbytes == 50 and len(st) == 1 and st.get("b") is None
    st.release("b")  # twice: nothing more is subtracted
    st.release("never-opened")
    assert st.nbytes == 50


def test_chunks_for_unknown_or_closed_transfers_are_dropped():
    st, _, _ = store()
    st.add("nobody", chunk(10))
    assert st.nbytes == 0 and st.get("nobody") is None
    st.open("a"); st.add("a", chunk(10)); st.close("a", 3)
    st.add("a", chunk(99))  # late chunk after close
    tr = st.get("a")
    assert st.nbytes == 10 and tr.nbytes == 10 and len(tr.chunks) == 1
    assert tr.closed and tr.num_tokens == 3


def test_budget_evicts_oldest_first_until_under_budget():
    # four transfers of 100 B opened at t = 0, 1, 2, 3; the budget holds 450 B
    st, clock, evicted = store(max_bytes=450, ttl_s=1e9)
    for k, tid in enumerate("abcd"):
        clock.t = float(k)
        st.open(tid); st.add(tid, chunk(100))
    assert evicted == [] and st.nbytes == 400
    # "e" brings 250 B: 650 > 450, so the two oldest ("a" then "b") go; 450 <= 450 stops there
    clock.t = 4.0
    st.open("e"); st.add("e", chunk(250))
    assert evicted == [("a", "staging budget exceeded"), ("b", "staging budget exceeded")]
    assert st.nbytes == 450 and sorted(t for t in "abcde" if st.get(t)) == ["c", "d", "e"]


def test_eviction_orders_by_age_not_by_insertion():
    # "old" is opened last in dict order but its last chunk came in first (close restarts the age)
    st, clock, evicted = store(max_bytes=300, ttl_s=1e9)
    clock.t = 5.0
    st.open("x"); st.add("x", chunk(100))
    clock.t = 1.0
    st.open("old"); st.add("old", chunk(100))
    clock.t = 6.0
    st.open("y"); st.add("y", chunk(100))
    clock.t = 7.0
    st.close("x", 1)  # x is now the youngest: age counts from its last chunk
    st.open("z"); st.add("z", chunk(150))
    assert [t for t, _ in evicted] == ["old", "y"]
    assert st.nbytes == 250


def test_the_transfer_being_written_is_never_evicted():
    st, clock, evicted = store(max_bytes=100)
    st.open("a"); st.add("a", chunk(60))
    clock.t = 1.0
    st.open("big"); st.add("big", chunk(500))  # alone over budget: it stays, "a" goes
    assert evicted == [("a", "staging budget exceeded")]
    assert st.get("big") is not None and st.nbytes == 500
    st.add("big", chunk(10, "L1"))  # no other victim: nothing happens
    assert st.nbytes == 510 and len(evicted) == 1


def test_exactly_at_budget_evicts_nothing():
    st, clock, evicted = store(max_bytes=200)
    st.open("a"); st.add("a", chunk(100))
    st.open("b"); st.add("b", chunk(100))
    assert evicted == [] and st.nbytes == 200
    st.add("b", chunk(1, "L1"))
    assert evicted == [("a", "staging budget exceeded")] and st.nbytes == 101


def test_ttl_sweep_boundary_and_accounting():
    st, clock, evicted = store(ttl_s=10.0)
    st.open("a"); st.add("a", chunk(40))
    clock.t = 3.0
    st.open("b"); st.add("b", chunk(2))
    clock.t = 10.0  # "a" is exactly ttl old: not yet expired
    assert st.sweep() == [] and evicted == []
    clock.t = 10.5
    assert st.sweep() == ["a"] and st.nbytes == 2
    assert evicted == [("a", "expired")]
    clock.t = 13.5
    assert st.sweep(pulling={"b"}) == [] and st.get("b") is not None
    assert st.sweep() == ["b"] and st.nbytes == 0 and len(st) == 0


def test_close_restarts_the_ttl_and_open_restarts_the_transfer():
    st, clock, _ = store(ttl_s=10.0)
    st.open("a")
    clock.t = 8.0
    st.close("a", 4)
    assert st.get("a").created == 8.0
    clock.t = 15.0
    assert st.sweep() == []
    clock.t = 18.5
    assert st.sweep() == ["a"]
    st.close("gone", 1)  # closing an unknown transfer is a no-op
    assert st.get("gone") is None


def test_fail_records_the_reason_and_wakes_waiters():
    st, _, _ = store()
    st.open("a")
    woke = threading.Event()

    def waiter():
        with st._cv:
            if st._cv.wait_for(lambda: st._items["a"].error is not None, timeout=5):
                woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    st.fail("a", "prefill aborted")
    t.join()
    assert woke.is_set() and st.get("a").error == "prefill aborted"
    st.fail("unknown", "x")  # no-op


@pytest.mark.parametrize("op", ["open", "add", "close"])
def test_every_change_wakes_waiters(op):
    """The KV server's pump waits on the condition; a change that did not notify would stall it."""
    st, _, _ = store()
    st.open("a")
    seen = threading.Event()
    ready = threading.Event()

    def waiter():
        with st._cv:
            ready.set()
            if st._cv.wait(timeout=5):
                seen.set()

    t = threading.Thread(target=waiter)
    t.start()
    ready.wait()
    with st._cv:  # the waiter is inside wait() once it released the lock
        pass
    {"open": lambda: st.open("b"), "add": lambda: st.add("a", chunk(1)),
     "close": lambda: st.close("a", 1)}[op]()
    t.join()
    assert seen.is_set()


def test_no_callback_is_fine():
    st = StagingStore(max_bytes=10, ttl_s=0.0, clock=lambda: 1.0)
    st.open("a"); st.add("a", chunk(8))
    st.open("b"); st.add("b", chunk(8))
    assert st.get("a") is None and st.nbytes == 8
    assert StagingStore(ttl_s=0.0, clock=lambda: 2.0).sweep() == []


def test_defaults():
    st = StagingStore()
    assert st._ttl_s == 120.0 and st._max_bytes == 4 << 30


def test_chunk_header_names_every_field():
    c = Chunk("model.layers.3", 16, 48, "fp8", "bfloat16", 576, memoryview(b""))
    assert c.header() == {"l": "model.layers.3", "s": 16, "e": 48, "enc": "fp8", "dt": "bfloat16", "w": 576}
