"""Torch references for every kernel in this package.

They are the test oracle for the Triton kernels *and* the CPU execution path of the MLA/DSA backends,
so they are vectorized (batched gathers, einsum/matmul, masks; loops only over memory-bounded chunks
of rows) and compute in float32 inside.

Conventions shared with the Triton kernels (see each function's docstring):
- latent cache row: 576 = 512 latent (``kv_c``) + 64 rope (``k_pe``); FP8 rows are 656 bytes:
  512 e4m3 codes | 4 fp32 scales (one per 128 latent values) | 64 bf16 rope values.
- attention scores are ``softmax_scale * q · k``; LSE is the natural log of the softmax denominator,
  ``+inf`` (with a zero output row) when a query has no valid key (FlashMLA's convention).
- sparse attention indices are physical cache slots (``block * block_size + offset``) or rows of a ragged KV;
  one outside the cache (``-1``, ``-2^31``, ``>= num_slots``) is ignored; a slot of ``-1`` skips a write.
"""

from __future__ import annotations

import torch

from .fp8 import FP8_MAX, dequantize_fp8_e4m3, quantize_fp8_e4m3

KV_LORA_RANK = 512
ROPE_DIM = 64
LATENT_DIM = KV_LORA_RANK + ROPE_DIM  # 576
FP8_GROUP = 128
FP8_ROW_BYTES = KV_LORA_RANK + 4 * (KV_LORA_RANK // FP8_GROUP) + 2 * ROPE_DIM  # 656

# Elements of the largest fp32 intermediate a reference materializes at once (~256 MiB).
_CHUNK_ELEMS = 1 << 26


def _row_chunks(n_rows: int, elems_per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, elems_per_row))
    for s in range(0, n_rows, step):
        yield s, min(n_rows, s + step)


# ---------------------------------------------------------------------------------------------
# Latent (MLA) KV cache
# ---------------------------------------------------------------------------------------------


