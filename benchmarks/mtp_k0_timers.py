"""Benchmark-only worker and scheduler classes that time, per engine step, what an MTP engine pinned at k = 0
adds to a plain step (`benchmarks/mtp_k0_overhead.py`).

Each wrapper records wall times (`time.perf_counter`, no profiler) of one layer and of the layer below it, so
that their difference is the layer's own work:
- worker: `execute_model` / `sample_tokens` of the worker class (ours: `CPUMTPWorker`, which hides the
  speculative config for a plain step; vLLM's `CPUWorker` for the plain engine) and of vLLM's model runner
  underneath, and `SkippingMTPProposer.keep_plain_step`;
- scheduler: `schedule` / `update_from_output` of the scheduler class (`PinnedDraftScheduler` or vLLM's
  `Scheduler`) and of vLLM's `Scheduler` methods underneath.
Medians per step go to the file named by `FRONTIER_BENCH_K0_TIMERS` (JSON lines) when the engine becomes idle
(scheduler) or on `collective_rpc("k0_timers")` (worker). `benchmarks/` must be on the engine's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler
from vllm_frontier.spec_decode.worker import CPUMTPWorker

OUT_ENV = "FRONTIER_BENCH_K0_TIMERS"


def _medians_us(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(1e6 * statistics.median(v), 1) for k, v in samples.items() if v}


def _timed(fn, samples: list[float]):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        samples.append(time.perf_counter() - t)
        return out
    return wrapper


class _WorkerTimers:
    def _timers(self) -> dict[str, list[float]]:
        got = self.__dict__.get("_k0_timers")
        if got is None:   # the runner and drafter exist once the device is up; the first step installs them
            got = self._k0_timers = {"worker_execute": [], "worker_sample": [], "runner_execute": [],
                                     "runner_sample": [], "keep_plain_step": []}
            runner = self.model_runner
            runner.execute_model = _timed(runner.execute_model, got["runner_execute"])
            runner.sample_tokens = _timed(runner.sample_tokens, got["runner_sample"])
            drafter = getattr(runner, "drafter", None)
            if hasattr(drafter, "keep_plain_step"):
                drafter.keep_plain_step = _timed(drafter.keep_plain_step, got["keep_plain_step"])
        return got

    def execute_model(self, scheduler_output):
        timers = self._timers()
        return _timed(super().execute_model, timers["worker_execute"])(scheduler_output)

    def sample_tokens(self, grammar_output):
        return _timed(super().sample_tokens, self._timers()["worker_sample"])(grammar_output)

    def k0_timers(self) -> dict[str, float]:
        """Medians (us) since the last call; the samples are cleared."""
        timers = self._timers()
        out = _medians_us(timers)
        for v in timers.values():
            v.clear()
        return out


class PlainTimedWorker(_WorkerTimers, CPUWorker):
    """vLLM's CPU worker, timed."""


class MTPTimedWorker(_WorkerTimers, CPUMTPWorker):
    """`CPUMTPWorker`, timed."""


class _SchedulerTimers:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._k0_timers = {"scheduler_schedule": [], "scheduler_update": [], "vllm_schedule": [],
                           "vllm_update": []}

    def schedule(self, *args, **kwargs):
        out = _timed(super().schedule, self._k0_timers["scheduler_schedule"])(*args, **kwargs)
        if not out.total_num_scheduled_tokens:
            # a step that runs nothing (the engine core steps once more as a busy period ends) is not a decode
            # step: its pin read after idle would enter a busy period of one step as that period's median
            self._k0_timers["scheduler_schedule"].pop()
            self._k0_timers["vllm_schedule"].pop()
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        out = _timed(super().update_from_output, self._k0_timers["scheduler_update"])(
            scheduler_output, model_runner_output)
        if not scheduler_output.total_num_scheduled_tokens:
            self._k0_timers["scheduler_update"].pop()
            self._k0_timers["vllm_update"].pop()
        if not self.running and not self.waiting and os.environ.get(OUT_ENV) and self._k0_timers["scheduler_update"]:
            with open(os.environ[OUT_ENV], "a") as f:
                f.write(json.dumps(_medians_us(self._k0_timers)) + "\n")
            for v in self._k0_timers.values():
                v.clear()
        return out


_vllm_schedule, _vllm_update = Scheduler.schedule, Scheduler.update_from_output


def _vllm_schedule_timed(self, *args, **kwargs):
    return _timed(_vllm_schedule, self._k0_timers["vllm_schedule"])(self, *args, **kwargs)


def _vllm_update_timed(self, *args, **kwargs):
    return _timed(_vllm_update, self._k0_timers["vllm_update"])(self, *args, **kwargs)


class PlainTimedScheduler(_SchedulerTimers, Scheduler):
    """vLLM's scheduler, timed."""


class MTPTimedScheduler(_SchedulerTimers, PinnedDraftScheduler):
    """`PinnedDraftScheduler`, timed. `FRONTIER_BENCH_PIN_CHECK_EVERY` (seconds) overrides how often it reads the
    pin file while busy (0: every step, as before the interval: shows what one file read per step costs)."""

    pin_check_every = float(os.environ.get("FRONTIER_BENCH_PIN_CHECK_EVERY", PinnedDraftScheduler.pin_check_every))


# vLLM's own methods, timed underneath either class (both reach them through super()); patched in the engine
# core process only, which imports this module for its scheduler class
Scheduler.schedule = _vllm_schedule_timed
Scheduler.update_from_output = _vllm_update_timed
