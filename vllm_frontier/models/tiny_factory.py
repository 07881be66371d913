"""Deterministic random-weight DeepSeek checkpoints (V2, V3 with MTP, V3.2 with indexer) in HF format.

They keep DeepSeek's attention geometry (kv_lora_rank 512, rope 64, nope 128, v 128: vLLM's MLA backends
accept head sizes 320/512/576 only) and shrink everything else, so a vLLM CPU engine starts in seconds.
Weight names are the ones vLLM's `deepseek_v2.py` / `deepseek_mtp.py` loaders read. Used by tests for
shape and wiring; quality numbers use the trained embedded model instead.

Size presets (`PRESETS`, `--preset`) keep the same attention geometry at realistic layer sizes, for speed and
memory benchmarks on a 24 GiB CPU machine:
- "tiny" (default): the shapes above, a few MB.
- "mid": DeepSeek-V3-style MoE, hidden 1024, 6 layers (first dense) + 1 MTP layer, 64 routed experts top-6 of
  width 512, one shared expert: ~0.55 B parameters in the main model (+0.1 B MTP), ~1.3 GB in bf16. Batch-1
  decode reads 6 of 64 experts per layer.
- "dense": dense-heavy, hidden 4096, intermediate 11008 (LLaMA-7B widths), 6 dense layers, 32 heads: ~1.05 B
  parameters, ~2.1 GB in bf16; batch-1 decode reads every weight.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
DTYPES = ("float32", "bfloat16")

# Config overrides of each size preset (see module docstring); vocab stays the tiny tokenizer's.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "mid": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=384, routed_scaling_factor=2.5,
                initializer_range=0.02),
    "dense": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=6, num_attention_heads=32,
                  num_key_value_heads=32, first_k_dense_replace=6, q_lora_rank=1536, initializer_range=0.02),
}
# MTP layers and dtype of each preset unless given (big presets: bf16, or the file doubles).
_PRESET_DEFAULTS = {"tiny": (0, "float32"), "mid": (1, "bfloat16"), "dense": (0, "bfloat16")}


def preset_config(preset: str, arch: str = "deepseek_v3", *, mtp_layers: int | None = None, dtype: str | None = None,
                  **overrides) -> dict:
    """The config.json dict of size preset `preset` (see PRESETS) for `arch`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d_mtp, d_dtype = _PRESET_DEFAULTS[preset]
    if arch == "deepseek_v2":
        d_mtp = 0
    over = dict(PRESETS[preset])
    if arch == "deepseek_v2" and preset != "tiny":
        over["q_lora_rank"] = None  # V2 uses a plain q_proj
    over.update(overrides)
    return tiny_config(arch, mtp_layers=d_mtp if mtp_layers is None else mtp_layers,
                       dtype=d_dtype if dtype is None else dtype, **over)


def param_count(cfg: dict, *, include_mtp: bool = True) -> int:
    """Parameters of the checkpoint `cfg` describes (MTP layers included unless include_mtp is False)."""
    n = cfg["num_hidden_layers"]
    total = 0
    for name, shape in checkpoint_shapes(cfg).items():
        if not include_mtp and name.startswith("model.layers.") and int(name.split(".")[2]) >= n:
            continue
        c = 1
        for d in shape:
            c *= d
        total += c
    return total


_ARCH_NAMES = {
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
    "deepseek_v32": ("DeepseekV32ForCausalLM", "deepseek_v32"),
}


