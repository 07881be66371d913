"""`AdaptiveDraftScheduler`: vLLM's V1 scheduler with the draft length chosen per step (see `policy`).

vLLM 0.32 already carries a per-step draft length from the scheduler to the drafter: the scheduler puts
`num_spec_tokens_to_schedule` into every `SchedulerOutput` (from its `dynamic_sd_lookup` table, indexed by
the step's batch size; vLLM fills it from the static `num_speculative_tokens_per_batch_size` option), and the
V1 model runner passes it to `EagleProposer.propose(num_speculative_tokens=...)`, which drafts that many
tokens (0 included). This subclass, installed with vLLM's `--scheduler-cls` option, rewrites that table
from the measured acceptance and step times (each decode-only step timed from its `schedule()` to the next
one), and trims drafts made under a larger k before they are verified. It changes nothing else:
verification is vLLM's rejection sampler, so outputs are those of the target model (greedy: identical
token ids).

`PinnedDraftScheduler` (benchmarks, tests, operators): k follows a pin, `adaptive`, a fixed `k`, or a cycle
`3,0,1,2` (one entry per step), carried by the requests of a busy period (`SamplingParams.extra_args`
`{"frontier_mtp_pin": ...}`, read from memory at its first step) or else by a small text file named by
`FRONTIER_MTP_PIN_FILE`, read at the first step after the engine was idle and every 0.5 s while it is busy.
One MTP engine then serves adaptive and fixed-k runs side by side; pinned steps teach the rule nothing.

Counters (cumulative, for benchmarks): `stats()`; with `FRONTIER_MTP_STATS=/path.json` they are also written
to that file (atomically) whenever the scheduler becomes idle and at most every 2 s while busy. Acceptance is
also counted by the drafting run the drafts came from (`run_reached_per_pos[r]`, `run_accepted_per_pos[r]`:
drafts made in the (r + 1)-th consecutive drafting step, the last entry for that run length and more), so
the first drafts after a pause (r = 0) can be compared with steady drafting.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path

from vllm.v1.core.sched.scheduler import Scheduler

from .policy import DraftLengthPolicy, PolicyConfig

logger = logging.getLogger("vllm.frontier.spec_decode")

STATS_ENV = "FRONTIER_MTP_STATS"
PIN_ENV = "FRONTIER_MTP_PIN_FILE"
# a request's `SamplingParams.extra_args` key carrying a pin (`PinnedDraftScheduler`): no file, no system call
REQUEST_PIN_KEY = "frontier_mtp_pin"
RUN_BUCKETS = 4   # drafting-run lengths counted apart: 1, 2, 3, >= 4 consecutive drafting steps


def drafter_skips(vllm_config) -> bool:
    """Whether the workers run `SkippingMTPProposer` (k = 0 steps run no drafter), read from the config."""
    from . import WORKER_CLS

    parallel = vllm_config.parallel_config
    return parallel.worker_cls in WORKER_CLS.values() and parallel.data_parallel_size == 1


def draft_cost_ratio(hf_config) -> float:
    """rho: one MTP module (one decoder layer) per `num_hidden_layers` target layers."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    layers = getattr(text, "num_hidden_layers", None) or 1
    return 1.0 / layers


