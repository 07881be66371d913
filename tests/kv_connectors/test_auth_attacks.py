"""Attacks on the P/D control channel, against the real ZeroMQ KV server over a TCP socket.

An attacker knows the protocol, can record a legitimate exchange and can open sessions of its
own, but does not hold the shared secret. Each attack must end with ``ERR`` and no KV frame."""

import socket

import pytest
import torch
import zmq

from vllm_frontier.kv_connectors import auth, wire
from vllm_frontier.kv_connectors.staging import Chunk, StagingStore
from vllm_frontier.kv_connectors.transport import AuthError, Counters, get_transport

SECRET = b"pd-shared-secret"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(store, tid, fill):
    rows = torch.full((2, 576), float(fill))
    enc, payload = wire.encode_rows(rows, "raw")
    store.open(tid)
    store.add(tid, Chunk("L0", 0, 2, enc, "float32", 576, memoryview(payload.numpy())))
    store.close(tid, 2)


@pytest.fixture
def server():
    store = StagingStore(ttl_s=60)
    counters = Counters()
    srv = get_transport("zmq").make_server(store, "127.0.0.1", _free_port(), SECRET, counters,
                                           unknown_wait_s=0.5)
    srv.start()
    yield store, srv, counters
    srv.stop()


class Peer:
    """A raw DEALER speaking the protocol frame by frame."""

    def __init__(self, addr):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def send(self, *frames):
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_ms=5000):
        assert self.sock.poll(timeout_ms), "the server did not answer"
        return self.sock.recv_multipart()

    def pull(self, cn, tid):
        self.send(b"PULL1", cn, tid)
        kind, sn, proof = self.recv()
        assert kind == b"CHAL"
        return sn, proof

    def close(self):
        self.sock.close(linger=0)


def _frames_until_end(peer):
    """Everything the server sends after AUTH, up to END or ERR."""
    got = []
    while True:
        msg = peer.recv()
        if msg[0] == b"WAIT":
            continue
        got.append(msg)
        if msg[0] in (b"END", b"ERR"):
            return got


def test_legitimate_raw_exchange_gets_the_kv(server):
    """The attacker's tools are sound: with the secret, the same frames fetch the KV."""
    store, srv, counters = server
    _stage(store, "A", 1)
    p = Peer(srv.address)
    cn = auth.new_nonce()
    sn, proof = p.pull(cn, b"A")
    assert auth.verify(auth.server_proof(SECRET, cn, sn, b"A"), proof)
    p.send(b"AUTH", auth.client_proof(SECRET, cn, sn, b"A"))
    got = _frames_until_end(p)
    p.close()
    assert [m[0] for m in got] == [b"KV", b"END"]


def test_replayed_client_proof_is_rejected_on_a_new_session(server):
    """Recorded PULL + AUTH of a real transfer, replayed verbatim on a new connection: the server
    picks a fresh nonce, so the old proof does not open the transfer again."""
    store, srv, counters = server
    _stage(store, "A", 1)
    _stage(store, "B", 2)
    victim = Peer(srv.address)
    cn = auth.new_nonce()
    sn, _ = victim.pull(cn, b"B")
    recorded = auth.client_proof(SECRET, cn, sn, b"B")  # what the attacker sniffed
    victim.close()  # the victim's session never completes: B stays staged

    attacker = Peer(srv.address)
    sn2, _ = attacker.pull(cn, b"B")
    assert sn2 != sn  # a fresh challenge
    attacker.send(b"AUTH", recorded)
    assert _frames_until_end(attacker) == [[b"ERR", b"peer failed authentication for B"]]
    attacker.close()
    assert counters.totals()["rejected_auth"] == 1
    assert store.get("B") is not None


