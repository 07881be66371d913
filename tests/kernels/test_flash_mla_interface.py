"""FlashMLA's test scenarios against our ``flash_mla_interface``, called exactly as FlashMLA's own tests call
FlashMLA (deepseek-ai/FlashMLA 9241ae3: tests/test_flash_mla_{dense_decoding,sparse_decoding,sparse_prefill}.py),
on the torch path and the Triton path (interpreter on CPU: fp16/fp32 only, small shapes).

The expected values come from references written here from FlashMLA's published semantics (its docstrings and
tests/ref.py), not from this package's ``ref`` module, which is itself under test on the torch path.
Inputs are built the way FlashMLA builds them: shuffled block tables with a huge id in unused entries, NaN in
every unused cache row (before FP8 quantization), non-contiguous q / kv / indices, FP8 caches typed
``float8_e4m3fn`` inside a padded allocation, invalid indices of every kind, sinks of ±inf.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from kernel_testing import DEVICE, assert_close
from vllm_frontier.kernels import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

D_QK, D_V = 576, 512
BACKENDS = ["torch", "triton"]
# (dtype, out atol, out rtol, lse atol) against an fp32 reference on the same (rounded) inputs:
#  fp32: summation order only; fp16: the kernel rounds p to fp16 before the PV dot (2^-11 relative) and stores
#  fp16; bf16 (torch path only: the interpreter's bf16 arithmetic is wrong): the output is stored in bf16,
#  FlashMLA's own tolerance (abs 1e-3, rel 2.01/128).
TOL = {torch.float32: (2e-5, 0.0, 1e-5), torch.float16: (2e-3, 0.0, 1e-4), torch.bfloat16: (1e-3, 2.01 / 128, 1e-4)}
DTYPES = {"torch": [torch.bfloat16, torch.float32], "triton": [torch.float16, torch.float32]}
COMBOS = [(b, d) for b in BACKENDS for d in DTYPES[b]]
COMBO_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in COMBOS]
INVALID = [-(2**31), -123456, -1]  # plus values >= the number of rows / slots, added per test


def _seed(name: str) -> torch.Generator:
    random.seed(zlib.crc32(name.encode()))
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values inside a larger allocation (every dim +1, the last +128), as FlashMLA's tests do."""
    base = torch.empty([n + 128 if i == t.dim() - 1 else n + 1 for i, n in enumerate(t.shape)], dtype=t.dtype)
    view = base[tuple(slice(0, n) for n in t.shape)]
    view.copy_(t)
    return view


