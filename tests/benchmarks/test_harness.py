"""benchmarks/harness.py: the header every result JSON starts with (commit, command, versions), and engine
subprocesses that leave nothing running behind them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def test_header_names_the_checkouts_commit_and_the_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/dopd.py", "--sizes", "8", "--out", "a b.json"])
    h = harness.header()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert h["commit"] in (head, head + "-dirty")
    assert h["command"] == "python benchmarks/dopd.py --sizes 8 --out 'a b.json'"
    assert {"torch", "triton", "vllm", "python", "device", "utc"} <= set(h)


def test_commit_is_none_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert harness.git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere on PATH
    assert harness.git_commit(ROOT) is None


def test_dirty_suffix_follows_tracked_changes_only(tmp_path):
    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked").write_text("x")
    assert harness.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert harness.git_commit(tmp_path) == head + "-dirty"


# a child that starts a grandchild in the background (as vLLM starts its engine core), writes its pid, then
# exits at once or hangs
_SPAWNER = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(g.pid))
if sys.argv[2] == "hang":
    time.sleep(120)
"""


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:   # killed but not yet reaped (a zombie) counts as gone
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_an_engine_subprocess_leaves_no_process_behind(tmp_path, how):
    pid_file = tmp_path / "grandchild"
    argv = [sys.executable, "-c", _SPAWNER, str(pid_file), how]
    if how == "exit":
        code, _ = harness.run_process_group(argv, dict(os.environ), timeout=60)
        assert code == 0
    else:
        with pytest.raises(subprocess.TimeoutExpired):
            harness.run_process_group(argv, dict(os.environ), timeout=3)
    assert _gone(int(pid_file.read_text()))


def test_a_log_file_gets_stdout_and_stderr_and_is_returned(tmp_path):
    log = tmp_path / "engine.log"
    argv = [sys.executable, "-c", "import sys; print('KV cache size: 1,024 tokens'); sys.stderr.write('warn\\n')"]
    code, text = harness.run_process_group(argv, dict(os.environ), timeout=60, log=log)
    assert code == 0 and "KV cache size: 1,024 tokens" in text and "warn" in text
    assert log.read_text() == text
    code, text = harness.run_process_group([sys.executable, "-c", "print('out'); raise SystemExit(3)"],
                                           dict(os.environ), timeout=60)
    assert code == 3 and "out" not in text   # without a log: stderr only
