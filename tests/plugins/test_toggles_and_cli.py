"""Feature toggles, `--plugin` parsing, registration, and the tiny-model factory (no vLLM engine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_frontier.plugins.features import FeatureError, Features, load_features, parse_plugin_list


def test_no_toggles_means_nothing_active():
    f = load_features({})
    assert f == Features()
    assert not f.any
    assert "none" in f.describe()


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                          ("off", False)])
def test_bool_toggle_values(raw, expected):
    assert load_features({"FRONTIER_DSA": raw}).dsa is expected


@pytest.mark.parametrize("raw,mode", [("1", "nvfp4"), ("nvfp4", "nvfp4"), ("MXFP4", "mxfp4"), ("0", None)])
def test_fp4_modes(raw, mode):
    assert load_features({"FRONTIER_FP4": raw}).fp4 == mode


@pytest.mark.parametrize("env", [{"FRONTIER_FP4": "bogus"}, {"FRONTIER_DSA": "maybe"}, {"FRONTIER_MTP_K": "0"},
                                 {"FRONTIER_MTP_K": "x"}, {"FRONTIER_MTP_K": "99"}])
def test_bad_toggle_values_name_the_valid_ones(env):
    with pytest.raises(FeatureError, match="valid values"):
        load_features(env)


def test_active_list_and_mtp_k():
    f = load_features({"FRONTIER_DSA": "1", "FRONTIER_FP4": "mxfp4", "FRONTIER_MTP": "1", "FRONTIER_MTP_K": "2"})
    assert f.active() == ["dsa", "fp4=mxfp4", "mtp"]
    assert f.mtp_k == 2


def test_plugin_list_parsing():
    assert parse_plugin_list("dsa,fp4") == {"FRONTIER_DSA": "1", "FRONTIER_FP4": "nvfp4"}
    assert parse_plugin_list(" mla , fp4=mxfp4 ,mtp=2") == {
        "FRONTIER_MLA": "1", "FRONTIER_FP4": "mxfp4", "FRONTIER_MTP": "1", "FRONTIER_MTP_K": "2"}
    assert parse_plugin_list("spec-moe,pd") == {"FRONTIER_SPEC_MOE": "1", "FRONTIER_PD": "1"}
    env = parse_plugin_list("all")
    assert env["FRONTIER_ALL"] == "1" and all(env[f"FRONTIER_{n}"] for n in ("DSA", "MLA", "FP4", "MTP", "PD"))
    # an explicit mode wins over `all`'s default, in either order
    assert parse_plugin_list("all,fp4=mxfp4")["FRONTIER_FP4"] == "mxfp4"
    assert parse_plugin_list("fp4=mxfp4,all")["FRONTIER_FP4"] == "mxfp4"
    assert load_features(parse_plugin_list("all")).all


@pytest.mark.parametrize("value", ["bogus", "", "dsa,nope", "fp4=int3", "mtp=0", "dsa=2"])
def test_bad_plugin_values(value):
    with pytest.raises(FeatureError, match="valid"):
        parse_plugin_list(value)


def _run_python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_registration_is_inert_and_idempotent_with_toggles_off():
    code = (
        "import sys, vllm_frontier.plugins as p\n"
        "p.register(); p.register()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('vllm_frontier.')\n"
        "                and not m.startswith('vllm_frontier.plugins') and m != 'vllm_frontier.errors')\n"
        "print('LOADED', loaded, sorted(p._registered))\n"
    )
    r = _run_python(code, {})
    assert r.returncode == 0, r.stderr
    assert "LOADED [] []" in r.stdout


def test_registration_with_a_bad_toggle_exits_2_with_one_line():
    r = _run_python("import vllm_frontier.plugins as p; p.register()", {"FRONTIER_FP4": "bogus"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nvfp4" in lines[0] and "mxfp4" in lines[0]


@pytest.mark.parametrize("argv,env,needle", [
    (["serve", "--plugin", "bogus"], {}, "valid names"),
    (["serve", "--plugin"], {}, "needs a value"),
    (["serve", "--plugin=dsa,fp4=int3"], {}, "nvfp4"),
    (["serve"], {"FRONTIER_FP4": "bogus"}, "valid values"),
    (["features"], {"FRONTIER_SPEC_MOE": "2"}, "valid values"),
    (["no-such-command"], {}, "valid commands"),
])
def test_cli_bad_input_one_line_exit_2(argv, env, needle):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    e.update(env)
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", *argv], capture_output=True, text=True, env=e,
                       timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_features_command_prints_active_features():
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
    e.update({"FRONTIER_MLA": "1", "FRONTIER_FP4": "mxfp4"})
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "features"], capture_output=True, text=True,
                       env=e, timeout=60)
    assert r.returncode == 0 and "mla, fp4=mxfp4" in r.stdout


def test_tiny_factory_is_deterministic_and_shaped(tmp_path):
    from safetensors.torch import load_file

    from vllm_frontier.models.tiny_factory import make_tiny_model

    a = make_tiny_model("deepseek_v32", tmp_path / "a", mtp_layers=1, seed=3)
    b = make_tiny_model("deepseek_v32", tmp_path / "b", mtp_layers=1, seed=3)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and cfg["index_topk"] == 64
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    # MTP layer lives at index num_hidden_layers, with its own head and the indexer
    n = cfg["num_hidden_layers"]
    assert wa[f"model.layers.{n}.eh_proj.weight"].shape == (256, 512)
    assert f"model.layers.{n}.self_attn.indexer.wq_b.weight" in wa
    assert wa["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (256, 128)
    c = make_tiny_model("deepseek_v32", tmp_path / "c", mtp_layers=1, seed=4)
    assert not (load_file(c / "model.safetensors")["lm_head.weight"] == wa["lm_head.weight"]).all()


def test_tiny_factory_rejects_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "tiny-model", "--arch", "deepseek_v3",
                        "--out", str(tmp_path), "--index-topk", "8"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "deepseek_v32 only" in r.stderr and "Traceback" not in r.stderr
    from vllm_frontier.models.tiny_factory import tiny_config

    with pytest.raises(ValueError, match="MTP layers exist only"):
        tiny_config("deepseek_v2", mtp_layers=1)
