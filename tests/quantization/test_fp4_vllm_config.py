"""The vLLM-facing pieces without an engine: registration, the config's env parsing and pickling, and the
linear method on a bare module (including the identity-matrix read MLA does on kv_b_proj)."""

import logging
import pickle

import pytest
import torch

pytest.importorskip("vllm")

from vllm_frontier.quantization import QUANT_NAME, register  # noqa: E402
from vllm_frontier.quantization.fp4_formats import dequantize, quantize  # noqa: E402


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_frontier.quantization.fp4_config import FrontierFP4Config

    register()
    register()
    assert QUANTIZATION_METHODS.count(QUANT_NAME) == 1
    assert get_quantization_config(QUANT_NAME) is FrontierFP4Config


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "MXFP4"])
def test_config_format_travels_with_the_pickled_config(monkeypatch, fmt):
    from vllm_frontier.quantization.fp4_config import FrontierFP4Config

    monkeypatch.setenv("FRONTIER_FP4", "nvfp4" if fmt.lower() == "mxfp4" else "mxfp4")
    cfg = FrontierFP4Config(fmt)
    assert cfg.fmt == fmt.lower() and cfg.get_name() == QUANT_NAME
    assert FrontierFP4Config.get_config_filenames() == []  # so vLLM builds it with no arguments
    assert FrontierFP4Config().fmt == "nvfp4"  # `--quantization frontier_fp4` alone; the environment is not read
    # built once in the API process, pickled to the engine core and workers: the mode travels with it
    assert pickle.loads(pickle.dumps(cfg)).fmt == fmt.lower()


def test_config_rejects_bad_mode():
    from vllm_frontier.quantization.fp4_config import FrontierFP4Config

    with pytest.raises(ValueError, match="unknown format"):
        FrontierFP4Config("fp8")
    assert FrontierFP4Config.from_config({"quant_method": QUANT_NAME, "fmt": "mxfp4"}).fmt == "mxfp4"
    assert FrontierFP4Config.from_config({"quant_method": QUANT_NAME}).fmt == "nvfp4"


def test_non_linear_layers_are_left_alone():
    from vllm_frontier.quantization.fp4_config import FrontierFP4Config

    assert FrontierFP4Config("nvfp4").get_quant_method(torch.nn.LayerNorm(8), "model.norm") is None


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    """vLLM's weight parameters ask for the tensor-parallel rank; outside an engine there is no group: rank 0 of 1."""
    import vllm.model_executor.parameter as vparam

    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)


def _loaded_layer(method, out_sizes, k, w):
    layer = torch.nn.Module()

    def weight_loader(param, loaded):
        param.data.copy_(loaded)

    method.create_weights(layer, k, out_sizes, k, sum(out_sizes), torch.float32, weight_loader=weight_loader)
    layer.weight.weight_loader(layer.weight, w)
    layer.quant_method = method
    layer.input_size_per_partition = k
    return layer


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_linear_method_quantizes_after_loading_and_reads_back_through_identity(fmt):
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_and_maybe_dequant_weights

    from vllm_frontier.quantization.fp4_methods import FP4LinearMethod

    w = torch.randn(48, 64)
    method = FP4LinearMethod(fmt, "model.layers.0.self_attn.kv_b_proj")
    layer = _loaded_layer(method, [32, 16], 64, w)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight")  # the full-precision weight is gone
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (48, 32)
    want = dequantize(quantize(w, fmt))
    x = torch.randn(3, 64)
    torch.testing.assert_close(method.apply(layer, x), x @ want.T, rtol=1e-5, atol=1e-5)  # fp32, order only
    # MLA on CPU reads kv_b_proj's weight as apply(layer, eye(K)).T
    torch.testing.assert_close(get_and_maybe_dequant_weights(layer), want, rtol=0, atol=0)


def test_linear_method_leaves_misfit_layer_unquantized_with_a_log_line(caplog):
    from vllm_frontier.quantization.fp4_methods import FP4LinearMethod

    w = torch.randn(8, 24)
    method = FP4LinearMethod("nvfp4", "model.layers.0.odd_proj")
    with caplog.at_level(logging.INFO, logger="vllm.frontier.quantization"):
        layer = _loaded_layer(method, [8], 24, w)
    assert method.fallback is not None
    method.process_weights_after_loading(layer)
    assert any("model.layers.0.odd_proj" in r.getMessage() and "block size 16" in r.getMessage()
               for r in caplog.records)
    x = torch.randn(2, 24)
    torch.testing.assert_close(method.apply(layer, x), x @ w.T)


