"""Benchmark-only schedulers that log the wall time of every engine step (`benchmarks/mtp.py`).

A step is timed from its `schedule()` to the next one (the model runner, the post-step draft round trip,
the engine loop; an interval that ends in an idle engine is dropped), as `AdaptiveDraftScheduler` times
the steps its rule learns from. When the engine becomes idle the log is written, as JSON lines of [scheduled
requests, k, seconds] (k = -1: a step that is not decode-only: prompt tokens, or a request's first token),
to the file named by `FRONTIER_BENCH_STEP_LOG` (appended; the benchmark reads and removes it after each
run), followed in the MTP engine by one line {"stats": ...} with the scheduler's counters (`stats()`): both
engines then make the same one file write when they become idle (with `FRONTIER_MTP_STATS` the MTP engine would
make a second one, each system call there waiting for the GIL in the engine core). The median decode step of a
run is robust to the CPU hiccups that move a run's total.

    StepLogScheduler          vLLM's scheduler (the plain engine)
    PinnedStepLogScheduler    `PinnedDraftScheduler` (the MTP engine)

The engine core imports them by qualified name (`mtp_step_log.StepLogScheduler`): `benchmarks/` must be on
the engine's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import time

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

LOG_ENV = "FRONTIER_BENCH_STEP_LOG"


class _StepLog:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log_path = os.environ.get(LOG_ENV) or None
        self._log: list[tuple[int, int, float]] = []
        self._log_pending: tuple[float, int, int] | None = None

    def schedule(self, *args, **kwargs):
        start = time.perf_counter()
        if self._log_pending is not None:
            t0, batch, k = self._log_pending
            self._log.append((batch, k, start - t0))
            self._log_pending = None
        out = super().schedule(*args, **kwargs)
        if out.num_scheduled_tokens:
            decode_only = all(
                n == 1 + len(out.scheduled_spec_decode_tokens.get(rid, ())) and rid in self.requests
                and self.requests[rid].num_output_tokens > 0
                for rid, n in out.num_scheduled_tokens.items())
            # k = -1: a step with prompt tokens or a request's first output token
            k = out.num_spec_tokens_to_schedule if decode_only else -1
            self._log_pending = (start, len(out.num_scheduled_tokens), k)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        if not self.running and not self.waiting:
            self._log_pending = None
            stats = self.stats() if self._log_path and getattr(self, "_policy", None) is not None else None
            if self._log_path and (self._log or stats):
                with open(self._log_path, "a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in self._log)
                    if stats:
                        f.write(json.dumps({"stats": stats}) + "\n")
                self._log.clear()
        return result


class StepLogScheduler(_StepLog, Scheduler):
    """vLLM's scheduler, logging decode-only step times."""


class PinnedStepLogScheduler(_StepLog, PinnedDraftScheduler):
    """`PinnedDraftScheduler`, logging decode-only step times."""


def read_log(path) -> tuple[list[tuple[int, int, float]], dict | None]:
    """The steps logged since the last read and the MTP scheduler's latest counters among them, or None (the
    file is removed)."""
    rows, stats = [], None
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    got = json.loads(line)
                    if isinstance(got, dict):
                        stats = got["stats"]
                    else:
                        rows.append(tuple(got))
    except FileNotFoundError:
        return [], None
    os.remove(path)
    return rows, stats


class PeriodPinnedStepLogScheduler(PinnedStepLogScheduler):
    """`PinnedStepLogScheduler` whose pin cycle restarts at every busy period: entry j is the k of the period's
    (j + 1)-th step, so a pin puts a drafting step at a chosen step of a run (`benchmarks/mtp_probe_cost.py`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._period_start = 0

    def became_idle(self) -> None:
        super().became_idle()
        self._period_start = self._step

    def pin_index(self) -> int:
        return self._step - self._period_start - 1
