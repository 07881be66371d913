"""KV transports: how staged chunks move from a prefill worker to a decode worker.

The interface is two calls: a server that publishes a `StagingStore` on an address,
and a blocking `pull(addr, tid, on_chunk)` on the decode side. `ZmqTransport` (TCP,
pyzmq) moves everything over ZeroMQ; `NixlTransport` keeps the same authenticated
ZeroMQ control channel and moves the payload bytes by NIXL READ (`nixl_plane.py`).
A NIXL-capable server also answers plain ZeroMQ pulls, so mixed deployments work.

ZeroMQ protocol (multipart frames; the server is a ROUTER, each pull a DEALER):

    C: PULL1 | client_nonce | tid
    S: CHAL  | server_nonce | server_proof          (see auth.py)
    C: AUTH  | client_proof
    S: KV    | header json  | payload   (repeated, layer by layer, as produced)
    S: WAIT                              (keepalive every 0.5 s while nothing is ready)
    S: END   | summary json              or   S: ERR | reason

NIXL pulls open with PULLN instead of PULL1; after AUTH the server sends
``NIXL | agent metadata`` and each chunk as ``KVN | header json`` whose header also holds
the staged buffer's address and length; the puller READs it and, after END, answers
``DONE`` so the server can deregister the buffers (it also does so after a timeout).

A server that cannot prove the secret, a malformed chunk, a lost connection, an
idle gap longer than `idle_timeout_s` or a transfer longer than `timeout_s` ends the
pull with `TransferError`; nothing blocks forever.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.utils.monitor

from vllm_frontier.kv_connectors import auth, nixl_plane
from vllm_frontier.kv_connectors.staging import StagingStore

__all__ = [
    "Counters",
    "TransferError",
    "AuthError",
    "PullResult",
    "KVServer",
    "KVTransport",
    "ZmqTransport",
    "NixlTransport",
    "TRANSPORTS",
    "get_transport",
]

# under "vllm." so that vLLM's logging configuration (VLLM_LOGGING_LEVEL) applies in its processes
logger = logging.getLogger("vllm.frontier.pd.transport")

_CTRL_MAX_BYTES = 4096  # clients only send small control frames
_KEEPALIVE_S = 0.5  # a waiting puller hears from the server this often
_HANDSHAKE_S = 120.0  # an unfinished challenge is dropped after this
_HANDSHAKE_HOLD_S = 30.0  # staged KV does not expire while a challenge for it is younger than this
_MAX_ATTEMPTS = 3  # a pull whose connection was lost is retried on a new one


class TransferError(RuntimeError):
    """A pull failed; the decode side falls back (recompute) or reports an error."""


class AuthError(TransferError):
    """The peer could not prove the shared secret."""


class Counters:
    """Thread-safe named counters; `take()` returns and resets the deltas."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delta: dict[str, int] = {}
        self._total: dict[str, int] = {}

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._delta[name] = self._delta.get(name, 0) + n
            self._total[name] = self._total.get(name, 0) + n

    def take(self) -> dict[str, int]:
        with self._lock:
            d, self._delta = self._delta, {}
            return d

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._total)


@dataclass(frozen=True)
class PullResult:
    chunks: int
    nbytes: int
    num_tokens: int
    seconds: float


# on_chunk(header dict, payload bytes-like) -> None; raising aborts the pull
ChunkSink = Callable[[dict, memoryview], None]


class KVServer(ABC):
    address: str

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...


class KVTransport(ABC):
    name: str

    @abstractmethod
    def make_server(
        self, store: StagingStore, host: str, port: int, secret: bytes, counters: Counters,
        *, unknown_wait_s: float = 10.0,
    ) -> KVServer: ...

    @abstractmethod
    def pull(
        self, addr: str, tid: str, secret: bytes, on_chunk: ChunkSink, counters: Counters,
        *, timeout_s: float = 30.0, idle_timeout_s: float = 10.0,
    ) -> PullResult: ...


_CTX: zmq.Context | None = None
_CTX_PID: int | None = None
_CTX_LOCK = threading.Lock()


def _context() -> zmq.Context:
    """This module's own ZeroMQ context (not shared with vLLM's sockets), one per process."""
    global _CTX, _CTX_PID
    with _CTX_LOCK:
        if _CTX is None or _CTX_PID != os.getpid():
            _CTX, _CTX_PID = zmq.Context(io_threads=1), os.getpid()
        return _CTX


