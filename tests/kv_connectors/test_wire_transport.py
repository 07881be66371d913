"""vLLM-free core of the P/D connector: wire encodings, staging, the ZeroMQ and NIXL transports.

The transport tests run for both transports; the NIXL ones need the `nixl` package (installed by
`make setup`) and are skipped, with the import error as the reason, where it cannot be imported."""

import socket
import threading
import time

import pytest
import torch

from pd_harness import CuttingProxy
from vllm_frontier.kv_connectors import nixl_plane, wire
from vllm_frontier.kv_connectors.staging import Chunk, StagingStore
from vllm_frontier.kv_connectors.transport import AuthError, Counters, TransferError, get_transport

SECRET = b"s3cret"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("t", [1, 17])
def test_raw_roundtrip_is_exact(dtype, t):
    rows = (torch.randn(t, 576) * 3).to(dtype) if dtype != torch.uint8 else torch.randint(0, 255, (t, 132), dtype=torch.uint8)
    enc, payload = wire.encode_rows(rows, "fp8" if dtype == torch.uint8 else "raw")
    assert enc == "raw"  # fp8 does not apply to uint8 indexer rows
    back = wire.decode_rows(payload, enc, rows.shape[1], dtype)
    assert torch.equal(back, rows)


def test_fp8_row_is_656_bytes_and_accurate():
    torch.manual_seed(0)
    rows = torch.randn(33, 576, dtype=torch.bfloat16)
    rows[3, :128] = 0  # an all-zero group must decode to zeros, not NaN
    enc, payload = wire.encode_rows(rows, "fp8")
    assert enc == "fp8" and payload.shape == (33, 656)
    assert wire.encoded_nbytes(33, 576, torch.bfloat16, "raw") == 33 * 1152
    back = wire.decode_rows(payload, "fp8", 576, torch.bfloat16).float()
    ref = rows.float()
    assert torch.equal(back[:, 512:], ref[:, 512:])  # rope is bf16 already: exact
    assert torch.all(back[3, :128] == 0)
    # e4m3 has 3 mantissa bits: relative rounding step 2**-3, so error <= 2**-4 * group amax
    amax = ref[:, :512].reshape(33, 4, 128).abs().amax(-1, keepdim=True)
    err = (back[:, :512] - ref[:, :512]).reshape(33, 4, 128).abs()
    assert torch.all(err <= amax * 2**-4 + 1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(name):
    if name == "nixl" and (why := nixl_plane.import_error()):
        pytest.skip(f"NIXL cannot be imported here: {why}")
    return get_transport(name)


@pytest.fixture(params=["zmq", "nixl"])
def server(request):
    """(store, server, server counters, transport) for each transport."""
    tr = _need(request.param)
    store = StagingStore(ttl_s=60)
    counters = Counters()
    srv = tr.make_server(store, "127.0.0.1", _free_port(), SECRET, counters, unknown_wait_s=0.5)
    srv.start()
    yield store, srv, counters, tr
    srv.stop()


def _chunk(layer, start, end, fill):
    rows = torch.full((end - start, 576), float(fill))
    enc, payload = wire.encode_rows(rows, "raw")
    return Chunk(layer, start, end, enc, "float32", 576, memoryview(payload.numpy()))


def test_streams_layers_as_they_are_produced(server):
    store, srv, counters, tr = server
    store.open("t1")
    store.add("t1", _chunk("L0", 0, 5, 1))
    got, client = [], Counters()

    def produce_rest():
        time.sleep(0.2)  # the pull is already under way: later layers stream in
        store.add("t1", _chunk("L1", 0, 5, 2))
        store.close("t1", 5)

    threading.Thread(target=produce_rest).start()
    res = tr.pull(srv.address, "t1", SECRET, lambda h, p: got.append((h["l"], bytes(p))), client, timeout_s=10)
    assert [g[0] for g in got] == ["L0", "L1"] and res.chunks == 2 and res.num_tokens == 5
    assert wire.decode_rows(torch.frombuffer(bytearray(got[1][1]), dtype=torch.uint8).reshape(5, -1),
                            "raw", 576, torch.float32).eq(2).all()
    assert client.totals()["recv_bytes"] == 2 * 5 * 576 * 4
    # released after the last chunk went out (NIXL: once the puller said DONE)
    deadline = time.monotonic() + 5
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(store) == 0
    assert counters.totals()["sent_bytes"] == 2 * 5 * 576 * 4
    if tr.name == "nixl":
        assert srv._nixl.registered_transfers() == 0  # buffers deregistered


def test_wrong_secret_rejected_both_ways(server):
    store, srv, counters, tr = server
    store.open("t2"); store.add("t2", _chunk("L0", 0, 2, 1)); store.close("t2", 2)
    client = Counters()
    # the server cannot prove the client's secret: the client rejects its KV
    with pytest.raises(AuthError):
        tr.pull(srv.address, "t2", b"other", lambda h, p: pytest.fail("KV accepted"), client, timeout_s=5)
    assert client.totals()["rejected_auth"] == 1
    # a client that cannot prove the secret is refused by the server
    import zmq
    from vllm_frontier.kv_connectors import auth
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(srv.address)
    sock.send_multipart([b"PULLN" if tr.name == "nixl" else b"PULL1", auth.new_nonce(), b"t2"])
    assert sock.poll(5000) and sock.recv_multipart()[0] == b"CHAL"
    sock.send_multipart([b"AUTH", b"x" * 32])
    # no NIXL metadata or buffer address reaches a peer that failed the challenge
    assert sock.poll(5000) and sock.recv_multipart() == [b"ERR", b"peer failed authentication for t2"]
    sock.close(linger=0)
    assert counters.totals().get("rejected_auth") == 1
    assert store.get("t2") is not None  # the real consumer can still pull it


def test_unknown_transfer_rejected_and_counted(server):
    _, srv, counters, tr = server
    with pytest.raises(TransferError, match="unknown transfer"):
        tr.pull(srv.address, "nope", SECRET, lambda h, p: None, Counters(), timeout_s=5)
    assert counters.totals()["rejected_unknown"] == 1


def test_dead_server_fails_fast_not_hang():
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        get_transport("zmq").pull(f"tcp://127.0.0.1:{_free_port()}", "x", SECRET, lambda h, p: None,
                                  Counters(), timeout_s=3, idle_timeout_s=1)
    assert time.monotonic() - t0 < 3 + 0.5  # bounded by timeout_s (retries included)


@pytest.mark.parametrize("server", ["zmq"], indirect=True)  # NIXL: see the control-channel cut test below
def test_connection_killed_mid_transfer(server):
    """A TCP proxy forwards the first 64 KiB of KV, then cuts both sides."""
    store, srv, _, tr = server
    store.open("t3")
    for i in range(8):
        store.add("t3", _chunk(f"L{i}", 0, 64, i))  # 8 x 147 KiB
    store.close("t3", 64)
    proxy = CuttingProxy(int(srv.address.rsplit(":", 1)[1]), limit=65536)
    got = []
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        tr.pull(f"tcp://127.0.0.1:{proxy.port}", "t3", SECRET, lambda h, p: got.append(h),
                Counters(), timeout_s=10, idle_timeout_s=2)
    assert len(got) < 8 and time.monotonic() - t0 < 10  # retried, then failed within timeout_s


def test_server_that_drops_every_connection_fails_the_pull_after_max_attempts():
    """A connection that drops during the handshake is a lost attempt (bounded by `_MAX_ATTEMPTS`), not a
    slow server to be waited for until the deadline: counted as slow, the puller reconnected in a tight
    loop for the whole `timeout_s` (over 160k attempts in 120 s behind a proxy that refused after a cut)."""
    from vllm_frontier.kv_connectors.transport import _MAX_ATTEMPTS

    lsock = socket.create_server(("127.0.0.1", 0))

    def drop_all():
        while True:
            try:
                lsock.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=drop_all, daemon=True).start()
    client = Counters()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match=f"after {_MAX_ATTEMPTS} attempts"):
        get_transport("zmq").pull(f"tcp://127.0.0.1:{lsock.getsockname()[1]}", "t", SECRET,
                                  lambda h, p: None, client, timeout_s=20, idle_timeout_s=5)
    assert time.monotonic() - t0 < 10
    assert client.totals().get("pull_retries") == _MAX_ATTEMPTS - 1
    lsock.close()


