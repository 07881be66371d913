"""Cluster simulator (simpy): N serving instances, a P/D router, and the ratio controller in the loop.

Each instance runs an engine loop (continuous batching, one simpy process): a step takes the instance's
running decodes plus queued prefill tokens up to a token budget, and lasts ``prefill + decode`` time from
the `InstanceProfile` cost models (one step intercept, not two, when both kinds share a step).

- **Disaggregated** (roles ``prefill`` / ``decode``): a prompt is prefilled whole (no chunking) on the
  prefill instance with the least queued work, its first token is emitted there (TTFT), its KV is shipped
  (``prompt_len * kv_transfer_s_per_token``) to the decode instance with the most free KV, which admits it
  when its KV reservation (prompt + output tokens) fits.
- **Colocated** (role ``both``): vLLM-style chunked prefill: each step mixes the running decodes with up
  to ``chunk_tokens`` prompt tokens; the request then decodes on the same instance.
- **Re-roling** (`set_role`): new work follows the new role at once; work already queued or running on the
  instance finishes there (the same draining rule as the live `InstancePool`). Steps that mix prefill and
  decode (a re-roled instance draining) use chunked prefill. As in the live router (`InstancePool.acquire`
  leases the instance with the fewest in-flight leases of the stage asked for), an instance re-roled to
  prefill takes prompts while it still drains its decodes, counted as holding one prompt more (its steps
  carry the decodes, so its prompts run in chunks). When prefill and decode instances use different GPU
  counts (`SimConfig.prefill_profile`), whole instances change in units of GPUs instead: the leaving ones
  take no new work and drain, then their GPUs start instances of the other role (`_Sim._apply_tp`).

Latency SLOs (`SimConfig.slo_kind`): the TTFT, and for the decode side either the per-request mean TPOT
(``tpot-mean``: ``(finish - first token) / (output - 1)``, DistServe's definition) or a per-token one: the
P90 (``tbt-p90``) or P99 (``tbt-p99``) of the request's own gaps between consecutive tokens (Sarathi-Serve's
time between tokens). Every request records the times its tokens came out, so one run serves all three.

The same `RatioController` object as the live router is called every `interval_s` with a `LoadSample`
built from the simulated measurements. Nothing is ever dropped: requests not finished by the end of
the run count as SLO misses.
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from vllm_frontier.schedulers.controller import SLO_KINDS, LoadSample, RatioController
from vllm_frontier.schedulers.cost_model import InstanceProfile
from vllm_frontier.schedulers.traces import Request

__all__ = ["SimConfig", "SimResult", "RequestRecord", "simulate", "percentile", "SLO_KINDS"]


def _check_kind(kind: str) -> None:
    if kind not in SLO_KINDS:
        raise ValueError(f"slo_kind must be one of {', '.join(SLO_KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment.

    Attributes:
        profile: cost models of one instance.
        n_instances: cluster size.
        n_prefill: initial prefill instances (the rest decode); None = colocated (every instance ``both``).
        chunk_tokens: colocated prefill token budget per step (vLLM's ``max_num_batched_tokens``).
        colocated: how a colocated instance (role ``both``) mixes the phases: ``chunked`` (each step carries
            the running decodes and up to `chunk_tokens` prompt tokens) or ``prefill-first`` (vLLM without
            chunked prefill, the baseline of DistServe and DOPD: a step prefills whole prompts, up to the
            profile's `max_batch_tokens`, whenever one is queued and its KV fits, and decodes otherwise).
        slo_ttft_s / slo_tpot_s: SLOs used for attainment (`slo_tpot_s` bounds the decode metric of `slo_kind`).
        slo_kind: decode-side SLO, one of `SLO_KINDS` (mean TPOT, or the P90 / P99 of the token gaps).
        kv: ``reserve`` (a decode instance admits a request when its prompt + output fits, and keeps that
            reservation to the end) or ``paged`` (vLLM's paged KV: pages of `block_size` tokens are taken as
            tokens come; when a decode step needs a page and none is free the newest running request is
            preempted: its KV is freed and it is prefilled again, prompt + tokens so far, on the same instance
            ahead of every other prompt; no new request starts in a step that preempted).
        prefill_profile: cost model of prefill-role instances when it differs from `profile` (e.g. a TP=2
            prefill instance beside TP=1 decode ones, as DistServe deploys OPT-13B; its `tensor_parallel`
            counts the GPUs); None: `profile` for every role.
        interval_s: controller period (ignored without a controller).
        drain_s: how long after the last arrival the run continues before unfinished requests count as missed.
    """

    profile: InstanceProfile
    n_instances: int
    n_prefill: int | None
    slo_ttft_s: float
    slo_tpot_s: float
    chunk_tokens: int = 2048
    interval_s: float = 2.0
    drain_s: float = 60.0
    slo_kind: str = "tpot-mean"
    kv: str = "reserve"
    block_size: int = 16
    colocated: str = "chunked"
    prefill_profile: InstanceProfile | None = None

    def __post_init__(self) -> None:
        _check_kind(self.slo_kind)
        if self.colocated not in ("chunked", "prefill-first"):
            raise ValueError(f"colocated must be 'chunked' or 'prefill-first', got {self.colocated!r}")
        if self.kv not in ("reserve", "paged"):
            raise ValueError(f"kv must be 'reserve' or 'paged', got {self.kv!r}")
        if self.prefill_profile is not None and self.n_prefill is None:
            raise ValueError("prefill_profile needs a disaggregated deployment (n_prefill given)")
        if self.block_size < 1 or self.profile.kv_capacity_tokens < self.block_size:
            raise ValueError("block_size must be >= 1 and at most the profile's kv_capacity_tokens")
        if self.n_instances < 1:
            raise ValueError("n_instances must be >= 1")
        if self.n_prefill is not None and not 1 <= self.n_prefill <= self.n_instances - 1:
            raise ValueError(
                f"n_prefill must be in [1, n_instances - 1] = [1, {self.n_instances - 1}] for a disaggregated "
                f"deployment (None for colocated), got {self.n_prefill}")
        if self.chunk_tokens < 1 or self.interval_s <= 0 or self.drain_s < 0:
            raise ValueError("chunk_tokens >= 1, interval_s > 0 and drain_s >= 0 are required")


