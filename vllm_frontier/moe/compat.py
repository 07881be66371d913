"""The vLLM 0.32 MoE pieces the speculative-MoE adapter relies on, pinned.

Some are private (``_init_moe_kernel``, ``FusedMoEKernel``'s constructor); all are
checked by :func:`check_vllm_moe_api` (run by ``tests/moe/test_moe_vllm_compat.py``), so a
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
        "UnquantizedFusedMoEMethod._init_moe_kernel",
        ("self", "layer"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "UnquantizedFusedMoEMethod.apply",
        ("self", "layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "UnquantizedFusedMoEMethod.register_oot",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.modular_kernel",
        "FusedMoEKernel.__init__",
        ("self", "prepare_finalize", "fused_experts"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.modular_kernel",
        "FusedMoEPrepareAndFinalizeModular.prepare",
        ("self", "a1", "topk_weights", "topk_ids", "num_experts", "expert_map",
         "apply_router_weight_on_input", "quant_config", "defer_input_quant"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.modular_kernel",
        "FusedMoEPrepareAndFinalizeModular.finalize",
        ("self", "output", "fused_expert_output", "topk_weights", "topk_ids",
         "apply_router_weight_on_input", "weight_and_reduce_impl"),
    ),
    (
        "vllm.model_executor.layers.fused_moe.fused_moe_method_base",
        "FusedMoEMethodBase.supports_internal_mk",
        None,
    ),
    (
        "vllm.model_executor.layers.fused_moe.runner.moe_runner",
        "MoERunner.do_naive_dispatch_combine",
        None,
    ),
]


def _resolve(module: str, qualname: str):
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def check_vllm_moe_api() -> list[str]:
    """Compare the installed vLLM with :data:`PINNED`; return one line per mismatch (empty = OK)."""
    problems = []
    for module, qualname, params in PINNED:
        try:
            obj = _resolve(module, qualname)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{qualname}: missing ({exc})")
            continue
        if params is None:
            continue
        fn = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            problems.append(f"{module}.{qualname}: parameters {got}, pinned {params}")
    return problems
