"""Every vLLM 0.32 internal the MTP code reaches, in one place, pinned.

Public in vLLM: the scheduler class option (`--scheduler-cls`), the worker class option (`--worker-cls`),
`SchedulerOutput.num_spec_tokens_to_schedule`. Private (no stability promise), used here only:
- the scheduler's `dynamic_sd_lookup` table (k per batch size) that `AdaptiveDraftScheduler` rewrites;
- the model runner's `drafter` attribute (built in `GPUModelRunner.__init__`, which `CPUModelRunner`
  inherits) and `EagleProposer`, the MTP proposer our `SkippingMTPProposer` subclasses: its `propose`
  signature, the first-pass helpers it calls (`build_per_group_and_layer_attn_metadata`,
  `_determine_batch_execution_and_padding`, `build_model_inputs_first_pass`, `_get_slot_mapping`), its
  input buffers (`input_ids`, `positions`, `hidden_states`) and `block_size`;
- `CommonAttentionMetadata`'s fields and `set_forward_context`;
- the runner's `input_batch.req_ids` and `requests`.

:func:`check_vllm_spec_decode_api` compares the installed vLLM with these pins (run by
``tests/spec_decode/test_spec_decode_vllm_compat.py``), so an upgrade that changes them fails loudly instead of
silently running the drafter with stale inputs. Imports vLLM only inside the functions.
"""

from __future__ import annotations

import inspect

PINNED_VLLM = "0.32"

_EAGLE = "vllm.v1.spec_decode.eagle"
_BASE = "vllm.v1.spec_decode.llm_base_proposer"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SCHED = "vllm.v1.core.sched.scheduler"

# (module, qualified attribute, expected parameter names in order, or None = must exist)
PINNED: list[tuple[str, str, tuple[str, ...] | None]] = [
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
]

# Behaviour relied on, checked in the source of these functions.
PINNED_SOURCE: list[tuple[str, str, str]] = [
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
    # the CPU model runner loads the drafter after the target (runner.drafter at load time)
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "self.drafter.load_model(self.model)"),
]

# CommonAttentionMetadata fields the catch-up pass sets.
PINNED_FIELDS = ("query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
                 "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
                 "seq_lens_cpu_upper_bound")


def eagle_proposer_cls():
    """vLLM's MTP/EAGLE proposer class (the base of `SkippingMTPProposer`)."""
    from vllm.v1.spec_decode.eagle import EagleProposer

    return EagleProposer


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


def _resolve(module: str, qualname: str):
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def _check_one(module: str, qualname: str, params: tuple[str, ...] | None, needle: str | None) -> str | None:
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


def check_vllm_spec_decode_api() -> list[str]:
    """Compare the installed vLLM with the pins above; one line per mismatch (empty: all hold)."""
    checks = [(m, q, p, None) for m, q, p in PINNED] + [(m, q, None, n) for m, q, n in PINNED_SOURCE]
    problems = [problem for c in checks if (problem := _check_one(*c)) is not None]
    try:
        import dataclasses

        from vllm.v1.attention.backend import CommonAttentionMetadata

        have = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
        problems += [f"CommonAttentionMetadata: field {f} missing" for f in PINNED_FIELDS if f not in have]
    except ImportError as exc:
        problems.append(f"vllm.v1.attention.backend.CommonAttentionMetadata: missing ({exc})")
    return problems
