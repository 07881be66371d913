"""vLLM-free core of the P/D connector: wire encodings, staging, ZeroMQ transport."""

import socket
import threading
import time

import pytest
import torch

from vllm_frontier.kv_connectors import wire
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


@pytest.fixture
def server():
    store = StagingStore(ttl_s=60)
    counters = Counters()
    srv = get_transport("zmq").make_server(store, "127.0.0.1", _free_port(), SECRET, counters, unknown_wait_s=0.5)
    srv.start()
    yield store, srv, counters
    srv.stop()


def _chunk(layer, start, end, fill):
    rows = torch.full((end - start, 576), float(fill))
    enc, payload = wire.encode_rows(rows, "raw")
    return Chunk(layer, start, end, enc, "float32", 576, memoryview(payload.numpy()))


def test_streams_layers_as_they_are_produced(server):
    store, srv, _ = server
    store.open("t1")
    store.add("t1", _chunk("L0", 0, 5, 1))
    got, client = [], Counters()

    def produce_rest():
        time.sleep(0.2)  # the pull is already under way: later layers stream in
        store.add("t1", _chunk("L1", 0, 5, 2))
        store.close("t1", 5)

    threading.Thread(target=produce_rest).start()
    res = get_transport("zmq").pull(srv.address, "t1", SECRET,
                                    lambda h, p: got.append((h["l"], bytes(p))), client, timeout_s=10)
    assert [g[0] for g in got] == ["L0", "L1"] and res.chunks == 2 and res.num_tokens == 5
    assert wire.decode_rows(torch.frombuffer(bytearray(got[1][1]), dtype=torch.uint8).reshape(5, -1),
                            "raw", 576, torch.float32).eq(2).all()
    assert client.totals()["recv_bytes"] == 2 * 5 * 576 * 4
    assert len(store) == 0  # released after the last chunk went out


def test_wrong_secret_rejected_both_ways(server):
    store, srv, counters = server
    store.open("t2"); store.add("t2", _chunk("L0", 0, 2, 1)); store.close("t2", 2)
    client = Counters()
    # the server cannot prove the client's secret: the client rejects its KV
    with pytest.raises(AuthError):
        get_transport("zmq").pull(srv.address, "t2", b"other", lambda h, p: pytest.fail("KV accepted"),
                                  client, timeout_s=5)
    assert client.totals()["rejected_auth"] == 1
    # a client that cannot prove the secret is refused by the server
    import zmq
    from vllm_frontier.kv_connectors import auth
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(srv.address)
    sock.send_multipart([b"PULL1", auth.new_nonce(), b"t2"])
    assert sock.poll(5000) and sock.recv_multipart()[0] == b"CHAL"
    sock.send_multipart([b"AUTH", b"x" * 32])
    assert sock.poll(5000) and sock.recv_multipart() == [b"ERR", b"peer failed authentication for t2"]
    sock.close(linger=0)
    assert counters.totals().get("rejected_auth") == 1
    assert store.get("t2") is not None  # the real consumer can still pull it


def test_unknown_transfer_rejected_and_counted(server):
    _, srv, counters = server
    with pytest.raises(TransferError, match="unknown transfer"):
        get_transport("zmq").pull(srv.address, "nope", SECRET, lambda h, p: None, Counters(), timeout_s=5)
    assert counters.totals()["rejected_unknown"] == 1


def test_dead_server_fails_fast_not_hang():
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        get_transport("zmq").pull(f"tcp://127.0.0.1:{_free_port()}", "x", SECRET, lambda h, p: None,
                                  Counters(), timeout_s=3, idle_timeout_s=1)
    assert time.monotonic() - t0 < 3 + 0.5  # bounded by timeout_s (retries included)


def test_connection_killed_mid_transfer(server):
    """A TCP proxy forwards the first 64 KiB of KV, then cuts both sides."""
    store, srv, _ = server
    store.open("t3")
    for i in range(8):
        store.add("t3", _chunk(f"L{i}", 0, 64, i))  # 8 x 147 KiB
    store.close("t3", 64)
    port = int(srv.address.rsplit(":", 1)[1])
    lsock = socket.create_server(("127.0.0.1", 0))
    proxy_port = lsock.getsockname()[1]

    def proxy():
        c, _ = lsock.accept()
        u = socket.create_connection(("127.0.0.1", port))
        passed = 0

        def up():
            try:
                while (d := c.recv(65536)):
                    u.sendall(d)
            except OSError:
                pass
        threading.Thread(target=up, daemon=True).start()
        while passed < 65536:
            d = u.recv(65536)
            if not d:
                break
            c.sendall(d); passed += len(d)
        for s in (c, u):
            s.shutdown(socket.SHUT_RDWR); s.close()
        lsock.close()

    threading.Thread(target=proxy, daemon=True).start()
    got = []
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        get_transport("zmq").pull(f"tcp://127.0.0.1:{proxy_port}", "t3", SECRET, lambda h, p: got.append(h),
                                  Counters(), timeout_s=10, idle_timeout_s=2)
    assert len(got) < 8 and time.monotonic() - t0 < 10  # retried, then failed within timeout_s


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


def test_keepalive_while_prefill_is_slow(server):
    """A pull that starts before the prefill outlives the idle timeout: the server sends WAIT."""
    store, srv, _ = server

    def produce_late():
        time.sleep(0.3)
        store.open("t4")
        time.sleep(1.5)  # longer than the client's idle timeout
        store.add("t4", _chunk("L0", 0, 3, 1))
        store.close("t4", 3)

    threading.Thread(target=produce_late).start()
    res = get_transport("zmq").pull(srv.address, "t4", SECRET, lambda h, p: None, Counters(),
                                    timeout_s=10, idle_timeout_s=1.0)
    assert res.chunks == 1 and res.num_tokens == 3
