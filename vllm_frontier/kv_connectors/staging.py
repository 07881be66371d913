"""Prefill-side staging of KV chunks until a decode instance pulls them.

The producer (the prefill worker) copies each layer's rows out of the paged cache
into a `Transfer` as soon as the layer is computed, so the engine frees its blocks
when the request finishes, whatever happens to the transfer. A KV server streams
the chunks of a transfer as they appear (layer-wise overlap) and releases the
transfer when its last chunk is sent. A transfer no puller is connected for expires `ttl_s`
after its last chunk came in (after it was opened, while the prefill still runs); the byte budget
evicts oldest first when staged KV outgrows it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Chunk", "Transfer", "StagingStore"]


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, end)`` of one layer; `payload` is the encoded bytes
    (``(end - start) * bytes_per_row``) as a contiguous buffer."""

    layer: str
    start: int
    end: int
    encoding: str
    dtype: str  # cache dtype name, e.g. "bfloat16"
    width: int  # cache row width (elements)
    payload: memoryview

    def header(self) -> dict:
        return {
            "l": self.layer, "s": self.start, "e": self.end, "enc": self.encoding,
            "dt": self.dtype, "w": self.width,
        }


@dataclass
class Transfer:
    tid: str
    created: float  # opened, then: last chunk in (the TTL counts from here)
    chunks: list[Chunk] = field(default_factory=list)
    nbytes: int = 0
    closed: bool = False  # all chunks are in
    num_tokens: int = 0
    error: str | None = None


class StagingStore:
    """Thread-safe map transfer id -> `Transfer`."""

    def __init__(
        self,
        *,
        ttl_s: float = 120.0,
        max_bytes: int = 4 << 30,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str, str], None] | None = None,
    ) -> None:
        self._cv = threading.Condition()
        self._items: dict[str, Transfer] = {}
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_evict = on_evict
        self.nbytes = 0

    def open(self, tid: str) -> None:
        """Start (or restart, after a preemption) a transfer."""
        with self._cv:
            old = self._items.pop(tid, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[tid] = Transfer(tid=tid, created=self._clock())
            self._cv.notify_all()

    def add(self, tid: str, chunk: Chunk) -> None:
        with self._cv:
            tr = self._items.get(tid)
            if tr is None or tr.closed:
                return  # released or expired meanwhile: nobody will read it
            tr.chunks.append(chunk)
            n = chunk.payload.nbytes
            tr.nbytes += n
            self.nbytes += n
            self._cv.notify_all()
            self._evict_over_budget(keep=tid)

    def close(self, tid: str, num_tokens: int) -> None:
        with self._cv:
            tr = self._items.get(tid)
            if tr is not None:
                tr.closed, tr.num_tokens = True, num_tokens
                tr.created = self._clock()
                self._cv.notify_all()

    def fail(self, tid: str, reason: str) -> None:
        with self._cv:
            tr = self._items.get(tid)
            if tr is not None:
                tr.error = reason
                self._cv.notify_all()

    def get(self, tid: str) -> Transfer | None:
        with self._cv:
            return self._items.get(tid)

    def release(self, tid: str) -> None:
        with self._cv:
            tr = self._items.pop(tid, None)
            if tr is not None:
                self.nbytes -= tr.nbytes

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    def sweep(self, pulling: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Drop transfers older than the TTL, except those in `pulling` (a puller is on them
        now); returns their ids."""
        with self._cv:
            horizon = self._clock() - self._ttl_s
            dead = [t for t, tr in self._items.items() if tr.created < horizon and t not in pulling]
            for t in dead:
                self.nbytes -= self._items.pop(t).nbytes
        for t in dead:
            if self._on_evict:
                self._on_evict(t, "expired")
        return dead

    def _evict_over_budget(self, keep: str) -> None:
        # oldest first; called with the lock held
        while self.nbytes > self._max_bytes:
            victims = [t for t in self._items if t != keep]
            if not victims:
                return
            t = min(victims, key=lambda k: self._items[k].created)
            self.nbytes -= self._items.pop(t).nbytes
            if self._on_evict:
                self._on_evict(t, "staging budget exceeded")