@dataclass
class RequestRecord:
    """Latencies of one request. `tbt_p90_s` / `tbt_p99_s`: nearest-rank P90 / P99 of its gaps between
    consecutive output tokens (0 with fewer than two tokens; None until it finishes)."""

    req: Request
    first_token_s: float | None = None
    finish_s: float | None = None
    tbt_p90_s: float | None = None
    tbt_p99_s: float | None = None
    n_tokens: int = 0  # output tokens that came out (set when it finishes)

    def set_token_times(self, times: Sequence[float]) -> None:
        """Record the per-token SLO metrics from the times its output tokens came out."""
        self.n_tokens = len(times)
        if len(times) < 2:
            self.tbt_p90_s = self.tbt_p99_s = 0.0
            return
        gaps = np.sort(np.diff(np.asarray(times, dtype=float)))
        n = len(gaps)
        self.tbt_p90_s = float(gaps[max(0, math.ceil(0.9 * n) - 1)])
        self.tbt_p99_s = float(gaps[max(0, math.ceil(0.99 * n) - 1)])

    def decode_metric(self, kind: str) -> float:
        """The request's decode-side latency under SLO kind `kind` (inf while unfinished)."""
        if kind == "tpot-mean":
            return self.tpot_s
        if self.finish_s is None:
            return math.inf
        v = self.tbt_p90_s if kind == "tbt-p90" else self.tbt_p99_s
        return math.inf if v is None else v

    @property
    def ttft_s(self) -> float:
        return math.inf if self.first_token_s is None else self.first_token_s - self.req.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.finish_s is None or self.first_token_s is None:
            return math.inf
        if self.req.output_len <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.req.output_len - 1)