def _quantize_v32(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's V3.2 FP8 cache layout from its docstring: 512 e4m3 codes (four tiles of 128, each with a
    power-of-two scale = 2^ceil(log2(amax / 448))), 4 float32 scales, 64 bf16 rope values = 656 bytes.

    k: ``[num_blocks, block_size, 1, 576]`` bf16. Returns (the float8_e4m3fn cache ``[nb, bs, 1, 656]`` inside
    an allocation with one spare row per block, the dequantized bf16 values the reference must use).
    """
    nb, bs = k.shape[:2]
    kf = k[:, :, 0].float()
    alloc = torch.zeros(nb, bs + 1, 656, dtype=torch.uint8)[:, :bs]
    deq = torch.empty(nb, bs, D_QK)
    for t in range(4):
        x = kf[..., t * 128 : (t + 1) * 128]
        scale = torch.pow(2, torch.log2(x.abs().amax(-1).clamp_min(1e-4 * 448) / 448).ceil())
        codes = (x / scale[..., None]).to(torch.float8_e4m3fn)
        alloc[..., t * 128 : (t + 1) * 128] = codes.view(torch.uint8)
        alloc[..., 512 + 4 * t : 516 + 4 * t] = scale.contiguous().view(torch.uint8).view(nb, bs, 4)
        deq[..., t * 128 : (t + 1) * 128] = codes.float() * scale[..., None]
    rope = k[:, :, 0, 512:].to(torch.bfloat16)
    alloc[..., 528:] = rope.contiguous().view(torch.uint8).view(nb, bs, 128)
    deq[..., 512:] = rope.float()
    return alloc.view(torch.float8_e4m3fn).unsqueeze(2), deq.to(torch.bfloat16)


def _random_rows(gen, n_rows: int, ranges: list[int], k: int, pad: list[int]) -> torch.Tensor:
    """``[n_rows, k]`` int32: row ``i`` holds distinct values of ``[0, ranges[i])`` first (as many as fit),
    then paddings drawn from ``pad``."""
    out = torch.empty(n_rows, k, dtype=torch.int64)
    for i, r in enumerate(ranges):
        vals = torch.randperm(max(r, 1), generator=gen)[: min(r, k)]
        fill = torch.tensor(pad)[torch.randint(0, len(pad), (k - vals.numel(),), generator=gen)]
        row = torch.cat([vals, fill])
        out[i] = row[torch.randperm(k, generator=gen)]
    return out.to(torch.int32)


def _sink(gen, h_q: int) -> torch.Tensor:
    s = torch.randn(h_q, generator=gen)
    m = torch.randn(h_q, generator=gen)
    s[m > 0.5], s[m < -0.5] = float("inf"), float("-inf")
    return s


def _check(out, lse, ref_out, ref_lse, dtype):
    atol, rtol, lse_atol = TOL[dtype]
    assert out.dtype == dtype
    assert_close(out, ref_out, atol, rtol, what="out")
    assert_close(lse, ref_lse, lse_atol, 8.01 / 65536, what="lse")


# ---------------------------------------------------------------------------------------------
# dense decoding (tests/test_flash_mla_dense_decoding.py)
# ---------------------------------------------------------------------------------------------


def _ref_dense(q, blocked_k, block_table, seqlens, causal, scale):
    """Per request: gather its first seq_len rows, GQA over h_kv heads, causal = tril(diagonal=s_k - s_q);
    a query with no key: zero output, lse +inf."""
    b, s_q, h_q, _ = q.shape
    bs, h_kv = blocked_k.shape[1], blocked_k.shape[2]
    out = torch.zeros(b, s_q, h_q, D_V)
    lse = torch.full((b, h_q, s_q), float("inf"))
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        kv = blocked_k[block_table[i, : -(-n // bs)].long()].reshape(-1, h_kv, D_QK)[:n].float()
        kv = kv.repeat_interleave(h_q // h_kv, dim=1).transpose(0, 1)  # [h_q, n, d]
        s = q[i].float().transpose(0, 1) @ kv.transpose(1, 2) * scale  # [h_q, s_q, n]
        if causal:
            s = s.masked_fill(~torch.ones(s_q, n, dtype=torch.bool).tril(n - s_q), float("-inf"))
        l = torch.logsumexp(s, -1)
        o = torch.softmax(s, -1) @ kv[..., :D_V]
        empty = l == float("-inf")
        out[i] = o.masked_fill(empty[..., None], 0).transpose(0, 1)
        lse[i] = l.masked_fill(empty, float("inf"))
    return out, lse


# (b, s_q, mean s_k, h_q, h_kv, varlen, zero-length requests, block_size)
DENSE = {
    "b1_sq1_h1": (1, 1, 20, 1, 1, False, False, 16),
    "b2_sq2_odd_heads_varlen": (2, 2, 140, 9, 1, True, False, 64),
    "b3_sq4_gqa3": (3, 4, 33, 9, 3, True, False, 16),
    "b4_zero_seqlen": (4, 2, 40, 3, 1, True, True, 16),
    "b2_h_not_block_multiple": (2, 1, 70, 20, 1, False, False, 16),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(DENSE))
@pytest.mark.parametrize("backend,dtype", COMBOS, ids=COMBO_IDS)
def test_dense_decoding(case, causal, backend, dtype):
    b, s_q, s_k, h_q, h_kv, varlen, zeros, bs = DENSE[case]
    gen = _seed(case)
    seqlens = torch.full((b,), s_k, dtype=torch.int32)
    if varlen:
        seqlens = torch.tensor([max(int(random.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)], dtype=torch.int32)
    if zeros:
        seqlens[::2] = 0
    pad = -(-max(int(seqlens.max()), 1) // 64) * 64
    block_table = torch.randperm(b * pad // bs, generator=gen).int().view(b, -1)
    blocked_k = (torch.randn(block_table.numel(), bs, h_kv, D_QK, generator=gen) / 10).clamp(-1, 1).to(dtype)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen) / 10).clamp(-1, 1).to(dtype)
    for i in range(b):  # NaN in every row past a request's length; a huge id in every unused table entry
        n, used = int(seqlens[i]), -(-int(seqlens[i]) // bs)
        blocked_k[block_table[i, used:].long()] = float("nan")
        if n % bs:
            blocked_k[block_table[i, used - 1].long(), n % bs :] = float("nan")
        block_table[i, used:] = 2147480000
    scale = D_QK**-0.5
    ref_out, ref_lse = _ref_dense(q, blocked_k, block_table, seqlens, causal, scale)
    dev = [t.to(DEVICE) for t in (q, blocked_k, block_table, seqlens)]
    q, blocked_k, block_table, seqlens = dev

    tile_scheduler_metadata, num_splits = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(
        q, blocked_k, block_table, seqlens, D_V, tile_scheduler_metadata, num_splits, causal=causal, backend=backend
    )
    _check(out, lse, ref_out, ref_lse, dtype)
    # the schedule is reusable with the same arguments (FlashMLA's contract) and gives the same result
    out2, _ = flash_mla_with_kvcache(
        q, blocked_k, block_table, seqlens, D_V, tile_scheduler_metadata, num_splits, causal=causal, backend=backend
    )
    assert torch.equal(out, out2)


# ---------------------------------------------------------------------------------------------
# sparse decoding (tests/test_flash_mla_sparse_decoding.py, V3.2 layout: d_qk 576, FP8 cache)
# ---------------------------------------------------------------------------------------------


class _Scope:
    """One KV cache of a sparse decode call: FP8 cache, physical indices, optional top-k lengths."""

    def __init__(self, gen, b, s_q, s_k, topk, bs, varlen, zero_seqlen, all_invalid, with_len, invalid):
        seqlens = torch.full((b,), s_k, dtype=torch.int32)
        if varlen:
            seqlens = torch.tensor([max(int(random.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)],
                                   dtype=torch.int32)
        if zero_seqlen:
            seqlens[1::2] = 0
        pad = max(-(-int(seqlens.max()) // (4 * bs)), 1) * 4 * bs
        block_table = torch.randperm(b * pad // bs, generator=gen).int().view(b, -1)
        k = (torch.randn(block_table.numel(), bs, 1, D_QK, generator=gen) / 10).clamp(-1, 1)
        # request-local positions; unused slots padded with an invalid value
        pos = _random_rows(gen, b * s_q, seqlens.repeat_interleave(s_q).tolist(), topk, [-1]).view(b, s_q, topk)
        if all_invalid:
            pos[0] = -1
        blk = block_table.long().gather(1, (pos.clamp_min(0) // bs).view(b, -1)).view(b, s_q, topk)
        self.indices = torch.where(pos >= 0, blk * bs + pos.clamp_min(0) % bs, -1).int()
        self.indices[pos < 0] = torch.tensor(invalid, dtype=torch.int32)[
            torch.randint(0, len(invalid), (int((pos < 0).sum()),), generator=gen)]
        self.topk_length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32) if with_len else None
        used = self.indices.clone().long()
        if with_len:
            used[(torch.arange(topk).view(1, 1, -1) >= self.topk_length.view(b, 1, 1)).expand_as(used)] = -1
        unused = torch.ones(k.shape[0] * bs, dtype=torch.bool)
        unused[used[(used >= 0) & (used < unused.numel())]] = False
        k.view(-1, 1, D_QK)[unused] = float("nan")  # every row the call must not read
        self.cache, self.k = _quantize_v32(k.to(torch.bfloat16))

    def gathered(self, b, s_q):
        """(rows ``[b, s_q, topk, 576]`` float32 (0 where unused), valid mask ``[b, s_q, topk]``)."""
        flat = self.k.view(-1, D_QK).float()
        idx = self.indices.long()
        valid = (idx >= 0) & (idx < flat.shape[0])
        if self.topk_length is not None:
            valid &= torch.arange(idx.shape[-1]).view(1, 1, -1) < self.topk_length.view(b, 1, 1)
        rows = flat[torch.where(valid, idx, 0)]
        return torch.where(valid[..., None], rows, 0.0), valid


def _ref_sparse_decode(q, scopes, sink, scale):
    """FlashMLA's ref_sparse_attn_decode semantics: softmax over the union of all scopes' valid keys, sink
    factor 1 / (1 + exp(sink - lse)) on the output only, zero output and lse +inf for a query without keys."""
    b, s_q, h_q, _ = q.shape
    parts = [sc.gathered(b, s_q) for sc in scopes]
    kv = torch.cat([p[0] for p in parts], dim=2)
    valid = torch.cat([p[1] for p in parts], dim=2)
    s = torch.einsum("bshd,bskd->bshk", q.float(), kv) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bshk,bskv->bshv", torch.exp(s - lse[..., None]), kv[..., :D_V])
    if sink is not None:
        out = out / (1 + torch.exp(sink.view(1, 1, h_q) - lse))[..., None]
    empty = lse == float("-inf")
    out = out.masked_fill(empty[..., None], 0.0)
    return out, lse.masked_fill(empty, float("inf")).transpose(1, 2)


# (b, s_q, s_k, topk, h_q, block_size, varlen, zero-length requests, all-invalid query, topk_length, sink)
SPARSE_DECODE = {
    "basic": (2, 1, 60, 16, 4, 16, False, False, False, False, True),
    "sq3_block_61_h20": (3, 3, 50, 32, 20, 61, True, False, False, False, True),
    "topk_gt_seqlen_block2": (2, 2, 10, 24, 5, 2, True, False, False, False, False),
    "zero_seqlen_all_invalid": (4, 3, 40, 16, 4, 16, True, True, True, False, True),
    "topk_length": (3, 2, 60, 32, 4, 16, True, False, False, True, True),
}


def _call_sparse_decode(q, scope, extra, sink, scale, backend, sched=None):
    """FlashMLA's run_flash_mla_decode, argument for argument."""
    sched = sched if sched is not None else get_mla_metadata()[0]
    return flash_mla_with_kvcache(
        q, scope.cache.to(DEVICE), None, None, D_V,
        sched, None,
        scale, False, True,
        scope.indices.to(DEVICE),
        sink.to(DEVICE) if sink is not None else None,
        extra.cache.to(DEVICE) if extra is not None else None,
        extra.indices.to(DEVICE) if extra is not None else None,
        scope.topk_length.to(DEVICE) if scope.topk_length is not None else None,
        extra.topk_length.to(DEVICE) if extra is not None and extra.topk_length is not None else None,
        backend=backend,
    )


