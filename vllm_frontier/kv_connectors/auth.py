"""Mutual HMAC challenge between a KV puller (client) and a KV server.

Both ends hold the same shared secret. A session is bound to both nonces and the
transfer id, so a recorded exchange cannot be replayed for another transfer:

    client -> server: PULL  client_nonce, transfer_id
    server -> client: CHAL  server_nonce, mac(secret, "S" | cn | sn | tid)
    client -> server: AUTH  mac(secret, "C" | sn | cn | tid)

The client rejects a server that cannot prove the secret (it would be sending KV
from an unauthenticated peer); the server rejects a client that cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["NONCE_BYTES", "new_nonce", "server_proof", "client_proof", "verify"]

NONCE_BYTES = 16
_DOMAIN = b"frontier-pd-v1"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    h = hmac.new(secret, _DOMAIN, hashlib.sha256)
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes, tid: bytes) -> bytes:
    return _mac(secret, b"S", client_nonce, server_nonce, tid)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes, tid: bytes) -> bytes:
    return _mac(secret, b"C", server_nonce, client_nonce, tid)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
