"""Worker classes that install `SkippingMTPProposer` as the model runner's drafter (vLLM's `--worker-cls`).

vLLM builds the MTP drafter (`EagleProposer`) in the model runner's constructor, which the worker calls in
`init_device`; the drafter is loaded later (`load_model`) and its attention backend set up after that. So
replacing `runner.drafter` right after `init_device` puts our proposer through vLLM's whole drafter life
cycle. One class per vLLM worker we extend (CPU, GPU); `update_vllm_config` picks the one matching the
platform's worker. `frontier_mtp_counters` answers `LLM.collective_rpc` (tests, benchmarks).

A step that drafts nothing and verifies nothing (the scheduler's k = 0, no drafts scheduled) runs as a plain
step: the worker hides the speculative config from the model runner for that step's `execute_model` and
`sample_tokens`, so vLLM's runner takes its non-speculative path (no speculative-decoding metadata, the plain
sampler instead of the rejection sampler with zero drafts, no drafter call), and vLLM's DSA indexer metadata
builders their layout without speculation (one query row per decode instead of flattened rows). Such a step
then costs what it costs in an engine without MTP; the proposer keeps the step's drafter inputs for the catch-up pass
(`SkippingMTPProposer.keep_plain_step`). vLLM's model runner reads `speculative_config` per step in those two
calls (pinned in `compat`).
"""

from __future__ import annotations

import logging

from vllm_frontier import compat

logger = logging.getLogger("vllm.frontier.spec_decode")


def install_proposer(runner) -> bool:
    """Put `SkippingMTPProposer` in place of an MTP runner's `EagleProposer`; returns whether it did."""
    drafter = getattr(runner, "drafter", None)
    spec = runner.vllm_config.speculative_config
    if drafter is None or spec is None or spec.method != "mtp" or type(drafter) is not compat.eagle_proposer_cls():
        return False
    if runner.vllm_config.parallel_config.data_parallel_size > 1:
        # each DP rank's scheduler picks its own k; a rank skipping the drafter's collectives would hang the rest
        logger.info("vllm-frontier: MTP keeps vLLM's drafter under data parallelism (no skipped drafter passes)")
        return False
    from .proposer import SkippingMTPProposer

    runner.drafter = SkippingMTPProposer(runner.vllm_config, runner.device, runner)
    logger.info("vllm-frontier: MTP drafter skips steps that draft nothing and catches up when drafting resumes")
    return True


def plain_step(scheduler_output) -> bool:
    """Whether a step neither drafts (k = 0) nor verifies drafts, so that it can run as a plain step."""
    return (scheduler_output.total_num_scheduled_tokens > 0 and scheduler_output.num_spec_tokens_to_schedule == 0
            and not scheduler_output.scheduled_spec_decode_tokens)


class _MTPWorkerMixin:
    _plain = False   # the step in flight runs without speculation (set by execute_model, read by sample_tokens)

    def init_device(self):
        super().init_device()
        install_proposer(self.model_runner)

    def execute_model(self, scheduler_output):
        runner = self.model_runner
        drafter = getattr(runner, "drafter", None)
        self._plain = (hasattr(drafter, "keep_plain_step") and plain_step(scheduler_output)
                       and drafter.fits_plain_step(scheduler_output.total_num_scheduled_tokens))
        if not self._plain:
            return super().execute_model(scheduler_output)
        with self._without_speculation():
            return super().execute_model(scheduler_output)

    def _without_speculation(self) -> compat.without_speculation:
        """The context a plain step's two calls run in (one object, made at the first plain step: the attention
        groups exist once the KV cache is set up, before any step)."""
        hidden = self.__dict__.get("_no_speculation")
        if hidden is None:
            runner = self.model_runner
            hidden = self._no_speculation = compat.without_speculation(
                runner, compat.speculation_free_builders(runner))
        return hidden

    def sample_tokens(self, grammar_output):
        if not self._plain:
            return super().sample_tokens(grammar_output)
        self._plain = False
        runner = self.model_runner
        state = runner.execute_model_state
        with self._without_speculation():
            output = super().sample_tokens(grammar_output)
        if state is not None:
            runner.drafter.keep_plain_step(state, output)
        return output

    def frontier_mtp_counters(self) -> dict | None:
        """The proposer's counters (skipped steps, catch-up passes...), or None without our proposer."""
        drafter = getattr(self.model_runner, "drafter", None)
        return dict(drafter.counters) if hasattr(drafter, "counters") else None


class CPUMTPWorker(_MTPWorkerMixin, compat.worker_base_cls("cpu")):
    """vLLM's CPU worker with `SkippingMTPProposer`."""


class GPUMTPWorker(_MTPWorkerMixin, compat.worker_base_cls("gpu")):
    """vLLM's GPU worker with `SkippingMTPProposer`."""


WORKER_CLS = {"cpu": f"{__name__}.CPUMTPWorker", "gpu": f"{__name__}.GPUMTPWorker"}
