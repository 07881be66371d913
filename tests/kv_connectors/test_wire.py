"""Wire encodings of KV rows: exact sizes, the FP8 byte layout field by field, and the errors."""

import pytest
import torch

from vllm_frontier.kernels.fp8 import AMAX_FLOOR
from vllm_frontier.kv_connectors import wire


def test_constants():
    assert wire.MLA_WIDTH == 576 and wire.FP8_ROW_BYTES == 512 + 16 + 128 == 656
    assert wire.ENCODINGS == ("raw", "fp8")


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("float16", torch.float16),
                                        ("bfloat16", torch.bfloat16), ("uint8", torch.uint8),
                                        ("int8", torch.int8), ("float8_e4m3fn", torch.float8_e4m3fn)])
def test_dtype_names(name, dtype):
    assert wire.dtype_from_name(name) is dtype


def test_unknown_dtype_name():
    with pytest.raises(ValueError, match="unsupported KV dtype on the wire: 'float64'"):
        wire.dtype_from_name("float64")


@pytest.mark.parametrize("width,dtype,applies", [
    (576, torch.float32, True), (576, torch.float16, True), (576, torch.bfloat16, True),
    (575, torch.bfloat16, False), (577, torch.float32, False), (576, torch.uint8, False), (132, torch.uint8, False),
])
def test_fp8_applies_only_to_576_wide_float_rows(width, dtype, applies):
    assert wire.fp8_applies(width, dtype) is applies


@pytest.mark.parametrize("t,width,dtype,enc,want", [
    (3, 576, torch.bfloat16, "raw", 3 * 1152),
    (3, 576, torch.bfloat16, "fp8", 3 * 656),
    (5, 576, torch.float32, "fp8", 5 * 656),
    (5, 576, torch.float32, "raw", 5 * 2304),
    (2, 132, torch.uint8, "fp8", 2 * 132),  # fp8 does not apply: raw size
    (0, 576, torch.float16, "fp8", 0),
])
def test_encoded_nbytes(t, width, dtype, enc, want):
    assert wire.encoded_nbytes(t, width, dtype, enc) == want
    rows = torch.zeros(t, width, dtype=dtype)
    assert wire.encode_rows(rows, enc)[1].numel() == want


def test_fp8_layout_field_by_field():
    rows = torch.zeros(2, 576, dtype=torch.float32)
    rows[0, :128] = 448.0  # group amax 448: scale 1, code of 448 is 0x7e
    rows[0, 128:256] = torch.linspace(-8, 8, 128)  # scale 8 / 448
    rows[0, 512:] = 1.5
    rows[1, 300] = -2.0  # group 2 of token 1: scale 2/448, code of -448 is 0xfe
    rows[1, 400] = 0.5  # group 3 of token 1: amax below 1 still sets the scale (0.5 / 448), code 0x7e
    enc, p = wire.encode_rows(rows, "fp8")
    assert enc == "fp8" and p.dtype == torch.uint8 and p.shape == (2, 656)
    scales = p[:, 512:528].contiguous().view(torch.float32)
    # zero groups take the FP8 latent cache's scale floor: the wire and the cache share one codec
    floor = pytest.approx(AMAX_FLOOR / 448)
    assert scales[0].tolist() == [1.0, pytest.approx(8 / 448), floor, floor]
    assert scales[1].tolist() == [floor, floor, pytest.approx(2 / 448), pytest.approx(0.5 / 448)]
    assert torch.all(p[0, :128] == 0x7E) and p[1, 300] == 0xFE and p[1, 400] == 0x7E
    assert torch.all(p[1, :300] == 0) and torch.all(p[1, 301:400] == 0) and torch.all(p[1, 401:512] == 0)
    assert torch.equal(p[0, 528:].contiguous().view(torch.bfloat16), torch.full((64,), 1.5, dtype=torch.bfloat16))
    back = wire.decode_rows(p, "fp8", 576, torch.float32)
    assert back.dtype == torch.float32 and back.shape == (2, 576)
    assert torch.equal(back[0, :128], rows[0, :128]) and back[1, 300] == -2.0
    assert back[1, 400] == 0.5 and back[1].count_nonzero() == 2 and torch.all(back[0, 512:] == 1.5)


def test_fp8_clamps_to_the_e4m3_range():
    # amax / 448 scaling keeps every value in range; the clamp covers rounding of x / scale at the edge
    rows = torch.randn(4, 576) * 1e4
    back = wire.decode_rows(wire.encode_rows(rows, "fp8")[1], "fp8", 576, torch.float32)
    assert torch.isfinite(back).all()
    amax = rows[:, :512].reshape(4, 4, 128).abs().amax(-1)
    assert torch.all(back[:, :512].reshape(4, 4, 128).abs().amax(-1) <= amax * (1 + 2**-4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_decode_gives_the_cache_dtype(dtype):
    rows = torch.randn(3, 576).to(dtype)
    back = wire.decode_rows(wire.encode_rows(rows, "fp8")[1], "fp8", 576, dtype)
    assert back.dtype == dtype
    assert torch.allclose(back.float(), rows.float(), rtol=2**-3, atol=rows.float().abs().max().item() * 2**-9)


def test_raw_is_the_cache_bytes():
    rows = torch.arange(2 * 576, dtype=torch.float32).reshape(2, 576)
    enc, p = wire.encode_rows(rows, "raw")
    assert enc == "raw" and p.shape == (2, 2304) and torch.equal(p, rows.view(torch.uint8))
    assert torch.equal(wire.decode_rows(p, "raw", 576, torch.float32), rows)
    # a non-contiguous view is encoded as its values
    t = torch.arange(20, dtype=torch.float16).reshape(4, 5).t()
    assert torch.equal(wire.decode_rows(wire.encode_rows(t, "raw")[1], "raw", 4, torch.float16), t)


@pytest.mark.parametrize("call,match", [
    (lambda: wire.encode_rows(torch.zeros(2, 576), "zstd"), "wire encoding must be one of"),
    (lambda: wire.encode_rows(torch.zeros(576), "raw"), r"rows must be \[T, W\], got shape \(576,\)"),
    (lambda: wire.decode_rows(torch.zeros(2, 656), "fp8", 576, torch.float32), r"^payload must be uint8 \[T, bytes_per_row\]$"),
    (lambda: wire.decode_rows(torch.zeros(656, dtype=torch.uint8), "fp8", 576, torch.float32), r"^payload must be uint8 \[T, bytes_per_row\]$"),
    (lambda: wire.decode_rows(torch.zeros(2, 655, dtype=torch.uint8), "fp8", 576, torch.float32), "fp8 payload needs 656 B rows"),
    (lambda: wire.decode_rows(torch.zeros(2, 656, dtype=torch.uint8), "fp8", 576, torch.uint8), "fp8 payload needs"),
    (lambda: wire.decode_rows(torch.zeros(2, 8, dtype=torch.uint8), "lz4", 2, torch.float32), "unknown wire encoding 'lz4'"),
    (lambda: wire.decode_rows(torch.zeros(2, 8, dtype=torch.uint8), "raw", 4, torch.float32), r"raw payload rows are 8 B, expected 4 x 4 B"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the payload stays on the rows' device)")
@pytest.mark.parametrize("enc", ["raw", "fp8"])
def test_payload_stays_on_the_rows_device(enc):
    rows = torch.randn(3, 576, device="cuda")
    used, p = wire.encode_rows(rows, enc)
    assert used == enc and p.device == rows.device
    assert wire.decode_rows(p, enc, 576, torch.float32).device == rows.device
