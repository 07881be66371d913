"""Sparse MLA over the paged latent cache, one row per query token (torch; DSA's CPU path).

Token ``t`` of a batch (its request ``req[t]``) attends to the request-local positions ``indices[t]``
(the indexer's top-k). Per tile of tokens the selected latent rows are gathered once through the block
table, ``[tile, topk, 576]``, and both products are batched matrix products; the same math as
:func:`.ref.ref_mla_sparse_decode` without per-position masks (products in the cache's float dtype, softmax
in float32; FP8 rows decoded to float32).
"""

from __future__ import annotations

import torch

from .ref import KV_LORA_RANK, decode_latent_rows

__all__ = ["sparse_mla_tokens"]

# Few large tiles: on a loaded CPU every parallel op costs a thread wake-up, whatever its size.
_TILE_BYTES = 256 << 20


def sparse_mla_tokens(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    req: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA (absorbed form) for ``T`` query tokens.

    Args:
        q: ``[T, H, 576]`` float.
        cache: ``[num_blocks, block_size, 576]`` float or ``[num_blocks, block_size, 656]`` uint8 (FP8 rows).
        block_table: ``[num_reqs, max_blocks]`` int; req: ``[T]`` int, the request of each token.
        indices: ``[T, topk]`` int request-local positions, ``-1`` = unused slot (positions must be visible).
    Returns: out ``[T, H, 512]`` (q's dtype), lse ``[T, H]`` float32 (``-inf`` and zero output with no key).
    """
    T, H, D = q.shape
    K = indices.shape[1]
    bs = cache.shape[1]
    fp8 = cache.dtype == torch.uint8
    # float caches compute in their own dtype (a bf16 model's products in bf16 with fp32 accumulation, as its
    # dense attention does; converting every gathered row to fp32 cost more than the products); the softmax
    # is fp32. FP8 rows are decoded to fp32.
    cdt = torch.float32 if fp8 else cache.dtype
    flat = cache.reshape(-1, cache.shape[-1]) if cache.stride(0) == bs * cache.stride(1) else None
    out = torch.empty(T, H, KV_LORA_RANK, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    step = max(1, _TILE_BYTES // max(1, K * (D * 4 + cache.shape[-1] * cache.element_size())))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        n = t1 - t0
        idx = indices[t0:t1].long()
        valid = idx >= 0
        pos = idx.clamp_min(0)  # unused slots read position 0 (always written, finite); masked below
        blk = block_table[req[t0:t1, None].long(), pos // bs].long()
        if flat is not None:
            raw = flat.index_select(0, (blk * bs + pos % bs).view(-1)).view(n, K, -1)
        else:
            raw = cache[blk, pos % bs]
        rows = decode_latent_rows(raw) if fp8 else raw  # [n, K, 576]
        scores = torch.bmm(q[t0:t1].to(cdt), rows.transpose(1, 2)).float().mul_(softmax_scale)  # [n, H, K]
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        l = torch.logsumexp(scores, dim=-1)  # [n, H]
        p = torch.exp(scores.sub_(torch.where(torch.isinf(l), 0.0, l)[..., None]))
        # the product over all 576 columns, then the slice: cheaper than a contiguous copy of the latent part
        out[t0:t1] = torch.bmm(p.to(cdt), rows)[..., :KV_LORA_RANK]
        lse[t0:t1] = l
    return out, lse
