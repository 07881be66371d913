"""Helpers shared by the kernel tests: device, poisoned inputs, and one comparison function."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """Same shape, same NaN/inf positions (same-sign infs), finite entries within atol + rtol*|expected|;
    on failure report the worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float().cpu(), expected.float().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: inf positions differ"
    inf = torch.isinf(e)
    assert torch.equal(a[inf], e[inf]), f"{what}: inf signs differ"
    fin = torch.isfinite(e)
    err = torch.where(fin, (a - e).abs() - rtol * e.abs(), torch.zeros_like(a))
    worst = int(err.argmax()) if err.numel() else 0
    if err.numel() and err.reshape(-1)[worst] > atol:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{what}: max excess error {float(err.reshape(-1)[worst]):.3g} > atol {atol:g} at {idx}: "
            f"actual {float(a[idx]):.6g} expected {float(e[idx]):.6g}"
        )


def poisoned_block_table(rows: int, cols: int, seqlens: list[int], block_size: int, num_blocks: int, gen) -> torch.Tensor:
    """Shuffled physical blocks for the used entries; a huge id in every unused entry (must never be read)."""
    bt = torch.full((rows, cols), 10**8, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    k = 0
    for r, n in enumerate(seqlens):
        used = -(-n // block_size)
        bt[r, :used] = perm[k : k + used].int()
        k += used
    assert k <= num_blocks, "test setup: not enough blocks"
    return bt


def nan_cache(num_blocks: int, block_size: int, dtype, fp8: bool) -> torch.Tensor:
    """A latent cache whose every byte is poison: NaN floats, or 0xFF bytes (NaN codes and NaN scales)."""
    if fp8:
        return torch.full((num_blocks, block_size, 656), 0xFF, dtype=torch.uint8)
    return torch.full((num_blocks, block_size, 576), float("nan"), dtype=dtype)


def written_latent_cache(seqlens: list[int], block_size: int, dtype, fp8: bool, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache, block_table): random latent rows for requests of `seqlens` tokens in shuffled blocks, every other
    byte poison (`nan_cache`, `poisoned_block_table`), written by the torch reference."""
    from vllm_frontier.kernels import write_latent_cache

    nb = sum(-(-n // block_size) for n in seqlens) + 2
    bt = poisoned_block_table(len(seqlens), 20, seqlens, block_size, nb, gen)
    cache = nan_cache(nb, block_size, dtype, fp8)
    for r, n in enumerate(seqlens):
        pos = torch.arange(n)
        write_latent_cache(torch.randn(n, 512, generator=gen), torch.randn(n, 64, generator=gen), cache,
                           bt[r, pos // block_size].long() * block_size + pos % block_size, fp8=fp8, backend="torch")
    return cache, bt
