"""FlashMLA's public interface over this package's Triton kernels and torch references.

Follows ``flash_mla/flash_mla_interface.py`` of deepseek-ai/FlashMLA as of commit 9241ae3 (2026-04-29):
same functions, argument order, meanings and conventions, so code written for FlashMLA runs unchanged:

- :func:`get_mla_metadata` takes no arguments (any are accepted and ignored, as FlashMLA does) and returns
  ``(FlashMLASchedMeta, None)``; the schedule is fixed by the first :func:`flash_mla_with_kvcache` call that
  uses it, and later calls must have the same shapes (checked).
- sparse decode ``indices`` are physical cache slots, ``block * page_block_size + offset``; no block table or
  sequence lengths are needed (both may be None and are not read). A slot outside the cache (``-1``,
  ``-2^31``, ``>= num_blocks * page_block_size``) is unused. :func:`request_positions_to_slots` converts
  request-local token positions (what an indexer produces) through a block table.
- a query with no valid key gets a zero output row and ``lse = +inf``; ``max_logits = -inf``.
- ``attn_sink`` ``[h_q]`` scales the output by ``1 / (1 + exp(attn_sink - lse))`` (``+inf``: zero output,
  ``-inf``: no effect) and leaves lse unchanged; ``topk_length`` keeps the leftmost indices only.
- FP8 caches (656-byte rows, layout below) may be typed ``uint8`` or ``torch.float8_e4m3fn``.

Shapes: ``b`` batch, ``s_q`` query tokens per request, ``h_q`` query heads, ``h_k`` KV heads, ``d = 576``
(512 latent + 64 rope), ``d_v = 512``. FP8 row: 512 e4m3 codes | 4 float32 scales (one per 128 codes) |
64 bfloat16 rope values.

Beyond FlashMLA (accepted here, refused there): float caches for sparse decode, FP8 caches for dense decode
and sparse prefill, float32 / float16 queries, a default for ``tile_scheduler_metadata``, and the keyword-only
``backend=`` (``None``: Triton on CUDA tensors, the torch reference elsewhere; ``"triton"`` on CPU needs
``TRITON_INTERPRET=1``; ``"torch"``). Not implemented (``NotImplementedError``): head dim 512 (FlashMLA's
MODEL1 FP8 layout, including its ``extra_k_cache`` use), ``h_k > 1`` with sparse attention (FlashMLA refuses it
too); FlashMLA's dense prefill and backward (``flash_attn_varlen_*``) are not provided.
"""

from __future__ import annotations

import dataclasses

import torch

from ._common import INTERPRET, cdiv, check_dtype, target_capability, use_triton
from .mla_attention import KernelConfig, default_config, mla_attention_fwd
from .ref import FP8_ROW_BYTES, LATENT_DIM, ref_mla_decode, ref_mla_sparse_decode, ref_mla_sparse_prefill

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "request_positions_to_slots",
    "warm_up_split_variants",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.uint8, torch.float8_e4m3fn)
