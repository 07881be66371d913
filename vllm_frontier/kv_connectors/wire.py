"""Wire encodings of KV rows.

A KV chunk is the rows of one layer for a token range: ``rows [T, W]`` gathered from
the paged cache (for MLA, W = 576 = 512 latent + 64 rope; for the V3.2 indexer K
cache, W = 132 uint8). Two encodings:

- ``"raw"``: the cache's own bytes, ``T * W * itemsize`` (MLA bf16: 1152 B/token);
  decoding gives back the exact rows, so P/D is bit-for-bit.
- ``"fp8"``: FlashMLA's FP8 MLA row, 656 B/token, only for 576-wide float rows:
  bytes ``[0, 512)`` = latent as float8 e4m3, ``[512, 528)`` = 4 fp32 scales (one per
  128 latent values, scale = amax / 448), ``[528, 656)`` = the 64 rope values as
  bf16. Lossy (latent to ~2**-4 relative, rope to bf16); used to cut wire bytes.
"""

from __future__ import annotations

import torch

__all__ = [
    "ENCODINGS",
    "MLA_WIDTH",
    "FP8_ROW_BYTES",
    "encode_rows",
    "decode_rows",
    "encoded_nbytes",
    "dtype_from_name",
]

ENCODINGS = ("raw", "fp8")
MLA_LATENT = 512
MLA_ROPE = 64
MLA_WIDTH = MLA_LATENT + MLA_ROPE
_GROUP = 128
_N_GROUPS = MLA_LATENT // _GROUP
FP8_ROW_BYTES = MLA_LATENT + 4 * _N_GROUPS + 2 * MLA_ROPE  # 656
_FP8_MAX = 448.0  # largest finite float8_e4m3fn

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
              torch.float8_e4m3fn)
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype on the wire: {name!r}") from None


def fp8_applies(width: int, dtype: torch.dtype) -> bool:
    """FP8 wire encoding is defined only for 576-wide float MLA rows."""
    return width == MLA_WIDTH and dtype in (torch.float32, torch.float16, torch.bfloat16)


def encoded_nbytes(num_tokens: int, width: int, dtype: torch.dtype, encoding: str) -> int:
    if encoding == "fp8" and fp8_applies(width, dtype):
        return num_tokens * FP8_ROW_BYTES
    return num_tokens * width * torch.empty((), dtype=dtype).element_size()


def encode_rows(rows: torch.Tensor, encoding: str) -> tuple[str, torch.Tensor]:
    """Encode ``rows [T, W]`` (any supported dtype, CPU or GPU) for the wire.

    Returns ``(encoding actually used, payload uint8 [T, bytes_per_row])`` on the
    same device. ``"fp8"`` falls back to ``"raw"`` for rows it does not cover
    (e.g. the uint8 indexer cache).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"wire encoding must be one of {ENCODINGS}, got {encoding!r}")
    if rows.dim() != 2:
        raise ValueError(f"rows must be [T, W], got shape {tuple(rows.shape)}")
    if encoding == "fp8" and fp8_applies(rows.shape[1], rows.dtype):
        return "fp8", _encode_fp8(rows)
    return "raw", rows.contiguous().view(torch.uint8).reshape(rows.shape[0], -1)


def decode_rows(
    payload: torch.Tensor, encoding: str, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `encode_rows`: ``payload uint8 [T, B]`` to ``rows [T, W]`` of `dtype`."""
    if payload.dtype != torch.uint8 or payload.dim() != 2:
        raise ValueError("payload must be uint8 [T, bytes_per_row]")
    if encoding == "fp8":
        if not fp8_applies(width, dtype) or payload.shape[1] != FP8_ROW_BYTES:
            raise ValueError(
                f"fp8 payload needs {FP8_ROW_BYTES} B rows for a {MLA_WIDTH}-wide float "
                f"cache; got {payload.shape[1]} B rows for width {width} {dtype}"
            )
        return _decode_fp8(payload, dtype)
    if encoding != "raw":
        raise ValueError(f"unknown wire encoding {encoding!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if payload.shape[1] != width * itemsize:
        raise ValueError(
            f"raw payload rows are {payload.shape[1]} B, expected {width} x {itemsize} B"
        )
    return payload.contiguous().view(dtype).reshape(payload.shape[0], width)


def _encode_fp8(rows: torch.Tensor) -> torch.Tensor:
    t = rows.shape[0]
    latent = rows[:, :MLA_LATENT].float().reshape(t, _N_GROUPS, _GROUP)
    amax = latent.abs().amax(dim=-1, keepdim=True)
    # all-zero groups keep scale 1 so decoding is exact zeros, never 0/0
    scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    q = (latent / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    out = torch.empty(t, FP8_ROW_BYTES, dtype=torch.uint8, device=rows.device)
    out[:, :MLA_LATENT] = q.reshape(t, MLA_LATENT).view(torch.uint8)
    out[:, MLA_LATENT : MLA_LATENT + 16] = (
        scale.reshape(t, _N_GROUPS).contiguous().view(torch.uint8)
    )
    rope = rows[:, MLA_LATENT:].to(torch.bfloat16).contiguous()
    out[:, MLA_LATENT + 16 :] = rope.view(torch.uint8)
    return out


def _decode_fp8(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = payload.shape[0]
    payload = payload.contiguous()
    q = payload[:, :MLA_LATENT].contiguous().view(torch.float8_e4m3fn).float()
    scale = payload[:, MLA_LATENT : MLA_LATENT + 16].contiguous().view(torch.float32)
    latent = (q.reshape(t, _N_GROUPS, _GROUP) * scale.reshape(t, _N_GROUPS, 1)).reshape(
        t, MLA_LATENT
    )
    rope = payload[:, MLA_LATENT + 16 :].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent, rope], dim=1).to(dtype)