def test_proof_is_bound_to_the_transfer_id(server, monkeypatch):
    """With the server nonce held fixed (as a broken RNG would), only the transfer id stands between
    a proof recorded for transfer A and transfer B: replayed for B it must fail. Replayed for A it
    is accepted, which shows the rejection comes from the binding and not from the nonce."""
    store, srv, counters = server
    _stage(store, "A", 1)
    _stage(store, "B", 2)
    fixed = b"\x07" * auth.NONCE_BYTES
    monkeypatch.setattr(auth, "new_nonce", lambda: fixed)  # the server thread reads it per session
    cn = b"\x01" * auth.NONCE_BYTES
    recorded = auth.client_proof(SECRET, cn, fixed, b"A")

    attacker = Peer(srv.address)
    sn, _ = attacker.pull(cn, b"B")
    assert sn == fixed
    attacker.send(b"AUTH", recorded)
    assert _frames_until_end(attacker) == [[b"ERR", b"peer failed authentication for B"]]
    attacker.close()
    assert store.get("B") is not None

    control = Peer(srv.address)
    control.pull(cn, b"A")
    control.send(b"AUTH", recorded)
    assert [m[0] for m in _frames_until_end(control)] == [b"KV", b"END"]
    control.close()


def test_reflected_server_proof_is_rejected(server):
    """The attacker answers the challenge with the server's own proof (reflection): a server proof
    must never be a valid client proof."""
    store, srv, counters = server
    _stage(store, "A", 1)
    attacker = Peer(srv.address)
    cn = auth.new_nonce()
    sn, proof = attacker.pull(cn, b"A")
    attacker.send(b"AUTH", proof)
    assert _frames_until_end(attacker) == [[b"ERR", b"peer failed authentication for A"]]
    attacker.close()
    # nor does a second session whose client nonce is the first server nonce (nonce-swap reflection)
    attacker = Peer(srv.address)
    sn2, proof2 = attacker.pull(sn, b"A")
    attacker.send(b"AUTH", proof2)
    assert _frames_until_end(attacker)[0][0] == b"ERR"
    attacker.close()
    assert counters.totals()["rejected_auth"] == 2
    assert store.get("A") is not None


def test_second_auth_on_an_authenticated_session_is_rejected(server):
    store, srv, counters = server
    store.open("A")  # staged but not closed: the session waits after AUTH
    p = Peer(srv.address)
    cn = auth.new_nonce()
    sn, _ = p.pull(cn, b"A")
    good = auth.client_proof(SECRET, cn, sn, b"A")
    p.send(b"AUTH", good)
    p.send(b"AUTH", good)
    msg = p.recv()
    while msg[0] == b"WAIT":
        msg = p.recv()
    assert msg == [b"ERR", b"peer failed authentication for A"]
    p.close()


class _ImpostorServer:
    """A fake KV server without the secret: it answers PULL1 with a CHAL built by `forge`."""

    def __init__(self, forge):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.forge = forge

    def serve_one(self):
        assert self.sock.poll(5000)
        ident, kind, cn, tid = self.sock.recv_multipart()
        assert kind == b"PULL1"
        sn, proof = self.forge(cn, tid)
        self.sock.send_multipart([ident, b"CHAL", sn, proof])
        # if the puller were fooled it would now send AUTH: answer with KV anyway
        self.sock.send_multipart([ident, b"KV", b'{"l":"L0"}', b"\x00" * 8])
        self.sock.send_multipart([ident, b"END", b'{"chunks": 1, "tokens": 1}'])

    def close(self):
        self.sock.close(linger=0)


