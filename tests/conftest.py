"""Shared fixtures: tiny checkpoints made once per session by the project's factory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serving.py

# Triton decides at decoration time (its own `tl.cdiv`, ... included, when triton is first imported) whether
# kernels run under the interpreter, so on a machine without CUDA the flag is set here, before any test module
# imports triton: test folders are collected in name order and `attention_backends/` imports the kernels before
# `kernels/conftest.py` could set it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must not inherit feature toggles from the shell that runs them.
for _k in [k for k in os.environ if k.startswith("FRONTIER_")]:
    del os.environ[_k]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: tiny_models(arch, mtp_layers=0, dtype='float32', **overrides) -> Path, cached per session."""
    from vllm_frontier.models.tiny_factory import make_tiny_model

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str, mtp_layers: int = 0, dtype: str = "float32", **overrides) -> Path:
        key = (arch, mtp_layers, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{arch}-mtp{mtp_layers}-{dtype}-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
            cache[key] = make_tiny_model(arch, root / name, mtp_layers=mtp_layers, dtype=dtype, **overrides)
        return cache[key]

    return get