def unpin_current_thread() -> None:
    """Let the calling thread run on every CPU the process may use.

    vLLM's CPU worker pins its main thread (OpenMP thread 0) to one core, and threads it
    starts inherit that mask. On a small machine two engines' workers can share that core
    with their spinning main threads, and a KV server or puller pinned there starves for
    tens of seconds (measured: pulls timing out on an idle 2-core machine). Transfer threads
    do I/O, not compute, so they float.
    """
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError, ValueError):  # not Linux, or a cpuset forbids it
        pass


class _Retry(TransferError):
    """The attempt was lost in transit (no answer to the challenge, connection dropped).
    `server_slow`: the connection stood but the challenge came late (a busy prefill instance)."""

    def __init__(self, msg: str, server_slow: bool = False):
        super().__init__(msg)
        self.server_slow = server_slow


# --------------------------------------------------------------------------- server
@dataclass
class _Session:
    tid: str
    client_nonce: bytes
    server_nonce: bytes
    started: float
    authed: bool = False
    nixl: bool = False  # payloads by NIXL READ (PULLN) instead of inline frames
    done_wait: bool = False  # NIXL: END sent, waiting for the puller's DONE
    pending: tuple | None = None  # NIXL: (header, metadata) of the next chunk, registered, not sent
    next_chunk: int = 0
    sent_bytes: int = 0
    last_send: float = 0.0


