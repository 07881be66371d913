"""Resource monitor (Prometheus text -> LoadSample) and the live auto-ratio loop against fake instances."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from vllm_frontier.schedulers.auto_ratio import (
    AutoRatio, RatioGauges, controller_from_args, plan_role_changes, start_auto_ratio,
)
from vllm_frontier.schedulers.controller import ControllerConfig, RatioController
from vllm_frontier.schedulers.cost_model import GPU_OPT13B_A100 as GPU
from vllm_frontier.schedulers.instance_pool import InstancePool, Stage
from vllm_frontier.schedulers.monitor import delta, histogram_quantile, parse_metrics

LBL = 'engine="0",model_name="m"'


def vllm_text(running=0, waiting=0, kv=0.0, prompt=(), gen=(), ttft=()):
    """vLLM-style /metrics text with the given observations in the histograms."""
    lines = []
    for name, v in (("num_requests_running", running), ("num_requests_waiting", waiting),
                    ("kv_cache_usage_perc", kv)):
        lines += [f"# TYPE vllm:{name} gauge", f"vllm:{name}{{{LBL}}} {float(v)}"]
    for name, obs, bounds in (("request_prompt_tokens", prompt, (100, 500, 1000, 2000)),
                              ("request_generation_tokens", gen, (10, 100, 1000)),
                              ("time_to_first_token_seconds", ttft, (0.1, 0.5, 1.0, 5.0))):
        lines.append(f"# TYPE vllm:{name} histogram")
        for b in bounds:
            lines.append(f'vllm:{name}_bucket{{{LBL},le="{float(b)}"}} {float(sum(1 for x in obs if x <= b))}')
        lines.append(f'vllm:{name}_bucket{{{LBL},le="+Inf"}} {float(len(obs))}')
        lines.append(f"vllm:{name}_count{{{LBL}}} {float(len(obs))}")
        lines.append(f"vllm:{name}_sum{{{LBL}}} {float(sum(obs))}")
    return "\n".join(lines) + "\n"


def test_parse_delta_quantile():
    a = parse_metrics(vllm_text(running=3, waiting=1, kv=0.25, prompt=[50, 600], gen=[5], ttft=[0.05]))
    assert (a.running, a.waiting, a.kv_usage) == (3, 1, 0.25)
    assert a.hists["prompt_tokens"].count == 2 and a.hists["prompt_tokens"].total == 650
    b = parse_metrics(vllm_text(prompt=[50, 600, 1500, 1600], gen=[5, 50, 60], ttft=[0.05] + [0.7] * 9))
    d = delta(a, b)
    assert d.count("prompt_tokens") == 2 and d.mean("prompt_tokens") == pytest.approx(1550)
    assert d.mean("generation_tokens") == pytest.approx(55)
    # 9 new TTFT samples all in (0.5, 1.0]: P90 interpolates inside that bucket
    q = histogram_quantile(d.hists["ttft"], 0.9)
    assert 0.5 < q <= 1.0
    assert delta(None, b).count("prompt_tokens") == 0  # first scrape: nothing known since
    assert delta(b, a).count("prompt_tokens") == 2  # counters went down: restart, count from zero


class FakeInstance:
    def __init__(self):
        self.text = vllm_text()

    async def metrics(self, request):
        return web.Response(text=self.text)


async def _serve(fakes):
    runners, urls = [], []
    for f in fakes:
        app = web.Application()
        app.router.add_get("/metrics", f.metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
    return runners, urls


def _ctrl():
    return RatioController(ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.1, prefill=GPU.prefill,
                                            decode=GPU.decode, kv_capacity_tokens=GPU.kv_capacity_tokens,
                                            confirm=1))


def test_auto_ratio_moves_roles_on_a_mix_shift_and_exports_gauges():
    async def main():
        fakes = [FakeInstance() for _ in range(6)]
        runners, urls = await _serve(fakes)
        try:
            pool = InstancePool([(u, "prefill") for u in urls[:3]] + [(u, "decode") for u in urls[3:]])
            reg = CollectorRegistry()
            loop = AutoRatio(pool, _ctrl(), RatioGauges(reg), interval_s=2.0)
            held = pool.acquire(Stage.DECODE)  # a request in flight on a decode instance
            prompts, gens = [], []
            async with aiohttp.ClientSession() as session:
                await loop.tick(session)  # first scrape: baseline
                roles_seen = []
                for k in range(12):
                    heavy_prefill = k < 6
                    # 40 requests per 2 s window; router sees their prompt lengths
                    for _ in range(40):
                        p = 1500 if heavy_prefill else 100
                        pool.record_ttft(0.3, p)
                        pool.record_done(True)
                        prompts.append(p)
                        gens.append(40 if heavy_prefill else 600)
                    for f in fakes[3:]:
                        f.text = vllm_text(prompt=prompts, gen=gens)
                    d = await loop.tick(session)
                    snap = pool.snapshot()
                    n_p = sum(1 for i in snap.instances if i.role == "prefill")
                    roles_seen.append(n_p)
                    assert 1 <= n_p <= 5 and d.n_prefill + d.n_decode == 6
            # prefill-heavy first: more prefill instances; decode-heavy later: fewer
            assert max(roles_seen[:6]) > 3, roles_seen
            assert roles_seen[-1] < 3, roles_seen
            # the in-flight lease was never cancelled and still releases cleanly
            assert pool.inflight(held.url, Stage.DECODE) == 1
            pool.release(held.url, Stage.DECODE)
            assert pool.inflight(held.url) == 0
            assert reg.get_sample_value("frontier_pd_instances", {"role": "prefill"}) == roles_seen[-1]
            assert reg.get_sample_value("frontier_pd_role_changes_total") >= 2
            assert reg.get_sample_value("frontier_pd_prefill_fraction") == pytest.approx(roles_seen[-1] / 6)
        finally:
            for r in runners:
                await r.cleanup()
    asyncio.run(main())


def test_unreachable_instances_do_not_break_a_tick():
    async def main():
        pool = InstancePool([("http://127.0.0.1:9", "prefill"), ("http://127.0.0.1:9/x", "decode")])
        loop = AutoRatio(pool, _ctrl(), RatioGauges(CollectorRegistry()), interval_s=1.0)
        async with aiohttp.ClientSession() as session:
            d = await loop.tick(session)
        assert d.n_prefill == 1 and d.n_decode == 1
    asyncio.run(main())


def test_plan_role_changes_prefers_idle_instances():
    pool = InstancePool([("http://a:1", "prefill"), ("http://b:1", "decode"), ("http://c:1", "decode"),
                         ("http://d:1", "both")])
    pool.acquire(Stage.DECODE)  # one decode instance busy
    busy = next(i.url for i in pool.snapshot().instances if i.inflight_decode)
    moves = plan_role_changes(pool.snapshot(), 2)
    assert len(moves) == 1 and moves[0][1] == "prefill" and moves[0][0] != busy
    assert plan_role_changes(pool.snapshot(), 1) == []
    with pytest.raises(ValueError):
        plan_role_changes(pool.snapshot(), 4)  # the "both" instance is not managed


def test_start_auto_ratio_validates_and_starts():
    with pytest.raises(ValueError, match="slo-ttft"):
        controller_from_args(argparse.Namespace(slo_ttft=None, slo_tpot=100))
    with pytest.raises(ValueError, match="profile"):
        controller_from_args(argparse.Namespace(slo_ttft=1000, slo_tpot=100, ratio_profile="nope"))

    async def main():
        pool = InstancePool([("http://127.0.0.1:9", "prefill"), ("http://127.0.0.1:10", "decode")])
        reg = CollectorRegistry()
        task = start_auto_ratio(pool, argparse.Namespace(slo_ttft=1000, slo_tpot=100, auto_ratio_interval=0.05),
                                registry=reg)
        await asyncio.sleep(0.3)
        assert not task.done()
        assert reg.get_sample_value("frontier_pd_instances", {"role": "decode"}) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
