"""Pins: the private vLLM 0.32 pieces the MTP scheduler and the drafter-skipping proposer rely on."""

from __future__ import annotations

import pytest

from vllm_frontier.spec_decode.compat import PINNED, PINNED_SOURCE, check_vllm_spec_decode_api


def test_pinned_vllm_spec_decode_api_unchanged():
    pytest.importorskip("vllm")
    problems = check_vllm_spec_decode_api()
    assert problems == [], ("vLLM's speculative-decoding internals changed; update "
                            "vllm_frontier/spec_decode/compat.py:\n" + "\n".join(problems))


def test_check_reports_changed_signature_missing_object_and_changed_behaviour(monkeypatch):
    pytest.importorskip("vllm")
    import vllm_frontier.spec_decode.compat as compat

    module, qualname, params = PINNED[1]
    monkeypatch.setattr(compat, "PINNED_SOURCE", [])
    monkeypatch.setattr(compat, "PINNED", [(module, qualname, params + ("extra",))])
    assert "parameters" in compat.check_vllm_spec_decode_api()[0]
    monkeypatch.setattr(compat, "PINNED", [(module, "NoSuchClass.method", None)])
    assert "missing" in compat.check_vllm_spec_decode_api()[0]
    module, qualname, _ = PINNED_SOURCE[0]
    monkeypatch.setattr(compat, "PINNED", [])
    monkeypatch.setattr(compat, "PINNED_SOURCE", [(module, qualname, "text that is not there")])
    assert "no longer contains" in compat.check_vllm_spec_decode_api()[0]
    monkeypatch.setattr(compat, "PINNED_SOURCE", [])
    monkeypatch.setattr(compat, "PINNED_FIELDS", ("no_such_field",))
    assert "field no_such_field missing" in compat.check_vllm_spec_decode_api()[0]


def test_proposer_subclasses_vllms_mtp_proposer_and_overrides_propose_only():
    pytest.importorskip("vllm")
    from vllm.v1.spec_decode.eagle import EagleProposer

    from vllm_frontier.spec_decode.proposer import SkippingMTPProposer

    assert issubclass(SkippingMTPProposer, EagleProposer)
    ours = {n for n, v in vars(SkippingMTPProposer).items() if callable(v) and not n.startswith("__")}
    # every other method is vLLM's: a vLLM change to them reaches the proposer unmodified
    assert ours & set(dir(EagleProposer)) == {"propose"}
