"""The GPU benchmark script itself, run in --smoke mode (tiny shapes; Triton interpreter on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_gpu_smoke_writes_agreeing_json(tmp_path):
    out = tmp_path / "kernels_smoke.json"
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"device", "torch", "triton", "vllm"} <= set(data["header"])
    sections = data["sections"]
    expected = {"correctness", "copy_bandwidth", "dense_decode_bf16", "dense_decode_fp8", "sparse_decode_bf16",
                "sparse_decode_fp8", "sparse_prefill_bf16", "indexer_decode", "indexer_prefill"}
    assert expected <= set(sections)
    bad = {k: v.get("error") for k, v in sections.items() if v.get("status") != "ok"}
    assert not bad, bad
    assert sections["correctness"]["all_ok"] is True
    for name in ("dense_decode_bf16", "dense_decode_fp8", "sparse_decode_bf16"):
        best = sections[name]["triton_best"]
        assert best is not None and best["agree"]["ok"] and best["ms_median"] > 0
