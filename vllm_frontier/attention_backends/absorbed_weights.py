"""Contiguous absorbed up-projections for vLLM's MLA layer.

vLLM's `MLAAttention.process_weights_after_loading` (it runs after the backend's own) keeps ``W_UK_T``
``[N, P, L]`` and ``W_UV`` ``[N, L, V]`` as strided views of the split ``kv_b_proj`` weight: per head, a batch
stride of ``(P + V) * L``. On CPU `torch.bmm` cannot read such a bf16 batch in place, so every decode step
copies both weights of every layer (2 x 512 KiB per layer and step for a 4-head bf16 model; more with more heads).
Our backends make them contiguous once, on their first forward: the same values, one copy instead of one per step.
"""

from __future__ import annotations

import torch

ABSORBED = ("W_UK_T", "W_UV")


def make_absorbed_weights_contiguous(layer: torch.nn.Module) -> None:
    """Replace the layer's strided ``W_UK_T`` / ``W_UV`` by contiguous copies (no-op where they are already)."""
    for name in ABSORBED:
        w = getattr(layer, name, None)
        if isinstance(w, torch.Tensor) and not w.is_contiguous():
            setattr(layer, name, torch.nn.Parameter(w.contiguous(), requires_grad=False))
