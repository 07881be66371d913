"""The vLLM 0.32 MoE pieces the speculative-MoE adapter relies on, pinned.

Some are private (the runner's ``do_naive_dispatch_combine`` rule, the method's
``supports_internal_mk``); all are checked by :func:`check_vllm_moe_api` (run by ``tests/moe/test_moe_vllm_compat.py``), so a
vLLM upgrade that changes them fails loudly instead of silently mis-routing tokens.
Imports vLLM only inside the functions.
"""

from __future__ import annotations

import inspect

PINNED_VLLM = "0.32"

# (module, qualified attribute, expected parameter names in order, or None = must exist)
PINNED: list[tuple[str, str, tuple[str, ...] | None]] = [
    (
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "UnquantizedFusedMoEMethod.apply",
        ("self", "layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "UnquantizedFusedMoEMethod.process_weights_after_loading",
        ("self", "layer"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "UnquantizedFusedMoEMethod.register_oot",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.fused_moe_method_base",
        "FusedMoEMethodBase.supports_internal_mk",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.fused_moe_method_base",
        "FusedMoEMethodBase.is_monolithic",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.runner.moe_runner",
        "MoERunner.do_naive_dispatch_combine",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.routed_experts",
        "RoutedExperts.expert_map",
        None,
    ),
]

# Behaviour the adapter relies on, checked in the source of these functions: the runner skips its naive
# all-gather dispatch (which raises on gloo) when the method says it supports the internal modular kernel,
# and all-reduces the MoE output over the TP group when EP is on (which re-replicates our TP rows).
PINNED_SOURCE: list[tuple[str, str, str]] = [
    ("vllm.model_executor.layers.fused_moe.runner.moe_runner", "MoERunner.do_naive_dispatch_combine",
     "not self._quant_method.supports_internal_mk"),
    ("vllm.model_executor.layers.fused_moe.runner.moe_runner", "MoERunner._maybe_reduce_final_output",
     "tensor_model_parallel_all_reduce(states)"),
    ("vllm.model_executor.layers.fused_moe.routed_experts", "RoutedExperts.forward_modular",
     "self.quant_method.apply("),
    ("vllm.distributed.parallel_state", "GroupCoordinator.__init__", "self.cpu_group = "),
]


def _resolve(module: str, qualname: str):
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def _check_one(module: str, qualname: str, params: tuple[str, ...] | None, needle: str | None) -> str | None:
    """One pin: the object exists, has these parameters (if given), its source has ``needle`` (if given)."""
    try:
        obj = _resolve(module, qualname)
    except (ImportError, AttributeError) as exc:
        return f"{module}.{qualname}: missing ({exc})"
    if params is not None:
        fn = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            return f"{module}.{qualname}: parameters {got}, pinned {params}"
    if needle is not None:
        fn = obj.fget if isinstance(obj, property) else obj
        if needle not in inspect.getsource(fn):
            return f"{module}.{qualname}: no longer contains {needle!r}"
    return None


def check_vllm_moe_api() -> list[str]:
    """Compare the installed vLLM with :data:`PINNED` and :data:`PINNED_SOURCE`; one line per mismatch."""
    checks = [(m, q, p, None) for m, q, p in PINNED] + [(m, q, None, n) for m, q, n in PINNED_SOURCE]
    return [problem for c in checks if (problem := _check_one(*c)) is not None]
