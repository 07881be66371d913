"""Pins: the private vLLM 0.32 MoE pieces the adapter relies on keep their signatures."""

from __future__ import annotations

import pytest

from vllm_frontier.moe.compat import PINNED, check_vllm_moe_api


def test_pinned_vllm_moe_api_unchanged():
    pytest.importorskip("vllm")
    problems = check_vllm_moe_api()
    assert problems == [], "vLLM's MoE internals changed; update vllm_frontier/moe/compat.py:\n" + "\n".join(problems)


def test_check_reports_a_changed_signature(monkeypatch):
    pytest.importorskip("vllm")
    import vllm_frontier.moe.compat as compat

    module, qualname, params = PINNED[0]
    monkeypatch.setattr(compat, "PINNED", [(module, qualname, params + ("extra",))])
    assert len(compat.check_vllm_moe_api()) == 1
    monkeypatch.setattr(compat, "PINNED", [(module, "NoSuchClass.method", None)])
    assert "missing" in compat.check_vllm_moe_api()[0]


def test_moe_core_imports_no_vllm():
    """The EP layer, dispatch, shuffle and placement code stay free of vLLM."""
    import ast
    import pathlib

    import vllm_frontier.moe as pkg

    root = pathlib.Path(pkg.__file__).parent
    for name in ("ep_layer", "dispatch", "shuffle", "placement", "pregroup", "experts", "routing",
                 "reference", "traces", "launch", "relocate", "settings"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            assert not any(m == "vllm" or m.startswith("vllm.") for m in mods), (name, mods)


def test_check_reports_a_changed_behaviour(monkeypatch):
    pytest.importorskip("vllm")
    import vllm_frontier.moe.compat as compat

    module, qualname, _ = compat.PINNED_SOURCE[0]
    monkeypatch.setattr(compat, "PINNED", [])
    monkeypatch.setattr(compat, "PINNED_SOURCE", [(module, qualname, "text that is not there")])
    assert "no longer contains" in compat.check_vllm_moe_api()[0]