class _ZmqServer(KVServer):
    def __init__(self, store, host, port, secret, counters, unknown_wait_s, nixl: bool = False):
        self._nixl = nixl_plane.NixlServerPlane() if nixl else None
        self._store = store
        self._secret = secret
        self._counters = counters
        self._unknown_wait_s = unknown_wait_s
        self._ctx = _context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _CTRL_MAX_BYTES)
        self._sock.setsockopt(zmq.SNDHWM, 64)
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, 0)  # a CPU-starved peer may greet late
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close()
            raise RuntimeError(
                f"frontier-pd: cannot bind the KV listener on {host}:{port} ({e}); set a "
                "free port with FRONTIER_PD_PORT or kv_connector_extra_config.port"
            ) from e
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sessions: dict[bytes, _Session] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frontier-pd-kv-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sock.close(linger=0)
        if self._nixl is not None:
            self._nixl.close()

    # one thread owns the socket: receive control frames, then push ready chunks
    def _run(self) -> None:
        unpin_current_thread()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            # authed sessions keep the loop busy, NIXL ones waiting for DONE included: the puller
            # is reading and the target's agent has to make progress for it
            busy = any(s.authed for s in self._sessions.values())
            events = dict(poller.poll(1 if busy else 50))
            if self._sock in events:
                for _ in range(256):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            for ident in list(self._sessions):
                self._pump(ident)
            if self._nixl is not None and busy:
                self._nixl.progress()
            now = time.monotonic()
            if now - last_sweep > 1.0:
                last_sweep = now
                # a transfer with a puller on it does not expire, nor one whose puller is in a recent
                # handshake (a busy server answers challenges late); abandoned handshakes stop counting
                pulling = {x.tid for x in self._sessions.values()
                           if x.authed or now - x.started < _HANDSHAKE_HOLD_S}
                for tid in self._store.sweep(pulling):
                    self._counters.incr("staging_expired")
                    logger.warning("frontier-pd: staged KV for %s expired unclaimed", tid)
                for ident, s in list(self._sessions.items()):
                    if (not s.authed or s.done_wait) and now - s.started > _HANDSHAKE_S:
                        self._drop(ident)  # abandoned handshake, or a NIXL puller that never said DONE

    def _send(self, ident: bytes, *frames) -> bool:
        """False when the peer is gone or its queue is full (retry later)."""
        try:
            self._sock.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            logger.debug("frontier-pd: send to %s would block (%s)", ident.hex(), frames[0])
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client disconnected
            if e.errno == zmq.EHOSTUNREACH:
                s = self._drop(ident)
                if s is not None:
                    self._counters.incr("send_aborted")
                    logger.warning("frontier-pd: puller of %s went away mid-transfer", s.tid)
                return False
            raise

    def _drop(self, ident: bytes) -> _Session | None:
        """Forget a session (the staged transfer stays for a retry) and its NIXL registrations."""
        s = self._sessions.pop(ident, None)
        if s is not None and s.nixl:
            self._nixl.release(ident)
        return s

    def _finish(self, ident: bytes) -> None:
        """The puller has the whole transfer: count it and release the staged KV."""
        s = self._drop(ident)
        self._counters.incr("sent_transfers")
        self._counters.incr("sent_bytes", s.sent_bytes)
        self._store.release(s.tid)

    def _reject(self, ident: bytes, counter: str, reason: str) -> None:
        self._counters.incr(counter)
        self._drop(ident)
        logger.warning("frontier-pd: rejected KV pull: %s", reason)
        self._send(ident, b"ERR", reason.encode())

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, kind, rest = frames[0], frames[1], frames[2:]
        if kind in (b"PULL1", b"PULLN") and len(rest) == 2 and len(rest[0]) == auth.NONCE_BYTES:
            if kind == b"PULLN" and self._nixl is None:
                self._reject(ident, "rejected_protocol",
                             "this KV server has no NIXL plane (set the transport to nixl on both sides)")
                return
            if len(self._sessions) > 1024:
                self._reject(ident, "rejected_busy", "too many open sessions")
                return
            cn, tid = rest
            logger.debug("frontier-pd: pull of %s from peer %s", tid, ident.hex())
            sn = auth.new_nonce()
            self._sessions[ident] = _Session(
                tid=tid.decode(errors="replace"), client_nonce=cn, server_nonce=sn,
                started=time.monotonic(), nixl=kind == b"PULLN",
            )
            self._send(ident, b"CHAL", sn, auth.server_proof(self._secret, cn, sn, tid))
        elif kind == b"AUTH" and len(rest) == 1 and ident in self._sessions:
            s = self._sessions[ident]
            want = auth.client_proof(self._secret, s.client_nonce, s.server_nonce, s.tid.encode())
            if s.authed or not auth.verify(want, rest[0]):
                self._reject(ident, "rejected_auth", f"peer failed authentication for {s.tid}")
                return
            s.authed, s.started = True, time.monotonic()
            logger.debug("frontier-pd: peer %s authenticated for %s", ident.hex(), s.tid)
            if s.nixl:
                self._send(ident, b"NIXL", self._nixl.metadata)
        elif kind == b"DONE" and not rest and ident in self._sessions and self._sessions[ident].done_wait:
            self._finish(ident)
        else:
            self._reject(ident, "rejected_protocol", f"unexpected frame {kind[:16]!r}")

    def _pump(self, ident: bytes) -> None:
        s = self._sessions.get(ident)
        if s is None or not s.authed or s.done_wait:
            return
        tr = self._store.get(s.tid)
        now = time.monotonic()
        if tr is None:
            # the pull may arrive before the prefill request is scheduled: wait a while
            if now - s.started > self._unknown_wait_s:
                self._reject(ident, "rejected_unknown", f"unknown transfer {s.tid}")
            else:
                self._keepalive(ident, s, now)
            return
        if tr.error is not None:
            self._reject(ident, "send_failed", f"transfer {s.tid} failed: {tr.error}")
            self._store.release(s.tid)
            return
        chunks = tr.chunks
        while s.next_chunk < len(chunks):
            c = chunks[s.next_chunk]
            if s.nixl:  # register once, even when the send has to wait for the next round
                if s.pending is None:
                    desc, meta = self._nixl.descriptor(ident, c.payload)
                    s.pending = (json.dumps({**c.header(), **desc}).encode(), meta)
                sent = self._send(ident, b"KVN", *s.pending)
                if sent:
                    s.pending = None
            else:
                sent = self._send(ident, b"KV", json.dumps(c.header()).encode(), c.payload)
            if not sent:
                return
            s.next_chunk += 1
            s.sent_bytes += c.payload.nbytes
            s.last_send = now
        if tr.closed:
            summary = {"chunks": s.next_chunk, "tokens": tr.num_tokens, "bytes": s.sent_bytes}
            if self._send(ident, b"END", json.dumps(summary).encode()):
                logger.debug("frontier-pd: sent %s to %s: %s", s.tid, ident.hex(), summary)
                if s.nixl:  # the puller may still be reading: release on its DONE
                    s.done_wait, s.started = True, now
                    return
                self._finish(ident)
        else:
            self._keepalive(ident, s, now)

    def _keepalive(self, ident: bytes, s: _Session, now: float) -> None:
        """Tell a waiting puller the server is alive (the prefill is still computing)."""
        if now - s.last_send >= _KEEPALIVE_S and self._send(ident, b"WAIT"):
            s.last_send = now