def encode_latent_rows_fp8(kv_c: torch.Tensor, k_pe: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """``kv_c [T, 512]``, ``k_pe [T, 64]`` (float) -> ``[T, 656]`` uint8 FP8 cache rows."""
    values, scales = quantize_fp8_e4m3(kv_c, FP8_GROUP, scale_fmt)
    return torch.cat(
        [
            values.view(torch.uint8),
            scales.contiguous().view(torch.uint8),
            k_pe.to(torch.bfloat16).contiguous().view(torch.uint8),
        ],
        dim=-1,
    )


def decode_latent_rows(rows: torch.Tensor) -> torch.Tensor:
    """Cache rows ``[..., 576]`` (float) or ``[..., 656]`` (uint8 FP8) -> ``[..., 576]`` float32."""
    if rows.dtype != torch.uint8:
        return rows.float()
    lead = rows.shape[:-1]
    r = rows.reshape(-1, FP8_ROW_BYTES)
    values = r[:, :KV_LORA_RANK].contiguous().view(torch.float8_e4m3fn)
    scales = r[:, KV_LORA_RANK : KV_LORA_RANK + 16].contiguous().view(torch.float32)
    rope = r[:, KV_LORA_RANK + 16 :].contiguous().view(torch.bfloat16).float()
    latent = dequantize_fp8_e4m3(values, scales, FP8_GROUP)
    return torch.cat([latent, rope], dim=-1).reshape(*lead, LATENT_DIM)


def ref_write_latent_cache(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fp8: bool,
    scale_fmt: str | None = None,
) -> None:
    """Reference of :func:`vllm_frontier.kernels.latent_cache.write_latent_cache` (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    bs = cache.shape[1]
    kv_c, k_pe = kv_c[keep], k_pe[keep]
    if fp8:
        rows = encode_latent_rows_fp8(kv_c, k_pe, scale_fmt)
    else:
        rows = torch.cat([kv_c, k_pe], dim=-1).to(cache.dtype)
    cache[slots // bs, slots % bs] = rows


def ref_read_latent_cache(cache: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Whole cache ``[num_blocks, block_size, 576 | 656]`` -> ``[num_blocks, block_size, 576]`` dequantized."""
    return decode_latent_rows(cache).to(out_dtype)


def gather_latent(cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
    """Rows of request-local token ``positions`` through the block table, dequantized to float32.

    Args:
        cache: ``[num_blocks, block_size, 576]`` float or ``[num_blocks, block_size, 656]`` uint8.
        block_table: ``[B, max_blocks]`` int.
        positions: ``[B, ...]`` int64 token positions; entries where ``valid`` is False are not read.
    Returns: ``[B, ..., 576]`` float32 (zeros where not valid).
    """
    bs = cache.shape[1]
    B = positions.shape[0]
    pos = torch.where(valid, positions, torch.zeros_like(positions))
    flat = pos.reshape(B, -1)
    col = (flat // bs).clamp(max=block_table.shape[1] - 1)
    blk = torch.gather(block_table.long(), 1, col)
    blk = torch.where(valid.reshape(B, -1), blk, torch.zeros_like(blk))
    rows = decode_latent_rows(cache[blk, flat % bs])
    rows = torch.where(valid.reshape(B, -1, 1), rows, 0.0)  # not a multiply: unused slots may hold NaN
    return rows.reshape(*positions.shape, LATENT_DIM)


# ---------------------------------------------------------------------------------------------
# Attention (absorbed / MQA form: one 576-wide latent KV head shared by every query head)
# ---------------------------------------------------------------------------------------------


def _softmax_out(scores: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, eq: str):
    """scores/mask ``[..., K]`` -> (out via einsum ``eq`` with v, lse ``[...]``, max ``[...]``);
    a row without a valid key has a zero output, lse ``+inf`` and max ``-inf``."""
    scores = scores.masked_fill(~mask, float("-inf"))
    mx = scores.amax(dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe.unsqueeze(-1)) * mask
    return torch.einsum(eq, p, v), lse.masked_fill(lse == float("-inf"), float("inf")), mx


def ref_mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    head_dim_v: int = KV_LORA_RANK,
    out_dtype: torch.dtype | None = None,
):
    """Dense paged MLA decode (absorbed form).

    Args:
        q: ``[B, S_q, H, 576]``.
        cache: ``[num_blocks, block_size, 576]`` float or ``[num_blocks, block_size, 656]`` uint8 (FP8).
        block_table: ``[B, max_blocks]`` int32; entries past a request's length are never read.
        cache_seqlens: ``[B]`` int32 tokens in the cache per request (the S_q new tokens included).
        causal: query ``s`` sits at position ``seq_len - S_q + s`` and sees keys at positions ``<=`` it.
    Returns: out ``[B, S_q, H, head_dim_v]`` (``out_dtype``, default q's), lse ``[B, H, S_q]`` float32
        (``+inf`` where a query sees no key).
    """
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, head_dim_v, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((B, H, S), float("inf"), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    L = int(cache_seqlens.max().item()) if B else 0
    if L <= 0:
        return out, lse
    seqlens = cache_seqlens.long()
    for b0, b1 in _row_chunks(B, L * (LATENT_DIM + S * H)):
        sl = seqlens[b0:b1]
        pos = torch.arange(L, device=q.device).expand(b1 - b0, L)
        valid = pos < sl[:, None]
        kv = gather_latent(cache, block_table[b0:b1], pos, valid)  # [b, L, 576]
        qf = q[b0:b1].float().reshape(b1 - b0, S * H, D)
        scores = torch.einsum("bmd,bld->bml", qf, kv) * softmax_scale
        mask = valid[:, None, :].expand(-1, S * H, -1)
        if causal:
            qpos = (sl[:, None] - S + torch.arange(S, device=q.device)[None, :]).repeat_interleave(H, dim=1)
            mask = mask & (pos[:, None, :] <= qpos[:, :, None])
        o, l, _ = _softmax_out(scores, mask, kv[..., :head_dim_v], "bml,blv->bmv")
        out[b0:b1] = o.reshape(b1 - b0, S, H, head_dim_v).to(out.dtype)
        lse[b0:b1] = l.reshape(b1 - b0, S, H).transpose(1, 2)
    return out, lse


def ref_mla_sparse_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    topk_length: torch.Tensor | None = None,
    head_dim_v: int = KV_LORA_RANK,
    out_dtype: torch.dtype | None = None,
):
    """Sparse paged MLA decode: query ``(b, s)`` attends only to the cache slots ``indices[b, s]``.

    Args:
        q: ``[B, S_q, H, 576]``.
        cache: ``[num_blocks, block_size, 576]`` float or ``[num_blocks, block_size, 656]`` uint8 (FP8);
            any block / row strides.
        indices: ``[B, S_q, topk]`` int32 physical slots ``block * block_size + offset`` (no block table);
            a slot outside ``[0, num_blocks * block_size)`` (``-1``, ``-2^31``, ...) is unused.
        topk_length: optional ``[B]`` int32: request ``b`` uses only ``indices[b, :, :topk_length[b]]``.
    Returns: out ``[B, S_q, H, head_dim_v]`` (``out_dtype``, default q's), lse ``[B, H, S_q]`` float32
        (``+inf`` where a query has no valid key).
    """
    B, S, H, D = q.shape
    K = indices.shape[-1]
    nb, bs = cache.shape[0], cache.shape[1]
    out = torch.zeros(B, S, H, head_dim_v, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((B, H, S), float("inf"), dtype=torch.float32, device=q.device)
    if K == 0 or nb * bs == 0:
        return out, lse
    for b0, b1 in _row_chunks(B, S * K * (LATENT_DIM + H)):
        idx = indices[b0:b1].long()
        valid = (idx >= 0) & (idx < nb * bs)
        if topk_length is not None:
            valid &= torch.arange(K, device=q.device) < topk_length[b0:b1, None, None].long()
        slot = torch.where(valid, idx, torch.zeros_like(idx))
        kv = decode_latent_rows(cache[slot // bs, slot % bs])
        kv = torch.where(valid[..., None], kv, 0.0)  # not a multiply: unused slots may hold NaN
        scores = torch.einsum("bshd,bskd->bshk", q[b0:b1].float(), kv) * softmax_scale
        mask = valid[:, :, None, :].expand(-1, -1, H, -1)
        o, l, _ = _softmax_out(scores, mask, kv[..., :head_dim_v], "bshk,bskv->bshv")
        out[b0:b1] = o.to(out.dtype)
        lse[b0:b1] = l.transpose(1, 2)
    return out, lse


def ref_mla_sparse_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = KV_LORA_RANK,
    topk_length: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """Sparse MLA prefill over a ragged KV.

    Args:
        q: ``[S_q, H, 576]``.
        kv: ``[S_kv, 1, 576]`` float or ``[S_kv, 1, 656]`` uint8 (FP8 rows); any row stride.
        indices: ``[S_q, 1, topk]`` int32 rows of ``kv``; one outside ``[0, S_kv)`` is an unused slot.
        topk_length: optional ``[S_q]`` int32: query ``t`` uses only ``indices[t, 0, :topk_length[t]]``.
    Returns: out ``[S_q, H, d_v]`` (``out_dtype``, default q's), max_logits ``[S_q, H]`` float32 (max of
        ``sm_scale * q·k`` over valid keys, ``-inf`` if none), lse ``[S_q, H]`` float32 (``+inf`` if none).
    """
    Sq, H, D = q.shape
    K = indices.shape[-1]
    out = torch.zeros(Sq, H, d_v, dtype=out_dtype or q.dtype, device=q.device)
    mx = torch.full((Sq, H), float("-inf"), dtype=torch.float32, device=q.device)
    lse = torch.full((Sq, H), float("inf"), dtype=torch.float32, device=q.device)
    rows = kv[:, 0]
    n_kv = rows.shape[0]
    if K == 0 or n_kv == 0:
        return out, mx, lse
    for s0, s1 in _row_chunks(Sq, K * (LATENT_DIM + H)):
        idx = indices[s0:s1, 0].long()
        valid = (idx >= 0) & (idx < n_kv)
        if topk_length is not None:
            valid &= torch.arange(K, device=q.device) < topk_length[s0:s1, None].long()
        g = decode_latent_rows(rows[torch.where(valid, idx, torch.zeros_like(idx))])
        g = torch.where(valid[..., None], g, 0.0)
        scores = torch.einsum("shd,skd->shk", q[s0:s1].float(), g) * sm_scale
        o, l, m = _softmax_out(scores, valid[:, None, :].expand(-1, H, -1), g[..., :d_v], "shk,skv->shv")
        out[s0:s1], lse[s0:s1], mx[s0:s1] = o.to(out.dtype), l, m
    return out, mx, lse


def ref_dense_attention_unabsorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    causal_offset: int | None = None,
):
    """Plain multi-head softmax attention in MLA's *un-absorbed* form, for checking the absorbed kernels.

    Args:
        q_nope: ``[S_q, H, d_nope]``, q_pe: ``[S_q, H, 64]``.
        kv_c: ``[S_kv, 512]``, k_pe: ``[S_kv, 64]``.
        w_uk: ``[H, d_nope, 512]`` (k_nope = kv_c @ w_uk^T per head), w_uv: ``[H, d_v, 512]``.
        causal_offset: if set, query ``s`` sees keys ``<= causal_offset + s``.
    Returns: ``[S_q, H, d_v]`` float32 = softmax(scale * [q_nope;q_pe]·[k_nope;k_pe]) @ v.
    """
    k_nope = torch.einsum("tc,hdc->thd", kv_c.float(), w_uk.float())
    v = torch.einsum("tc,hdc->thd", kv_c.float(), w_uv.float())
    scores = (
        torch.einsum("shd,thd->sht", q_nope.float(), k_nope)
        + torch.einsum("shr,tr->sht", q_pe.float(), k_pe.float())
    ) * softmax_scale
    if causal_offset is not None:
        S, T = q_nope.shape[0], kv_c.shape[0]
        allowed = torch.arange(T)[None, :] <= (causal_offset + torch.arange(S))[:, None]
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("sht,thd->shd", torch.softmax(scores, dim=-1), v)


# ---------------------------------------------------------------------------------------------
# Lightning indexer
# ---------------------------------------------------------------------------------------------


def _indexer_block_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, D + 4]`` uint8 -> ``[num_blocks, block_size * (D + 4)]`` view (any block stride)."""
    nb, bs, w = cache.shape
    if cache.dtype != torch.uint8 or cache.stride(2) != 1 or cache.stride(1) != w:
        raise ValueError("indexer K cache must be uint8 [num_blocks, block_size, D+4] with contiguous blocks")
    return torch.as_strided(cache, (nb, bs * w), (cache.stride(0), 1), cache.storage_offset())


def ref_indexer_write_k_cache(
    k: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, scale_fmt: str | None = None
) -> None:
    """Reference of :func:`vllm_frontier.kernels.indexer.write_indexer_k_cache` (in place)."""
    nb, bs, w = cache.shape
    D = w - 4
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    values, scales = quantize_fp8_e4m3(k[keep], D, scale_fmt)
    flat = _indexer_block_bytes(cache)
    blk, off = slots // bs, slots % bs
    cols = off[:, None] * D + torch.arange(D, device=k.device)[None, :]
    flat[blk[:, None], cols] = values.view(torch.uint8)
    scols = bs * D + off[:, None] * 4 + torch.arange(4, device=k.device)[None, :]
    flat[blk[:, None], scols] = scales.contiguous().view(torch.uint8).reshape(-1, 4)


def ref_indexer_gather_k(cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
    """Dequantized indexer K ``[B, ..., D]`` float32 for request-local ``positions [B, ...]`` (zeros where not valid)."""
    nb, bs, w = cache.shape
    D = w - 4
    B = positions.shape[0]
    flat_pos = torch.where(valid, positions, torch.zeros_like(positions)).reshape(B, -1)
    col = (flat_pos // bs).clamp(max=block_table.shape[1] - 1)
    blk = torch.gather(block_table.long(), 1, col)
    blk = torch.where(valid.reshape(B, -1), blk, torch.zeros_like(blk))
    off = flat_pos % bs
    flat = _indexer_block_bytes(cache)
    vals = flat[blk[..., None], off[..., None] * D + torch.arange(D, device=cache.device)]
    sc = flat[blk[..., None], bs * D + off[..., None] * 4 + torch.arange(4, device=cache.device)]
    k = vals.contiguous().view(torch.float8_e4m3fn).float() * sc.contiguous().view(torch.float32)
    k = torch.where(valid.reshape(B, -1, 1), k, 0.0)
    return k.reshape(*positions.shape, D)


def ref_indexer_paged_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    causal: bool = True,
) -> torch.Tensor:
    """Indexer logits over the paged FP8 K cache (decode, and MTP with N > 1 query tokens per request).

    ``logits[b, n, t] = sum_h weights[b, n, h] * relu(q[b, n, h] · k[b, t])`` with ``k`` dequantized.

    Args:
        q: ``[B, N, H, D]`` float8_e4m3fn or float (its scale folded into ``weights``).
        weights: ``[B, N, H]`` float32.
        k_cache: ``[num_blocks, block_size, D + 4]`` uint8 (vLLM layout: per block, all fp8 values
            ``[block_size, D]`` then all fp32 scales ``[block_size]``).
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32.
        causal: query ``n`` sits at position ``seq_len - N + n`` and sees keys ``<=`` it;
            otherwise every key ``< seq_len``.
    Returns: ``[B, N, max_seq_len]`` float32, ``-inf`` where a key is not visible.
    """
    B, N, H, D = q.shape
    out = torch.full((B, N, max_seq_len), float("-inf"), dtype=torch.float32, device=q.device)
    sl = seq_lens.long()
    for b0, b1 in _row_chunks(B, max_seq_len * (D + N * H)):
        pos = torch.arange(max_seq_len, device=q.device).expand(b1 - b0, -1)
        valid = pos < sl[b0:b1, None]
        k = ref_indexer_gather_k(k_cache, block_table[b0:b1], pos, valid)  # [b, L, D]
        s = torch.einsum("bnhd,bld->bnhl", q[b0:b1].float(), k).clamp_min(0)
        logits = torch.einsum("bnhl,bnh->bnl", s, weights[b0:b1].float())
        vis = valid[:, None, :].expand(-1, N, -1)
        if causal:
            qpos = sl[b0:b1, None] - N + torch.arange(N, device=q.device)[None, :]
            vis = vis & (pos[:, None, :] <= qpos[:, :, None])
        out[b0:b1] = logits.masked_fill(~vis, float("-inf"))
    return out


def ref_indexer_ragged_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    cu_seqlen_ks: torch.Tensor,
    cu_seqlen_ke: torch.Tensor,
) -> torch.Tensor:
    """Indexer logits for prefill over a ragged (gathered) K.

    Args:
        q: ``[T, H, D]`` float8_e4m3fn or float; weights: ``[T, H]`` float32.
        k: ``[S, D]`` float8_e4m3fn (with ``k_scale [S]`` float32) or float (``k_scale`` None).
        cu_seqlen_ks, cu_seqlen_ke: ``[T]`` int32; query ``t`` sees keys ``ks[t] <= s < ke[t]``
            (causal prefill: ``ks`` = its request's first key row, ``ke`` = its own row + 1).
    Returns: ``[T, S]`` float32, ``-inf`` outside each query's window.
    """
    T, H, D = q.shape
    S = k.shape[0]
    kf = k.float() if k_scale is None else k.float() * k_scale.float()[:, None]
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    col = torch.arange(S, device=q.device)
    for t0, t1 in _row_chunks(T, S * (H + 1)):
        s = torch.einsum("thd,sd->ths", q[t0:t1].float(), kf).clamp_min(0)
        logits = torch.einsum("ths,th->ts", s, weights[t0:t1].float())
        vis = (col[None, :] >= cu_seqlen_ks[t0:t1, None].long()) & (col[None, :] < cu_seqlen_ke[t0:t1, None].long())
        out[t0:t1] = logits.masked_fill(~vis, float("-inf"))
    return out


_POS_BITS = 21  # rows up to 2M columns


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2^32) whose unsigned order equals the float order (NaN excluded)."""
    b = x.float().contiguous().view(torch.int32).long()
    return torch.where(b < 0, (~b) & 0xFFFFFFFF, b | 0x80000000)


def ref_topk_indices(
    logits: torch.Tensor, k: int, lengths: torch.Tensor | None = None, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-``k`` positions per row with a stable tie rule (equal scores: the lower position wins).

    Args:
        logits: ``[R, L]`` float.
        k: positive int (up to 2048 in DeepSeek-V3.2).
        lengths: ``[R]`` int, tokens in each row's window (default ``L - starts``).
        starts: ``[R]`` int, first column of each row's window (default 0).
    Returns: ``[R, k]`` int32 window-relative positions (column - start) in ascending order, then
        ``-1`` for unused slots when the window holds fewer than ``k`` tokens. Every column inside the
        window is a candidate, even one whose logit is ``-inf``.
    """
    R, L = logits.shape
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if L >= (1 << _POS_BITS):
        raise ValueError(f"rows longer than {1 << _POS_BITS} columns are not supported")
    dev = logits.device
    starts = torch.zeros(R, dtype=torch.long, device=dev) if starts is None else starts.long()
    lengths = (L - starts) if lengths is None else lengths.long()
    out = torch.full((R, k), -1, dtype=torch.int32, device=dev)
    if R == 0 or L == 0:
        return out
    col = torch.arange(L, device=dev)
    inwin = (col[None, :] >= starts[:, None]) & (col[None, :] < (starts + lengths)[:, None])
    key = (inwin.long() << (32 + _POS_BITS)) | (float_order_key(logits) << _POS_BITS) | (L - 1 - col)[None, :]
    kk = min(k, L)
    top = torch.topk(key, kk, dim=-1, sorted=False).values
    ok = top >= (1 << (32 + _POS_BITS))
    pos = (L - 1 - (top & ((1 << _POS_BITS) - 1))) - starts[:, None]
    pos = torch.where(ok, pos, torch.full_like(pos, 1 << 40))
    pos = torch.sort(pos, dim=-1).values
    out[:, :kk] = torch.where(pos == (1 << 40), torch.full_like(pos, -1), pos).to(torch.int32)
    return out


__all__ = [
    "LATENT_DIM",
    "FP8_ROW_BYTES",
    "FP8_MAX",
    "encode_latent_rows_fp8",
    "decode_latent_rows",
    "gather_latent",
    "ref_write_latent_cache",
    "ref_read_latent_cache",
    "ref_mla_decode",
    "ref_mla_sparse_decode",
    "ref_mla_sparse_prefill",
    "ref_dense_attention_unabsorbed",
    "ref_indexer_write_k_cache",
    "ref_indexer_gather_k",
    "ref_indexer_paged_logits",
    "ref_indexer_ragged_logits",
    "ref_topk_indices",
    "float_order_key",
]
