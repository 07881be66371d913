"""Start N local processes with an initialised torch.distributed group (tests, benchmarks).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes
(``torch.multiprocessing`` spawn), initialises a process group on a free
127.0.0.1 port, calls ``fn(rank, world_size, *args)`` in each, and returns the
list of per-rank return values (they must be picklable).  An exception in any
rank is re-raised in the caller.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, backend: str, threads: int, out_dir: str,
           fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results.

    ``fn`` must be importable by module path (a module-level function).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="frontier_moe_") as out_dir:
        mp.spawn(
            _entry,
            args=(world_size, free_port(), backend, threads_per_rank, out_dir, fn, args),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
