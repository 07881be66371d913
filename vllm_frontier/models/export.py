"""Write a trained ``DeepseekReference`` as the two HF views vLLM loads.

Layout (``root`` is e.g. the package's ``embedded/`` folder)::

    root/v32/config.json           DeepseekV32ForCausalLM (index_topk, index_n_heads, index_head_dim)
    root/v32/model.safetensors     every weight except the indexer's (main model + MTP layer)
    root/v32/indexer.safetensors   the lightning indexers (``model.layers.{i}.self_attn.indexer.*``)
    root/v32/tokenizer*.json, generation_config.json
    root/v3/config.json            DeepseekV3ForCausalLM: the same model without the indexer (dense MLA)
    root/v3/model.safetensors      -> ../v32/model.safetensors (symlink: one copy of the shared weights)
    root/v3/tokenizer*.json ...    -> ../v32/... (symlinks)

vLLM reads every ``*.safetensors`` of a directory without an index file, so the V3.2 view gets both files
and the V3 view only the shared one. A wheel build copies symlink targets (the installed size doubles; the
stored checkpoint does not).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .reference import DeepseekReference

SHARED_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json")


def v3_config_from_v32(cfg: dict) -> dict:
    """The dense V3 view's config: the V3.2 config without indexer keys, V3 architecture and model type."""
    out = {k: v for k, v in cfg.items() if not k.startswith("index_") and k != "indexer_rope_interleave"}
    out["architectures"] = ["DeepseekV3ForCausalLM"]
    out["model_type"] = "deepseek_v3"
    return out


def _to_storage(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The router's selection bias is an fp32 parameter in vLLM; keep it exact.
    if name.endswith("e_score_correction_bias"):
        return t.float().contiguous()
    return t.to(dtype).contiguous()


def export_views(model: DeepseekReference, hf_config: dict, tokenizer_dir: Path, root: Path,
                 *, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    """Write ``root/v32`` and ``root/v3`` (see module docstring). Returns (v32_dir, v3_dir)."""
    from safetensors.torch import save_file

    if "index_topk" not in hf_config:
        raise ValueError("hf_config must be the V3.2 config (with index_topk)")
    root = Path(root)
    v32, v3 = root / "v32", root / "v3"
    v32.mkdir(parents=True, exist_ok=True)
    v3.mkdir(parents=True, exist_ok=True)
    sd = model.hf_state_dict()
    main = {k: _to_storage(k, v, dtype) for k, v in sd.items() if ".self_attn.indexer." not in k}
    idx = {k: _to_storage(k, v, dtype) for k, v in sd.items() if ".self_attn.indexer." in k}
    save_file(main, str(v32 / "model.safetensors"), metadata={"format": "pt"})
    save_file(idx, str(v32 / "indexer.safetensors"), metadata={"format": "pt"})
    for name in ("model.safetensors", "indexer.safetensors"):
        os.chmod(v32 / name, 0o644)   # safetensors writes 0600; package data must be world-readable
    cfg = dict(hf_config, torch_dtype=str(dtype).removeprefix("torch."))
    (v32 / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (v32 / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    tokenizer_dir = Path(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = tokenizer_dir / name
        if src.resolve() != (v32 / name).resolve():
            (v32 / name).write_bytes(src.read_bytes())
    (v3 / "config.json").write_text(json.dumps(v3_config_from_v32(cfg), indent=2) + "\n")
    for name in SHARED_FILES:
        link = v3 / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.join("..", "v32", name), link)
    return v32, v3
