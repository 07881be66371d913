"""benchmarks/harness.py: the header every result JSON starts with (commit, command, versions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
