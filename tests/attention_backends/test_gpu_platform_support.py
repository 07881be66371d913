"""What our platforms need on GPUs, checked without one: which vLLM Triton kernels DSA replaces on which device,
the torch replacement of vLLM's fused indexer-query kernel, and ``--kv-cache-dtype fp8`` -> the 656-byte layout."""

import types

import pytest
import torch

from vllm_frontier.attention_backends import cpu_overrides
from vllm_frontier.attention_backends.latent_cache_io import apply_kv_cache_dtype, canonical_kv_cache_dtype

FUSED = "vllm.model_executor.layers.sparse_attn_indexer._fused_indexer_q_rope_quant_kernel"
QUANT = "vllm.model_executor.layers.quantization.utils.fp8_utils.per_token_group_quant_fp8"


def test_overrides_by_device():
    cpu = cpu_overrides.overrides_for("cpu")
    assert {FUSED, QUANT} < set(cpu) and len(cpu) == 4
    for cap in ((8, 0), (8, 6), (8, 7)):  # A100, A10 / RTX 3090, Orin: no float8e4nv in Triton
        assert set(cpu_overrides.overrides_for("cuda", cap)) == {FUSED, QUANT}, cap
    for cap in ((8, 9), (9, 0), (10, 0), (12, 0)):
        assert cpu_overrides.overrides_for("cuda", cap) == {}, cap
    assert cpu_overrides.overrides_for("xpu", (9, 0)) == {}


def test_override_names_resolve_to_vllm_kernels():
    """A renamed kernel in a vLLM update must fail here, not silently stop being replaced."""
    from vllm.triton_utils.dispatcher import _resolve_kernel

    for name in cpu_overrides.overrides_for("cpu"):
        host, attr = _resolve_kernel(name)
        assert hasattr(host, attr), name


def _rope_reference(q, cos, sin, is_neox):
    """Rotary embedding as a complex multiply (a different formulation from the override's)."""
    if is_neox:
        z = torch.complex(q[..., :32], q[..., 32:64])
    else:
        z = torch.complex(q[..., 0:64:2], q[..., 1:64:2])
    r = z * torch.complex(cos, sin)
    out = q.clone()
    if is_neox:
        out[..., :32], out[..., 32:64] = r.real, r.imag
    else:
        out[..., 0:64:2], out[..., 1:64:2] = r.real, r.imag
    return out


@pytest.mark.parametrize("is_neox", [True, False])
def test_fused_indexer_q_rope_quant_override(is_neox):
    gen = torch.Generator().manual_seed(0)
    T, H, max_pos = 5, 4, 40
    q = (torch.randn(T, H, 128, generator=gen) * torch.logspace(-2, 1, H)[None, :, None]).to(torch.bfloat16)
    ang = torch.rand(max_pos, 32, generator=gen) * 6.3
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    pos = torch.tensor([0, 7, 39, 7, 3])
    w = torch.randn(T, H, generator=gen)
    q_fp8 = torch.empty(T, H, 128, dtype=torch.float8_e4m3fn)
    w_out = torch.empty(T, H)
    cpu_overrides.fused_indexer_q_rope_quant_kernel(
        pos, q, q.stride(0), q.stride(1), cos_sin, cos_sin.stride(0), q_fp8, q_fp8.stride(0), q_fp8.stride(1),
        w, w.stride(0), w.stride(1), w_out, w_out.stride(0), w_out.stride(1), 0.5, 0.25,
        fp8_min=-448.0, fp8_max=448.0, is_neox=is_neox, num_warps=1)  # launched as vLLM launches the kernel
    want = _rope_reference(q.float(), cos_sin[pos, None, :32], cos_sin[pos, None, 32:], is_neox)
    scale = w_out / (w * 0.5 * 0.25)  # the per-(token, head) quantization scale folded into the weights
    assert torch.allclose(scale, torch.exp2(torch.round(torch.log2(scale))), rtol=1e-5), "ue8m0: powers of two"
    assert torch.all(want.abs().amax(-1) <= 448 * scale * (1 + 1e-6)), "no saturation"
    assert torch.all(want.abs().amax(-1) > 224 * scale), "the smallest power of two that covers amax"
    deq = q_fp8.float() * scale[..., None]
    # e4m3: 2^-4 relative rounding, plus the rope output's bf16 rounding (2^-8), plus subnormal steps
    assert torch.all((deq - want).abs() <= want.abs() * (2**-4 + 2**-7) + scale[..., None] * 2**-9)


def test_kv_cache_dtype_fp8_selects_the_656_byte_layout():
    assert canonical_kv_cache_dtype("fp8") == "fp8_ds_mla"
    assert canonical_kv_cache_dtype("fp8_e4m3") == "fp8_ds_mla"
    for keep in ("auto", "bfloat16", "fp8_ds_mla"):
        assert canonical_kv_cache_dtype(keep) == keep
    from vllm.config import CacheConfig

    cfg = types.SimpleNamespace(cache_config=CacheConfig(cache_dtype="fp8"))  # what --kv-cache-dtype fp8 builds
    assert apply_kv_cache_dtype(cfg) == "fp8_ds_mla" and cfg.cache_config.cache_dtype == "fp8_ds_mla"
    from vllm_frontier.kernels.ref import FP8_ROW_BYTES

    assert FP8_ROW_BYTES == 656
    with pytest.raises(ValueError, match="fp8_e5m2"):
        apply_kv_cache_dtype(types.SimpleNamespace(cache_config=CacheConfig(cache_dtype="fp8_e5m2")))
