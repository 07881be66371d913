"""Build a small C++ kernel into a shared library at first use, with the machine's C++ compiler (torch-free).

The CPU kernels (`kernels/csrc/dsa_cpu.cpp`, `quantization/csrc/fp4_cpu.cpp`) are plain C ABIs loaded with
ctypes: no PyTorch headers, so a build takes a second or two. The library is cached under
`$XDG_CACHE_HOME/vllm_frontier/<name>/<hash of source and flags>/`; concurrent builders each compile beside the
target and rename, so they never load a half-written file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["cpu_flags", "build_library"]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm_frontier" / name


def build_library(src: Path, flags: list[str], name: str) -> Path:
    """Compile `src` with `flags` into `lib<name>.so` unless a build of the same source and flags is cached."""
    code = src.read_bytes()
    key = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    out = _cache_dir(name) / key / f"lib{name}.so"
    if out.is_file():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