@dataclass
class SimResult:
    records: list[RequestRecord]
    slo_ttft_s: float
    slo_tpot_s: float
    # (t, n_prefill, n_decode) after every applied change, starting with the initial split.
    ratio_timeline: list[tuple[float, int, int]] = field(default_factory=list)
    slo_kind: str = "tpot-mean"
    preemptions: int = 0  # recompute preemptions (paged KV)
    gpus: int = 0  # GPUs of the initial deployment (sum of the instances' tensor-parallel sizes)
    # (t, direction, seconds) per re-roled instance: how long it kept running work of its old role
    drains: list[tuple[float, str, float]] = field(default_factory=list)

    def attainment(self, records: Sequence[RequestRecord] | None = None, kind: str | None = None,
                   slo_tpot_s: float | None = None) -> float:
        """Fraction of `records` (default: all) meeting the TTFT SLO and the decode SLO of `kind` (default:
        the run's) at `slo_tpot_s` (default: the run's); unfinished ones miss; 1.0 when empty."""
        records = self.records if records is None else records
        kind = self.slo_kind if kind is None else kind
        _check_kind(kind)
        tpot = self.slo_tpot_s if slo_tpot_s is None else slo_tpot_s
        if not records:
            return 1.0
        ok = sum(1 for r in records if r.ttft_s <= self.slo_ttft_s and r.decode_metric(kind) <= tpot)
        return ok / len(records)

    def decode_p(self, q: float, kind: str) -> float:
        """Percentile `q` over requests of the decode metric of SLO kind `kind`."""
        return percentile([r.decode_metric(kind) for r in self.records], q)

    def finished(self) -> int:
        return sum(1 for r in self.records if r.finish_s is not None)

    def ttft_p(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.records], q)

    def tpot_p(self, q: float) -> float:
        return percentile([r.tpot_s for r in self.records], q)


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of `xs`; nan for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


class _Job:
    __slots__ = ("rec", "left", "done_pref", "pref_len", "token_times", "seg_start", "g", "kv_base", "epoch",
                 "recompute")

    def __init__(self, rec: RequestRecord) -> None:
        self.rec = rec
        self.left = rec.req.prompt_len  # tokens still to prefill (prompt, or prompt + output for a recompute)
        self.pref_len = rec.req.prompt_len  # tokens of the prefill in progress
        self.done_pref = 0
        self.token_times: list[float] = []  # when each output token came out
        self.seg_start = 0  # the instance's decode-step count when this job joined its batch
        self.g = 0  # output tokens produced so far
        self.kv_base = 0  # KV tokens it held when it joined the batch (prompt + g - 1)
        self.epoch = 0  # bumped on preemption: finish-heap entries of an older epoch are stale
        self.recompute = False  # prefilling again after a preemption (KV was freed)


