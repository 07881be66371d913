"""Wiring without an engine: which vLLM configs get the adaptive scheduler, the pin file's grammar, the cost
ratio read from the model config."""

from __future__ import annotations

import types

import pytest

from vllm_frontier.spec_decode import FIXED_SCHEDULER_CLS, SCHEDULER_CLS, update_vllm_config


def fake_config(method="mtp", scheduler_cls=None, async_scheduling=False):
    spec = None if method is None else types.SimpleNamespace(method=method, num_speculative_tokens=3)
    sched = types.SimpleNamespace(scheduler_cls=scheduler_cls, async_scheduling=async_scheduling)
    return types.SimpleNamespace(speculative_config=spec, scheduler_config=sched)


def test_update_vllm_config_installs_the_adaptive_scheduler_for_mtp_only():
    cfg = fake_config()
    assert update_vllm_config(cfg) and cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS
    for cfg in (fake_config(method=None), fake_config(method="ngram"),
                fake_config(scheduler_cls=FIXED_SCHEDULER_CLS), fake_config(async_scheduling=True)):
        before = cfg.scheduler_config.scheduler_cls
        assert not update_vllm_config(cfg) and cfg.scheduler_config.scheduler_cls == before


def test_scheduler_classes_import_and_resolve_by_path():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_frontier.spec_decode.scheduler import AdaptiveDraftScheduler, PinnedDraftScheduler

    assert resolve_obj_by_qualname(SCHEDULER_CLS) is AdaptiveDraftScheduler
    assert issubclass(PinnedDraftScheduler, AdaptiveDraftScheduler) and issubclass(AdaptiveDraftScheduler, Scheduler)
    assert resolve_obj_by_qualname(FIXED_SCHEDULER_CLS) is Scheduler


def test_pin_file_grammar(tmp_path):
    from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

    s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)  # the parser needs only these two fields
    s.num_spec_tokens = 3
    s._pin_path = str(tmp_path / "pin")
    assert s.pinned() is None  # no file: adaptive
    for text, want in [("adaptive", None), ("", None), ("2", [2]), ("3,0,1", [3, 0, 1]), ("9,-1", [3, 0])]:
        (tmp_path / "pin").write_text(text)
        assert s.pinned() == want
    (tmp_path / "pin").write_text("fast")
    with pytest.raises(ValueError, match="comma-separated cycle"):
        s.pinned()


def test_draft_cost_ratio_from_the_model_config():
    from vllm_frontier.spec_decode.scheduler import draft_cost_ratio

    assert draft_cost_ratio(types.SimpleNamespace(num_hidden_layers=4)) == 0.25
    assert draft_cost_ratio(types.SimpleNamespace(num_hidden_layers=61)) == pytest.approx(1 / 61)
