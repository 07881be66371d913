"""The drafter-skipping proposer is vLLM's MTP proposer but for `propose` (its pins: vllm_frontier/compat.py)."""

from __future__ import annotations

import pytest


def test_proposer_subclasses_vllms_mtp_proposer_and_overrides_propose_only():
    pytest.importorskip("vllm")
    from vllm.v1.spec_decode.eagle import EagleProposer

    from vllm_frontier.spec_decode.proposer import SkippingMTPProposer

    assert issubclass(SkippingMTPProposer, EagleProposer)
    ours = {n for n, v in vars(SkippingMTPProposer).items() if callable(v) and not n.startswith("__")}
    # every other method is vLLM's: a vLLM change to them reaches the proposer unmodified
    assert ours & set(dir(EagleProposer)) == {"propose"}
