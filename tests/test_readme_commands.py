"""The README's first command, exactly as written: `make serve` with nothing set, then the README's curl.

No VLLM_CPU_KVCACHE_SPACE and no FRONTIER_* reach it (every other engine test sets a small KV cache, which hid
that vLLM's CPU worker refused to start on a machine whose NUMA node reports less memory than the machine has).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from serving import REPO

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()


def _readme_block_lines(first_word: str) -> list[str]:
    """Lines of the README's bash blocks that start with `first_word` (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln.startswith(first_word)]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_make_serve_as_written_answers_the_readme_curl():
    serve = [ln for ln in _readme_block_lines("make serve")]
    curl = _readme_block_lines("curl")
    assert serve and curl, "the README lost its serve command or its curl example"
    if not _port_free(8000):
        pytest.skip("port 8000 (the README's) is taken on this machine")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FRONTIER_")
           and k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "TRITON_INTERPRET")}
    log_path = Path(tempfile.mkstemp(prefix="make-serve-", suffix=".log")[1])
    proc = subprocess.Popen(["bash", "-c", serve[0].split("#")[0]], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"make serve exited {proc.returncode}:\n{log_path.read_text()[-6000:]}"
            try:
                if requests.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            pytest.fail("make serve not healthy after 900 s:\n" + log_path.read_text()[-6000:])
        r = subprocess.run(["bash", "-c", curl[0]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        body = r.stdout
        assert '"text"' in body and '"completion_tokens":16' in body.replace(" ", ""), body[:2000]
        log = log_path.read_text()
        assert "vllm-frontier: CPU KV cache" in log  # sized for the model, not 0.92 of the NUMA node
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
