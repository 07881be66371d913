"""vLLM side of the speculative EP MoE: NOT IMPLEMENTED YET.

The planned integration (see the report in the issue and ``compat.py`` for the pinned
pieces): an ``UnquantizedFusedMoEMethod.register_oot`` subclass whose ``apply`` runs
:func:`vllm_frontier.moe.dispatch.dispatch` / ``combine`` over the EP group's gloo/NCCL
group with the layer's local expert weights, and whose ``moe_kernel`` is set (through the
pinned ``_init_moe_kernel`` / ``FusedMoEKernel``) so vLLM's runner skips its naive
all-gather dispatch (which raises on CPU).  Until that exists and is tested end to end,
switching the feature on fails loudly instead of running stock vLLM's broken CPU EP path.
"""

from __future__ import annotations


def register() -> None:
    """Refuse to enable FRONTIER_SPEC_MOE inside vLLM (the adapter is not built yet)."""
    raise NotImplementedError(
        "FRONTIER_SPEC_MOE / --plugin spec_moe: the vLLM integration of the speculative EP MoE "
        "is not implemented yet. Unset the toggle; the standalone EP layer "
        "(vllm_frontier.moe.ep_layer) and benchmarks/spec_moe.py work without vLLM."
    )
