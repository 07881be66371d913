"""`vllm-frontier tiny-model --preset`: the benchmark models' geometry, without writing their weights."""

import subprocess
import sys

import pytest

from vllm_frontier.models.tiny_factory import PRESETS, param_count, preset_config


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v32"])
def test_mid_preset_is_the_moe_benchmark_shape(arch):
    cfg = preset_config("mid", arch)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]) == (1024, 6, 1)
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (64, 6, 512)
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (512, 64)  # MLA head 576, as vLLM requires
    assert 0.5e9 < param_count(cfg, include_mtp=False) < 0.6e9 < param_count(cfg) < 0.7e9
    assert ("index_topk" in cfg) == (arch == "deepseek_v32")


def test_dense_preset_reads_every_weight():
    cfg = preset_config("dense")
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (4096, 11008)
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"]  # no MoE layer: batch 1 reads all weights
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
    assert 0.9e9 < param_count(cfg) < 1.2e9
    assert cfg["torch_dtype"] == "bfloat16" and preset_config("tiny")["torch_dtype"] == "float32"


def test_unknown_preset_is_one_line_error():
    with pytest.raises(ValueError, match="tiny, mid, dense"):
        preset_config("huge")
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "tiny-model", "--preset", "huge", "--out", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr and "Traceback" not in r.stderr
    assert set(PRESETS) == {"tiny", "mid", "dense"}
