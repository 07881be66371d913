"""NIXL data plane for the KV transport: payload bytes move by one-sided RDMA READ.

The control channel stays the authenticated ZeroMQ protocol of `transport.py`; only the
bytes of a chunk change path. After the HMAC handshake the server sends its NIXL agent's
metadata (connection info); for each staged chunk it registers the chunk's host buffer with
its agent and sends a descriptor (address, length) with the partial metadata of that buffer
instead of the payload; the puller loads the metadata, READs the bytes into a buffer of its
own, registered with its agent, and acknowledges the whole transfer with DONE so the server
may deregister and release it. Descriptors are only ever sent to
a peer that proved the shared secret, so an unauthenticated peer learns no address.

Server and puller each own one agent per process. NIXL picks the fabric (UCX: RDMA on a
cluster with InfiniBand/RoCE, shared memory or TCP on one host); the staged buffers are host
memory ("DRAM"), so this plane moves what the prefill worker staged, like the ZeroMQ one.

NIXL is optional: `available()` says whether it can be imported (``pip install nixl``,
with ``--no-deps`` on a CPU machine so that pip does not pull a CUDA build of torch).
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

__all__ = ["available", "import_error", "NixlServerPlane", "NixlClientPlane", "client_plane"]

_MEM = "DRAM"
_POLL_S = 0.0002  # completion polling interval of a READ


def import_error() -> str | None:
    """None when NIXL can be used here, else why not."""
    try:
        importlib.import_module("nixl._api")
    except Exception as e:  # ImportError, or a broken native library
        return f"{type(e).__name__}: {e}"
    return None


def available() -> bool:
    return import_error() is None


def _new_agent(role: str):
    from nixl._api import nixl_agent, nixl_agent_config

    name = f"frontier-pd-{role}-{uuid.uuid4().hex[:12]}"
    # No progress thread: NIXL's spins a whole core even when idle (measured: 2.0 s of CPU in
    # 2 s idle), which an engine beside its own compute threads cannot spare. Progress is
    # driven instead by the puller polling its READ and by the server's loop (`progress`).
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


def _address(buf: memoryview) -> tuple[np.ndarray, int]:
    """A uint8 view of `buf` (kept alive by the caller) and its address."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr, int(arr.ctypes.data)


@dataclass
class _Registered:
    handle: object  # nixlRegDList
    buffers: list = field(default_factory=list)  # keeps the memory alive while registered


class NixlServerPlane:
    """Prefill side: registers staged chunks and hands out their descriptors.

    Used only from the KV server's thread (one owner), so it needs no lock.
    """

    def __init__(self) -> None:
        self._agent = _new_agent("srv")
        self.metadata: bytes = self._agent.get_agent_metadata()
        self._regs: dict[object, list[_Registered]] = {}  # session key -> its registrations

    def descriptor(self, key, payload: memoryview) -> tuple[dict, bytes]:
        """Register `payload` (kept registered until `release(key)`); returns its descriptor
        and the partial agent metadata a puller loads before reading it."""
        arr, addr = _address(payload)
        descs = self._agent.get_reg_descs([(addr, arr.nbytes, 0, "")], _MEM)
        handle = self._agent.register_memory(descs)
        self._regs.setdefault(key, []).append(_Registered(handle, [payload, arr]))
        return {"addr": addr, "n": arr.nbytes}, self._agent.get_partial_agent_metadata(descs)

    def release(self, key) -> None:
        for r in self._regs.pop(key, []):
            self._agent.deregister_memory(r.handle)

    def progress(self) -> None:
        """Let the agent make progress (a READ over a transport that needs the target's help,
        e.g. UCX over TCP, completes only while the target progresses)."""
        self._agent.get_new_notifs()

    def registered_transfers(self) -> int:
        return len(self._regs)

    def close(self) -> None:
        for key in list(self._regs):
            self.release(key)


class NixlClientPlane:
    """Decode side: READs described chunks from a server's agent. Thread-safe (one lock
    around the agent; the pull pool's threads share it)."""

    def __init__(self) -> None:
        self._agent = _new_agent("cli")
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}  # remote agent name -> pulls using it now
        self._abandoned: list = []

    def connect(self, metadata: bytes) -> str:
        """Load a server's connection metadata for one pull; pair with `disconnect`."""
        with self._lock:
            name = self._agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else name
            self._users[name] = self._users.get(name, 0) + 1
            return name

    def load(self, metadata: bytes) -> None:
        """Load the partial metadata of a buffer the server registered."""
        with self._lock:
            self._agent.add_remote_agent(metadata)

    def disconnect(self, remote: str) -> None:
        """End of a pull. The last pull of a server drops its remote agent, and with it the
        metadata of every buffer loaded for it (the server deregisters them anyway)."""
        with self._lock:
            n = self._users.get(remote, 0) - 1
            if n > 0:
                self._users[remote] = n
                return
            self._users.pop(remote, None)
            try:
                self._agent.remove_remote_agent(remote)
            except Exception:
                pass  # already gone

    def read(self, remote: str, addr: int, nbytes: int, deadline: float) -> memoryview:
        """READ ``nbytes`` at ``addr`` of agent `remote` into a new buffer; raises
        TimeoutError past `deadline` (monotonic) and RuntimeError when NIXL reports an error."""
        dst = np.empty(nbytes, dtype=np.uint8)
        daddr = int(dst.ctypes.data)
        with self._lock:
            reg = self._agent.register_memory(
                self._agent.get_reg_descs([(daddr, nbytes, 0, "")], _MEM)
            )
            local = self._agent.get_xfer_descs([(daddr, nbytes, 0)], _MEM)
            remote_d = self._agent.get_xfer_descs([(addr, nbytes, 0)], _MEM)
            handle = self._agent.initialize_xfer("READ", local, remote_d, remote)
            state = self._agent.transfer(handle)
        try:
            while state != "DONE":
                if state == "ERR":
                    raise RuntimeError(f"NIXL READ of {nbytes} B from {remote} failed")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL READ of {nbytes} B from {remote} timed out")
                time.sleep(_POLL_S)
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
        finally:
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle)
                    self._agent.deregister_memory(reg)
                except Exception:
                    # still in flight (timed out): keep the target buffer alive for good
                    # rather than let the NIC write into freed memory
                    self._abandoned.append((handle, reg, dst))
        return memoryview(dst)


_CLIENT: NixlClientPlane | None = None
_CLIENT_LOCK = threading.Lock()


def client_plane() -> NixlClientPlane:
    """This process's puller agent, created on first use."""
    global _CLIENT
    with _CLIENT_LOCK:
        if _CLIENT is None:
            _CLIENT = NixlClientPlane()
        return _CLIENT