# --------------------------------------------------------------------------- client
def _zmq_attempt(addr, tid, secret, on_chunk, counters, t0, deadline, timeout_s, idle_timeout_s,
                 handshake_s, plane: nixl_plane.NixlClientPlane | None = None) -> PullResult:
    ctx = _context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 0)
    # a unique monitor endpoint: pyzmq's default name reuses the socket's fd number, so a new
    # socket could receive the close events of an earlier one
    mon_addr = f"inproc://frontier-pd-monitor-{uuid.uuid4().hex}"
    sock.monitor(mon_addr, zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
    monitor = ctx.socket(zmq.PAIR)
    monitor.connect(mon_addr)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    tid_b = tid.encode()
    connected = False
    linger_ms = 0
    remote = None  # NIXL agent of the server, once it has sent its metadata

    def recv(idle: float = idle_timeout_s) -> list[bytes]:
        nonlocal connected
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TransferError(f"transfer {tid} from {addr} timed out after {timeout_s}s")
            wait = min(idle, deadline - now)
            events = dict(poller.poll(int(wait * 1000)))
            if not events:
                raise TransferError(
                    f"transfer {tid} from {addr}: no data for {idle}s"
                    + ("" if connected else " (could not connect)")
                )
            if monitor in events:
                ev = zmq.utils.monitor.recv_monitor_message(monitor)
                if ev["event"] == zmq.EVENT_CONNECTED:
                    connected = True
                elif ev["event"] == zmq.EVENT_DISCONNECTED:
                    raise _Retry(f"transfer {tid}: connection to {addr} lost")
            if sock in events:
                return sock.recv_multipart(copy=False)

    try:
        sock.connect(addr)
        cn = auth.new_nonce()
        sock.send_multipart([b"PULLN" if plane else b"PULL1", cn, tid_b])
        logger.debug("frontier-pd: pulling %s from %s", tid, addr)
        try:
            msg = recv(handshake_s)
        except _Retry:
            raise  # the connection dropped: a lost attempt, even if it had connected
        except TransferError as e:
            raise _Retry(str(e), server_slow=connected) from None
        kind = msg[0].bytes
        if kind == b"ERR":
            raise TransferError(f"server refused {tid}: {msg[1].bytes.decode(errors='replace')}")
        if kind != b"CHAL" or len(msg) != 3:
            raise TransferError(f"transfer {tid}: protocol error (expected CHAL)")
        sn, proof = msg[1].bytes, msg[2].bytes
        if not auth.verify(auth.server_proof(secret, cn, sn, tid_b), proof):
            counters.incr("rejected_auth")
            raise AuthError(
                f"KV server {addr} failed authentication (wrong FRONTIER_PD_SECRET?); "
                f"its KV for {tid} is rejected"
            )
        sock.send_multipart([b"AUTH", auth.client_proof(secret, cn, sn, tid_b)])
        logger.debug("frontier-pd: %s authenticated %s", tid, addr)
        chunks = nbytes = 0
        while True:
            msg = recv()
            kind = msg[0].bytes
            if kind in (b"KV", b"KVN") and len(msg) == 3 and (kind == b"KV" or remote is not None):
                if kind == b"KV":  # payload inline
                    try:
                        header = json.loads(msg[1].bytes)
                    except ValueError as e:
                        raise TransferError(f"transfer {tid}: bad chunk header") from e
                    payload = msg[2].buffer
                else:  # descriptor + partial metadata: READ the payload from the server's memory
                    try:
                        header = json.loads(msg[1].bytes)
                        addr_n = int(header["addr"]), int(header["n"])
                        plane.load(msg[2].bytes)
                    except Exception as e:  # malformed header, or metadata NIXL refuses
                        raise TransferError(f"transfer {tid}: bad chunk descriptor ({e})") from e
                    try:
                        payload = plane.read(remote, *addr_n, deadline)
                    except TimeoutError:
                        raise TransferError(f"transfer {tid} from {addr} timed out after {timeout_s}s") from None
                    except RuntimeError as e:
                        raise TransferError(f"transfer {tid}: {e}") from None
                on_chunk(header, payload)
                chunks += 1
                nbytes += len(payload)
            elif kind == b"NIXL" and plane is not None and len(msg) == 2 and remote is None:
                remote = plane.connect(msg[1].bytes)
            elif kind == b"WAIT":
                continue  # the prefill is still running; the overall deadline still applies
            elif kind == b"END" and len(msg) == 2:
                summary = json.loads(msg[1].bytes)
                if summary.get("chunks") != chunks:
                    raise TransferError(
                        f"transfer {tid}: got {chunks} chunks, server sent {summary.get('chunks')}"
                    )
                if plane is not None:  # the server keeps the buffers registered until this
                    sock.send_multipart([b"DONE"])
                    linger_ms = 1000
                counters.incr("recv_transfers")
                counters.incr("recv_bytes", nbytes)
                return PullResult(chunks, nbytes, int(summary.get("tokens", 0)),
                                  time.monotonic() - t0)
            elif kind == b"ERR":
                raise TransferError(
                    f"server refused {tid}: {msg[1].bytes.decode(errors='replace')}"
                )
            else:
                raise TransferError(f"transfer {tid}: protocol error ({kind[:16]!r})")
    finally:
        if remote is not None:
            plane.disconnect(remote)
        sock.monitor(None, 0)
        monitor.close(linger=0)
        sock.close(linger=linger_ms)


def _zmq_pull(addr, tid, secret, on_chunk, counters, timeout_s, idle_timeout_s,
              plane: nixl_plane.NixlClientPlane | None = None) -> PullResult:
    """Pull with retries: an attempt whose challenge goes unanswered or whose connection drops is
    started again on a fresh connection (rows are rewritten idempotently) until `timeout_s`. At most
    `_MAX_ATTEMPTS` lost connections; a server that is connected but slow to answer (its worker busy
    with prefills on a saturated machine) is waited for until the deadline."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    handshake_s = min(idle_timeout_s, 5.0)
    attempt = lost = 0
    while True:
        attempt += 1
        try:
            return _zmq_attempt(addr, tid, secret, on_chunk, counters, t0, deadline, timeout_s,
                                idle_timeout_s, handshake_s, plane)
        except _Retry as e:
            lost += not e.server_slow
            if lost >= _MAX_ATTEMPTS or time.monotonic() >= deadline:
                raise TransferError(f"{e} (after {attempt} attempts)") from None
            counters.incr("pull_retries")
            logger.warning("frontier-pd: %s; retrying on a new connection", e)
            handshake_s = min(handshake_s * 2, idle_timeout_s)


class ZmqTransport(KVTransport):
    name = "zmq"

    def make_server(self, store, host, port, secret, counters, *, unknown_wait_s=10.0):
        return _ZmqServer(store, host, port, secret, counters, unknown_wait_s)

    def pull(self, addr, tid, secret, on_chunk, counters, *, timeout_s=30.0,
             idle_timeout_s=10.0):
        return _zmq_pull(addr, tid, secret, on_chunk, counters, timeout_s, idle_timeout_s)


class NixlTransport(ZmqTransport):
    """ZeroMQ control channel (same handshake), payloads by NIXL READ."""

    name = "nixl"

    def make_server(self, store, host, port, secret, counters, *, unknown_wait_s=10.0):
        return _ZmqServer(store, host, port, secret, counters, unknown_wait_s, nixl=True)

    def pull(self, addr, tid, secret, on_chunk, counters, *, timeout_s=30.0,
             idle_timeout_s=10.0):
        return _zmq_pull(addr, tid, secret, on_chunk, counters, timeout_s, idle_timeout_s,
                         plane=nixl_plane.client_plane())


TRANSPORTS: dict[str, type[KVTransport]] = {"zmq": ZmqTransport, "nixl": NixlTransport}


def get_transport(name: str) -> KVTransport:
    """`name` is a key of `TRANSPORTS`, or "auto" (NIXL when it can be imported, else ZeroMQ)."""
    if name == "auto":
        name = "nixl" if nixl_plane.available() else "zmq"
    if name not in TRANSPORTS:
        raise ValueError(
            f"unknown KV transport {name!r}; available: {sorted(TRANSPORTS)} or 'auto' "
            "(set FRONTIER_PD_TRANSPORT or kv_connector_extra_config.transport)"
        )
    if name == "nixl" and (why := nixl_plane.import_error()) is not None:
        raise ValueError(
            f"KV transport 'nixl' needs the NIXL Python package, which cannot be imported here ({why}); "
            "install it (`pip install nixl`, on a CPU-only machine `pip install --no-deps nixl nixl-cu12`) "
            "or set FRONTIER_PD_TRANSPORT=zmq"
        )
    return TRANSPORTS[name]()