@pytest.mark.parametrize("case", list(SPARSE_DECODE))
@pytest.mark.parametrize("backend,dtype", COMBOS, ids=COMBO_IDS)
def test_sparse_decoding(case, backend, dtype):
    b, s_q, s_k, topk, h_q, bs, varlen, zeros, all_invalid, with_len, with_sink = SPARSE_DECODE[case]
    gen = _seed(case)
    n_slots_guess = 10**9  # >= any cache here: an index past the cache is also unused
    scope = _Scope(gen, b, s_q, s_k, topk, bs, varlen, zeros, all_invalid, with_len, INVALID + [n_slots_guess])
    q = _non_contiguous((torch.randn(b, s_q, h_q, D_QK, generator=gen)).clamp(-1, 1).to(dtype))
    sink = _sink(gen, h_q) if with_sink else None
    scale = D_QK**-0.55
    ref_out, ref_lse = _ref_sparse_decode(q, [scope], sink, scale)
    out, lse = _call_sparse_decode(q.to(DEVICE), scope, None, sink, scale, backend)
    _check(out, lse, ref_out, ref_lse, dtype)
    if all_invalid:
        assert torch.all(out[0].cpu() == 0) and torch.all(lse[0].cpu() == float("inf")), "no key: zero out, lse +inf"


