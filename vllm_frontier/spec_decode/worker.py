"""Worker classes that install `SkippingMTPProposer` as the model runner's drafter (vLLM's `--worker-cls`).

vLLM builds the MTP drafter (`EagleProposer`) in the model runner's constructor, which the worker calls in
`init_device`; the drafter is loaded later (`load_model`) and its attention backend set up after that. So
replacing `runner.drafter` right after `init_device` puts our proposer through vLLM's whole drafter life
cycle. One class per vLLM worker we extend (CPU, GPU); `update_vllm_config` picks the one matching the
platform's worker. `frontier_mtp_counters` answers `LLM.collective_rpc` (tests, benchmarks).
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


class _MTPWorkerMixin:
    def init_device(self):
        super().init_device()
        install_proposer(self.model_runner)

    def frontier_mtp_counters(self) -> dict | None:
        """The proposer's counters (skipped steps, catch-up passes...), or None without our proposer."""
        drafter = getattr(self.model_runner, "drafter", None)
        return dict(drafter.counters) if hasattr(drafter, "counters") else None


class CPUMTPWorker(_MTPWorkerMixin, compat.worker_base_cls("cpu")):
    """vLLM's CPU worker with `SkippingMTPProposer`."""


class GPUMTPWorker(_MTPWorkerMixin, compat.worker_base_cls("gpu")):
    """vLLM's GPU worker with `SkippingMTPProposer`."""


WORKER_CLS = {"cpu": f"{__name__}.CPUMTPWorker", "gpu": f"{__name__}.GPUMTPWorker"}
