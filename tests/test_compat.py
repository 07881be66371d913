"""Pins: every vLLM internal vllm-frontier relies on still exists with the same signature and behaviour,
every vLLM name the package imports still resolves, and the version check says what to do."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import vllm_frontier
from vllm_frontier import compat

PKG = pathlib.Path(vllm_frontier.__file__).parent


def test_pinned_vllm_internals_unchanged():
    problems = compat.check_vllm_api()
    assert problems == [], "vLLM internals changed; update vllm_frontier/compat.py:\n" + "\n".join(problems)


def test_check_reports_a_changed_signature_a_missing_object_and_a_changed_behaviour(monkeypatch):
    module, qualname, params = compat.PINNED[0]
    monkeypatch.setattr(compat, "PINNED_SOURCE", [])
    monkeypatch.setattr(compat, "PINNED", [(module, qualname, params + ("extra",))])
    assert len(compat.check_vllm_api()) == 1
    monkeypatch.setattr(compat, "PINNED", [(module, "NoSuchClass.method", None)])
    assert "missing" in compat.check_vllm_api()[0]
    module, qualname, _ = compat.PINNED_SOURCE[0] if compat.PINNED_SOURCE else ("vllm.config", "VllmConfig", "")
    monkeypatch.setattr(compat, "PINNED", [])
    monkeypatch.setattr(compat, "PINNED_SOURCE", [("vllm.v1.core.sched.scheduler", "Scheduler.schedule",
                                                   "text that is not there")])
    assert "no longer contains" in compat.check_vllm_api()[0]
    monkeypatch.setattr(compat, "PINNED_SOURCE", [])
    monkeypatch.setattr(compat, "PINNED_FIELDS", ("no_such_field",))
    assert "field no_such_field missing" in compat.check_vllm_api()[0]


def _vllm_imports():
    """(file, module, name) for every `from vllm... import name` in the package."""
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module == "vllm" or node.module.startswith("vllm.")):
                for alias in node.names:
                    yield path.relative_to(PKG), node.module, alias.name


def test_every_vllm_name_the_package_imports_resolves():
    seen = list(_vllm_imports())
    assert len(seen) > 30  # the scan finds the adapters' imports
    missing = []
    for path, module, name in seen:
        if module == "vllm.platforms.cuda" and not _has_cuda():
            continue  # imports vLLM's CUDA extension, absent from the CPU build; covered where CUDA runs
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path}: from {module} import {name}")
    assert missing == []


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.4", True),
                                        ("0.31.9", False), ("0.33.0", False), ("1.0.0", False)])
def test_version_check_names_the_supported_range(version, ok):
    problem = compat.version_problem(version)
    assert (problem is None) is ok
    if not ok:
        assert "0.32.0" in problem and "0.33.0" in problem and version in problem and "pip install" in problem


def test_installed_vllm_is_supported():
    import vllm

    assert compat.version_problem(vllm.__version__) is None


def test_feature_packages_do_not_import_the_registration_layer():
    for pkg in ("attention_backends", "quantization", "moe", "spec_decode", "kv_connectors", "kernels",
                "schedulers", "models"):
        for path in (PKG / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(m.startswith("vllm_frontier.plugins") for m in mods), (path, mods)
