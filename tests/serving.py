"""Start real vLLM OpenAI servers (`vllm-frontier serve`) for end-to-end tests.

    with VllmServer(model_dir, args=["--dtype", "float32"], env={"FRONTIER_DSA": "1"}) as srv:
        out = srv.complete("def f(", max_tokens=8)

Each server is a subprocess on a free 127.0.0.1 port, with a small KV cache; its log goes to a file whose tail
is shown when it fails to start. Engine start takes ~30 s on 2 cores, so share servers between tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
# Feature toggles are cleared for a server unless the test sets them, so the outer environment cannot leak in.
TOGGLES = ("FRONTIER_DSA", "FRONTIER_MLA", "FRONTIER_FP4", "FRONTIER_MTP", "FRONTIER_MTP_K",
           "FRONTIER_SPEC_MOE", "FRONTIER_PD", "FRONTIER_ALL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frontier_cli() -> list[str]:
    """The `vllm-frontier` command of the interpreter running the tests."""
    return [sys.executable, "-m", "vllm_frontier.cli"]


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in TOGGLES}
    e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    e.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    e.update(env or {})
    return e


def draft_tokens(metrics_text: str) -> float:
    """Draft tokens proposed so far, from a vLLM server's Prometheus text (0 without speculative decoding)."""
    m = re.search(r"^vllm:spec_decode_num_draft_tokens_total\{[^}]*\} ([0-9.e+]+)$", metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


class ServerError(RuntimeError):
    pass


class VllmServer:
    """A `vllm-frontier serve` subprocess. Use as a context manager; `url`, `complete`, `log_text`."""

    def __init__(self, model: str | os.PathLike | None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 900.0,
                 command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = command if command is not None else frontier_cli() + ["serve"]
        model_args = [str(model)] if model is not None else []
        self.cmd = base + model_args + ["--host", "127.0.0.1", "--port", str(self.port),
                                        "--max-model-len", "1024"] + list(args or [])
        self.env = server_env(env)
        self.startup_timeout = startup_timeout
        fd, path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.proc: subprocess.Popen | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "VllmServer":
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO), start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-6000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"server not healthy after {self.startup_timeout:.0f}s:\n{self.log_text()[-6000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def model_name(self) -> str:
        return requests.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def complete(self, prompt, max_tokens: int = 16, **kw) -> dict:
        """POST /v1/completions (greedy unless `temperature` is given); returns the JSON response."""
        body = {"model": self.model_name(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        body.update(kw)
        r = requests.post(self.url + "/v1/completions", json=body, timeout=300)
        if r.status_code != 200:
            raise ServerError(f"completion failed {r.status_code}: {r.text[:2000]}")
        return r.json()

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=10).text


class RouterProcess:
    """`vllm-frontier router` as a subprocess on a free 127.0.0.1 port; waits for /health, log in a file."""

    def __init__(self, args: list[str], health_interval: float = 1, startup_timeout: float = 120,
                 stop_timeout: float = 20, log_prefix: str = "router-"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop_timeout = stop_timeout
        fd, path = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.proc = subprocess.Popen(
            frontier_cli() + ["router", "--port", str(self.port), "--health-interval", str(health_interval), *args],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=str(REPO), env=server_env(),
            start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("router not healthy:\n" + self.log()[-3000:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=self.stop_timeout)

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=20).text

    def roles(self) -> dict[str, str]:
        return {i["url"]: i["role"] for i in requests.get(self.url + "/health", timeout=10).json()["instances"]}
