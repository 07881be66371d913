"""The embedded default model: a trained tiny DeepSeek-V3.2-architecture checkpoint shipped as package data.

Two HF views of the same weights (written by ``vllm-frontier train-tiny``, layout in ``export.py``):

- ``"v32"``: ``DeepseekV32ForCausalLM`` with the lightning indexer (``index_topk`` 64) and one MTP layer;
  vLLM on CPU serves it with the project's DSA backend (``FRONTIER_DSA=1`` / ``--plugin dsa``).
- ``"v3"``: ``DeepseekV3ForCausalLM`` + MTP, dense MLA, no indexer: plain vLLM serves it.
"""

from __future__ import annotations

from pathlib import Path

VIEWS = ("v32", "v3")
_ROOT = Path(__file__).with_name("embedded")


def embedded_model_path(view: str = "v32") -> Path:
    """Directory of the shipped checkpoint ``view`` ("v32" or "v3"), inside the installed package."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    path = _ROOT / view
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded checkpoint is missing at {path}; "
                                "rebuild it with `vllm-frontier train-tiny` (about 20-45 minutes on 2 cores)")
    return path
