"""The prepared GPU check (benchmarks/gpu_check.py: kernels_gpu.py, fp4.py --gpu, the sm_80 path, the table) in
--dry-run mode: tiny shapes, Triton interpreter on CPU; timings meaningless, agreement and structure checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_agreeing_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget-s", "1500", "--out",
         str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True
    parts = doc["parts"]
    assert {p: r["returncode"] for p, r in parts.items()} == {"sm80_path": 0, "kernels": 0, "fp4": 0}
    data = parts["kernels"]["result"]
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
    sm80 = parts["sm80_path"]["result"]
    assert sm80["all_ok"] is True and {"mla_dense_fp8", "mla_sparse_fp8", "indexer_logits"} <= set(sm80)
    table = doc["table"]
    assert table["correct"] == {"kernels": True, "fp4": True, "sm80_path": True}
    values = table["values"]
    for key in ("copy_bandwidth_gbps", "dense_decode_bf16_gbps", "dense_decode_fraction_of_copy_bandwidth",
                "fp8_decode_speedup_vs_bf16", "sparse_decode_tflops"):
        assert isinstance(values[key], float) and values[key] > 0, key
    assert {f"{fmt}_N256_K256_M{m}" for fmt in ("nvfp4", "mxfp4") for m in (1, 16)} <= set(values["w4a16_speedup_vs_bf16"])
    # the decode-layout GEMM: agreement at M = 1, 3, 4, 16 and every swept config, then timed beside bf16
    fp4 = parts["fp4"]["result"]["sections"]
    for fmt in ("nvfp4", "mxfp4"):
        assert all(fp4["agreement"][f"decode_{fmt}_N256_K256_M{m}"]["ok"] for m in (1, 3, 4, 16))
        assert fp4["agreement"][f"decode_{fmt}_N256_K256_sweep_ok"] is True
    assert {f"{fmt}_N256_K256_M{m}" for fmt in ("nvfp4", "mxfp4") for m in (1, 16)} <= set(
        values["w4a16_decode_speedup_vs_bf16"])
    assert values["w4a16_decode_speedup_vs_bf16_M1_min"] > 0
    row = fp4["gemm_nvfp4_N256_K256"]["rows"][0]
    assert row["decode_default_gbps"] > 0 and 0 < row["decode_roofline_fraction_default"]
    assert set(table["met"]) == set(table["targets"])