class AdaptiveDraftScheduler(Scheduler):
    """Scheduler whose per-step draft length follows `DraftLengthPolicy` (MTP only; else plain vLLM)."""

    # Steps between table refreshes when nothing the rule reads has moved but the step costs (they move a little
    # every step); new acceptance outcomes refresh it after `refresh_stale_every` steps (one step's outcomes
    # barely move the estimates). The table costs 0.07-0.15 ms (Python, vLLM CPU host), 1-3 % of a small model's
    # CPU step.
    refresh_every = 16
    refresh_stale_every = 4
    # While the rule is quiet (`DraftLengthPolicy.quiet_until`), the steps before its next probe from which it
    # times steps again: the probe's drafting steps are priced against the plain steps just before them (the
    # last 8 of their bucket) and the k = 0 cell keeps `cell_window` (32) fresh times.
    quiet_lead = 32

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        spec = self.vllm_config.speculative_config
        self._policy: DraftLengthPolicy | None = None
        if spec is None or spec.method != "mtp" or self.num_spec_tokens <= 0:
            logger.info("vllm-frontier: adaptive draft length inactive (speculative method %s)",
                        None if spec is None else spec.method)
            return
        rho = draft_cost_ratio(self.vllm_config.model_config.hf_config)
        self._skips = drafter_skips(self.vllm_config)
        self._policy = DraftLengthPolicy(self.policy_config(self.num_spec_tokens, rho))
        self._table = self._policy.table(self.max_num_running_reqs)   # the rule's k per batch size
        self.dynamic_sd_lookup = self._table
        self._step = 0
        # the rule's own steps (those it chose k for: not pinned ones), its clock for probe intervals and the
        # acceptance window, so that steps it did not decide neither age what it learned nor count as time
        # since its last probe
        self._rule_step = 0
        self._refreshed_at = 0
        self._stale = False    # acceptance outcomes arrived since the table was computed
        self._quiet_until = 0  # the rule step before which the rule skips its per-step work (0: not quiet)
        # the last decode-only step (start time, batch, token units, k), timed until the next step starts
        self._pending: tuple[float, int, float, int] | None = None
        self._run = 0          # consecutive drafting steps up to the last scheduled one
        self._may_hold_drafts = True   # a running request may hold drafts (none since a trim to k = 0)
        # per request of the last drafting step, its computed tokens after that step: the drafter's KV covers
        # them (the catch-up pass of a drafting step replays everything before); `replay_per_request`
        self._drafted_upto: dict[str, int] = {}
        self._verify_run = 0   # the drafting run of the step whose drafts this step verifies
        self._stats_path = os.environ.get(STATS_ENV) or None
        self._last_write = 0.0
        self._counts = {
            "steps": 0, "decode_request_steps": 0, "decode_tokens": 0,
            "reached_per_pos": [0] * self.num_spec_tokens, "accepted_per_pos": [0] * self.num_spec_tokens,
            "k_histogram": [0] * (self.num_spec_tokens + 1), "draft_tokens_verified": 0, "quiet_steps": 0,
            "run_reached_per_pos": [[0] * self.num_spec_tokens for _ in range(RUN_BUCKETS)],
            "run_accepted_per_pos": [[0] * self.num_spec_tokens for _ in range(RUN_BUCKETS)],
        }
        logger.info("vllm-frontier: adaptive MTP draft length, k in [0, %d], rho %.3f, drafter skipped at k = 0: %s",
                    self.num_spec_tokens, rho, self._skips)

    def policy_config(self, max_k: int, rho: float) -> PolicyConfig:
        """The rule's parameters (a subclass may override)."""
        return PolicyConfig(max_k=max_k, draft_cost=rho, drafter_skips=self._skips)

    def choose_table(self) -> list[int]:
        """k per batch size for the coming step (a subclass may override, e.g. tests forcing a pattern)."""
        assert self._policy is not None
        return self._policy.table(self.max_num_running_reqs)

    def table_due(self) -> bool:
        """Whether this step recomputes the table: new acceptance outcomes, else every `refresh_every` steps;
        never while the rule is quiet."""
        if self._quiet():
            return False
        return ((self._stale and self._step - self._refreshed_at >= self.refresh_stale_every)
                or self._step - self._refreshed_at >= self.refresh_every or self._step == 1)

    def learns(self) -> bool:
        """Whether the rule learns from the current step (its time and acceptance outcomes)."""
        return True

    def became_idle(self) -> None:
        """Called when the last request of a busy period finished (a subclass may override)."""

    def _quiet(self) -> bool:
        """Whether the coming rule step falls in the quiet stretch set at the last table refresh."""
        return self._rule_step + 1 < self._quiet_until

    def quiet_until(self) -> int:
        """The rule step before which the rule skips its per-step work (`DraftLengthPolicy.quiet_until`); 0 for
        a table the rule did not choose (a pin)."""
        assert self._policy is not None
        if not self.learns():
            return 0
        return self._policy.quiet_until(self._table, self.max_num_running_reqs, self.quiet_lead)

    def probe_k(self, k_now: int, batch: int = 1) -> int | None:
        """An exploration step's k instead of the rule's ``k_now`` at ``batch`` decoding requests, or None
        (`DraftLengthPolicy.probe`)."""
        assert self._policy is not None
        self._rule_step += 1
        return self._policy.probe(self._rule_step, k_now, batch, self.replay_per_request if self._skips else None)

    def replay_per_request(self) -> float:
        """Mean positions per request, running or waiting, that the drafter has not passed over: what the next
        drafting step's drafter passes cover per request (`SkippingMTPProposer`: the catch-up pass replays the
        positions skipped since the drafter last ran for the request, the first pass the step's own tokens, a
        waiting request's whole prompt included). Waiting requests count up to the free batch slots, in queue
        order: the ones the next step could admit (and a long queue costs no more than a full batch)."""
        seen = self._drafted_upto
        total, n = 0, 0
        free = max(0, self.max_num_running_reqs - len(self.running))
        for r in itertools.chain(self.running, itertools.islice(self.waiting, free)):
            total += r.num_tokens - seen.get(r.request_id, 0)
            n += 1
        return total / n if n else 0.0

    # -- vLLM hooks ---------------------------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        if self._policy is None:
            return super().schedule(*args, **kwargs)
        start = time.perf_counter()
        if self._pending is not None:
            # a step costs everything from its schedule() to the next one: the model runner, the post-step
            # draft round trip of a drafting step, the engine loop's output handling
            t0, batch, units, k = self._pending
            self._policy.observe_step(batch, k, start - t0, units)
            self._pending = None
        self._step += 1
        if self.table_due():
            self._table = self.choose_table()
            self._stale = False
            self._refreshed_at = self._step
            self._quiet_until = self.quiet_until()
        batch = min(max(len(self.running), 1), len(self._table) - 1)
        k_now = self._table[batch]
        quiet = self._quiet()
        if quiet:   # the rule's step, but nothing it does now could change what it decides: not timed
            self._rule_step += 1
            self._counts["quiet_steps"] += 1
            probe = None
        else:
            probe = self.probe_k(k_now, batch)
        # vLLM reads this step's k from dynamic_sd_lookup; an exploration step replaces it for this step only
        if probe is not None and probe != k_now:
            k_now = probe
            self.dynamic_sd_lookup = [probe] * len(self._table)
        else:
            self.dynamic_sd_lookup = self._table
        # Drafts made under a larger k: verify only the first k_now (the rest would cost target compute at
        # an acceptance the policy judged not worth it). Drafts exist only after a step scheduled with k > 0
        # (vLLM clears a request's drafts when it schedules or preempts it): after a trim to k = 0 no request
        # holds any until the next drafting step.
        if self._may_hold_drafts:
            for req in self.running:
                if len(req.spec_token_ids) > k_now:
                    req.spec_token_ids = req.spec_token_ids[:k_now]
        out = super().schedule(*args, **kwargs)
        self._may_hold_drafts = k_now > 0 or out.num_spec_tokens_to_schedule > 0
        if out.num_spec_tokens_to_schedule > 0 and self._skips:   # the drafter catches these requests up
            requests = self.requests
            self._drafted_upto = {rid: requests[rid].num_computed_tokens
                                  for rid in out.num_scheduled_tokens if rid in requests}
        units = self._decode_units(out) if self.learns() and not quiet else None
        if units is not None:
            self._pending = (start, len(out.num_scheduled_tokens), units, out.num_spec_tokens_to_schedule)
        if out.num_scheduled_tokens:
            self._counts["k_histogram"][min(out.num_spec_tokens_to_schedule, self.num_spec_tokens)] += 1
            self._verify_run = self._run
            self._run = self._run + 1 if out.num_spec_tokens_to_schedule > 0 else 0
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._policy is None:
            return super().update_from_output(scheduler_output, model_runner_output)
        self._observe(scheduler_output, model_runner_output)
        result = super().update_from_output(scheduler_output, model_runner_output)
        idle = not self.running and not self.waiting
        if idle:
            self._pending = None   # the time until the next step would include the engine's idle wait
            self.became_idle()
        if self._stats_path and (idle or time.monotonic() - self._last_write > 2.0):
            self._write_stats()
        return result

    # -- measurements -------------------------------------------------------------------------------------

    def _decode_units(self, out) -> float | None:
        """T(B, k) - F for a step made only of decode requests (the cost fit uses those only), else None."""
        if not out.num_scheduled_tokens:
            return None
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            drafts = len(out.scheduled_spec_decode_tokens.get(req_id, ()))
            if req is None or n != 1 + drafts or req.num_output_tokens == 0:
                return None
        rho = self._policy.config.draft_cost
        batch = len(out.num_scheduled_tokens)
        k = out.num_spec_tokens_to_schedule
        if k == 0 and self._skips:
            return float(out.total_num_scheduled_tokens)   # no drafter pass
        return (1.0 + rho) * out.total_num_scheduled_tokens + rho * batch * max(k - 1, 0)

    def _observe(self, scheduler_output, model_runner_output) -> None:
        c = self._counts
        c["steps"] += 1
        spec = scheduler_output.scheduled_spec_decode_tokens   # empty in a k = 0 step
        if not spec:
            # no drafts verified: nothing for the rule, and each decoding request gained one token. Counted
            # without a pass over the requests (the pass below costs ~1 us per request, at every step where the
            # rule does not draft) as the one-token requests of the step, so a one-token prompt chunk counts too.
            n = list(scheduler_output.num_scheduled_tokens.values()).count(1)
            c["decode_request_steps"] += n
            c["decode_tokens"] += n
            return
        outcomes = []
        index = model_runner_output.req_id_to_index
        sampled = model_runner_output.sampled_token_ids
        requests = self.requests
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            scheduled = spec.get(req_id, ()) if spec else ()
            if n_sched != 1 + len(scheduled):
                continue  # a prefill chunk
            i = index.get(req_id)
            if i is None or i >= len(sampled) or not sampled[i]:
                continue
            req = requests.get(req_id)
            if req is None or req.num_output_tokens == 0:
                continue  # the first token after the prompt
            drafts = [t for t in scheduled if t >= 0] if scheduled else ()
            accepted = len(sampled[i]) - 1
            c["decode_request_steps"] += 1
            c["decode_tokens"] += len(sampled[i])
            if drafts:
                accepted = min(max(accepted, 0), len(drafts))
                outcomes.append((len(drafts), accepted))
                c["draft_tokens_verified"] += len(drafts)
                bucket = min(max(self._verify_run, 1), RUN_BUCKETS) - 1
                for p in range(min(accepted + 1, len(drafts))):
                    c["reached_per_pos"][p] += 1
                    c["run_reached_per_pos"][bucket][p] += 1
                for p in range(accepted):
                    c["accepted_per_pos"][p] += 1
                    c["run_accepted_per_pos"][bucket][p] += 1
        if self.learns():
            self._policy.window.observe(self._rule_step, outcomes)
            self._stale = self._stale or bool(outcomes)

    def stats(self) -> dict:
        """Cumulative counters plus the current estimates (JSON-ready)."""
        c = dict(self._counts)
        c["drafter_skips"] = self._skips
        c["tokens_per_target_forward"] = (c["decode_tokens"] / c["decode_request_steps"]
                                          if c["decode_request_steps"] else None)
        c["conditional_acceptance_per_pos"] = [a / r if r else None
                                               for a, r in zip(c["accepted_per_pos"], c["reached_per_pos"])]
        c["window_acceptance_estimate"] = self._policy.acceptance()
        c["fixed_cost_estimate"], c["drafting_cost_estimate"] = self._policy.cost.costs()
        c["k_table_head"] = self._table[:33]
        c["measured_cost_ratios"] = self._policy.measured_ratios()
        c["step_time_cells"] = self._policy.step_time_cells()
        c["paired_ratio_cells"] = self._policy.paired_ratio_cells()
        return c

    def _write_stats(self) -> None:
        self._last_write = time.monotonic()
        path = Path(self._stats_path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.stats()))
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("vllm-frontier: cannot write MTP stats to %s: %s", path, e)


