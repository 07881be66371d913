"""FlashMLA-shaped public API over this package's Triton kernels and torch references.

Shapes use FlashMLA's names: ``b`` batch, ``s_q`` query tokens per request, ``h_q`` query heads, one latent
KV head (``h_kv = 1``) of ``d = 576`` (512 latent + 64 rope), ``d_v = 512``.

Every function dispatches to Triton when the tensors are on CUDA (or ``backend="triton"`` with
``TRITON_INTERPRET=1`` on CPU) and to the torch reference in :mod:`.ref` otherwise (``backend="torch"`` forces it).
The LSE returned is the natural log of the softmax denominator of ``softmax_scale * q·k``; a query with no
valid key gets a zero output row and ``lse = -inf``.
"""

from __future__ import annotations

import dataclasses

import torch

from ._common import cdiv, check_dtype, use_triton
from .mla_attention import KernelConfig, default_config, mla_attention_fwd
from .ref import FP8_ROW_BYTES, LATENT_DIM, ref_mla_decode, ref_mla_sparse_decode, ref_mla_sparse_prefill

__all__ = ["MLASchedule", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 32


@dataclasses.dataclass(frozen=True)
class MLASchedule:
    """Scheduling metadata (FlashMLA's ``tile_scheduler_metadata``): how many key splits per program row
    block and the kernel tile config. Build it once per batch with :func:`get_mla_metadata`; reuse it for
    every layer."""

    num_splits: int
    config: KernelConfig

    def __post_init__(self):
        if not 1 <= self.num_splits <= 256:
            raise ValueError(f"num_splits must be in [1, 256], got {self.num_splits}")


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int = 1,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    config: KernelConfig | None = None,
) -> tuple[MLASchedule, int]:
    """Pick the number of key splits so that small batches / long contexts still fill the GPU.

    Args:
        cache_seqlens: ``[b]`` int32 (read on the host once: this synchronizes with the device).
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``.
        num_heads_k: must be 1 (MLA's single latent head).
        num_heads_q: ``h_q`` (used for the sparse row blocking; default ``num_q_tokens_per_head_k``).
        topk: keys per query for sparse decode (None: dense).
    Returns: ``(schedule, num_splits)``.
    """
    if num_heads_k != 1:
        raise ValueError(f"MLA has one latent KV head; num_heads_k must be 1, got {num_heads_k}")
    b = cache_seqlens.shape[0]
    rows = num_q_tokens_per_head_k
    cfg = config or default_config(cache_seqlens.device, num_heads_q if topk else rows)
    if topk:
        h = num_heads_q or rows
        row_blocks = (rows // max(h, 1)) * cdiv(h, cfg.block_m)
        keys = topk
    else:
        row_blocks = cdiv(rows, cfg.block_m)
        keys = int(cache_seqlens.max().item()) if b else 0
    programs = max(1, b * row_blocks)
    if cache_seqlens.is_cuda:
        num_sms = torch.cuda.get_device_properties(cache_seqlens.device).multi_processor_count
    else:
        num_sms = 1
    tiles = cdiv(max(keys, 1), cfg.block_n)
    splits = max(1, min(cdiv(num_sms, programs), tiles // 4, _MAX_SPLITS)) if programs < num_sms else 1
    return MLASchedule(splits, cfg), splits


def _validate_q(q: torch.Tensor, dims: int, name: str = "q") -> None:
    if q.dim() != dims or q.shape[-1] != LATENT_DIM:
        raise ValueError(f"{name} must be {dims}-D with last dim {LATENT_DIM}, got {list(q.shape)}")
    check_dtype(name, q, _FLOATS)
    if q.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous; call .contiguous()")


def _validate_cache(cache: torch.Tensor, is_fp8: bool, name: str) -> torch.Tensor:
    if cache.dim() == 4:
        if cache.shape[2] != 1:
            raise ValueError(f"{name} [num_blocks, block_size, h_kv, d] needs h_kv == 1, got {cache.shape[2]}")
        cache = cache.squeeze(2)
    if cache.dim() != 3:
        raise ValueError(f"{name} must be [num_blocks, block_size, d], got {list(cache.shape)}")
    if is_fp8:
        if cache.dtype != torch.uint8 or cache.shape[-1] != FP8_ROW_BYTES:
            raise ValueError(
                f"an FP8 {name} is uint8 with {FP8_ROW_BYTES} bytes per token, got {cache.dtype} x {cache.shape[-1]}"
            )
    else:
        if cache.dtype not in _FLOATS or cache.shape[-1] != LATENT_DIM:
            raise ValueError(
                f"{name} must be float with {LATENT_DIM} values per token (FP8 caches need is_fp8_kvcache=True), "
                f"got {cache.dtype} x {cache.shape[-1]}"
            )
    if cache.stride(-1) != 1 or cache.stride(-2) != cache.shape[-1]:
        raise ValueError(f"{name} rows must be contiguous within a block")
    return cache


def _as_int32(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    t = t.to(torch.int32)
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    tile_scheduler_metadata: MLASchedule | None = None,
    num_splits: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over the paged latent cache (absorbed form), dense or sparse.

    Args:
        q: ``[b, s_q, h_q, 576]`` fp16/bf16/fp32 (absorbed query: ``q_nope @ W_UK`` then ``q_pe``).
        k_cache: ``[num_blocks, block_size, 576]`` float, or ``[num_blocks, block_size, 656]`` uint8 with
            ``is_fp8_kvcache=True`` (layout in :mod:`.latent_cache`); a ``[.., .., 1, d]`` view is accepted.
        block_table: ``[b, max_blocks]`` int32; entries past a request's length are never read (may be garbage).
        cache_seqlens: ``[b]`` int32 tokens per request (the new ``s_q`` included); 0 = empty row.
        head_dim_v: must be 512.
        tile_scheduler_metadata / num_splits: from :func:`get_mla_metadata` (computed here when None).
        softmax_scale: default ``576 ** -0.5``.
        causal: for ``s_q > 1`` (MTP verification): query ``s`` sees positions ``<= seq_len - s_q + s``.
            Ignored when ``indices`` is given (the indices already encode visibility).
        indices: ``[b, s_q, topk]`` int32 request-local token positions for sparse decode; ``-1`` (or any
            position ``>= seq_len``) is an unused slot.
    Returns:
        out ``[b, s_q, h_q, 512]`` (q's dtype), lse ``[b, h_q, s_q]`` float32.
    """
    _validate_q(q, 4)
    if head_dim_v != 512:
        raise ValueError(f"only head_dim_v=512 is supported, got {head_dim_v}")
    k_cache = _validate_cache(k_cache, is_fp8_kvcache, "k_cache")
    b, s_q, h_q, _ = q.shape
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [b={b}, max_blocks], got {list(block_table.shape)}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must be [b={b}], got {list(cache_seqlens.shape)}")
    block_table = _as_int32("block_table", block_table)
    cache_seqlens = _as_int32("cache_seqlens", cache_seqlens)
    if indices is not None:
        if indices.dim() != 3 or indices.shape[:2] != (b, s_q):
            raise ValueError(f"indices must be [b={b}, s_q={s_q}, topk], got {list(indices.shape)}")
        indices = _as_int32("indices", indices)
    scale = softmax_scale if softmax_scale is not None else LATENT_DIM**-0.5
    if not use_triton(backend, q):
        if indices is not None:
            return ref_mla_sparse_decode(q, k_cache, block_table, cache_seqlens, indices, scale)
        return ref_mla_decode(q, k_cache, block_table, cache_seqlens, scale, causal=causal)
    sched = tile_scheduler_metadata
    if sched is None:
        sched, _ = get_mla_metadata(
            cache_seqlens, s_q * h_q, 1, h_q, is_fp8_kvcache, indices.shape[-1] if indices is not None else None
        )
    splits = num_splits if isinstance(num_splits, int) else sched.num_splits
    return mla_attention_fwd(
        q, k_cache, block_table, cache_seqlens, scale, fp8=is_fp8_kvcache, indices=indices,
        causal=causal, num_splits=splits, config=sched.config,
    )


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    backend: str | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill over a ragged KV: query ``t`` attends to rows ``indices[t, 0, :]`` of ``kv``.

    Args:
        q: ``[s_q, h_q, 576]`` fp16/bf16/fp32.
        kv: ``[s_kv, 1, 576]`` float, or ``[s_kv, 1, 656]`` uint8 FP8 rows (layout in :mod:`.latent_cache`).
        indices: ``[s_q, 1, topk]`` int32 row numbers into ``kv``; ``-1`` (or ``>= s_kv``) = unused slot.
        sm_scale: softmax scale.
        d_v: must be 512.
    Returns:
        out ``[s_q, h_q, 512]`` (q's dtype); max_logits ``[s_q, h_q]`` float32 (max of ``sm_scale * q·k``
        over the valid keys, ``-inf`` if none); lse ``[s_q, h_q]`` float32 (natural log).
    """
    _validate_q(q, 3)
    if d_v != 512:
        raise ValueError(f"only d_v=512 is supported, got {d_v}")
    if kv.dim() != 3 or kv.shape[1] != 1:
        raise ValueError(f"kv must be [s_kv, 1, d], got {list(kv.shape)}")
    fp8 = kv.dtype == torch.uint8
    _validate_cache(kv.transpose(0, 1), fp8, "kv")
    s_q, h_q, _ = q.shape
    if indices.dim() != 3 or indices.shape[0] != s_q or indices.shape[1] != 1:
        raise ValueError(f"indices must be [s_q={s_q}, 1, topk], got {list(indices.shape)}")
    indices = _as_int32("indices", indices)
    s_kv = kv.shape[0]
    if not use_triton(backend, q):
        return ref_mla_sparse_prefill(q, kv, indices, sm_scale, d_v)
    if s_kv == 0 or s_q == 0:
        return (
            torch.zeros(s_q, h_q, 512, dtype=q.dtype, device=q.device),
            torch.full((s_q, h_q), float("-inf"), device=q.device),
            torch.full((s_q, h_q), float("-inf"), device=q.device),
        )
    cache = kv.transpose(0, 1)  # one block holding every row: [1, s_kv, d]
    block_table = torch.zeros(1, 1, dtype=torch.int32, device=q.device).expand(s_q, 1)
    seqlens = torch.full((s_q,), s_kv, dtype=torch.int32, device=q.device)
    out, lse, maxl = mla_attention_fwd(
        q.unsqueeze(1), cache, block_table, seqlens, sm_scale, fp8=fp8, indices=indices,
        num_splits=1, config=config, write_max=True,
    )
    return out[:, 0], maxl[:, 0], lse[:, :, 0]
