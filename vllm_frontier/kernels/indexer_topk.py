"""Indexer logits fused with a stable top-k, in tiles of bounded size (torch; DSA's CPU path).

The query tokens of one request sit at the *last* positions of its sequence (prefill chunk, decode, MTP
verification): token ``i`` of ``T`` sits at ``ctx + i`` (``ctx = L - T``) and sees keys ``< ctx + i + 1``.
So a prefill chunk is scored against the request's keys read once as one contiguous ``[L, D]`` matrix,
one matrix product per row tile, and each tile is reduced to its top-k before the next is scored::

    logits[t, s] = sum_h w[t, h] * relu(q[t, h] · k_s)        (k dequantized: e4m3 code * per-token scale)

Rows of a tile only need the columns the tile's last row sees (causal), which halves the work of a long
prefill. The working memory of one call (keys, one tile of head scores and logits, the top-k
temporaries) stays under ``workspace_bytes`` at any context a DeepSeek-V3.2 model serves.

Top-k rule (the one :func:`.ref.ref_topk_indices` defines): higher logit first, equal logits -> lower
position wins; positions returned in ascending order, ``-1`` for unused slots (fewer than k visible).
"""

from __future__ import annotations

import torch

from .ref import _indexer_block_bytes

__all__ = ["WORKSPACE_BYTES", "stable_topk_prefix", "request_keys", "tile_rows", "indexer_topk_request"]

# Working-memory bound of one indexer call (a layer's call, per request) on this path.
WORKSPACE_BYTES = 256 << 20
# Rows per tile at most: small tiles skip more of the causal triangle, large ones amortize the product and
# the per-op cost (on a loaded CPU every parallel op costs a thread wake-up, whatever its size).
_MAX_TILE_ROWS = 1024
# fp32 temporaries per (row, column) of a tile besides the H head scores: logits, top-k masks and ranks.
_TILE_EXTRA = 6


def stable_topk_prefix(logits: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` columns per row among the first ``visible[r]`` ones, stable ties (lower position wins).

    Args:
        logits: ``[R, C]`` float32; modified in place (columns ``>= visible`` set to ``-inf``).
        visible: ``[R]`` int, keys each row sees (``<= C``).
    Returns: ``[R, k]`` int32 ascending positions, ``-1`` for unused slots.
    """
    R, C = logits.shape
    dev = logits.device
    vis = visible.long()[:, None]
    ar = torch.arange(k, device=dev)[None, :]
    short = torch.where(ar < vis, ar, -1).to(torch.int32)  # the answer for rows that see <= k keys
    if C <= k or R == 0:
        return short
    col = torch.arange(C, device=dev)[None, :]
    torch.nan_to_num_(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    logits.masked_fill_(col >= vis, float("-inf"))
    thr = torch.topk(logits, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    gt = logits > thr
    eq = logits == thr
    need = k - gt.sum(dim=1, keepdim=True, dtype=torch.int32)
    # ties at the threshold: the lowest positions fill the remaining slots
    sel = gt | (eq & (eq.cumsum(dim=1, dtype=torch.int32) <= need))
    pos = sel.nonzero()[:, 1].view(R, k).to(torch.int32)  # exactly k per row, row-major = ascending
    return torch.where(vis <= k, short, pos)


def request_keys(k_cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` keys of one request, dequantized: ``[length, D]`` float32.

    Args:
        k_cache: ``[num_blocks, block_size, D + 4]`` uint8 (layout in :mod:`.indexer`).
        block_row: ``[max_blocks]`` int, the request's block table row.
    """
    nb, bs, w = k_cache.shape
    D = w - 4
    n_blk = -(-length // bs)
    raw = _indexer_block_bytes(k_cache)[block_row[:n_blk].long()]  # one gather of whole blocks
    codes = raw[:, : bs * D].reshape(n_blk * bs, D)[:length].view(torch.float8_e4m3fn)
    scales = raw[:, bs * D:].contiguous().view(torch.float32).reshape(-1)[:length]
    return codes.float().mul_(scales[:, None])


def tile_rows(num_cols: int, heads: int, head_dim: int, workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """Rows per tile so that keys (``num_cols x head_dim``) plus one tile fit in ``workspace_bytes``."""
    keys = num_cols * (head_dim * 8 + 8)  # fp32 keys and room for one transient copy (gather, products)
    per_row = num_cols * (heads + _TILE_EXTRA) * 4 + heads * head_dim * 4
    free = workspace_bytes - keys
    if free < per_row:
        raise ValueError(f"the indexer workspace ({workspace_bytes >> 20} MiB) cannot hold one row of {num_cols} "
                         f"keys with {heads} heads")
    return max(1, min(_MAX_TILE_ROWS, free // per_row))


def indexer_topk_request(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    out: torch.Tensor,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> torch.Tensor:
    """Top-``k`` key positions of every query token of one request (causal, tokens at the sequence end).

    Args:
        q: ``[T, H, D]`` float8_e4m3fn codes or float (the q scale folded into ``weights``).
        weights: ``[T, H]`` float32.
        keys: ``[L, D]`` float32 (:func:`request_keys`), ``L >= T``; token ``i`` sees keys ``< L - T + i + 1``.
        out: ``[T, >= k]`` int32, written in its first ``k`` columns.
    Returns: ``out``.
    """
    T, H, D = q.shape
    L = keys.shape[0]
    ctx = L - T
    if T == 0:
        return out
    w = weights.float()
    step = tile_rows(L, H, D, workspace_bytes)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        n, C = t1 - t0, ctx + t1  # the tile's last row sees C keys
        s = torch.mm(q[t0:t1].float().reshape(n * H, D), keys[:C].t()).clamp_min_(0)  # [n*H, C]
        logits = torch.bmm(w[t0:t1, None, :], s.view(n, H, C)).view(n, C)
        del s
        visible = torch.arange(ctx + t0 + 1, ctx + t1 + 1, device=q.device)
        out[t0:t1, :k] = stable_topk_prefix(logits, visible, k)
    return out
