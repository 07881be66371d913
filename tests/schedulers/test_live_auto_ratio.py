"""Live ratio control on real vLLM CPU engines: 3 `kv_both` instances behind `vllm-frontier router
--auto-ratio`; a workload whose mix shifts from prefill-heavy to decode-heavy must make the router
re-role instances both ways (router log; ``/health`` roles; ``frontier_pd_instances`` on ``/metrics``),
with every request answered in full. Heavy: three engines plus the router on the test machine."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving import RouterProcess, VllmServer, free_port

pytestmark = pytest.mark.slow

KV_CONFIG = json.dumps({"kv_connector": "FrontierPDConnector", "kv_role": "kv_both",
                        "kv_load_failure_policy": "recompute"})
PD_ENV = {"FRONTIER_PD": "1", "FRONTIER_PD_SECRET": "auto-ratio-test", "VLLM_CPU_KVCACHE_SPACE": "1"}
ENGINE_ARGS = ["--dtype", "float32", "--kv-transfer-config", KV_CONFIG, "--max-num-seqs", "16",
               "--enforce-eager"]
VOCAB = ["def", "return", "value", "for", "in", "range", "self", "print", "class", "import",
         "if", "else", "while", "yield", "lambda", "None", "True", "data", "list", "dict"]


def words(n: int, seed: int) -> str:
    return " ".join(VOCAB[(i * 7 + seed * 3 + i // 5) % len(VOCAB)] for i in range(n))


def RouterProc(args: list[str]) -> RouterProcess:
    """The auto-ratio router: health checks every 2 s, up to 3 minutes to start on a loaded machine."""
    return RouterProcess(args, health_interval=2, startup_timeout=180, stop_timeout=30,
                         log_prefix="router-auto-ratio-")


@pytest.fixture(scope="module")
def cluster(tiny_models):
    model = tiny_models("deepseek_v3")
    srvs = [VllmServer(model, args=ENGINE_ARGS, env={**PD_ENV, "FRONTIER_PD_PORT": str(free_port())},
                       startup_timeout=900) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as ex:
            errs = [f.exception() for f in [ex.submit(s.start) for s in srvs]]
        if any(errs):
            raise next(e for e in errs if e)
        # The test's load on 2 CPU cores keeps the split's pressure far below the default threshold for
        # prefill -> decode moves (0.9); with it off, the controller moves whenever the pressure improves, so
        # both directions of live re-roling are exercised. The threshold itself: test_controller_model.py.
        router = RouterProc(["--prefill", srvs[0].url, "--decode", srvs[1].url, srvs[2].url,
                             "--auto-ratio", "--slo-ttft", "5000", "--slo-tpot", "500",
                             "--decode-move-pressure", "off"])
        try:
            yield srvs, router
        finally:
            router.stop()
    finally:
        for s in srvs:
            s.stop()


def _drive(router: RouterProc, phase: str, seconds: float, clients: int, results: list, stop_when=None):
    """Closed-loop clients for `seconds`; each result is (status, completion_tokens, max_tokens)."""
    name = requests.get(router.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int) -> None:
        k = 0
        while time.monotonic() < deadline and not (stop_when and stop_when()):
            if phase == "prefill-heavy":
                prompt, max_tokens = words(300, seed=c * 1000 + k), 2  # ~700 tokens (max-model-len 1024)
            else:
                prompt, max_tokens = words(6, seed=c * 1000 + k), 96
            body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True}
            try:
                r = requests.post(router.url + "/v1/completions", json=body, timeout=600)
                got = r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None
                res = (r.status_code, got, max_tokens)
            except requests.RequestException as e:
                res = (None, str(e), max_tokens)
            with lock:
                results.append(res)
            if res[0] != 200:
                return  # the test fails on it; do not hammer the router with a broken request
            k += 1

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))


def test_mix_shift_changes_the_ratio_and_loses_nothing(cluster):
    srvs, router = cluster
    results: list = []
    n_prefill = lambda: sum(1 for r in router.roles().values() if r == "prefill")  # noqa: E731
    assert n_prefill() == 1
    # Prefill-heavy: long prompts, 2 output tokens. The controller must give prefill a second instance.
    _drive(router, "prefill-heavy", 150, 4, results, stop_when=lambda: n_prefill() >= 2)
    after_a = n_prefill()
    log_a = router.log()
    metrics_a = requests.get(router.url + "/metrics", timeout=30).text
    # Decode-heavy: short prompts, 96 output tokens. Back to one prefill instance.
    _drive(router, "decode-heavy", 240, 4, results, stop_when=lambda: n_prefill() <= 1)
    _drive(router, "decode-heavy", 10, 4, results)  # traffic right after the change still flows
    after_b = n_prefill()
    log_b = router.log()
    metrics_b = requests.get(router.url + "/metrics", timeout=30).text
    print(re.findall(r"^.*auto-ratio.*$", log_b, re.M))

    assert after_a == 2, log_a[-4000:]
    assert re.search(r"auto-ratio: \S+ decode -> prefill", log_a), log_a[-4000:]
    assert after_b == 1, log_b[-4000:]
    assert re.search(r"auto-ratio: \S+ prefill -> decode", log_b), log_b[-4000:]
    # Nothing lost: every request answered 200 with all its tokens, and the router counted them as ok.
    bad = [r for r in results if r[0] != 200 or r[1] != r[2]]
    assert results and not bad, (len(results), bad[:5])
    ok = sum(float(v) for v in re.findall(r'^frontier_router_requests_total\{[^}]*outcome="ok"[^}]*\} (\S+)$',
                                          metrics_b, re.M))
    assert ok >= len(results), (ok, len(results))
    # The split on the router's /metrics.
    assert re.search(r'^frontier_pd_instances\{role="prefill"\} 2\.0$', metrics_a, re.M), metrics_a[-3000:]
    assert re.search(r'^frontier_pd_instances\{role="decode"\} 2\.0$', metrics_b, re.M), metrics_b[-3000:]
    assert re.search(r"^frontier_pd_role_changes_total [2-9]", metrics_b, re.M), metrics_b[-3000:]
