"""The router's view of its vLLM instances: roles, health, in-flight work, timings.

One `InstancePool` is shared by the P/D router (which leases instances per request
stage) and the ratio controller (which reads `snapshot()` and calls `set_role`).
Pure Python: no torch, no vLLM, no event loop, so the controller and the simulator
can use it in unit tests. All methods are thread-safe.

Stages and roles:
- a request passes through the `"prefill"` stage (one token, KV kept) and then the
  `"decode"` stage;
- an instance with role `"prefill"` accepts only prefill leases, `"decode"` only
  decode leases, `"both"` either.

Draining (`set_role`): the new role takes effect for the *next* lease at once; leases
already granted keep running to completion on the instance (nothing is cancelled or
lost). `inflight(url, stage)` tells when the old stage's work has drained;
`wait_drained` blocks until it has.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Role",
    "Stage",
    "Instance",
    "InstanceSnapshot",
    "PoolSnapshot",
    "InstancePool",
    "NoInstanceAvailable",
]


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def accepts(self, stage: Stage) -> bool:
        return self is Role.BOTH or self.value == stage.value


class Stage(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class NoInstanceAvailable(RuntimeError):
    """No healthy instance accepts the requested stage."""


@dataclass
class Instance:
    """One vLLM server. `url` is its HTTP base URL (``http://host:port``)."""

    url: str
    role: Role
    kv_addr: str | None = None  # the KV connector's listener, learnt by the router
    healthy: bool = True
    down_reason: str | None = None
    inflight: dict[Stage, int] = field(
        default_factory=lambda: {Stage.PREFILL: 0, Stage.DECODE: 0}
    )
    served: dict[Stage, int] = field(
        default_factory=lambda: {Stage.PREFILL: 0, Stage.DECODE: 0}
    )
    failures: int = 0  # consecutive failed requests/health checks


@dataclass(frozen=True)
class InstanceSnapshot:
    url: str
    role: str
    healthy: bool
    inflight_prefill: int
    inflight_decode: int
    served_prefill: int
    served_decode: int


@dataclass(frozen=True)
class PoolSnapshot:
    """Router-side measurements at time `t` (seconds, the pool's clock).

    `ttft_s` / `tpot_s` are the samples recorded in the last `window_s` seconds
    (seconds, oldest first); `waiting_*` are requests the router holds because no
    instance accepted their stage yet.
    """

    t: float
    window_s: float
    instances: tuple[InstanceSnapshot, ...]
    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    prompt_tokens: tuple[int, ...]
    waiting_prefill: int
    waiting_decode: int
    completed: int
    failed: int
    # per streamed request with >= 2 tokens: its own P90 / P99 gap between tokens (same window)
    tbt_p90_s: tuple[float, ...] = ()
    tbt_p99_s: tuple[float, ...] = ()


class InstancePool:
    """Instances plus router-side timing samples.

    Args:
        instances: ``(url, role)`` pairs; role is a `Role` or its string value.
        window_s: how long timing samples are kept for `snapshot()`.
        clock: monotonic clock in seconds (injectable for tests and the simulator).
    """

    def __init__(
        self,
        instances: Iterable[tuple[str, Role | str]] = (),
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        self._lock = threading.Condition()
        self._instances: dict[str, Instance] = {}
        self._clock = clock
        self._window_s = window_s
        self._ttft: collections.deque[tuple[float, float]] = collections.deque()
        self._tpot: collections.deque[tuple[float, float]] = collections.deque()
        self._tbt: collections.deque[tuple[float, float, float]] = collections.deque()
        self._prompt_tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._waiting = {Stage.PREFILL: 0, Stage.DECODE: 0}
        self._completed = 0
        self._failed = 0
        self._rr = 0
        for url, role in instances:
            self.add(url, role)

    # ---- membership -------------------------------------------------------
    def add(self, url: str, role: Role | str) -> None:
        url = _norm_url(url)
        with self._lock:
            if url in self._instances:
                raise ValueError(f"instance {url} is already in the pool")
            self._instances[url] = Instance(url=url, role=_role(role))
            self._lock.notify_all()

    def remove(self, url: str) -> None:
        with self._lock:
            self._instances.pop(_norm_url(url), None)

    def get(self, url: str) -> Instance:
        with self._lock:
            return self._get(url)

    def urls(self) -> list[str]:
        with self._lock:
            return list(self._instances)

    def set_kv_addr(self, url: str, kv_addr: str | None) -> None:
        with self._lock:
            self._get(url).kv_addr = kv_addr

    # ---- roles and draining -------------------------------------------------
    def set_role(self, url: str, role: Role | str) -> Role:
        """Give `url` a new role; returns the old one.

        New leases follow the new role immediately; leases already granted finish
        where they are (see `inflight` / `wait_drained`).
        """
        with self._lock:
            inst = self._get(url)
            old, inst.role = inst.role, _role(role)
            self._lock.notify_all()
            return old

    def inflight(self, url: str, stage: Stage | str | None = None) -> int:
        with self._lock:
            inst = self._get(url)
            if stage is None:
                return sum(inst.inflight.values())
            return inst.inflight[Stage(stage)]

    def wait_drained(self, url: str, stage: Stage | str, timeout: float | None = None) -> bool:
        """Block until `url` has no in-flight leases of `stage`; False on timeout."""
        stage = Stage(stage)
        with self._lock:
            return self._lock.wait_for(
                lambda: self._get(url).inflight[stage] == 0, timeout=timeout
            )

    # ---- health -------------------------------------------------------------
    def mark_down(self, url: str, reason: str) -> None:
        with self._lock:
            inst = self._get(url)
            inst.healthy, inst.down_reason = False, reason
            inst.failures += 1

    def mark_up(self, url: str) -> None:
        with self._lock:
            inst = self._get(url)
            inst.healthy, inst.down_reason, inst.failures = True, None, 0
            self._lock.notify_all()

    # ---- leasing --------------------------------------------------------------
    def candidates(self, stage: Stage | str, exclude: Iterable[str] = ()) -> list[Instance]:
        stage = Stage(stage)
        excluded = {_norm_url(u) for u in exclude}
        with self._lock:
            return [
                i
                for i in self._instances.values()
                if i.healthy and i.role.accepts(stage) and i.url not in excluded
            ]

    def acquire(self, stage: Stage | str, exclude: Iterable[str] = ()) -> Instance:
        """Lease the healthy instance accepting `stage` with the fewest in-flight
        leases of that stage, then the fewest of any stage (ties rotate). A prefill
        instance still draining decodes (re-roled from decode) counts as holding one
        prompt more. Raises `NoInstanceAvailable` if there is none.

        Why the stage first: a prompt waits for the prompts ahead of it, not for the
        decodes an instance runs (vLLM schedules them in the same steps, chunked), so an
        instance re-roled from decode to prefill takes prompts at once while it drains its
        decodes. Counting every lease kept it idle for prefill until its longest decode
        finished (tens of seconds for long outputs), which the cluster simulator showed
        costs the ratio controller most of its gain on a shifting mix. Why one prompt more
        while it drains: its steps carry its decodes, so its prompts run in chunks beside
        them, slower than on an instance without decodes; a prompt goes there only when every
        instance without decodes has a prompt more in flight (in the simulator this gained
        the controller 4-11 % goodput on the shifting mix under a P90 TBT SLO)."""
        stage = Stage(stage)
        excluded = {_norm_url(u) for u in exclude}
        with self._lock:
            cands = [
                i
                for i in self._instances.values()
                if i.healthy and i.role.accepts(stage) and i.url not in excluded
            ]
            if not cands:
                raise NoInstanceAvailable(
                    f"no healthy instance accepts the {stage.value} stage"
                )
            self._rr += 1
            n = len(cands)
            def draining(i: Instance) -> int:
                return int(stage is Stage.PREFILL and i.role is Role.PREFILL and i.inflight[Stage.DECODE] > 0)

            best = min(
                range(n),
                key=lambda k: (cands[k].inflight[stage] + draining(cands[k]), sum(cands[k].inflight.values()),
                               (k - self._rr) % n),
            )
            inst = cands[best]
            inst.inflight[stage] += 1
            return inst

    def release(self, url: str, stage: Stage | str, ok: bool = True) -> None:
        stage = Stage(stage)
        with self._lock:
            inst = self._instances.get(_norm_url(url))
            if inst is None:  # removed while in flight
                return
            inst.inflight[stage] -= 1
            if ok:
                inst.served[stage] += 1
            self._lock.notify_all()

    @contextlib.contextmanager
    def lease(self, stage: Stage | str, exclude: Iterable[str] = ()) -> Iterator[Instance]:
        inst = self.acquire(stage, exclude)
        ok = False
        try:
            yield inst
            ok = True
        finally:
            self.release(inst.url, stage, ok)

    # ---- router-side measurements ----------------------------------------------
    def waiting_changed(self, stage: Stage | str, delta: int) -> None:
        with self._lock:
            self._waiting[Stage(stage)] += delta

    def record_ttft(self, seconds: float, prompt_tokens: int | None = None) -> None:
        with self._lock:
            now = self._clock()
            self._ttft.append((now, seconds))
            if prompt_tokens is not None:
                self._prompt_tokens.append((now, prompt_tokens))

    def record_tpot(self, seconds: float) -> None:
        with self._lock:
            self._tpot.append((self._clock(), seconds))

    def record_tbt(self, p90_s: float, p99_s: float) -> None:
        """One streamed request's P90 and P99 gap between tokens."""
        with self._lock:
            self._tbt.append((self._clock(), p90_s, p99_s))

    def record_done(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._completed += 1
            else:
                self._failed += 1

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            now = self._clock()
            horizon = now - self._window_s
            for dq in (self._ttft, self._tpot, self._prompt_tokens, self._tbt):
                while dq and dq[0][0] < horizon:
                    dq.popleft()
            return PoolSnapshot(
                t=now,
                window_s=self._window_s,
                instances=tuple(
                    InstanceSnapshot(
                        url=i.url,
                        role=i.role.value,
                        healthy=i.healthy,
                        inflight_prefill=i.inflight[Stage.PREFILL],
                        inflight_decode=i.inflight[Stage.DECODE],
                        served_prefill=i.served[Stage.PREFILL],
                        served_decode=i.served[Stage.DECODE],
                    )
                    for i in self._instances.values()
                ),
                ttft_s=tuple(v for _, v in self._ttft),
                tpot_s=tuple(v for _, v in self._tpot),
                prompt_tokens=tuple(v for _, v in self._prompt_tokens),
                waiting_prefill=self._waiting[Stage.PREFILL],
                waiting_decode=self._waiting[Stage.DECODE],
                completed=self._completed,
                failed=self._failed,
                tbt_p90_s=tuple(v for _, v, _ in self._tbt),
                tbt_p99_s=tuple(v for _, _, v in self._tbt),
            )

    def _get(self, url: str) -> Instance:
        try:
            return self._instances[_norm_url(url)]
        except KeyError:
            raise KeyError(
                f"unknown instance {url!r}; known: {sorted(self._instances)}"
            ) from None


def _norm_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"instance URL must start with http:// or https://, got {url!r}")
    return url


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValueError(
            f"role must be one of {[r.value for r in Role]}, got {role!r}"
        ) from None
