"""Wire encodings of KV rows.

A KV chunk is the rows of one layer for a token range: ``rows [T, W]`` gathered from
the paged cache (for MLA, W = 576 = 512 latent + 64 rope; for the V3.2 indexer K
cache, W = 132 uint8). Two encodings:

- ``"raw"``: the cache's own bytes, ``T * W * itemsize`` (MLA bf16: 1152 B/token);
  decoding gives back the exact rows, so P/D is bit-for-bit.
- ``"fp8"``: FlashMLA's FP8 MLA row, 656 B/token, only for 576-wide float rows: the
  same codec as the FP8 latent cache (`vllm_frontier.kernels.ref.encode_latent_rows_fp8`):
  bytes ``[0, 512)`` = latent as float8 e4m3, ``[512, 528)`` = 4 fp32 scales (one per
  128 latent values), ``[528, 656)`` = the 64 rope values as bf16. Lossy (latent to
  ~2**-4 relative, rope to bf16); used to cut wire bytes.
"""

from __future__ import annotations

import torch

from vllm_frontier.kernels.ref import FP8_ROW_BYTES, KV_LORA_RANK, LATENT_DIM, decode_latent_rows, encode_latent_rows_fp8

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
MLA_WIDTH = LATENT_DIM  # 576

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
    return encode_latent_rows_fp8(rows[:, :KV_LORA_RANK].float(), rows[:, KV_LORA_RANK:])


def _decode_fp8(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return decode_latent_rows(payload).to(dtype)