@pytest.mark.parametrize("forge", [
    # reflection: the puller's own nonce sent back as the server nonce, and a proof made the way a
    # client proof is made for those nonces (what a reflected client proof would look like)
    lambda cn, tid: (cn, auth.client_proof(b"guess", cn, cn, tid)),
    # a proof recorded for another transfer, the nonces matching
    lambda cn, tid: (b"\x02" * 16, auth.server_proof(b"guess", cn, b"\x02" * 16, b"other")),
    lambda cn, tid: (b"\x02" * 16, b"\x00" * 32),
], ids=["reflected", "other-transfer", "zeros"])
def test_puller_rejects_an_impostor_server(forge):
    import threading
    imp = _ImpostorServer(forge)
    t = threading.Thread(target=imp.serve_one)
    t.start()
    got, counters = [], Counters()
    try:
        with pytest.raises(AuthError, match="failed authentication"):
            get_transport("zmq").pull(imp.address, "A", SECRET, lambda h, p: got.append(h), counters,
                                      timeout_s=5, idle_timeout_s=2)
    finally:
        t.join()
        imp.close()
    assert got == [] and counters.totals()["rejected_auth"] == 1


def test_puller_rejects_a_proof_for_another_transfer_made_with_the_secret():
    """Even a server holding the secret cannot pass off transfer B's KV for transfer A."""
    import threading
    imp = _ImpostorServer(lambda cn, tid: (b"\x03" * 16, auth.server_proof(SECRET, cn, b"\x03" * 16, b"B")))
    t = threading.Thread(target=imp.serve_one)
    t.start()
    got = []
    try:
        with pytest.raises(AuthError):
            get_transport("zmq").pull(imp.address, "A", SECRET, lambda h, p: got.append(h), Counters(),
                                      timeout_s=5, idle_timeout_s=2)
    finally:
        t.join()
        imp.close()
    assert got == []


# ---- the proofs themselves ------------------------------------------------------------------
CN, SN, TID = b"c" * 16, b"s" * 16, b"tid-1"


def test_server_and_client_proofs_differ_for_the_same_inputs():
    assert auth.server_proof(SECRET, CN, SN, TID) != auth.client_proof(SECRET, CN, SN, TID)
    # not even with the nonces swapped (a reflection through a second session)
    assert auth.server_proof(SECRET, SN, CN, TID) != auth.client_proof(SECRET, CN, SN, TID)


@pytest.mark.parametrize("which", ["server_proof", "client_proof"])
def test_every_input_changes_the_proof(which):
    f = getattr(auth, which)
    base = f(SECRET, CN, SN, TID)
    assert len(base) == 32
    assert f(b"other", CN, SN, TID) != base
    assert f(SECRET, b"C" * 16, SN, TID) != base
    assert f(SECRET, CN, b"S" * 16, TID) != base
    assert f(SECRET, CN, SN, b"tid-2") != base
    assert f(SECRET, SN, CN, TID) != base  # the nonces' roles are not interchangeable


def test_proof_is_the_documented_hmac():
    """HMAC-SHA256 keyed by the secret over the domain and the length-prefixed parts, so a peer
    written from the protocol description interoperates."""
    import hashlib
    import hmac

    def mac(*parts):
        h = hmac.new(SECRET, b"frontier-pd-v1", hashlib.sha256)
        for p in parts:
            h.update(len(p).to_bytes(4, "big") + p)
        return h.digest()

    assert auth.server_proof(SECRET, CN, SN, TID) == mac(b"S", CN, SN, TID)
    assert auth.client_proof(SECRET, CN, SN, TID) == mac(b"C", SN, CN, TID)


def test_length_prefix_keeps_part_boundaries():
    # without length prefixes, ("ab", "c") and ("a", "bc") would give the same MAC
    assert auth.server_proof(SECRET, b"ab", b"c", TID) != auth.server_proof(SECRET, b"a", b"bc", TID)


def test_nonces_are_fresh_and_sized():
    a, b = auth.new_nonce(), auth.new_nonce()
    assert len(a) == auth.NONCE_BYTES == 16 and a != b


def test_verify_compares_exactly():
    p = auth.client_proof(SECRET, CN, SN, TID)
    assert auth.verify(p, bytes(p))
    assert not auth.verify(p, p[:-1] + bytes([p[-1] ^ 1]))
    assert not auth.verify(p, p[:16])
