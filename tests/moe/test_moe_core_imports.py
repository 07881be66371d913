"""The EP core of the speculative MoE stays free of vLLM."""

from __future__ import annotations


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