class PinnedDraftScheduler(AdaptiveDraftScheduler):
    """`AdaptiveDraftScheduler` whose k can be pinned at run time through the file named by `PIN_ENV`.

    Pin text: `adaptive` (or no file / empty file): the policy, refreshed as `AdaptiveDraftScheduler`
    refreshes it, learning from the adaptive steps only; `k`: fixed k (clipped to [0, K]); `k1,k2,...`: one
    entry per step, cycling. At the first step after the engine was idle, a pin carried by one of its requests
    (`REQUEST_PIN_KEY` in `SamplingParams.extra_args`) holds for that busy period; else the file is read then
    (a pin written between runs holds for the whole next run) and at most every `pin_check_every` seconds
    while it is busy (`write_pin`). A request pin costs no system call: a file read in the engine core's step
    loop waits for the GIL (below), and the plain engine a benchmark compares with pays none. A malformed pin
    raises ValueError naming where it came from.
    """

    # Seconds between reads of the file while busy (a pin written then takes effect within this time). No
    # system call per step: any call that releases the GIL in the engine core's step loop waits for the core's
    # input and output threads to hand it back; read every step on vLLM CPU (embedded model, V3 view, batch 1),
    # this scheduler's own time was 206 us per step instead of 24 us, 4 % of a decode step
    # (`benchmarks/mtp_k0_overhead.py --pin-check-every 0`,
    # `benchmarks/results/mtp/k0_overhead_pin_read_every_step.json`); read every 20 ms, still every second or
    # third step of an 8 ms decode step.
    pin_check_every = 0.5

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pin_path = os.environ.get(PIN_ENV) or None
        self._pin: list[int] | None = None
        self._pin_read_at = -1e9
        self._after_idle = True         # the next step is the first of a busy period
        self._request_pinned = False    # this busy period follows a pin carried by its requests
        self._is_pinned = False   # whether the last table came from a pin (no exploration then)

    def pinned(self) -> list[int] | None:
        if self._after_idle:
            self._after_idle = False
            text = self._request_pin()
            self._request_pinned = text is not None
            if self._request_pinned:
                self._pin = self._parse_pin(text, f"request pin ({REQUEST_PIN_KEY})")
        if self._request_pinned:
            return self._pin
        if not self._pin_path:
            return None
        now = time.monotonic()
        if now - self._pin_read_at < self.pin_check_every:
            return self._pin
        self._pin_read_at = now
        try:
            with open(self._pin_path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        self._pin = self._parse_pin(text, f"{PIN_ENV} file {self._pin_path}")
        return self._pin

    def _request_pin(self) -> str | None:
        """The pin carried by a request of the starting busy period (the first one found), or None."""
        for req in (*self.waiting, *self.running):
            extra = getattr(getattr(req, "sampling_params", None), "extra_args", None)
            if extra and REQUEST_PIN_KEY in extra:
                return str(extra[REQUEST_PIN_KEY])
        return None

    def _parse_pin(self, text: str, source: str) -> list[int] | None:
        text = text.strip()
        if text in ("", "adaptive"):
            return None
        try:
            return [min(max(int(x), 0), self.num_spec_tokens) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"{source} holds {text!r}; write 'adaptive', a draft length k, or a comma-separated "
                             "cycle such as 3,0,1,2") from None

    def became_idle(self) -> None:
        self._pin_read_at = -1e9   # the next busy period starts with a fresh read
        self._after_idle = True

    def table_due(self) -> bool:
        ks = self.pinned()
        # a pin takes effect at once (a cycle advances one entry per step); back to adaptive: recompute once
        return ks is not None or self._is_pinned or super().table_due()

    def choose_table(self) -> list[int]:
        ks = self._pin   # as `table_due` just read it (None without a pin file)
        self._is_pinned = ks is not None
        if ks is None:
            return super().choose_table()
        k = ks[self.pin_index() % len(ks)]
        return [k] * (self.max_num_running_reqs + 1)

    def pin_index(self) -> int:
        """The entry of a pin cycle this step takes, before the modulo (engine steps so far; a subclass may count
        otherwise)."""
        return self._step

    def probe_k(self, k_now: int, batch: int = 1) -> int | None:
        return None if self._is_pinned else super().probe_k(k_now, batch)

    def learns(self) -> bool:
        # pinned steps teach the rule nothing: under `adaptive` it knows only what its own steps measured,
        # as in an engine that never ran pinned
        return not self._is_pinned


def write_pin(path, text: str, busy: bool = False) -> None:
    """Pin the k of a `PinnedDraftScheduler` reading ``path``: write ``text``. An idle engine (every request
    finished: `LLM.generate` returned) reads it at its next step; for an engine that is ``busy`` this waits
    until its next read (`PinnedDraftScheduler.pin_check_every`), so that every step after the return follows
    it."""
    Path(path).write_text(text)
    if busy:
        time.sleep(2 * PinnedDraftScheduler.pin_check_every)
