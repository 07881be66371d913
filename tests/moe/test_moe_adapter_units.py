"""Unit tests of the pieces the vLLM adapter is built from: expert relocation over gloo ranks, the
FRONTIER_SPEC_MOE_* settings, the TP token-rank rule, the placement command. The adapter inside real vLLM
engines is tested in test_moe_vllm_ep.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_frontier.moe.launch import run_distributed
from vllm_frontier.moe.placement import ExpertPlacement, load_placements
from vllm_frontier.moe.settings import SpecMoESettingsError, read_settings
from vllm_frontier.moe.shuffle import contiguous_ranks, rank_scores
from vllm_frontier.moe.vllm_adapter import decoder_layer_index, held_experts, token_ranks

ROOT = Path(__file__).resolve().parents[2]
E = 8


def _full_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(E, 6, 4, generator=g), torch.randn(E, 4, 3, generator=g)


def _scrambled(n: int) -> ExpertPlacement:
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(11)).tolist()
    ranks = [0] * E
    for i, e in enumerate(perm):
        ranks[e] = i % n
    return ExpertPlacement(tuple(ranks), n)


def _relocate_rank(rank: int, n: int, held_kind: str) -> dict:
    from vllm_frontier.moe.relocate import gather_held, relocate_experts

    w13, w2 = _full_weights()
    per = E // n
    # what this rank holds now: vLLM's linear blocks, or round-robin in descending local order
    held = list(range(rank * per, (rank + 1) * per)) if held_kind == "linear" \
        else sorted(range(rank, E, n), reverse=True)
    held_all = gather_held(held)
    target = _scrambled(n)
    new13, new2 = relocate_experts([w13[held], w2[held]], held_all, target)
    want = target.local_experts(rank)
    return {"ok13": torch.equal(new13, w13[want]), "ok2": torch.equal(new2, w2[want]), "held_all": held_all}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("held_kind", ["linear", "round_robin_reversed"])
def test_relocate_experts_realises_the_placement(n, held_kind):
    out = run_distributed(_relocate_rank, n, held_kind)
    assert all(o["ok13"] and o["ok2"] for o in out)
    assert sorted(e for h in out[0]["held_all"] for e in h) == list(range(E))


def test_relocate_refuses_a_placement_of_another_size():
    from vllm_frontier.moe.relocate import relocate_experts

    with pytest.raises(ValueError, match="placement is for 4 ranks"):
        relocate_experts([torch.zeros(4, 1)], [[0, 1, 2, 3], [4, 5, 6, 7]], ExpertPlacement.linear(8, 4))


def test_settings_defaults_and_errors(tmp_path):
    s = read_settings({})
    assert (s.dispatch, s.placement_path, s.capacity, s.log_every) == ("speculative", None, 1.5, 0)
    f = tmp_path / "p.json"
    f.write_text("{}")
    s = read_settings({"FRONTIER_SPEC_MOE_DISPATCH": "Plain", "FRONTIER_SPEC_MOE_PLACEMENT": str(f),
                       "FRONTIER_SPEC_MOE_CAPACITY": "2", "FRONTIER_SPEC_MOE_LOG_EVERY": "5"})
    assert (s.dispatch, s.placement_path, s.capacity, s.log_every) == ("plain", f, 2.0, 5)
    for env, msg in [({"FRONTIER_SPEC_MOE_DISPATCH": "fast"}, "valid values are plain, speculative, worst, local"),
                     ({"FRONTIER_SPEC_MOE_PLACEMENT": str(tmp_path / "none.json")}, "no such file"),
                     ({"FRONTIER_SPEC_MOE_CAPACITY": "0.5"}, ">= 1"),
                     ({"FRONTIER_SPEC_MOE_CAPACITY": "nan"}, ">= 1"),
                     ({"FRONTIER_SPEC_MOE_LOG_EVERY": "-1"}, "integer >= 0")]:
        with pytest.raises(SpecMoESettingsError, match=msg):
            read_settings(env)


def test_layer_index_and_held_experts():
    assert decoder_layer_index("model.layers.7.mlp.experts") == 7
    assert decoder_layer_index("layers.0.mlp.experts") == 0
    assert decoder_layer_index("mtp.block.experts") is None
    # vLLM's expert_map: global id -> local index, -1 where the expert lives elsewhere
    assert held_experts(torch.tensor([-1, 1, -1, 0]), 4) == [3, 1]
    assert held_experts(None, 3) == [0, 1, 2]


def test_token_ranks_modes():
    p = _scrambled(2)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(40)])
    scores = rank_scores(ids, p)
    assert torch.equal(token_ranks("plain", ids, p, 1.5), contiguous_ranks(40, 2))
    worst = token_ranks("worst", ids, p, 1.5)
    assert torch.equal(scores.gather(1, worst.unsqueeze(1)).squeeze(1), scores.min(dim=1).values)
    spec = token_ranks("speculative", ids, p, 1.5)
    assert torch.bincount(spec, minlength=2).max() <= 30  # capacity 1.5 x 20
    assert scores.gather(1, spec.unsqueeze(1)).sum() > scores.gather(1, worst.unsqueeze(1)).sum()
    assert token_ranks("speculative", ids[:0], p, 1.5).numel() == 0


def test_placement_command(tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "vllm_frontier.cli", "spec-moe-placement",
           "--traces", str(ROOT / "benchmarks" / "results" / "spec_moe" / "spec_moe_traces_v3.pt")]
    r = subprocess.run(cmd + ["--ranks", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    placements = load_placements(out)
    assert sorted(placements) == [0, 1] and all(p.num_ranks == 2 for p in placements.values())
    assert json.loads(out.read_text())["meta"]["trace_tokens"] > 0
    r = subprocess.run(cmd + ["--ranks", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--ranks must divide the 8 experts" in r.stderr
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.pt"), "--ranks", "2", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr


def test_serve_spec_moe_needs_expert_parallelism():
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "serve", "--plugin", "spec_moe"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "needs expert parallelism" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vllm_frontier.cli", "serve", "--plugin", "spec_moe",
                        "--enable-expert-parallel", "--tensor-parallel-size", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "FRONTIER_SPEC_MOE_DISPATCH": "fast"})
    assert r.returncode != 0 and "FRONTIER_SPEC_MOE_DISPATCH='fast'" in r.stderr and "Traceback" not in r.stderr


def test_cpu_worker_binding_for_multi_worker_engines():
    from vllm_frontier.cli import cpu_worker_binding

    assert cpu_worker_binding(["--tensor-parallel-size", "2"], [0, 1], 1) == "0|1"
    assert cpu_worker_binding(["-dp=2"], list(range(8)), 1) == "0-3|4-7"
    assert cpu_worker_binding(["-tp", "2", "--data-parallel-size", "2"], list(range(8)), 2) == "0-1|2-3|4-5|6-7"
    assert cpu_worker_binding([], [0, 1], 1) is None  # one worker: vLLM's default binding works
    assert cpu_worker_binding(["-tp", "2"], [0, 1, 2, 3], 2) is None  # a NUMA node per worker
    assert cpu_worker_binding(["-tp", "4"], [0, 1], 1) is None  # fewer cores than workers: vLLM says so


def test_spec_moe_needs_expert_parallelism_and_no_fp4_and_all_leaves_it_off():
    from types import SimpleNamespace

    from vllm_frontier.errors import FeatureError
    from vllm_frontier.plugins import decide
    from vllm_frontier.plugins.features import Features

    hf = SimpleNamespace(n_routed_experts=8, kv_lora_rank=512, qk_rope_head_dim=64)

    def config(ep: bool, tp: int):
        par = SimpleNamespace(enable_expert_parallel=ep, tensor_parallel_size=tp, data_parallel_size=1)
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), parallel_config=par,
                               kv_transfer_config=None)

    assert decide(Features(spec_moe=True), config(True, 2)) == {}
    with pytest.raises(FeatureError, match="--enable-expert-parallel"):
        decide(Features(spec_moe=True), config(False, 2))
    with pytest.raises(FeatureError, match="does not combine with fp4"):
        decide(Features(spec_moe=True, fp4="nvfp4"), config(True, 2))
    # `--plugin all`: the unmet need leaves spec_moe off instead of ending the launch
    off = decide(Features(spec_moe=True, all=True), config(False, 1))
    assert "expert parallelism" in off["spec_moe"]


def test_counters_from_log_keeps_each_workers_last_line():
    from vllm_frontier.moe.vllm_adapter import counters_from_log

    log = ("(Worker_TP0 pid=11) INFO x vllm-frontier spec_moe: {'calls': 1, 'tokens': 3}\n"
           "(Worker_TP1 pid=12) INFO x vllm-frontier spec_moe: {'calls': 1, 'tokens': 4}\n"
           "(Worker_TP0 pid=11) INFO x vllm-frontier spec_moe: {'calls': 2, 'tokens': 9}\n"
           "(APIServer pid=10) INFO unrelated line\n")
    assert counters_from_log(log) == {"11": {"calls": 2, "tokens": 9}, "12": {"calls": 1, "tokens": 4}}