_MAX_SPLITS = 32
# Every key-split count a launch can use (NUM_SPLITS is a compile-time constant: a value met for the first time
# compiles a kernel, seconds on a GPU). Powers of two: at most six variants per kernel, all compiled at warm-up.
SPLIT_CHOICES = tuple(1 << i for i in range(_MAX_SPLITS.bit_length()))
_D_V = 512


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling state of :func:`flash_mla_with_kvcache` (FlashMLA's class of the same name).

    Made empty by :func:`get_mla_metadata`; the first call fills ``config`` (the call's shapes) and
    ``num_splits`` (key splits per program, chosen so small batches with long keys still fill the GPU; reading
    ``cache_seqlens`` for it synchronizes once). Reuse it across layers only with the same shapes and lengths.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    num_splits: int | None = None  # main cache; set by get_mla_metadata(num_splits=) or the first call
    extra_num_splits: int | None = None  # extra_k_cache pass
    kernel_config: KernelConfig | None = None  # Triton tile sizes (None: the device's default)
    tile_scheduler_metadata: None = None  # FlashMLA's device-side plan; this implementation needs none

    def __post_init__(self):
        if self.num_splits is not None and not 1 <= self.num_splits <= 256:
            raise ValueError(f"num_splits must be in [1, 256], got {self.num_splits}")


def get_mla_metadata(
    *args, num_splits: int | None = None, config: KernelConfig | None = None, **kwargs
) -> tuple[FlashMLASchedMeta, None]:
    """An empty :class:`FlashMLASchedMeta`, filled by the first :func:`flash_mla_with_kvcache` call.

    Positional and other keyword arguments (FlashMLA's older interface) are accepted and ignored, as FlashMLA
    does. Our additions: ``num_splits`` forces the key splits of the Triton kernel (1..256) and ``config``
    its tile sizes. Returns ``(sched_meta, None)``.
    """
    return FlashMLASchedMeta(num_splits=num_splits, kernel_config=config), None


def request_positions_to_slots(
    positions: torch.Tensor,
    block_table: torch.Tensor,
    page_block_size: int,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Request-local token positions -> physical cache slots (the ``indices`` of sparse decode).

    ``slot = block_table[r, pos // page_block_size] * page_block_size + pos % page_block_size``, as vLLM's
    ``triton_convert_req_index_to_global_index`` and FlashMLA's tests do.

    Args:
        positions: ``[R, ...]`` int32/int64 token positions of row ``r``'s request.
        block_table: ``[R, max_blocks]`` int32 (row ``r``'s blocks; unused entries are never read).
        seq_lens: optional ``[R]``: a position ``>= seq_lens[r]`` is dropped.
    Returns: ``positions.shape`` int32 slots; ``-1`` where a position is negative, past ``seq_lens``, past the
    block table, or its slot does not fit in int32.
    """
    if block_table.dim() != 2 or positions.dim() < 1 or positions.shape[0] != block_table.shape[0]:
        raise ValueError(
            f"positions [R, ...] and block_table [R, max_blocks] must share R, got {list(positions.shape)} "
            f"and {list(block_table.shape)}"
        )
    R, max_blocks = block_table.shape
    pos = positions.long()
    valid = (pos >= 0) & (pos < max_blocks * page_block_size)
    if seq_lens is not None:
        valid &= pos < seq_lens.long().view(R, *([1] * (pos.dim() - 1)))
    safe = torch.where(valid, pos, torch.zeros_like(pos))
    blk = torch.gather(block_table.long(), 1, (safe // page_block_size).reshape(R, -1)).reshape(pos.shape)
    slots = blk * page_block_size + safe % page_block_size
    valid &= (slots >= 0) & (slots < 2**31)
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_head_dims(q: torch.Tensor, d_v: int, d_v_name: str) -> None:
    if q.shape[-1] == 512:
        raise NotImplementedError(
            "head dim 512 (FlashMLA's MODEL1 layout) is not implemented here; supported: head dim 576 "
            "(DeepSeek V3 / V3.1 / V3.2: 512 latent + 64 rope)"
        )
    if q.shape[-1] != LATENT_DIM:
        raise ValueError(f"q's head dim must be {LATENT_DIM}, got {q.shape[-1]}")
    if d_v != _D_V:
        raise ValueError(f"{d_v_name} must be {_D_V}, got {d_v}")


def _validate_q(q: torch.Tensor, dims: int) -> None:
    if q.dim() != dims:
        raise ValueError(f"q must be {dims}-D, got {list(q.shape)}")
    check_dtype("q", q, _FLOATS)
    if q.stride(-1) != 1:
        raise ValueError("q's last dimension must be contiguous; call .contiguous()")


def _as_cache(cache: torch.Tensor, is_fp8: bool, name: str) -> torch.Tensor:
    """``[num_blocks, page_block_size, h_k, d]`` (or 3-D without ``h_k``) -> 4-D; FP8 as uint8 bytes."""
    if cache.dim() == 3:
        cache = cache.unsqueeze(2)
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_blocks, page_block_size, h_k, d], got {list(cache.shape)}")
    if is_fp8:
        if cache.dtype not in _FP8_DTYPES or cache.shape[-1] != FP8_ROW_BYTES:
            raise ValueError(
                f"an FP8 {name} has {FP8_ROW_BYTES} bytes per token typed uint8 or float8_e4m3fn, "
                f"got {cache.dtype} x {cache.shape[-1]}"
            )
        cache = cache.view(torch.uint8)
        if any(s % 4 for s in cache.stride()[:-1]):
            raise ValueError(f"{name}'s FP8 rows must start on 4-byte boundaries (strides {cache.stride()})")
    elif cache.dtype not in _FLOATS or cache.shape[-1] != LATENT_DIM:
        hint = " (FP8 caches need is_fp8_kvcache=True)" if cache.dtype in _FP8_DTYPES else ""
        raise ValueError(f"{name} must be float with {LATENT_DIM} values per token{hint}, got {cache.dtype} x "
                         f"{cache.shape[-1]}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous")
    return cache


def _as_int32(name: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    t = t.to(torch.int32)
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def _as_sink(attn_sink: torch.Tensor | None, h_q: int) -> torch.Tensor | None:
    if attn_sink is None:
        return None
    if attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink must be [h_q={h_q}], got {list(attn_sink.shape)}")
    return attn_sink.float()


def _splits(programs: int, keys: int, cfg: KernelConfig, device: torch.device) -> int:
    """Key splits so that ``programs * splits`` approaches the SM count (1 off CUDA), rounded down to one of
    ``SPLIT_CHOICES``."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if programs >= num_sms:
        return 1
    n = max(1, min(cdiv(num_sms, max(programs, 1)), cdiv(max(keys, 1), cfg.block_n) // 4, _MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def plan_num_splits(batch: int, s_q: int, h_q: int, max_seqlen_k: int, device: torch.device) -> int:
    """The key splits dense decode would choose for this shape, computed from host numbers (no device read),
    one of ``SPLIT_CHOICES``. Pass the result to ``get_mla_metadata(num_splits=...)``."""
    kcfg = default_config(device, s_q * h_q)
    return _splits(batch * cdiv(s_q * h_q, kcfg.block_m), max_seqlen_k, kcfg, device)


_WARM: set[tuple] = set()


def warm_up_split_variants(num_heads: int, dtype: torch.dtype, is_fp8_kvcache: bool, sparse: bool,
                           device: torch.device, block_size: int = 64, topk: int = 64) -> int:
    """Compile the single-token decode kernel (dense, or sparse with ``topk`` indices) at every split count of
    ``SPLIT_CHOICES`` for this head count, query dtype and cache format, on two blocks of dummy cache, so serving
    never meets a new variant (and never compiles during CUDA-graph capture). Once per process and shape;
    returns the launches made (0 when already warm, or where nothing is compiled)."""
    capability = target_capability(device)
    key = (num_heads, dtype, is_fp8_kvcache, sparse, str(device), block_size, topk, capability)
    if key in _WARM:
        return 0
    _WARM.add(key)
    q = torch.zeros(1, 1, num_heads, LATENT_DIM, dtype=dtype, device=device)
    if not use_triton(None, q) or (INTERPRET and capability is None):
        return 0  # the torch reference or the interpreter: nothing is compiled
    width = FP8_ROW_BYTES if is_fp8_kvcache else LATENT_DIM
    cache = torch.zeros(2, block_size, 1, width, dtype=torch.uint8 if is_fp8_kvcache else dtype, device=device)
    table = torch.arange(2, dtype=torch.int32, device=device).view(1, 2)
    lens = torch.full((1,), 2 * block_size, dtype=torch.int32, device=device)
    idx = torch.arange(topk, dtype=torch.int32, device=device).remainder(2 * block_size).view(1, 1, topk)
    for n in SPLIT_CHOICES:
        meta, _ = get_mla_metadata(num_splits=n)
        if sparse:
            flash_mla_with_kvcache(q, cache, None, None, head_dim_v=_D_V, tile_scheduler_metadata=meta,
                                   softmax_scale=1.0, is_fp8_kvcache=is_fp8_kvcache, indices=idx)
        else:
            flash_mla_with_kvcache(q, cache, table, lens, head_dim_v=_D_V, tile_scheduler_metadata=meta,
                                   softmax_scale=1.0, is_fp8_kvcache=is_fp8_kvcache)
    return len(SPLIT_CHOICES)


def _no_key_to_neg(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def _apply_sink(out: torch.Tensor, lse_heads_last: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """``out [..., h_q, d_v]`` (float32) times ``1 / (1 + exp(sink - lse))``; rows without keys stay zero."""
    lse = _no_key_to_neg(lse_heads_last)
    w = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.sigmoid(lse - sink))
    return out * w.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    head_dim_v: int = _D_V,
    tile_scheduler_metadata: FlashMLASchedMeta | None = None,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged KV cache (absorbed form): dense with ``indices=None``, else sparse.

    Args:
        q: ``[b, s_q, h_q, 576]`` bf16/fp16/fp32, last dim contiguous.
        k_cache: ``[num_blocks, page_block_size, h_k, 576]`` float, or ``[.., .., 1, 656]`` uint8 /
            float8_e4m3fn with ``is_fp8_kvcache=True``; a 3-D view without ``h_k`` is accepted. Any block and
            row strides.
        block_table: ``[b, max_blocks]`` int32, dense only (entries past a request's length are never read);
            may be None for sparse attention (then not read).
        cache_seqlens: ``[b]`` int32 tokens per request, dense only (0: an empty request); may be None for
            sparse attention.
        head_dim_v: must be 512.
        tile_scheduler_metadata: from :func:`get_mla_metadata` (None: a fresh one for this call).
        num_splits: must be None (FlashMLA's placeholder); force splits with ``get_mla_metadata(num_splits=)``.
        softmax_scale: default ``576 ** -0.5``.
        causal: dense only (``s_q > 1``, MTP): query ``s`` sees positions ``<= seq_len - s_q + s``.
        is_fp8_kvcache: the caches hold 656-byte FP8 rows.
        indices: ``[b, s_q, topk]`` int32 physical slots ``block * page_block_size + offset`` (sparse); a slot
            outside ``[0, num_blocks * page_block_size)`` (``-1``, ``-2^31``, ...) is unused.
        attn_sink: ``[h_q]`` float32 (sparse): output scaled by ``exp(lse) / (exp(lse) + exp(attn_sink))``.
        extra_k_cache / extra_indices_in_kvcache: a second cache and its ``[b, s_q, extra_topk]`` slots, attended
            together with the first (same format rules; sparse only).
        topk_length / extra_topk_length: ``[b]`` int32: request ``i`` uses only the leftmost
            ``topk_length[i]`` indices (of the extra cache: ``extra_topk_length[i]``).
        backend: keyword-only, see the module docstring.
    Returns:
        out ``[b, s_q, h_q, 512]`` (q's dtype), softmax_lse ``[b, h_q, s_q]`` float32 (natural log, before
        the sink; ``+inf`` with a zero output for a query with no valid key).
    """
    meta = tile_scheduler_metadata if tile_scheduler_metadata is not None else FlashMLASchedMeta()
    if not isinstance(meta, FlashMLASchedMeta):
        raise TypeError("tile_scheduler_metadata must be the FlashMLASchedMeta returned by get_mla_metadata()")
    if num_splits is not None:
        raise ValueError("num_splits must be None; to force the key splits use get_mla_metadata(num_splits=n)")
    _validate_q(q, 4)
    _check_head_dims(q, head_dim_v, "head_dim_v")
    b, s_q, h_q, _ = q.shape
    k4 = _as_cache(k_cache, is_fp8_kvcache, "k_cache")
    sparse = indices is not None
    extras = {"attn_sink": attn_sink, "extra_k_cache": extra_k_cache,
              "extra_indices_in_kvcache": extra_indices_in_kvcache, "topk_length": topk_length,
              "extra_topk_length": extra_topk_length}
    if sparse:
        if causal:
            raise ValueError("causal must be False when indices are given (sparse attention)")
        if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
            raise ValueError("extra_k_cache and extra_indices_in_kvcache must be given together")
        if extra_topk_length is not None and extra_k_cache is None:
            raise ValueError("extra_topk_length needs extra_k_cache")
    else:
        given = [n for n, v in extras.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need indices (sparse attention); dense attention takes none")
        if block_table is None or cache_seqlens is None:
            raise ValueError("block_table and cache_seqlens must be provided for dense attention")
    ek4 = _as_cache(extra_k_cache, is_fp8_kvcache, "extra_k_cache") if extra_k_cache is not None else None
    cfg_now = FlashMLASchedMeta.Config(
        b, s_q, h_q, k4.shape[1], k4.shape[2], bool(causal), bool(is_fp8_kvcache),
        indices.shape[-1] if sparse else None,
        ek4.shape[1] if ek4 is not None else None,
        extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None,
    )
    if meta.have_initialized and meta.config != cfg_now:
        diff = [f.name for f in dataclasses.fields(cfg_now) if getattr(meta.config, f.name) != getattr(cfg_now, f.name)]
        raise ValueError(f"tile_scheduler_metadata was made for other arguments ({', '.join(diff)} differ); "
                         "use one get_mla_metadata() per shape")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    tri = use_triton(backend, q)
    kcfg = meta.kernel_config or default_config(q.device, h_q if sparse else s_q * h_q)
    if sparse:
        out, lse = _sparse_decode(q, k4, indices, topk_length, ek4, extra_indices_in_kvcache, extra_topk_length,
                                  _as_sink(attn_sink, h_q), scale, is_fp8_kvcache, meta, cfg_now, kcfg, tri)
    else:
        out, lse = _dense_decode(q, k4, block_table, cache_seqlens, scale, causal, is_fp8_kvcache, meta, kcfg, tri)
    meta.have_initialized, meta.config = True, cfg_now
    return out, lse


def _dense_decode(q, k4, block_table, cache_seqlens, scale, causal, fp8, meta, kcfg, tri):
    b, s_q, h_q, _ = q.shape
    h_k = k4.shape[2]
    if h_q % h_k:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_k ({h_k})")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [b={b}, max_blocks], got {list(block_table.shape)}")
    block_table = _as_int32("block_table", block_table, block_table.shape)
    cache_seqlens = _as_int32("cache_seqlens", cache_seqlens, (b,))
    group = h_q // h_k
    if tri and meta.num_splits is None:
        keys = int(cache_seqlens.max().item()) if b else 0
        meta.num_splits = _splits(b * cdiv(s_q * group, kcfg.block_m) * h_k, keys, kcfg, q.device)
    outs, lses = [], []
    for g in range(h_k):  # one latent head per group of h_q / h_k query heads
        qg, kg = q[:, :, g * group : (g + 1) * group], k4[:, :, g]
        if tri:
            o, l = mla_attention_fwd(qg, kg, block_table, cache_seqlens, scale, fp8=fp8, causal=causal,
                                     num_splits=meta.num_splits, config=kcfg)
        else:
            o, l = ref_mla_decode(qg, kg, block_table, cache_seqlens, scale, causal=causal)
        outs.append(o)
        lses.append(l)
    if h_k == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


def _sparse_decode(q, k4, indices, topk_length, ek4, extra_indices, extra_topk_length, sink, scale, fp8, meta,
                   cfg_now, kcfg, tri):
    b, s_q, h_q, _ = q.shape
    for name, c in (("k_cache", k4), ("extra_k_cache", ek4)):
        if c is not None and c.shape[2] != 1:
            raise NotImplementedError(f"sparse attention needs one KV head (h_k = 1), {name} has {c.shape[2]}")
    passes = [(k4[:, :, 0], _as_int32("indices", indices, (b, s_q, cfg_now.topk)),
               None if topk_length is None else _as_int32("topk_length", topk_length, (b,)), "num_splits")]
    if ek4 is not None:
        passes.append((ek4[:, :, 0], _as_int32("extra_indices_in_kvcache", extra_indices, (b, s_q, cfg_now.extra_topk)),
                       None if extra_topk_length is None else _as_int32("extra_topk_length", extra_topk_length, (b,)),
                       "extra_num_splits"))
    # the sink and the two-cache merge work on float32 outputs; a single plain pass writes q's dtype directly
    out_dtype = torch.float32 if (sink is not None or ek4 is not None) else q.dtype
    results = []
    for cache, idx, tlen, split_field in passes:
        if tri:
            if getattr(meta, split_field) is None:
                programs = b * s_q * cdiv(h_q, kcfg.block_m)
                setattr(meta, split_field, _splits(programs, idx.shape[-1], kcfg, q.device))
            results.append(mla_attention_fwd(q, cache, None, None, scale, fp8=fp8, indices=idx, topk_length=tlen,
                                             num_splits=getattr(meta, split_field), config=kcfg, out_dtype=out_dtype))
        else:
            results.append(ref_mla_sparse_decode(q, cache, idx, scale, topk_length=tlen, out_dtype=out_dtype))
    out, lse = results[0]
    if len(results) == 2:  # softmax over the union of both key sets: merge the two partial results by their LSE
        (o2, l2), l1 = results[1], _no_key_to_neg(lse)
        l2 = _no_key_to_neg(l2)
        lse = torch.logaddexp(l1, l2)
        safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
        w1 = torch.exp(l1 - safe).transpose(1, 2).unsqueeze(-1)  # [b, s_q, h_q, 1]
        w2 = torch.exp(l2 - safe).transpose(1, 2).unsqueeze(-1)
        out = out * w1 + o2 * w2
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    if sink is not None:
        out = _apply_sink(out, lse.transpose(1, 2), sink)
    return out.to(q.dtype), lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = _D_V,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill over a ragged KV: query ``t`` attends to rows ``indices[t, 0, :]`` of ``kv``.

    Args:
        q: ``[s_q, h_q, 576]`` bf16/fp16/fp32, last dim contiguous.
        kv: ``[s_kv, 1, 576]`` float (any row stride), or ``[s_kv, 1, 656]`` uint8 / float8_e4m3fn FP8 rows.
        indices: ``[s_q, 1, topk]`` int32 rows of ``kv``; one outside ``[0, s_kv)`` (``-1``, ``-2^31``,
            ``>= s_kv``) is unused.
        sm_scale: softmax scale.
        d_v: must be 512.
        attn_sink: optional ``[h_q]`` float32: output scaled by ``exp(lse) / (exp(lse) + exp(attn_sink))``
            (``+inf``: zero output, ``-inf``: no effect); max_logits and lse unchanged.
        topk_length: optional ``[s_q]`` int32: query ``t`` uses only ``indices[t, 0, :topk_length[t]]``.
        backend, config: keyword-only; ``config`` sets the Triton tile sizes.
    Returns:
        out ``[s_q, h_q, 512]`` (q's dtype); max_logits ``[s_q, h_q]`` float32 (max of ``sm_scale * q·k``
        over the valid keys, ``-inf`` if none); lse ``[s_q, h_q]`` float32 (natural log, ``+inf`` if none).
    """
    _validate_q(q, 3)
    _check_head_dims(q, d_v, "d_v")
    if kv.dim() != 3:
        raise ValueError(f"kv must be [s_kv, h_kv, d], got {list(kv.shape)}")
    if kv.shape[1] != 1:
        raise NotImplementedError(f"sparse prefill needs one KV head (h_kv = 1), got {kv.shape[1]}")
    fp8 = kv.dtype in _FP8_DTYPES
    kv = _as_cache(kv.transpose(0, 1), fp8, "kv")[0]  # validated, FP8 bytes as uint8: [s_kv, 1, d]
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    if indices.dim() != 3 or indices.shape[:2] != (s_q, 1):
        raise ValueError(f"indices must be [s_q={s_q}, 1, topk], got {list(indices.shape)}")
    indices = _as_int32("indices", indices, indices.shape)
    if topk_length is not None:
        topk_length = _as_int32("topk_length", topk_length, (s_q,))
    sink = _as_sink(attn_sink, h_q)
    out_dtype = torch.float32 if sink is not None else q.dtype
    if not use_triton(backend, q):
        out, mx, lse = ref_mla_sparse_prefill(q, kv, indices, sm_scale, d_v, topk_length, out_dtype=out_dtype)
    elif s_kv == 0 or s_q == 0 or indices.shape[-1] == 0:
        out = torch.zeros(s_q, h_q, _D_V, dtype=out_dtype, device=q.device)
        mx = torch.full((s_q, h_q), float("-inf"), device=q.device)
        lse = torch.full((s_q, h_q), float("inf"), device=q.device)
    else:
        cache = kv.transpose(0, 1)  # the whole KV as one block: [1, s_kv, d], slot = row
        out, lse, mx = mla_attention_fwd(
            q.unsqueeze(1), cache, None, None, sm_scale, fp8=fp8, indices=indices, topk_length=topk_length,
            num_splits=1, config=config, write_max=True, out_dtype=out_dtype,
        )
        out, mx, lse = out[:, 0], mx[:, 0], lse[:, :, 0]
    if sink is not None:
        out = _apply_sink(out, lse, sink)
    return out.to(q.dtype), mx, lse