class _Instance:
    def __init__(self, sim: "_Sim", idx: int, role: str) -> None:
        self.sim, self.idx, self.role = sim, idx, role
        self.paged = sim.cfg.kv == "paged"
        self.bs = sim.cfg.block_size
        self.prefill_q: collections.deque[_Job] = collections.deque()
        self.queued_tokens = 0
        self.queued_sq = 0
        self.admit_q: collections.deque[_Job] = collections.deque()  # waiting for KV on this instance
        self.kv_used = 0  # KV tokens held (reserve: prompt + output per request; paged: blocks x block size)
        self.kv_pending = 0  # KV tokens asked for by jobs in admit_q
        self.blocks_used = 0
        # paged: running decodes whose next new block falls on a decode step k with k % block_size == r
        self.cross = [0] * self.bs
        self.run_order: dict[_Job, None] = {}  # running decodes, oldest first (vLLM preempts the newest)
        self.preemptions = 0
        self.drain: tuple[str, float] | None = None
        self.retiring = False  # re-roled across tensor-parallel sizes: takes no new work, then leaves
        self.incoming = 0  # KV transfers on their way here
        self.steps = 0
        self.step_times: list[float] = []  # end time of decode step k at index k - 1
        self.finish_heap: list[tuple[int, int, int, _Job]] = []  # (finish step, rid, epoch, job)
        self.ctx = 0  # context tokens of running decodes
        self.wake = sim.env.event()
        self.proc = sim.env.process(self.loop())

    @property
    def prof(self) -> InstanceProfile:
        """Cost model of this instance in its current role (`SimConfig.prefill_profile` on prefill)."""
        return self.sim.profile_for(self.role)

    @property
    def cap_blocks(self) -> int:
        return self.prof.kv_capacity_tokens // self.bs

    @property
    def running(self) -> int:
        return len(self.run_order)

    @property
    def draining_decodes(self) -> int:
        """Decodes in flight here (running or waiting for KV)."""
        return len(self.run_order) + len(self.admit_q)

    @property
    def idle(self) -> bool:
        """No work here or on its way (a retiring instance can leave)."""
        return not (self.prefill_q or self.run_order or self.admit_q or self.incoming)

    def start_drain(self, direction: str) -> None:
        """A role change: time how long the work of the old role keeps running here (`SimResult.drains`)."""
        self.drain = (direction, self.sim.env.now)
        self.check_drain()

    def check_drain(self) -> None:
        if self.drain is None:
            return
        direction, since = self.drain
        busy = (self.run_order or self.admit_q) if direction == "decode->prefill" else self.prefill_q
        if not busy:
            self.sim.drains.append((since, direction, self.sim.env.now - since))
            self.drain = None

    def kick(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def enqueue_prefill(self, job: _Job, front: bool = False) -> None:
        if front:  # ahead of every waiting prompt, behind the ones partly prefilled (vLLM runs those first)
            i = 0
            while i < len(self.prefill_q) and self.prefill_q[i].done_pref:
                i += 1
            self.prefill_q.insert(i, job)
        else:
            self.prefill_q.append(job)
        self.queued_tokens += job.left
        self.queued_sq += job.left * job.left
        self.kick()

    def enqueue_decode(self, job: _Job) -> None:
        self.admit_q.append(job)
        self.kv_pending += self._kv_need(job)
        self.kick()

    # ---- KV accounting ---------------------------------------------------------------------------
    def _kv_need(self, job: _Job) -> int:
        """KV tokens a job waiting for admission asks for: its whole life (reserve) or its prompt's pages."""
        if self.paged:
            return -(-job.rec.req.prompt_len // self.bs) * self.bs
        return job.rec.req.prompt_len + job.rec.req.output_len

    def _blocks(self, delta: int) -> None:
        self.blocks_used += delta
        self.kv_used = self.blocks_used * self.bs

    def _free_blocks(self) -> int:
        return self.cap_blocks - self.blocks_used

    def _admit(self) -> None:
        cap = self.prof.kv_capacity_tokens
        while self.admit_q:
            job = self.admit_q[0]
            need = self._kv_need(job)
            if self.paged:
                # preempted requests waiting to recompute go first (vLLM puts them at the head of the queue)
                if (self.prefill_q and self.prefill_q[0].recompute) or (
                        need // self.bs > self._free_blocks() and self.running > 0):
                    break
            elif self.kv_used + need > cap and self.running > 0:
                break
            self.admit_q.popleft()
            self.kv_pending -= need
            if self.paged:
                self._blocks(need // self.bs)
            else:
                self.kv_used += need
            # The first output token came from prefill: output_len - 1 decode steps remain.
            job.g = 1
            if job.rec.req.output_len <= 1:
                self._finish(job)
                continue
            self._start_decode(job)

    def _start_decode(self, job: _Job) -> None:
        """Join the decode batch with `job.g` tokens out and their KV (but the last token's) held here."""
        job.kv_base = job.rec.req.prompt_len + job.g - 1
        job.seg_start = self.steps
        self.run_order[job] = None
        self.ctx += job.kv_base + 1
        if self.paged:  # decode step k = seg_start + j processes position kv_base + j: a new block when it is 1 mod bs
            self.cross[(job.seg_start + 1 - job.kv_base) % self.bs] += 1
        heapq.heappush(self.finish_heap, (self.steps + job.rec.req.output_len - job.g, job.rec.req.rid,
                                          job.epoch, job))

    def _leave_batch(self, job: _Job) -> int:
        """Take `job` out of the decode batch; returns the KV tokens it holds."""
        k = self.steps - job.seg_start
        job.token_times.extend(self.step_times[job.seg_start:self.steps])
        job.g += k
        del self.run_order[job]
        self.ctx -= job.kv_base + 1 + k
        if self.paged:
            self.cross[(job.seg_start + 1 - job.kv_base) % self.bs] -= 1
        return job.kv_base + k

    def _finish(self, job: _Job) -> None:
        job.rec.finish_s = self.sim.env.now
        job.rec.set_token_times(job.token_times)
        if not self.paged:
            self.kv_used -= job.rec.req.prompt_len + job.rec.req.output_len
        self.sim.on_finish(job)

    def _preempt(self, job: _Job) -> None:
        """vLLM's recompute preemption: free the job's KV and queue its prompt + generated tokens for a fresh
        prefill on this instance, ahead of every other prompt."""
        held = self._leave_batch(job)
        self._blocks(-self._pages(held))
        job.epoch += 1
        job.recompute = True
        job.left = job.pref_len = job.rec.req.prompt_len + job.g
        job.done_pref = 0
        self.preemptions += 1
        self.sim.preemptions += 1
        self.enqueue_prefill(job, front=True)

    def _make_room(self) -> int:
        """Paged KV: blocks the next decode step needs, preempting the newest decodes until they fit."""
        nxt = (self.steps + 1) % self.bs
        while self.run_order:
            need = self.cross[nxt]
            if need <= self._free_blocks():
                return need
            victim = next(reversed(self.run_order))
            self._preempt(victim)
        return 0

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _prefill_blocks(self, job: _Job, take: int) -> int:
        """New blocks a chunk of `take` tokens of `job` needs (pages already held by its earlier chunks)."""
        return self._pages(job.done_pref + take) - self._pages(job.done_pref)

    # ---- engine loop -----------------------------------------------------------------------------
    def loop(self):
        env, cfg = self.sim.env, self.sim.cfg
        while True:
            prof = self.prof
            self._admit()
            if not self.prefill_q and not self.run_order:
                self.wake = env.event()
                yield self.wake
                continue
            preempted = self.preemptions
            # Prefill-first colocated (vLLM without chunked prefill): a step is a prefill batch whenever a
            # queued prompt fits, and a decode batch otherwise; prompts never share a step with decodes.
            pf_only = self.role == "both" and cfg.colocated == "prefill-first"
            pf_step = pf_only and bool(self.prefill_q) and (
                not self.paged or not self.run_order
                or self._prefill_blocks(self.prefill_q[0], self.prefill_q[0].left) <= self._free_blocks())
            if self.paged and self.run_order and not pf_step:
                self._blocks(self._make_room())
            # Prefill part of this step.
            # Steps that carry decodes use chunked prefill (vLLM's token budget); pure prefill steps batch
            # whole prompts up to max_batch_tokens.
            b = 0 if pf_step else self.running
            mixed = not pf_step and (self.role == "both" or b > 0)
            budget = cfg.chunk_tokens if mixed else prof.max_batch_tokens
            chunks: list[tuple[_Job, int]] = []
            tok = sq = 0.0
            used = 0
            free = self._free_blocks() if self.paged else 0
            for job in (self.prefill_q if not (pf_only and not pf_step) else ()):
                if used >= budget:
                    break
                if mixed:
                    take = min(job.left, budget - used)
                else:
                    take = job.left  # whole prompts; at least one per step
                    if used and used + take > budget:
                        break
                if self.paged:
                    # vLLM V1 starts no new request in a step that preempted; a chunk needs its pages
                    if job.done_pref == 0 and self.preemptions != preempted:
                        break
                    nb = self._prefill_blocks(job, take)
                    if nb > free:
                        if mixed and free > 0:  # the part of the chunk whose pages fit
                            take = min(take, (self._pages(job.done_pref) + free) * self.bs - job.done_pref)
                            nb = self._prefill_blocks(job, take)
                        if nb > free or take <= 0:
                            if chunks or b or self.blocks_used - self._partial_blocks() > 0:
                                break
                            # nothing else can free pages: let the head prompt run over the capacity
                            take = job.left if not mixed else min(job.left, budget)
                            nb = self._prefill_blocks(job, take)
                    free -= nb
                    self._blocks(nb)
                s0 = job.done_pref
                tok += take
                sq += (s0 + take) ** 2 - s0 ** 2  # attention of the chunk over its prefix
                used += take
                chunks.append((job, take))
            if not chunks and not b:
                if self.preemptions != preempted:
                    continue  # the step preempted every decode: the recomputes start next step
                # every queued prompt waits for pages that only a transfer or admission frees
                self.wake = env.event()
                yield self.wake
                continue
            yield env.timeout(self._step_s(chunks, tok, sq, b))
            # Decode progress: every running request produced one token.
            if b:
                self.steps += 1
                self.step_times.append(env.now)
                self.ctx += b
                while self.finish_heap and self.finish_heap[0][0] <= self.steps:
                    _, _, epoch, job = heapq.heappop(self.finish_heap)
                    if epoch != job.epoch or job not in self.run_order:
                        continue  # preempted since
                    held = self._leave_batch(job)
                    if self.paged:
                        self._blocks(-self._pages(held))
                    self._finish(job)
            for job, take in chunks:
                job.left -= take
                job.done_pref += take
                self.queued_tokens -= take
            while self.prefill_q and self.prefill_q[0].left == 0:
                job = self.prefill_q.popleft()
                self.queued_sq -= job.pref_len ** 2
                job.token_times.append(env.now)
                if job.recompute:
                    job.recompute = False
                    job.g += 1
                    if job.g >= job.rec.req.output_len:
                        self._blocks(-self._pages(job.done_pref))
                        self._finish(job)
                    else:
                        self._start_decode(job)
                    continue
                job.rec.first_token_s = env.now
                if self.paged and not self.sim.stays(self):
                    self._blocks(-self._pages(job.done_pref))  # the KV leaves with the transfer
                self.sim.on_prefilled(self, job)
            # Jobs that finished their prompt but sit behind an unfinished one are handled next step.
            self.check_drain()

    def _partial_blocks(self) -> int:
        """Pages held by prompts partly prefilled here."""
        return sum(self._pages(j.done_pref) for j in self.prefill_q if j.done_pref)

    def _step_s(self, chunks: list, tok: float, sq: float, b: int) -> float:
        """One engine step: prompt tokens `tok` (sum of squares `sq`) and `b` decodes (context `self.ctx`).
        A hybrid step uses the profile's measured `mixed` cost when it has one, else prefill + decode with
        one intercept; every step adds the profile's per-step overhead."""
        prof = self.prof
        ctx = self.ctx if b else 0
        over = prof.step_overhead_s + prof.overhead_s_per_token * (tok + ctx)
        if chunks and b and prof.mixed is not None:
            return prof.mixed.step_s(tok, sq, b, ctx) + over
        t_pref = prof.prefill.tokens_s(tok, sq) if chunks else 0.0
        t_dec = prof.decode.step_s(b, ctx) if b else 0.0
        if chunks and b:
            t_dec -= min(prof.prefill.a, prof.decode.coeffs(b)[0])  # one step intercept, not two
        return t_pref + t_dec + over


class _Sim:
    def __init__(self, cfg: SimConfig, trace: Sequence[Request], controller: RatioController | None) -> None:
        self.cfg, self.profile, self.controller = cfg, cfg.profile, controller
        self.env = simpy.Environment()
        colocated = cfg.n_prefill is None
        self.instances = [
            _Instance(self, i, "both" if colocated else ("prefill" if i < cfg.n_prefill else "decode"))
            for i in range(cfg.n_instances)
        ]
        self.records = [RequestRecord(r) for r in trace]
        self.trace = trace
        self.timeline: list[tuple[float, int, int]] = []
        if not colocated:
            self.timeline.append((0.0, cfg.n_prefill, cfg.n_instances - cfg.n_prefill))
        # measurement window for the controller
        self.win_prompts: list[int] = []
        self.win_outputs: list[tuple[int, int]] = []
        self.win_ttft: list[float] = []
        self.win_tpot: list[float] = []
        self.win_tbt90: list[float] = []
        self.win_tbt99: list[float] = []
        self.open = len(trace)
        self.preemptions = 0
        self.drains: list[tuple[float, str, float]] = []
        self.pending = {"prefill": 0, "decode": 0}  # instances waiting for the GPUs of retiring ones
        self._next_idx = len(self.instances)

    def profile_for(self, role: str) -> InstanceProfile:
        return self.cfg.prefill_profile if role == "prefill" and self.cfg.prefill_profile else self.profile

    def gpus(self) -> int:
        """GPUs in use: every instance's tensor-parallel size in its current role."""
        return sum(self.profile_for(i.role).tensor_parallel for i in self.instances)

    def stays(self, inst: _Instance) -> bool:
        """Whether a prompt prefilled on `inst` decodes there (colocated deployment)."""
        return inst.role == "both" and self.cfg.n_prefill is None

    # ---- routing -------------------------------------------------------------------------------
    def _pick_prefill(self) -> _Instance:
        # instances leaving the role (re-roled across tensor-parallel sizes) only while no other serves it
        cands = ([i for i in self.instances if i.role in ("prefill", "both") and not i.retiring]
                 or [i for i in self.instances if i.role in ("prefill", "both")])
        if self.cfg.n_prefill is None:  # colocated: balance queued prompt tokens and decode context
            return min(cands, key=lambda i: (i.queued_tokens + 0.1 * i.ctx, i.idx))
        # Disaggregated: as the live `InstancePool.acquire`, the instance with the fewest prompts in flight
        # (prefill leases), then the fewest requests in flight of any stage, then the least queued prompt
        # tokens. An instance re-roled from decode that still drains decodes takes prompts at once: it
        # prefills them in chunked steps alongside its last decodes (which those steps slow down), so it
        # counts as holding one prompt more.
        return min(cands, key=lambda i: (len(i.prefill_q) + (1 if i.draining_decodes else 0), i.draining_decodes,
                                         i.queued_tokens, i.idx))

    def _pick_decode(self) -> _Instance:
        cands = ([i for i in self.instances if i.role == "decode" and not i.retiring]
                 or [i for i in self.instances if i.role == "decode"])
        return min(cands, key=lambda i: (i.kv_used + i.kv_pending, i.idx))

    def on_prefilled(self, inst: _Instance, job: _Job) -> None:
        if self.stays(inst):
            if not inst.paged:
                inst.enqueue_decode(job)
                return
            job.g = 1  # paged: its prompt's pages are already here
            if job.rec.req.output_len <= 1:
                inst._blocks(-inst._pages(job.done_pref))
                inst._finish(job)
            else:
                inst._start_decode(job)
            return
        target = self._pick_decode()
        delay = job.rec.req.prompt_len * self.profile_for(inst.role).kv_transfer_s_per_token
        self.win_ttft.append(job.rec.ttft_s)

        target.incoming += 1

        def ship():
            yield self.env.timeout(delay)
            target.incoming -= 1
            target.enqueue_decode(job)
        self.env.process(ship())

    def on_finish(self, job: _Job) -> None:
        self.open -= 1
        self.win_outputs.append((job.rec.req.prompt_len, job.rec.req.output_len))
        self.win_tpot.append(job.rec.tpot_s)
        if job.rec.req.output_len > 1:
            self.win_tbt90.append(job.rec.tbt_p90_s)
            self.win_tbt99.append(job.rec.tbt_p99_s)

    # ---- processes -----------------------------------------------------------------------------
    def arrivals(self):
        for rec in self.records:
            dt = rec.req.arrival_s - self.env.now
            if dt > 0:
                yield self.env.timeout(dt)
            self.win_prompts.append(rec.req.prompt_len)
            self._pick_prefill().enqueue_prefill(_Job(rec))

    def control(self):
        cfg = self.cfg
        while True:
            yield self.env.timeout(cfg.interval_s)
            insts = self.instances
            n_p, n_d = self.split()
            sample = LoadSample(
                t=self.env.now, window_s=cfg.interval_s, prompt_lens=tuple(self.win_prompts),
                completed=tuple(self.win_outputs), n_prefill=n_p, n_decode=n_d,
                queued_prefill_tokens=sum(i.queued_tokens for i in insts),
                queued_prefill_sq_tokens=sum(i.queued_sq for i in insts),
                running_decode=sum(i.running + len(i.admit_q) for i in insts),
                ttft_p90_s=percentile(self.win_ttft, 90) if self.win_ttft else None,
                tpot_p90_s=percentile(self.win_tpot, 90) if self.win_tpot else None,
                tbt_p90_s=percentile(self.win_tbt90, 90) if self.win_tbt90 else None,
                tbt_p99_s=percentile(self.win_tbt99, 90) if self.win_tbt99 else None,
            )
            self.win_prompts, self.win_outputs, self.win_ttft, self.win_tpot = [], [], [], []
            self.win_tbt90, self.win_tbt99 = [], []
            d = self.controller.step(sample)
            if d.changed:
                self.apply(d.n_prefill)

    def split(self) -> tuple[int, int]:
        """(prefill, decode) instances as re-roling left them: instances leaving their role (retiring) not
        counted, the ones they will become counted."""
        live = [i for i in self.instances if not i.retiring]
        return (sum(1 for i in live if i.role == "prefill") + self.pending["prefill"],
                sum(1 for i in live if i.role == "decode") + self.pending["decode"])

    def apply(self, n_prefill: int) -> None:
        gp, gd = self.profile_for("prefill").tensor_parallel, self.profile.tensor_parallel
        if gp != gd:
            self._apply_tp(n_prefill, gp, gd)
            return
        pre = [i for i in self.instances if i.role == "prefill"]
        dec = [i for i in self.instances if i.role == "decode"]
        if n_prefill > len(pre):  # decode -> prefill: the least busy decoders
            for inst in sorted(dec, key=lambda i: (i.running + len(i.admit_q), i.idx))[: n_prefill - len(pre)]:
                inst.role = "prefill"
                inst.start_drain("decode->prefill")
        elif n_prefill < len(pre):  # prefill -> decode: the least queued prefillers
            for inst in sorted(pre, key=lambda i: (i.queued_tokens, i.idx))[: len(pre) - n_prefill]:
                inst.role = "decode"
                inst.start_drain("prefill->decode")
        n_p = sum(1 for i in self.instances if i.role == "prefill")
        self.timeline.append((self.env.now, n_p, len(self.instances) - n_p))

    def _apply_tp(self, n_prefill: int, gp: int, gd: int) -> None:
        """Re-roling when the roles' instances use different GPU counts (`prefill_profile.tensor_parallel`
        `gp`, `profile.tensor_parallel` `gd`): the GPUs of whole instances change role in units of
        lcm(gp, gd) GPUs. The instances leaving a role take no new work, finish what they hold (decodes, or
        queued prompts) and then leave; the instances of the new role start on their GPUs once every
        instance of the unit has left (an engine restarted at the other tensor-parallel size; the restart
        itself is not priced)."""
        unit = gp * gd // math.gcd(gp, gd)
        n_p, _ = self.split()
        if n_prefill == n_p:
            return
        to_prefill = n_prefill > n_p
        old_role, new_role = ("decode", "prefill") if to_prefill else ("prefill", "decode")
        per_old, per_new = unit // (gd if to_prefill else gp), unit // (gp if to_prefill else gd)
        units = abs(n_prefill - n_p) * gp // unit  # the controller moves whole units
        cands = [i for i in self.instances if i.role == old_role and not i.retiring]
        # the least busy leave first: decoders by requests held, prefillers by queued prompt tokens
        cands.sort(key=(lambda i: (i.running + len(i.admit_q), i.idx)) if to_prefill else
                   (lambda i: (i.queued_tokens, i.idx)))
        direction = f"{old_role}->{new_role}"
        for k in range(units):
            group = cands[k * per_old:(k + 1) * per_old]
            if len(group) < per_old:
                break
            for inst in group:
                inst.retiring = True
            self.pending[new_role] += per_new
            self.env.process(self._swap(group, new_role, per_new, direction))
        n_p, n_d = self.split()
        self.timeline.append((self.env.now, n_p, n_d))

    def _swap(self, group: list, role: str, count: int, direction: str):
        since = self.env.now
        while not all(i.idle for i in group):
            yield self.env.timeout(0.05)
        for inst in group:
            self.instances.remove(inst)
            self.drains.append((since, direction, self.env.now - since))
        self.pending[role] -= count
        for _ in range(count):
            self.instances.append(_Instance(self, self._next_idx, role))
            self._next_idx += 1

    def run(self) -> SimResult:
        self.gpus0 = self.gpus()
        self.env.process(self.arrivals())
        if self.controller is not None and self.cfg.n_prefill is not None:
            self.env.process(self.control())
        end = (self.trace[-1].arrival_s if self.trace else 0.0) + self.cfg.drain_s
        done_check = self.env.process(self._until_done())
        self.env.run(until=simpy.AnyOf(self.env, [done_check, self.env.timeout(end)]))
        return SimResult(self.records, self.cfg.slo_ttft_s, self.cfg.slo_tpot_s, self.timeline, self.cfg.slo_kind,
                         self.preemptions, self.gpus0, self.drains)

    def _until_done(self):
        while self.open > 0 or self.env.now < (self.trace[-1].arrival_s if self.trace else 0.0):
            yield self.env.timeout(1.0)


def simulate(cfg: SimConfig, trace: Sequence[Request], controller: RatioController | None = None) -> SimResult:
    """Run `trace` through the deployment `cfg` (with `controller` re-roling instances, if given)."""
    for r in trace:
        if r.prompt_len + r.output_len > cfg.profile.max_len:
            raise ValueError(
                f"request {r.rid} needs {r.prompt_len + r.output_len} tokens > the profile's max_len "
                f"{cfg.profile.max_len}: generate the trace with max_len={cfg.profile.max_len}")
    return _Sim(cfg, trace, controller).run()
