"""DSA on CPU in one call per op (csrc/dsa_cpu.cpp): the indexer's K-cache write, its scores with top-k, and the
sparse MLA attention, for the decode-sized steps where torch's per-op cost is what a step pays.

Imports torch only (never vllm). The kernel is a plain C++ library built at first use with the machine's g++
(`cpp_build.build_library`, about two seconds) and called through ctypes; where it cannot be built, `available()`
is False with the reason in `status()`, and callers keep the torch path (`indexer.write_indexer_k_cache`,
`indexer_topk.stable_topk_prefix` over vLLM's paged scores, `sparse_mla_tokens`). Same math and the same top-k
rule as those references (kernels/ref.py); products and softmax in fp32.

Ops (shapes as in the references):
- `write_k(k [T, D], cache [num_blocks, block_size, D + 4] uint8, slots [T], scale_fmt)`;
- `write_latent(kv_c [T, 512], k_pe [T, 64], cache [num_blocks, block_size, 576] float, slots [T])`;
- `indexer_topk(q [T, H, D], weights [T, H], cache, block_table [R, max_blocks], token_req [T], visible [T], k)
  -> [T, k] int32` request-local positions, ascending, -1 padded;
- `sparse_mla(q [T, H, 576], cache [num_blocks, block_size, 576] float, block_table, token_req, indices [T, K],
  softmax_scale) -> out [T, H, 512], lse [T, H]`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from .cpp_build import build_library, cpu_flags
from .ref import KV_LORA_RANK

__all__ = ["available", "status", "write_k", "write_latent", "indexer_topk", "sparse_mla", "DISABLE_ENV"]

logger = logging.getLogger("vllm.frontier.kernels")

_SRC = Path(__file__).resolve().parent / "csrc" / "dsa_cpu.cpp"
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno"]
_ABI = 2
# "0" keeps the torch path (a switch for comparisons and tests, not a user setting)
DISABLE_ENV = "FRONTIER_DSA_CPU_KERNEL"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}


def _flags() -> list[str]:
    # AVX2 + FMA where the CPU has them (every x86 server since 2013); the generic build elsewhere
    have = cpu_flags()
    return _BASE_FLAGS + (["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= have else [])


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    try:
        lib = ctypes.CDLL(str(build_library(_SRC, _flags(), "dsa_cpu")))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch path, say why
        return None, f"building the kernel failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if lib.dsa_cpu_abi_version() != _ABI:
        return None, "stale kernel build (ABI mismatch)"
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dsa_write_k.argtypes = [P, I, I64, I64, I64, P, P, I64, I64, I]
    lib.dsa_write_latent.argtypes = [P, I, I64, P, I, I64, I64, I64, I64, P, P, I, I64, I64, I64]
    lib.dsa_indexer_topk.argtypes = [P, I, I64, I64, I64, I64, I64, P, I64, I64, P, I64, I64, P, I64, P, P, I64, P,
                                     I64]
    lib.dsa_sparse_mla.argtypes = [P, I, I64, I64, I64, I64, I64, I64, P, I, I64, I64, I64, P, I64, P, P, I64, I64,
                                   F, P, I, I64, I64, P]
    for fn in (lib.dsa_write_k, lib.dsa_write_latent, lib.dsa_indexer_topk, lib.dsa_sparse_mla):
        fn.restype = None
    return lib, "C++ kernel (kernels/csrc/dsa_cpu.cpp)"


@functools.lru_cache(maxsize=1)
def status() -> tuple[bool, str]:
    """(available, reason): whether the kernel runs here, and what it is or why it does not (logged once)."""
    lib, why = _load()
    if lib is None and not why.startswith("disabled"):
        logger.warning("vllm-frontier: the CPU DSA kernel is not available (%s); DSA runs on torch ops", why)
    return lib is not None, why


def available() -> bool:
    return status()[0]


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the CPU DSA kernel is not available: {why}")
    return lib


def _dtype_code(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> int:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must be one of {[str(d) for d in allowed]}, got {t.dtype}")
    return _DTYPES[t.dtype]


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got {t.device}")


def _block_layout(cache: torch.Tensor) -> tuple[int, int]:
    """(block stride, block size) of an indexer K cache whose blocks are contiguous bytes."""
    nb, bs, w = cache.shape
    if cache.dtype != torch.uint8 or cache.stride(2) != 1 or cache.stride(1) != w:
        raise ValueError("indexer K cache must be uint8 [num_blocks, block_size, D+4] with contiguous blocks")
    return cache.stride(0), bs


def write_k(k: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, scale_fmt: str | None = None) -> None:
    """Quantize indexer keys ``k [T, D]`` to FP8 and write them into ``cache`` at ``slots [T]`` (-1: skip)."""
    T, D = k.shape
    if cache.shape[-1] != D + 4 or slots.shape != (T,):
        raise ValueError(f"expected cache [.., .., {D + 4}] and slots [{T}], got {list(cache.shape)}, "
                         f"{list(slots.shape)}")
    _check_cpu(k=k, cache=cache, slots=slots)
    code = _dtype_code("k", k, (torch.float32, torch.bfloat16, torch.float16))
    k = k if k.stride(1) == 1 else k.contiguous()
    slots = slots.to(torch.int64).contiguous()
    blk_stride, bs = _block_layout(cache)
    _lib().dsa_write_k(k.data_ptr(), code, T, D, k.stride(0), slots.data_ptr(), cache.data_ptr(), blk_stride, bs,
                       int(scale_fmt == "ue8m0"))


def write_latent(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write latent rows ``[kv_c | k_pe]`` (``[T, 512]``, ``[T, 64]``) into a float paged cache at ``slots [T]``
    (-1: skip), converted to the cache's dtype (round to nearest even)."""
    T, dc = kv_c.shape
    dr = k_pe.shape[-1]
    if k_pe.shape != (T, dr) or cache.dim() != 3 or cache.shape[-1] != dc + dr or slots.shape != (T,):
        raise ValueError(f"shape mismatch: kv_c {list(kv_c.shape)}, k_pe {list(k_pe.shape)}, cache "
                         f"{list(cache.shape)}, slots {list(slots.shape)}")
    _check_cpu(kv_c=kv_c, k_pe=k_pe, cache=cache, slots=slots)
    floats = (torch.float32, torch.bfloat16, torch.float16)
    cc, rc = _dtype_code("kv_c", kv_c, floats), _dtype_code("k_pe", k_pe, floats)
    ca = _dtype_code("cache", cache, floats)
    kv_c = kv_c if kv_c.stride(1) == 1 else kv_c.contiguous()
    k_pe = k_pe if k_pe.stride(1) == 1 else k_pe.contiguous()
    if cache.stride(2) != 1:
        raise ValueError("the latent cache rows must be contiguous")
    slots = slots.to(torch.int64).contiguous()
    _lib().dsa_write_latent(kv_c.data_ptr(), cc, kv_c.stride(0), k_pe.data_ptr(), rc, k_pe.stride(0), T, dc, dr,
                            slots.data_ptr(), cache.data_ptr(), ca, cache.stride(0), cache.stride(1), cache.shape[1])


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                 token_req: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Each query token's top-``k`` request-local key positions (ascending, -1 padded) by indexer score."""
    T, H, D = q.shape
    if weights.shape != (T, H) or cache.shape[-1] != D + 4 or token_req.shape != (T,) or visible.shape != (T,):
        raise ValueError(f"shape mismatch: q {list(q.shape)}, weights {list(weights.shape)}, cache "
                         f"{list(cache.shape)}, token_req {list(token_req.shape)}, visible {list(visible.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    _check_cpu(q=q, weights=weights, cache=cache, block_table=block_table)
    code = _dtype_code("q", q, tuple(_DTYPES))
    q = q if q.stride(2) == 1 else q.contiguous()
    w = weights.to(torch.float32)
    bt = block_table.to(torch.int32)
    bt = bt if bt.stride(1) == 1 else bt.contiguous()
    req = token_req.to(torch.int64).contiguous()
    vis = visible.to(torch.int32).contiguous()
    blk_stride, bs = _block_layout(cache)
    out = torch.empty(T, k, dtype=torch.int32)
    _lib().dsa_indexer_topk(q.data_ptr(), code, T, H, D, q.stride(0), q.stride(1), w.data_ptr(), w.stride(0),
                            w.stride(1), cache.data_ptr(), blk_stride, bs, bt.data_ptr(), bt.stride(0),
                            req.data_ptr(), vis.data_ptr(), k, out.data_ptr(), out.stride(0))
    return out


def sparse_mla(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, token_req: torch.Tensor,
               indices: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA of ``q [T, H, 576]`` over the float latent cache rows ``indices [T, K]`` selects (request-local
    positions, -1 unused). Returns out ``[T, H, 512]`` (q's dtype) and lse ``[T, H]`` float32 (-inf, zeros: none)."""
    T, H, D = q.shape
    K = indices.shape[1]
    if indices.shape[0] != T or token_req.shape != (T,) or cache.shape[-1] != D or cache.dim() != 3:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, cache {list(cache.shape)}, indices "
                         f"{list(indices.shape)}, token_req {list(token_req.shape)}")
    _check_cpu(q=q, cache=cache, block_table=block_table, indices=indices)
    floats = (torch.float32, torch.bfloat16, torch.float16)
    qc, cc = _dtype_code("q", q, floats), _dtype_code("cache", cache, floats)
    q = q if q.stride(2) == 1 else q.contiguous()
    if cache.stride(2) != 1:
        raise ValueError("the latent cache rows must be contiguous")
    bt = block_table.to(torch.int32)
    bt = bt if bt.stride(1) == 1 else bt.contiguous()
    req = token_req.to(torch.int64).contiguous()
    idx = indices.to(torch.int32)
    idx = idx if idx.stride(1) == 1 else idx.contiguous()
    out = torch.empty(T, H, KV_LORA_RANK, dtype=q.dtype)
    lse = torch.empty(T, H, dtype=torch.float32)
    _lib().dsa_sparse_mla(q.data_ptr(), qc, T, H, D, KV_LORA_RANK, q.stride(0), q.stride(1), cache.data_ptr(), cc,
                          cache.stride(0), cache.stride(1), cache.shape[1], bt.data_ptr(), bt.stride(0),
                          req.data_ptr(), idx.data_ptr(), idx.stride(0), K, float(softmax_scale), out.data_ptr(),
                          _DTYPES[q.dtype], out.stride(0), out.stride(1), lse.data_ptr())
    return out, lse
