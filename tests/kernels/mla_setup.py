"""Builders for the MLA attention tests: a poisoned paged latent cache filled through the block table."""

from __future__ import annotations

import torch

from kernel_testing import DEVICE, nan_cache, poisoned_block_table
from vllm_frontier.kernels import write_latent_cache


def build_paged_cache(seqlens, block_size, dtype, fp8, gen, spare_blocks=2):
    """-> (cache, block_table [B, max_blocks] int32, cache_seqlens [B] int32); unused bytes are poison."""
    used = [-(-n // block_size) for n in seqlens]
    num_blocks = sum(used) + spare_blocks
    cols = max(used + [1]) + 1
    bt = poisoned_block_table(len(seqlens), cols, list(seqlens), block_size, num_blocks, gen)
    cache = nan_cache(num_blocks, block_size, dtype, fp8)
    slots = []
    for r, n in enumerate(seqlens):
        pos = torch.arange(n)
        slots.append(bt[r, pos // block_size].long() * block_size + pos % block_size)
    slots = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
    T = slots.numel()
    kv_c = torch.randn(T, 512, generator=gen)
    k_pe = torch.randn(T, 64, generator=gen)
    cache = cache.to(DEVICE)
    write_latent_cache(kv_c.to(dtype).to(DEVICE), k_pe.to(dtype).to(DEVICE), cache, slots.to(DEVICE), fp8=fp8, backend="torch")
    return cache, bt.to(DEVICE), torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
