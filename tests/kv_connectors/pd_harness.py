"""Helpers for the P/D end-to-end tests: engine pair, router process, metrics, rogue KV servers."""

from __future__ import annotations

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from serving import RouterProcess, VllmServer, free_port

SECRET = "pd-test-secret"
KV_CONFIG = json.dumps({"kv_connector": "FrontierPDConnector", "kv_role": "kv_both",
                        "kv_load_failure_policy": "recompute"})
# A rejected, unknown or cut pull falls back within seconds (ERR frame, disconnect event). The idle
# timeout and TTL are generous: on a shared 2-core machine a worker's threads can starve for seconds.
PD_ENV = {"FRONTIER_PD": "1", "FRONTIER_PD_SECRET": SECRET, "FRONTIER_PD_IDLE_TIMEOUT": "60",
          "FRONTIER_PD_TIMEOUT": "120", "FRONTIER_PD_UNKNOWN_WAIT": "3", "FRONTIER_PD_STAGING_TTL": "60",
          "VLLM_CPU_KVCACHE_SPACE": "1"}
ENGINE_ARGS = ["--dtype", "float32", "--kv-transfer-config", KV_CONFIG, "--max-num-seqs", "64",
               "--enforce-eager"]


def start_pair(model, extra_env=None, extra_args=()):
    """Start a prefill and a decode instance in parallel; returns (P, D, P_kv_port, D_kv_port)."""
    ports = free_port(), free_port()
    srvs = [VllmServer(model, args=ENGINE_ARGS + list(extra_args),
                       env={**PD_ENV, **(extra_env or {}), "FRONTIER_PD_PORT": str(p)}) for p in ports]
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(s.start) for s in srvs]
        errs = [f.exception() for f in futs]
    if any(errs):
        for s in srvs:
            s.stop()
        raise next(e for e in errs if e)
    return srvs[0], srvs[1], ports[0], ports[1]


def body(prompt, max_tokens, **kw):
    b = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
         "logprobs": 1, "return_tokens_as_token_ids": True}
    b.update(kw)
    return b


def post(url, b, timeout=300):
    b = dict(b)
    if b.get("model") == "m":
        b["model"] = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = requests.post(url + "/v1/completions", json=b, timeout=timeout)
    assert r.status_code == 200, r.text[:2000]
    return r.json()


def token_ids(resp) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in resp["choices"][0]["logprobs"]["tokens"]]


def metric(text: str, name: str) -> float:
    """Sum of all series of `name` in a Prometheus exposition."""
    pat = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", re.M)
    return sum(float(v) for v in pat.findall(text))


def fresh_metrics(srv) -> str:
    """Connector counters flow with engine steps: run one tiny request, then read /metrics."""
    post(srv.url, body("nudge", 1))
    return requests.get(srv.url + "/metrics", timeout=10).text


def layer_names(srv) -> list[str]:
    m = re.search(r"frontier-pd: KV listener .* layers: (.*)$", srv.log_text(), re.M)
    assert m, "decode instance did not log its KV layers"
    return [x.strip() for x in m.group(1).split(",")]


def words(n: int, seed: int = 0) -> str:
    vocab = ["def", "return", "value", "for", "in", "range", "self", "print", "class", "import",
             "if", "else", "while", "yield", "lambda", "None", "True", "data", "list", "dict"]
    return " ".join(vocab[(i * 7 + seed * 3 + i // 5) % len(vocab)] for i in range(n))


def Router(args) -> RouterProcess:
    """The router under test: health checks every second."""
    return RouterProcess(args, health_interval=1)


class RogueKVServer:
    """Our own transport server in the test process, serving chosen rows for one transfer."""

    def __init__(self, secret: bytes, tid: str, layers: list[str], num_tokens: int, seed=0):
        from vllm_frontier.kv_connectors import wire
        from vllm_frontier.kv_connectors.staging import Chunk, StagingStore
        from vllm_frontier.kv_connectors.transport import Counters, get_transport

        self.store = StagingStore()
        self.counters = Counters()
        self.port = free_port()
        self.srv = get_transport("zmq").make_server(self.store, "127.0.0.1", self.port, secret,
                                                     self.counters, unknown_wait_s=1)
        g = torch.Generator().manual_seed(seed)
        self.store.open(tid)
        for name in layers:
            rows = torch.randn(num_tokens, 576, generator=g) * 5
            enc, payload = wire.encode_rows(rows, "raw")
            self.store.add(tid, Chunk(name, 0, num_tokens, enc, "float32", 576,
                                      memoryview(payload.numpy()).cast("B")))
        self.store.close(tid, num_tokens)
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.srv.start()

    def stop(self):
        self.srv.stop()


class CuttingProxy:
    """TCP proxy that cuts the first connection to carry `limit` bytes server->client (closes both
    sides), then takes no more connections (each later one is closed at once).

    Connections that end before the limit are forwarded whole and closed with their upstream: a puller
    whose challenge goes unanswered for a few seconds (the server's thread starved on a loaded 2-core
    machine) reconnects, and a single-connection proxy made that retry hang until the pull timed out,
    so no byte was ever cut."""

    def __init__(self, target_port: int, limit: int = 65536):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.cut = threading.Event()
        self._stop = threading.Event()  # set on the cut, before the client can see it
        threading.Thread(target=self._accept, args=(target_port, limit), daemon=True).start()

    def _accept(self, target_port, limit):
        try:
            while True:
                try:
                    c, _ = self.lsock.accept()
                except socket.timeout:
                    continue
                if self._stop.is_set():
                    c.close()
                    break
                threading.Thread(target=self._forward, args=(c, target_port, limit), daemon=True).start()
            while True:  # after the cut: refuse what is already queued, then stop listening
                try:
                    self.lsock.accept()[0].close()
                except socket.timeout:
                    break
        finally:
            self.lsock.close()

    def _forward(self, c, target_port, limit):
        u = socket.create_connection(("127.0.0.1", target_port))

        def up():
            try:
                while (d := c.recv(65536)):
                    u.sendall(d)
            except OSError:
                pass
            _close(u)  # the client went away: so does the upstream, and the loop below ends

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        try:
            while passed < limit:
                d = u.recv(min(65536, limit - passed))
                if not d:
                    break
                c.sendall(d)
                passed += len(d)
        except OSError:
            pass
        if passed >= limit:
            self._stop.set()
        _close(c)
        _close(u)
        if passed >= limit:
            self.cut.set()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