def test_linear_method_quantizes_while_loading_one_layer_at_a_time():
    """Streaming: the bf16 weight lives on the meta device until the layer's last shard arrives; that load
    quantizes the layer at once (no bf16 copy of the whole model ever exists)."""
    from vllm_frontier.quantization.fp4_methods import FP4LinearMethod

    method = FP4LinearMethod("nvfp4", "model.layers.0.mlp.gate_up_proj")
    layer = torch.nn.Module()
    shards = {}

    def weight_loader(param, loaded, shard_id):
        off = 0 if shard_id == 0 else 32
        param.data[off:off + loaded.shape[0]].copy_(loaded)
        shards[shard_id] = loaded

    method.create_weights(layer, 64, [32, 16], 64, 48, torch.bfloat16, weight_loader=weight_loader)
    layer.quant_method = method
    assert layer.weight.device.type == "meta"  # no bf16 memory before loading
    gate, up = torch.randn(32, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    layer.weight.weight_loader(layer.weight, gate, 0)
    assert not hasattr(layer, "weight_packed")  # half loaded: waiting
    layer.weight.weight_loader(layer.weight, up, 1)
    assert not hasattr(layer, "weight") and layer.weight_packed.dtype == torch.uint8  # quantized on the last shard
    assert layer.weight_packed.shape == (48, 32) and layer.fp4_format == "nvfp4"
    method.process_weights_after_loading(layer)  # vLLM's pass over all modules afterwards: a no-op
    want = dequantize(quantize(torch.cat([gate, up]).float(), "nvfp4"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(method.apply(layer, x), x @ want.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_linear_method_on_cuda_stores_the_decode_layout_and_runs_the_decode_gemm(monkeypatch, fmt):
    """What process_weights_after_loading does on CUDA (the device choice pinned, the kernel run by Triton's
    interpreter): the weight is permuted once into the decode GEMM's layout, no pairs copy is kept, and apply
    runs the decode kernel for decode (M = 3) and prefill-sized inputs (MLA's identity read, M = 64)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_and_maybe_dequant_weights

    from vllm_frontier.quantization import fp4_methods, fp4_ops, w4a16_decode_gemm

    monkeypatch.setattr(fp4_methods, "_kernel_layout", lambda w: "decode" if w.dim() == 2 else "pairs")
    monkeypatch.setattr(fp4_ops, "triton_available", lambda device: True)
    calls = []
    real = w4a16_decode_gemm.w4a16_decode_gemm
    monkeypatch.setattr(w4a16_decode_gemm, "w4a16_decode_gemm",
                        lambda x, d, *a: calls.append(x.shape) or real(x, d, *a))
    w = torch.randn(48, 64)
    method = fp4_methods.FP4LinearMethod(fmt, "model.layers.0.self_attn.kv_b_proj")
    layer = _loaded_layer(method, [32, 16], 64, w)
    method.process_weights_after_loading(layer)
    assert layer.weight_fp4_layout == "decode" and not hasattr(layer, "weight_global_scale")  # no pairs copy
    assert layer.weight_packed.dtype == torch.int32 and layer.weight_packed.shape == (48, 8)  # the words
    want = dequantize(quantize(w, fmt))
    x = torch.randn(3, 64)
    torch.testing.assert_close(method.apply(layer, x), x @ want.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(get_and_maybe_dequant_weights(layer), want, rtol=0, atol=0)
    assert calls == [(3, 64), (64, 64)]


def test_linear_method_keeps_pairs_for_mxfp4_scales_beyond_the_fp16_window(monkeypatch):
    from vllm_frontier.quantization import fp4_methods

    monkeypatch.setattr(fp4_methods, "_kernel_layout", lambda w: "decode")
    w = torch.randn(8, 64)
    w[:, 32:] *= 2.0**-40  # one block column 40 binades below the other: the decode kernel would flush it
    method = fp4_methods.FP4LinearMethod("mxfp4", "model.layers.0.o_proj")
    layer = _loaded_layer(method, [8], 64, w)
    method.process_weights_after_loading(layer)
    assert layer.weight_fp4_layout == "pairs" and layer.weight_packed.shape == (8, 32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(method.apply(layer, x), x @ dequantize(quantize(w, "mxfp4")).T, rtol=1e-5, atol=0)