def test_cutting_proxy_forwards_abandoned_connections_and_cuts_the_first_to_reach_the_limit():
    """The harness proxy itself: a client that gives up before any data (as a puller does when the
    challenge is slow) and reconnects still gets its connection, which is cut after `limit` bytes;
    connections after the cut get nothing."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: (c.recv(1) and c.sendall(b"x" * 300_000)), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    proxy = CuttingProxy(srv.getsockname()[1], limit=65536)

    def read_all(sock: socket.socket) -> int:
        n = 0
        try:
            while (d := sock.recv(65536)):
                n += len(d)
        except OSError:
            pass
        return n

    socket.create_connection(("127.0.0.1", proxy.port)).close()  # abandoned before any byte
    assert not proxy.cut.wait(0.3)
    c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    c.sendall(b"?")
    assert read_all(c) == 65536
    assert proxy.cut.wait(5)
    try:
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        late.sendall(b"?")
        assert read_all(late) == 0
    except OSError:
        pass  # refused: the listener is already closed
    srv.close()


def test_staging_ttl_and_budget():
    now = [0.0]
    evicted = []
    st = StagingStore(ttl_s=5, max_bytes=3 * 576 * 4 * 2, clock=lambda: now[0], on_evict=lambda t, r: evicted.append((t, r)))
    st.open("a"); st.add("a", _chunk("L0", 0, 2, 0))
    now[0] = 1
    st.open("b"); st.add("b", _chunk("L0", 0, 2, 0)); st.add("b", _chunk("L1", 0, 2, 0))
    st.add("b", _chunk("L2", 0, 2, 0))  # over budget: oldest other transfer goes
    assert evicted == [("a", "staging budget exceeded")]
    now[0] = 7
    assert st.sweep() == ["b"] and st.nbytes == 0 and len(st) == 0


def test_staging_ttl_counts_from_the_last_chunk_and_spares_transfers_being_pulled():
    now = [0.0]
    st = StagingStore(ttl_s=5, clock=lambda: now[0])
    st.open("long"); st.add("long", _chunk("L0", 0, 2, 0))
    now[0] = 4
    st.close("long", 2)  # a long prefill: the TTL starts when its KV is complete
    st.open("busy"); st.add("busy", _chunk("L0", 0, 2, 0)); st.close("busy", 2)
    now[0] = 8
    assert st.sweep() == [] and len(st) == 2
    now[0] = 9.5
    assert st.sweep(pulling={"busy"}) == ["long"]  # "busy" is being pulled right now
    now[0] = 100
    assert st.sweep() == ["busy"] and len(st) == 0


def test_keepalive_while_prefill_is_slow(server):
    """A pull that starts before the prefill outlives the idle timeout: the server sends WAIT."""
    store, srv, _, tr = server

    def produce_late():
        time.sleep(0.3)
        store.open("t4")
        time.sleep(1.5)  # longer than the client's idle timeout
        store.add("t4", _chunk("L0", 0, 3, 1))
        store.close("t4", 3)

    threading.Thread(target=produce_late).start()
    res = tr.pull(srv.address, "t4", SECRET, lambda h, p: None, Counters(), timeout_s=10, idle_timeout_s=1.0)
    assert res.chunks == 1 and res.num_tokens == 3


def _serve_in_child(transport, port, ready, stop):
    """Child process: a KV server of `transport` with one staged transfer of two layers."""
    store = StagingStore(ttl_s=60)
    srv = get_transport(transport).make_server(store, "127.0.0.1", port, SECRET, Counters(), unknown_wait_s=2)
    store.open("x1")
    for i in range(2):
        store.add("x1", _chunk(f"L{i}", 0, 300, i + 7))  # 300 x 2304 B per layer
    store.close("x1", 300)
    srv.start()
    ready.set()
    stop.wait(60)
    srv.stop()


def test_nixl_pull_from_another_process():
    """The bytes cross a process boundary by NIXL READ (the server's memory, not a copy in a frame)."""
    import multiprocessing as mp
    tr = _need("nixl")
    ctx = mp.get_context("spawn")
    ready, stop, port = ctx.Event(), ctx.Event(), _free_port()
    child = ctx.Process(target=_serve_in_child, args=("nixl", port, ready, stop), daemon=True)
    child.start()
    try:
        assert ready.wait(60), "child KV server did not start"
        got, client = {}, Counters()
        res = tr.pull(f"tcp://127.0.0.1:{port}", "x1", SECRET,
                      lambda h, p: got.__setitem__(h["l"], bytes(p)), client, timeout_s=30)
        assert res.chunks == 2 and res.num_tokens == 300
        for i in range(2):
            rows = wire.decode_rows(torch.frombuffer(bytearray(got[f"L{i}"]), dtype=torch.uint8).reshape(300, -1),
                                    "raw", 576, torch.float32)
            assert rows.eq(i + 7).all()
        assert client.totals()["recv_bytes"] == 2 * 300 * 576 * 4
    finally:
        stop.set()
        child.join(30)


def test_zmq_puller_is_served_by_a_nixl_server():
    """Mixed deployments: a NIXL-capable server still answers plain ZeroMQ pulls."""
    nixl = _need("nixl")
    store, counters = StagingStore(ttl_s=60), Counters()
    srv = nixl.make_server(store, "127.0.0.1", _free_port(), SECRET, counters, unknown_wait_s=0.5)
    srv.start()
    try:
        store.open("m1"); store.add("m1", _chunk("L0", 0, 4, 3)); store.close("m1", 4)
        got = []
        res = get_transport("zmq").pull(srv.address, "m1", SECRET, lambda h, p: got.append(bytes(p)),
                                        Counters(), timeout_s=10)
        assert res.chunks == 1 and len(got[0]) == 4 * 576 * 4
        assert srv._nixl.registered_transfers() == 0  # nothing was registered for an inline pull
    finally:
        srv.stop()


def test_nixl_puller_refused_by_a_zmq_only_server_with_a_clear_error():
    nixl = _need("nixl")
    store, counters = StagingStore(ttl_s=60), Counters()
    srv = get_transport("zmq").make_server(store, "127.0.0.1", _free_port(), SECRET, counters)
    srv.start()
    try:
        store.open("m2"); store.add("m2", _chunk("L0", 0, 4, 3)); store.close("m2", 4)
        with pytest.raises(TransferError, match="no NIXL plane"):
            nixl.pull(srv.address, "m2", SECRET, lambda h, p: None, Counters(), timeout_s=10)
        assert counters.totals()["rejected_protocol"] == 1
        assert store.get("m2") is not None
    finally:
        srv.stop()


def test_nixl_control_channel_cut_fails_the_pull_and_frees_registrations():
    """The control connection drops after the first descriptor: the pull fails within its timeout
    and the server deregisters what it had registered for that puller."""
    nixl = _need("nixl")
    store, counters = StagingStore(ttl_s=60), Counters()
    srv = nixl.make_server(store, "127.0.0.1", _free_port(), SECRET, counters, unknown_wait_s=0.5)
    srv.start()
    try:
        store.open("c1"); store.add("c1", _chunk("L0", 0, 8, 1))  # never closed: the pull waits
        got = []

        def on_chunk(h, p):
            got.append(h)
            raise RuntimeError("puller dies after the first chunk")

        with pytest.raises(RuntimeError, match="puller dies"):
            nixl.pull(srv.address, "c1", SECRET, on_chunk, Counters(), timeout_s=10)
        assert len(got) == 1
        store.add("c1", _chunk("L1", 0, 8, 2))  # the server notices the puller is gone when it sends
        deadline = time.monotonic() + 10
        while srv._nixl.registered_transfers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv._nixl.registered_transfers() == 0
        assert store.get("c1") is not None  # staged KV stays for a retry
    finally:
        srv.stop()


def test_transport_names():
    assert get_transport("auto").name == ("nixl" if nixl_plane.available() else "zmq")
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'"):
        get_transport("rdma")