def tiny_config(arch: str, *, mtp_layers: int = 0, dtype: str = "float32", vocab_size: int = 512, **overrides) -> dict:
    """The HF `config.json` dict of a tiny model of `arch` (see module docstring for the geometry)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if mtp_layers < 0 or (mtp_layers and arch == "deepseek_v2"):
        raise ValueError("mtp_layers must be >= 0, and MTP layers exist only for deepseek_v3 / deepseek_v32")
    architecture, model_type = _ARCH_NAMES[arch]
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": None if arch == "deepseek_v2" else 128,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "deepseek_v2":
        cfg.update(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, n_group=1, topk_group=1)
    else:
        cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1,
                   num_nextn_predict_layers=mtp_layers)
    if arch == "deepseek_v32":
        cfg.update(index_topk=64, index_n_heads=4, index_head_dim=128)
    cfg.update(overrides)
    return cfg


def _layer_shapes(cfg: dict, prefix: str, moe: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder block's weights, by checkpoint name."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kvr, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    s: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (H,),
        f"{prefix}.post_attention_layernorm.weight": (H,),
        f"{prefix}.self_attn.kv_a_proj_with_mqa.weight": (kvr + rope, H),
        f"{prefix}.self_attn.kv_a_layernorm.weight": (kvr,),
        f"{prefix}.self_attn.kv_b_proj.weight": (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kvr),
        f"{prefix}.self_attn.o_proj.weight": (H, nh * cfg["v_head_dim"]),
    }
    qr = cfg.get("q_lora_rank")
    if qr:
        s[f"{prefix}.self_attn.q_a_proj.weight"] = (qr, H)
        s[f"{prefix}.self_attn.q_a_layernorm.weight"] = (qr,)
        s[f"{prefix}.self_attn.q_b_proj.weight"] = (nh * qk_head, qr)
    else:
        s[f"{prefix}.self_attn.q_proj.weight"] = (nh * qk_head, H)
    if "index_topk" in cfg:
        ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
        s[f"{prefix}.self_attn.indexer.wq_b.weight"] = (ih * idim, qr)
        s[f"{prefix}.self_attn.indexer.wk.weight"] = (idim, H)
        s[f"{prefix}.self_attn.indexer.k_norm.weight"] = (idim,)
        s[f"{prefix}.self_attn.indexer.k_norm.bias"] = (idim,)
        s[f"{prefix}.self_attn.indexer.weights_proj.weight"] = (ih, H)
    if moe:
        E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        s[f"{prefix}.mlp.gate.weight"] = (E, H)
        if cfg.get("topk_method") == "noaux_tc":
            s[f"{prefix}.mlp.gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            s[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = (I, H)
            s[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = (I, H)
            s[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = (H, I)
        SI = I * cfg["n_shared_experts"]
        s[f"{prefix}.mlp.shared_experts.gate_proj.weight"] = (SI, H)
        s[f"{prefix}.mlp.shared_experts.up_proj.weight"] = (SI, H)
        s[f"{prefix}.mlp.shared_experts.down_proj.weight"] = (H, SI)
    else:
        I = cfg["intermediate_size"]
        s[f"{prefix}.mlp.gate_proj.weight"] = (I, H)
        s[f"{prefix}.mlp.up_proj.weight"] = (I, H)
        s[f"{prefix}.mlp.down_proj.weight"] = (H, I)
    return s


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a DeepSeek checkpoint described by `cfg`, by name (main model + MTP layers)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    n = cfg["num_hidden_layers"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    for i in range(n):
        shapes.update(_layer_shapes(cfg, f"model.layers.{i}", moe=i >= cfg["first_k_dense_replace"]))
    for j in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{n + j}"
        shapes.update(_layer_shapes(cfg, p, moe=n + j >= cfg["first_k_dense_replace"]))
        shapes.update({
            f"{p}.enorm.weight": (H,),
            f"{p}.hnorm.weight": (H,),
            f"{p}.eh_proj.weight": (H, 2 * H),
            f"{p}.shared_head.norm.weight": (H,),
            f"{p}.shared_head.head.weight": (V, H),
            f"{p}.embed_tokens.weight": (V, H),
        })
    return shapes


def random_weights(cfg: dict, seed: int = 0) -> dict:
    """Random weights for `cfg`: N(0, initializer_range) matrices, unit norms, zero biases. Deterministic."""
    import torch

    dtype = getattr(torch, cfg["torch_dtype"])
    gen = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]
    out = {}
    for name, shape in sorted(checkpoint_shapes(cfg).items()):
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * std
        out[name] = t.to(dtype).contiguous()
    return out


def make_tiny_model(arch: str, out_dir, *, mtp_layers: int | None = None, dtype: str | None = None, seed: int = 0,
                    preset: str = "tiny", **config_overrides) -> Path:
    """Write a random-weight checkpoint of `arch` and size `preset` (config.json, model.safetensors, tokenizer)
    to `out_dir`. mtp_layers / dtype default to the preset's (tiny: 0 / float32).

    Deterministic given (arch, preset, mtp_layers, dtype, seed, overrides). Returns the directory.
    """
    from safetensors.torch import save_file

    from .tokenizer import FACTORY_CORPUS_MODULES, stdlib_texts, train_bpe_tokenizer

    cfg = preset_config(preset, arch, mtp_layers=mtp_layers, dtype=dtype, **config_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
    train_bpe_tokenizer(stdlib_texts(FACTORY_CORPUS_MODULES), cfg["vocab_size"], out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`vllm-frontier tiny-model`: write a tiny random-weight checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog="vllm-frontier tiny-model", description=main.__doc__)
    p.add_argument("--arch", default="deepseek_v3", choices=ARCHS, help="default deepseek_v3")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                   help="size: tiny (default, MB), mid (MoE, ~0.65 B params), dense (dense-heavy, ~1 B params)")
    p.add_argument("--mtp-layers", type=int, default=None, help="MTP layers (default: the preset's; mid has 1)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 for tiny, bfloat16 otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-topk", type=int, default=None, help="deepseek_v32 only: indexer top-k (default 64)")
    args = p.parse_args(argv)
    overrides = {}
    if args.index_topk is not None:
        if args.arch != "deepseek_v32":
            p.error("--index-topk applies to --arch deepseek_v32 only")
        if args.index_topk <= 0:
            p.error("--index-topk must be a positive integer")
        overrides["index_topk"] = args.index_topk
    try:
        out = make_tiny_model(args.arch, args.out, mtp_layers=args.mtp_layers, dtype=args.dtype, seed=args.seed,
                              preset=args.preset, **overrides)
    except ValueError as e:
        p.error(str(e))
    print(out)
    return 0


def dense_v3_view(v32_dir, out_dir) -> Path:
    """The same weights as a DeepSeek-V3.2 checkpoint without the indexer, as a dense `DeepseekV3ForCausalLM`.

    With `index_topk` >= the context length, DSA attends to every token, so the two must agree.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(v32_dir), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    if "index_topk" not in cfg:
        raise ValueError(f"{src} is not a DeepSeek-V3.2 checkpoint (no index_topk in config.json)")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if ".indexer." not in k}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for key in ("index_topk", "index_n_heads", "index_head_dim"):
        cfg.pop(key)
    cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out
