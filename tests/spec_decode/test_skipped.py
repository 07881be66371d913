"""The kept drafter inputs of skipped MTP steps (torch only): runs per request, truncation, pass planning."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_frontier.spec_decode.skipped import SkippedPositions, plan_passes


def chunk(first: int, n: int, hidden: int = 3):
    """ids = position + 1000, hidden rows = position: what was kept can be read back from the values."""
    pos = torch.arange(first, first + n)
    return (pos + 1000).to(torch.int32), pos.float()[:, None].expand(n, hidden).clone()


def keep_chunk(stores, pos: dict, rng) -> None:
    """A chunk kept in every store (a verify step's accepted tokens), sometimes recomputing positions."""
    r = rng.choice(list(pos))
    first = max(pos[r] - rng.randint(0, 2), 0)
    n = rng.randint(1, 4)
    for store in stores:
        store.keep(r, first, *chunk(first, n))
    pos[r] = first + n


def take_same(x: SkippedPositions, y: SkippedPositions, r: str, n: int):
    """Take ``n`` positions of ``r`` from both stores; they must read back the same."""
    a, b = x.take(r, n), y.take(r, n)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    return a


def test_consecutive_steps_extend_one_run_and_take_returns_them_in_order():
    s = SkippedPositions()
    for first, n in [(10, 1), (11, 4), (15, 1)]:   # a prefill tail, a step with 4 accepted, a plain step
        s.keep("a", first, *chunk(first, n))
    assert s.total == 6 and "a" in s and s.runs["a"].first == 10 and s.runs["a"].end == 16
    first, ids, hidden = s.take("a", 4)
    assert first == 10 and ids.tolist() == [1010, 1011, 1012, 1013] and hidden[:, 0].tolist() == [10, 11, 12, 13]
    first, ids, hidden = s.take("a", 10)
    assert first == 14 and ids.tolist() == [1014, 1015] and not s and "a" not in s


def test_recomputed_positions_replace_kept_ones():
    s = SkippedPositions()
    s.keep("a", 0, *chunk(0, 8))
    s.keep("a", 5, *chunk(5, 2))   # positions 5, 6 computed again (e.g. drafts rejected, then recomputed)
    assert s.total == 7 and s.runs["a"].end == 7
    _, ids, _ = s.take("a", 7)
    assert ids.tolist() == [1000 + p for p in range(7)]
    s.keep("a", 20, *chunk(20, 3))
    s.keep("a", 0, *chunk(0, 2))   # recomputed from the start after preemption: the old run goes
    assert s.total == 2 and s.runs["a"].first == 0


def test_a_run_that_does_not_follow_on_replaces_the_old_one():
    s = SkippedPositions()
    s.keep("a", 0, *chunk(0, 4))
    s.keep("a", 9, *chunk(9, 2))   # a hole at 4..8 (computed by a drafter pass): only the new run is replayable
    assert s.total == 2 and s.runs["a"].first == 9


def test_truncate_retain_and_drop_keep_the_total_right():
    s = SkippedPositions()
    s.keep("a", 0, *chunk(0, 5))
    s.keep("b", 3, *chunk(3, 4))
    s.truncate("a", 2)             # a's positions >= 2 are being computed now
    assert s.total == 6 and s.runs["a"].length == 2
    s.truncate("b", 3)
    assert "b" not in s and s.total == 2
    s.keep("c", 0, *chunk(0, 1))
    s.retain({"c"})                # a finished
    assert list(s.runs) == ["c"] and s.total == 1
    s.drop("c")
    assert not s and s.total == 0


@pytest.mark.parametrize("budget", [1, 3, 8, 64])
def test_plan_passes_covers_every_position_within_the_budget(budget):
    rng = random.Random(budget)
    for _ in range(50):
        lengths = [rng.choice([0, 1, 2, 7, 30]) for _ in range(rng.randint(1, 6))]
        passes = plan_passes(lengths, budget)
        assert [sum(col) for col in zip(*passes)] == lengths if passes else not any(lengths)
        assert all(0 < sum(p) <= budget for p in passes)
        # as few passes as the budget allows
        assert len(passes) == -(-sum(lengths) // budget)


def test_plan_passes_one_pass_when_everything_fits():
    assert plan_passes([3, 0, 5], 16) == [[3, 0, 5]]
    with pytest.raises(ValueError, match="budget"):
        plan_passes([1], 0)


def test_single_positions_kept_without_tensor_ops_read_back_like_chunks():
    # a plain decode step keeps one position per request from the step's shared rows (keep_step); mixed with
    # chunks, truncation and takes, the run reads back exactly what `keep` alone would have kept
    rng = random.Random(3)
    for _ in range(50):
        lazy, eager = SkippedPositions(), SkippedPositions()
        pos = {"a": 0, "b": 7}
        for _ in range(rng.randint(1, 30)):
            action = rng.random()
            if action < 0.6:   # a decode step over both requests: one shared rows tensor
                rows = torch.stack([chunk(pos[r], 1)[1][0] for r in pos])
                lazy.keep_step(tuple(pos), [pos[r] for r in pos], [1000 + pos[r] for r in pos], rows)
                for r in pos:
                    eager.keep(r, pos[r], *chunk(pos[r], 1))
                    pos[r] += 1
            elif action < 0.8:   # a chunk (a verify step's accepted tokens), sometimes recomputing positions
                keep_chunk((lazy, eager), pos, rng)
            elif action < 0.9:   # part of the run replayed (a catch-up pass)
                r = rng.choice(list(pos))
                if r in eager:
                    take_same(lazy, eager, r, rng.randint(1, 3))
            else:   # positions being computed again
                r = rng.choice(list(pos))
                before = max(pos[r] - rng.randint(0, 3), 0)
                lazy.truncate(r, before)
                eager.truncate(r, before)
                pos[r] = before
            assert lazy.total == eager.total
        for r in pos:
            assert (r in lazy) == (r in eager)
            if r in eager:
                a = take_same(lazy, eager, r, 1000)
                assert a[1].dtype == torch.int32


def test_a_kept_position_that_does_not_follow_on_starts_a_new_run():
    s = SkippedPositions()
    rows = torch.arange(6.0).reshape(2, 3)
    s.keep_step(("a",), [4], [7], rows[1:])    # no run yet
    s.keep_step(("a",), [5], [8], rows[:1])    # follows on: pending
    s.keep_step(("a",), [9], [9], rows[:1])    # a hole: only the new run is replayable
    assert s.runs["a"].first == 9 and s.total == 1   # read, so folded
    first, ids, hidden = s.take("a", 5)
    assert first == 9 and ids.tolist() == [9] and hidden.tolist() == [[0.0, 1.0, 2.0]]


def test_kept_steps_fold_into_the_runs_that_keep_alone_makes():
    # a plain decode step is kept as one record (keep_step) and folded into the runs when they are read; mixed
    # with chunks, truncation, takes and finished requests, the runs read back what `keep` alone keeps
    rng = random.Random(7)
    for _ in range(50):
        stepwise, eager = SkippedPositions(), SkippedPositions()
        pos = {"a": 0, "b": 7}
        new = iter(f"r{i}" for i in range(100))
        for _ in range(rng.randint(1, 40)):
            action = rng.random()
            if action < 0.6:   # a decode step over the live requests
                live = list(pos)
                rows = torch.stack([chunk(pos[r], 1)[1][0] for r in live])
                stepwise.keep_step(tuple(live), [pos[r] for r in live], [1000 + pos[r] for r in live], rows)
                for r in live:
                    eager.keep(r, pos[r], *chunk(pos[r], 1))
                    pos[r] += 1
            elif action < 0.7:   # a chunk, sometimes recomputing positions
                keep_chunk((stepwise, eager), pos, rng)
            elif action < 0.8:   # part of a run replayed
                r = rng.choice(list(pos))
                if r in eager:
                    take_same(stepwise, eager, r, rng.randint(1, 3))
            elif action < 0.9:   # positions being computed again
                r = rng.choice(list(pos))
                before = max(pos[r] - rng.randint(0, 3), 0)
                stepwise.truncate(r, before)
                eager.truncate(r, before)
                pos[r] = before
            else:   # a request finishes, another starts; the finished one is forgotten when a reader asks
                del pos[rng.choice(list(pos))]
                pos[next(new)] = rng.randint(0, 5)
                if rng.random() < 0.5:
                    stepwise.retain(set(pos))
                    eager.retain(set(pos))
            if rng.random() < 0.2:   # a fold without the live set: finished requests stay until a retain
                assert set(stepwise.runs) >= {r for r in eager.runs if r in pos}
            if rng.random() < 0.3:
                stepwise.retain(set(pos))
                eager.retain(set(pos))
                assert stepwise.total == eager.total
        stepwise.retain(set(pos))
        eager.retain(set(pos))
        assert stepwise.total == eager.total
        for r in pos:
            assert (r in stepwise) == (r in eager)
            if r in eager:
                take_same(stepwise, eager, r, 1000)


def test_a_kept_step_costs_no_work_per_request_until_read(monkeypatch):
    s = SkippedPositions()
    calls = []
    keep_one = s._keep_one
    monkeypatch.setattr(s, "_keep_one", lambda *a: (calls.append(a[0]), keep_one(*a)))
    rows = torch.zeros(16, 3)
    req_ids = tuple(f"r{i}" for i in range(16))
    for step in range(100):
        s.keep_step(req_ids, [10 + step] * 16, [1] * 16, rows)
    assert s.total == 1600 and not calls and s   # counted, nothing folded
    s.retain({"r3"})                             # the others finished: skipped without a call
    assert calls == ["r3"] * 100 and s.total == 100 and list(s.runs) == ["r3"]
    first, ids, hidden = s.take("r3", 1000)
    assert first == 10 and ids.tolist() == [1] * 100 and hidden.shape == (100, 3)