@pytest.mark.parametrize("with_len", [False, True], ids=["full", "extra_topk_length"])
@pytest.mark.parametrize("backend,dtype", COMBOS, ids=COMBO_IDS)
def test_sparse_decoding_extra_cache(with_len, backend, dtype):
    """extra_k_cache / extra_indices_in_kvcache: one softmax over both caches' keys (own block size each)."""
    gen = _seed(f"extra{with_len}")
    b, s_q, h_q = 3, 2, 6
    scope = _Scope(gen, b, s_q, 40, 16, 16, True, False, False, True, [-1])
    extra = _Scope(gen, b, s_q, 30, 24, 5, True, True, False, with_len, [-1, -(2**31)])
    q = _non_contiguous(torch.randn(b, s_q, h_q, D_QK, generator=gen).clamp(-1, 1).to(dtype))
    sink = _sink(gen, h_q)
    scale = D_QK**-0.55
    ref_out, ref_lse = _ref_sparse_decode(q, [scope, extra], sink, scale)
    out, lse = _call_sparse_decode(q.to(DEVICE), scope, extra, sink, scale, backend)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decoding_fp8_dtypes_and_float_cache(backend):
    """The FP8 cache as float8_e4m3fn or as uint8 bytes: identical results; a float cache holding the
    dequantized values (our addition: FlashMLA requires FP8 for sparse) agrees within rounding."""
    gen = _seed("fp8dtypes")
    b, s_q, h_q = 2, 1, 4
    scope = _Scope(gen, b, s_q, 40, 16, 16, False, False, False, False, [-1])
    q = torch.randn(b, s_q, h_q, D_QK, generator=gen).clamp(-1, 1).to(DEVICE)
    idx = scope.indices.to(DEVICE)
    runs = [flash_mla_with_kvcache(q, c.to(DEVICE), None, None, D_V, get_mla_metadata()[0], None, 0.05, False, True,
                                   idx, backend=backend)
            for c in (scope.cache, scope.cache.view(torch.uint8))]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    as_float = scope.k.float().to(DEVICE)  # [nb, bs, 1, 576] with NaN in unused rows
    out_f, lse_f = flash_mla_with_kvcache(q, as_float, None, None, D_V, get_mla_metadata()[0], None, 0.05,
                                          indices=idx, backend=backend)
    assert_close(out_f, runs[0][0], 2e-5, what="float cache vs FP8 cache")
    assert_close(lse_f, runs[0][1], 1e-5, what="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_sink_limits(backend):
    """sink -inf: no effect; sink +inf: zero output; lse never changes."""
    gen = _seed("sinks")
    b, s_q, h_q = 2, 2, 3
    scope = _Scope(gen, b, s_q, 30, 16, 16, False, False, False, False, [-1])
    q = torch.randn(b, s_q, h_q, D_QK, generator=gen).clamp(-1, 1).to(DEVICE)
    base = _call_sparse_decode(q, scope, None, None, 0.05, backend)
    neg = _call_sparse_decode(q, scope, None, torch.full((h_q,), float("-inf")), 0.05, backend)
    pos = _call_sparse_decode(q, scope, None, torch.full((h_q,), float("inf")), 0.05, backend)
    assert torch.equal(neg[1], base[1]) and torch.equal(pos[1], base[1])
    assert_close(neg[0], base[0], 1e-6, what="sink -inf")
    assert torch.all(pos[0] == 0)


# ---------------------------------------------------------------------------------------------
# sparse prefill (tests/test_flash_mla_sparse_prefill.py)
# ---------------------------------------------------------------------------------------------


def _ref_sparse_prefill(q, kv, indices, sink, topk_length, scale):
    """FlashMLA's ref_sparse_attn_fwd semantics: invalid = outside [0, s_kv) or past topk_length; max_logits
    -inf and lse +inf without keys; the sink enters the output's denominator only."""
    s_q, h_q, _ = q.shape
    s_kv, topk = kv.shape[0], indices.shape[-1]
    idx = indices[:, 0].long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(topk)[None, :] < topk_length[:, None]
    g = kv[:, 0].float()[torch.where(valid, idx, 0)]  # [s_q, topk, d]
    p = torch.einsum("shd,skd->shk", q.float(), g) * scale
    p = p.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(p, -1)
    mx = p.amax(-1)
    lse_o = lse if sink is None else torch.logaddexp(lse, sink.view(1, h_q).expand(s_q, h_q))
    lse_o = lse_o.masked_fill(lse_o == float("-inf"), float("inf"))
    out = torch.einsum("shk,skv->shv", torch.exp(p - lse_o[..., None]), g[..., :D_V])
    return out, mx, lse.masked_fill(lse == float("-inf"), float("inf"))


# (s_q, s_kv, topk, h_q, sink, topk_length, some queries with every index invalid)
PREFILL = {
    "regular": (5, 64, 64, 4, False, False, False),
    "irregular_h20": (7, 150, 32, 20, False, False, False),
    "oob_topk": (4, 20, 32, 3, False, False, False),
    "sink_topk_length": (6, 90, 48, 5, True, True, False),
    "all_invalid": (5, 40, 32, 4, True, True, True),
    "topk_much_larger_than_kv": (3, 8, 64, 4, True, True, False),
}


@pytest.mark.parametrize("case", list(PREFILL))
@pytest.mark.parametrize("backend,dtype", COMBOS, ids=COMBO_IDS)
def test_sparse_prefill(case, backend, dtype):
    s_q, s_kv, topk, h_q, with_sink, with_len, all_invalid = PREFILL[case]
    gen = _seed(case)
    q = (torch.randn(s_q, h_q, D_QK, generator=gen) / 10 + (random.random() - 0.5) / 10).clamp(-10, 10).to(dtype)
    kv = (torch.randn(s_kv, 1, D_QK, generator=gen) / 10 + (random.random() - 0.5) / 10).clamp(-10, 10).to(dtype)
    invalid = INVALID + [s_kv, 114514, 2147480000, 2**31 - 1]
    indices = _random_rows(gen, s_q, [s_kv] * s_q, topk, invalid).view(s_q, 1, topk)
    if all_invalid:
        indices[::2] = random.choice(invalid)
    sink = _sink(gen, h_q) if with_sink else None
    topk_length = torch.randint(0, max(topk + 1, 64), (s_q,), generator=gen, dtype=torch.int32).clamp_max(topk) \
        if with_len else None
    q, kv, indices = _non_contiguous(q), _non_contiguous(kv), _non_contiguous(indices)
    assert not kv.is_contiguous()
    ref_out, ref_mx, ref_lse = _ref_sparse_prefill(q, kv, indices, sink, topk_length, 0.5)

    def dev(t):
        return t.to(DEVICE) if t is not None and DEVICE != "cpu" else t

    out, mx, lse = flash_mla_sparse_fwd(dev(q), dev(kv), dev(indices), sm_scale=0.5, attn_sink=dev(sink),
                                        topk_length=dev(topk_length), backend=backend)
    atol, rtol, lse_atol = TOL[dtype]
    assert out.shape == (s_q, h_q, D_V) and out.dtype == dtype
    assert_close(out, ref_out, atol, rtol, what="out")
    assert_close(mx, ref_mx, lse_atol, 2.01 / 65536, what="max_logits")
    assert_close(lse, ref_lse, lse_atol, 2.01 / 65536, what="lse")
    if all_invalid:
        assert torch.all(lse[::2].cpu() == float("inf")) and torch.all(mx[::2].cpu() == float("-inf"))
        assert torch.all(out[::2].cpu() == 0)


# ---------------------------------------------------------------------------------------------
# argument rules
# ---------------------------------------------------------------------------------------------


def test_metadata_without_arguments_and_reuse_checks():
    sched, none = get_mla_metadata()
    assert none is None and not sched.have_initialized
    q = torch.zeros(1, 1, 4, D_QK)
    cache = torch.zeros(2, 16, 1, D_QK)
    bt, sl = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    flash_mla_with_kvcache(q, cache, bt, sl, D_V, sched, None)
    assert sched.have_initialized and sched.config.h_q == 4 and sched.config.topk is None
    with pytest.raises(ValueError, match="h_q"):
        flash_mla_with_kvcache(torch.zeros(1, 1, 8, D_QK), cache, bt, sl, D_V, sched, None)
    with pytest.raises(ValueError, match="num_splits must be None"):
        flash_mla_with_kvcache(q, cache, bt, sl, D_V, get_mla_metadata()[0], 2)


def test_argument_errors():
    q = torch.zeros(1, 1, 4, D_QK)
    cache = torch.zeros(2, 16, 1, D_QK)
    idx = torch.zeros(1, 1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="causal"):
        flash_mla_with_kvcache(q, cache, None, None, D_V, get_mla_metadata()[0], None, causal=True, indices=idx)
    with pytest.raises(ValueError, match="block_table and cache_seqlens"):
        flash_mla_with_kvcache(q, cache, None, None, D_V, get_mla_metadata()[0], None)
    with pytest.raises(ValueError, match="attn_sink"):
        flash_mla_with_kvcache(q, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                               D_V, get_mla_metadata()[0], None, attn_sink=torch.zeros(4))
    with pytest.raises(ValueError, match="extra_k_cache and extra_indices"):
        flash_mla_with_kvcache(q, cache, None, None, D_V, None, None, indices=idx, extra_k_cache=cache)
    with pytest.raises(NotImplementedError, match="MODEL1"):
        flash_mla_sparse_fwd(torch.zeros(2, 4, 512), torch.zeros(3, 1, 512), torch.zeros(2, 1, 4, dtype=torch.int32),
                             0.1)
    with pytest.raises(NotImplementedError, match="one KV head"):
        flash_mla_with_kvcache(q, torch.zeros(2, 16, 2, D_QK), None, None, D_V, None, None, indices=idx)
    with pytest.raises(TypeError):  # backend is keyword-only: an extra positional argument is refused
        flash_mla_sparse_fwd(torch.zeros(2, 4, D_QK), torch.zeros(3, 1, D_QK), torch.zeros(2, 1, 4, dtype=torch.int32),
                             0.1, 512, None, None, "torch")


def test_request_positions_to_slots_matches_flashmla_conversion():
    """slot = block_table[b, pos // bs] * bs + pos % bs (FlashMLA's abs_indices2indices_in_kvcache); -1 for
    -1, positions past seq_lens or the table, and slots beyond int32 (a poisoned table entry)."""
    from vllm_frontier.kernels import request_positions_to_slots

    bs = 4
    bt = torch.tensor([[7, 2, 2147480000], [0, 5, 1]], dtype=torch.int32)
    pos = torch.tensor([[[0, 5, 3, -1, 9, 12]], [[11, 4, 0, 8, 2, -5]]], dtype=torch.int32)
    got = request_positions_to_slots(pos, bt, bs, torch.tensor([9, 12]))
    want = torch.tensor([[[28, 9, 31, -1, -1, -1]], [[7, 20, 0, 4, 2, -1]]], dtype=torch.int32)
    assert torch.equal(got, want)
    no_len = request_positions_to_slots(pos, bt, bs)
    assert no_len[0, 0, 4] == -1  # position 9 -> the poisoned entry 2147480000 * 4: past int32, dropped
    assert math.prod(no_len.shape) == 12 and no_len.dtype == torch.int32
