"""Plain k = 0 steps without an engine: which steps run without speculation, the runner's config hidden and put
back, the executor's local answer after a step that drafted nothing, the one-token fast path of the CPU
indexer-metadata override."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_frontier import compat
from vllm_frontier.spec_decode.worker import plain_step


def sched_out(k: int, drafts: dict | None = None, tokens: int = 4):
    return types.SimpleNamespace(num_spec_tokens_to_schedule=k, scheduled_spec_decode_tokens=drafts or {},
                                 total_num_scheduled_tokens=tokens)


def test_only_steps_that_neither_draft_nor_verify_run_plain():
    assert plain_step(sched_out(0))
    assert not plain_step(sched_out(2))                       # drafts after this step
    assert not plain_step(sched_out(0, {"r": [5, 6]}))        # verifies drafts of the step before
    assert not plain_step(sched_out(0, tokens=0))             # nothing to run


def test_without_speculation_hides_the_config_and_puts_it_back_on_error():
    spec = object()
    runner = types.SimpleNamespace(speculative_config=spec)
    with compat.without_speculation(runner):
        assert runner.speculative_config is None
    assert runner.speculative_config is spec
    with pytest.raises(RuntimeError), compat.without_speculation(runner):
        raise RuntimeError("step failed")
    assert runner.speculative_config is spec
    # builders get their settings without speculation for the step, and their own back after it
    builder = types.SimpleNamespace(num_speculative_tokens=3, decode_threshold=4, use_flattening=True)
    plain = {"num_speculative_tokens": 0, "decode_threshold": 1, "use_flattening": False}
    with compat.without_speculation(runner, [(builder, plain)]):
        assert vars(builder) == plain
    assert vars(builder) == {"num_speculative_tokens": 3, "decode_threshold": 4, "use_flattening": True}


def test_executor_asks_the_workers_for_drafts_only_after_a_drafting_step(monkeypatch):
    from vllm_frontier.spec_decode.executor import MTPMultiprocExecutor

    base = compat.multiproc_executor_cls()
    calls = []
    monkeypatch.setattr(base, "execute_model", lambda self, so, non_block=False: calls.append(("exec", non_block)))
    monkeypatch.setattr(base, "take_draft_token_ids", lambda self: calls.append("take") or "drafts")
    ex = MTPMultiprocExecutor.__new__(MTPMultiprocExecutor)   # no workers: only the two methods run
    assert ex.take_draft_token_ids() == "drafts"               # before any step: asks (vLLM's behaviour)
    ex.execute_model(sched_out(0), non_block=True)
    assert ex.take_draft_token_ids() is None and calls == ["take", ("exec", True)]
    ex.execute_model(sched_out(3))
    assert ex.take_draft_token_ids() == "drafts" and calls[-1] == "take" and calls.count("take") == 2


def test_one_token_decode_metadata_fast_path_equals_the_general_rule():
    from vllm_frontier.attention_backends.cpu_overrides import prepare_uniform_decode

    torch.manual_seed(0)
    seq = torch.tensor([7, 1, 130, 64], dtype=torch.int32)
    bt = torch.randint(0, 99, (4, 9), dtype=torch.int32)

    def run(max_decode_len, n_rows):
        out_seq = torch.full((16,), -5, dtype=torch.int32)
        out_bt = torch.full((16, 12), -5, dtype=torch.int32)
        out_lens = torch.full((16,), -5, dtype=torch.int32)
        prepare_uniform_decode(seq[:n_rows], out_seq, bt[:n_rows], bt.stride(0), out_bt, out_bt.stride(0), out_lens,
                               max_decode_len)
        return out_seq, out_bt, out_lens

    s1, b1, l1 = run(1, 4)
    assert s1[:4].tolist() == seq.tolist() and (s1[4:] == -5).all()
    assert torch.equal(b1[:4, :9], bt) and (b1[:4, 9:] == -5).all() and (b1[4:] == -5).all()
    assert l1[:4].tolist() == [1] * 4 and (l1[4:] == -5).all()
    # two tokens per request: each request's rows see one more key than the row before
    s2, b2, l2 = run(2, 4)
    assert s2[:8].tolist() == [6, 7, 0, 1, 129, 130, 63, 64]
    assert torch.equal(b2[:8, :9], bt.repeat_interleave(2, 0)) and l2[:8].tolist() == [1] * 8


def test_one_object_serves_step_after_step():
    spec = object()
    runner = types.SimpleNamespace(speculative_config=spec)
    builder = types.SimpleNamespace(decode_threshold=4)
    hidden = compat.without_speculation(runner, [(builder, {"decode_threshold": 1})])
    for step_spec in (spec, "changed between steps"):
        runner.speculative_config = step_spec
        with hidden:
            assert runner.speculative_config is None and builder.decode_threshold == 1
        assert runner.speculative_config is step_spec and builder.decode_threshold == 4


def _proposer_over(runner, getter=None):
    from vllm_frontier.spec_decode.proposer import SkippingMTPProposer
    from vllm_frontier.spec_decode.skipped import SkippedPositions

    p = SkippingMTPProposer.__new__(SkippingMTPProposer)   # no vLLM drafter: only the plain-step path runs
    p._runner, p.skipped, p._mtp_hidden_getter = runner, SkippedPositions(), getter
    p.counters = {"skipped_steps": 0, "plain_steps": 0}
    return p


@pytest.mark.parametrize("padded_rows", [0, 3])
def test_a_plain_decode_step_keeps_a_copy_of_its_rows(padded_rows):
    positions = torch.arange(100, 116)
    model = types.SimpleNamespace()
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(req_ids=["a", "b"]), requests={"a": 0, "b": 0},
                                   get_model=lambda: model, _get_positions=lambda n: positions[:n])
    p = _proposer_over(runner)
    for step in range(2):   # the runner writes the next step's hidden states into the same buffer
        buffer = torch.full((2 + padded_rows, 4), float(step))
        state = types.SimpleNamespace(hidden_states=buffer, scheduler_output=types.SimpleNamespace(
            num_scheduled_tokens={"a": 1, "b": 1}, total_num_scheduled_tokens=2))
        positions[:2] = torch.tensor([10 + step, 50 + step])
        p.keep_plain_step(state, types.SimpleNamespace(sampled_token_ids=[[7 + step], [9 + step]]))
        buffer.fill_(-1.0)
    assert p.counters == {"skipped_steps": 2, "plain_steps": 2} and p.skipped.total == 4
    first, ids, rows = p.skipped.take("a", 2)
    assert first == 10 and ids.tolist() == [7, 8] and rows.tolist() == [[0.0] * 4, [1.0] * 4]
    first, ids, rows = p.skipped.take("b", 2)
    assert first == 50 and ids.tolist() == [9, 10] and rows.shape == (2, 4)


def test_the_models_own_mtp_input_is_kept_where_it_has_one():
    own = torch.full((1, 4), 3.0)
    model = types.SimpleNamespace(get_mtp_target_hidden_states=lambda: own)
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(req_ids=["a"]), requests={"a": 0},
                                   get_model=lambda: model, _get_positions=lambda n: torch.tensor([5])[:n])
    p = _proposer_over(runner)
    state = types.SimpleNamespace(hidden_states=torch.zeros(1, 4), scheduler_output=types.SimpleNamespace(
        num_scheduled_tokens={"a": 1}, total_num_scheduled_tokens=1))
    p.keep_plain_step(state, types.SimpleNamespace(sampled_token_ids=[[2]]))
    assert p.skipped.take("a", 1)[2].tolist() == [[3.0] * 4]
