"""Router paths the other router tests do not reach: what the instance probe sends and learns, the
health loop, mid-stream decode failures, streaming headers, the process entry point (no engines)."""

import asyncio
import json

import pytest
from aiohttp import web
from fake_instance import FakeInstance, metrics, run_router

from vllm_frontier.pd_protocol import hello_params
from vllm_frontier.schedulers import router as R

NO_KV_REASON = ("it did not report a KV listener; start it with FRONTIER_PD=1 and "
                "--kv-transfer-config '{\"kv_connector\":\"FrontierPDConnector\",...}'")


async def until(cond, seconds=3.0):
    for _ in range(int(seconds / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


class Switchable(FakeInstance):
    """Health and KV listener can be switched off and on."""
    sick = False
    reports_kv = True

    async def health(self, request):
        return web.json_response({}, status=503 if self.sick else 200)

    def hello_answer(self):
        return super().hello_answer() if self.reports_kv else {"choices": [{"text": "x"}]}


# ---- the probe -------------------------------------------------------------------------------
def test_probe_sends_a_one_token_hello_and_relearns_only_a_missing_kv_address():
    D = Switchable("D")
    D.reports_kv = False

    async def fn(s, url, insts, pool, router):
        P, D = insts
        assert not pool.get(D.url).healthy and pool.get(D.url).down_reason == NO_KV_REASON
        (hello,) = D.hellos
        assert set(hello) == {"model", "prompt", "max_tokens", "kv_transfer_params"}
        assert hello["model"] == "m" and hello["max_tokens"] == 1 and hello["prompt"]
        assert hello["kv_transfer_params"] == hello_params()
        D.reports_kv = True
        # the model name is known but the KV address is not: the probe asks again
        assert await router._probe(D.url) is True
        assert pool.get(D.url).healthy and pool.get(D.url).kv_addr == "tcp://D:1" and len(D.hellos) == 2
        # both known: a probe is a health check only
        assert await router._probe(D.url) is True
        assert await router._probe(P.url) is True
        assert len(D.hellos) == 2 and len(P.hellos) == 1

    run_router([FakeInstance("P"), D], ["prefill", "decode"], fn)


class BadModels(FakeInstance):
    async def models(self, request):
        return web.json_response({"data": "m"})  # not a list of models


class BadHello(FakeInstance):
    def hello_answer(self):
        return [1]  # not an object


@pytest.mark.parametrize("bad", [BadModels, BadHello])
def test_malformed_probe_answer_takes_the_instance_out_instead_of_crashing(bad):
    """An instance answering the probe with JSON of the wrong shape is out of rotation; the router
    starts and answers 503 for want of a decode instance (it used to fail to start)."""
    async def fn(s, url, insts, pool, router):
        P, D = insts
        assert pool.get(P.url).healthy
        assert not pool.get(D.url).healthy and pool.get(D.url).down_reason
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
        return router

    router = run_router([FakeInstance("P"), bad("D")], ["prefill", "decode"], fn)
    assert router.session.closed  # the router's client session is closed with the app


def test_health_loop_puts_a_recovered_instance_back_with_its_kv_address():
    D = Switchable("D")
    D.sick = True

    async def fn(s, url, insts, pool, router):
        P, D = insts
        inst = pool.get(D.url)
        assert not inst.healthy and inst.down_reason == "/health answered 503" and inst.kv_addr is None
        D.sick = False
        await until(lambda: pool.get(D.url).healthy)  # the loop probes every 0.1 s
        assert pool.get(D.url).kv_addr == "tcp://D:1"
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "DD"

    run_router([FakeInstance("P"), D], ["prefill", "decode"], fn, "--health-interval", "0.1")


# ---- decode failures and counting ---------------------------------------------------------------
def test_no_decode_instance_is_one_no_instance_request():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        pool.mark_down(D.url, "test")
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == 503
        assert 'frontier_router_requests_total{endpoint="completions",outcome="no_instance"} 1.0' \
            in await metrics(s, url)
        assert pool.snapshot().failed == 1

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_decode_failure_mid_stream_ends_the_stream_with_an_error_event():
    async def fn(s, url, insts, pool, router):
        P, D, E = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True}) as r:
            assert r.status == 200
            body = await r.text()
        events = [ln[len("data: "):] for ln in body.splitlines() if ln.startswith("data: ")]
        assert events[:2] == ['{"choices": [{"text": "t0"}]}', '{"choices": [{"text": "t1"}]}']
        (err,) = [json.loads(e) for e in events[2:]]
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "code"}
        assert err["error"]["message"].startswith("decode instance failed mid-stream: ")
        assert (err["error"]["type"], err["error"]["code"]) == ("frontier_router_error", 502)
        # tokens already went out: no retry elsewhere, the instance leaves the rotation
        assert len(D.seen) + len(E.seen) == 1
        failed = D if D.seen else E
        assert not pool.get(failed.url).healthy
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (0, 1)
        assert 'frontier_router_requests_total{endpoint="completions",outcome="failed_mid_stream"} 1.0' \
            in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D", drop_after=2), FakeInstance("E", drop_after=2)],
               ["prefill", "decode", "decode"], fn)


def test_stream_headers_come_from_the_decode_and_the_decode_is_served():
    class Utf8(FakeInstance):
        content_type = "text/event-stream; charset=utf-8"

    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-cache"
            await r.text()
        assert {i.url: (i.served_prefill, i.served_decode) for i in pool.snapshot().instances} == \
            {P.url: (1, 0), D.url: (0, 1)}

    run_router([FakeInstance("P"), Utf8("D")], ["prefill", "decode"], fn)


def test_decode_error_reason_keeps_the_first_200_characters_of_its_answer():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 502
        answer = json.dumps({"error": {"message": "e" * 300}})  # what the fake sends
        inst = pool.get(D.url)
        assert not inst.healthy and inst.down_reason == "decode answered 500: " + answer[:200]

    run_router([FakeInstance("P"), FakeInstance("D", status=500, error_text="e" * 300)],
               ["prefill", "decode"], fn, "--max-retries", "0")


def test_client_kv_params_are_dropped_when_there_is_no_kv_to_pull():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        body = {"prompt": "hi", "max_tokens": 2,
                "kv_transfer_params": {"frontier_pd": "consume", "remote_addr": "tcp://elsewhere:1"}}
        async with s.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
        assert "kv_transfer_params" not in D.seen[0]

    run_router([FakeInstance("P", status=500), FakeInstance("D")], ["prefill", "decode"], fn)


def test_decode_answer_that_is_not_json_is_an_error_outcome():
    class Garbled(FakeInstance):
        async def complete(self, request):
            body = await request.json()
            if (body.get("kv_transfer_params") or {}).get("frontier_pd") == "hello":
                return await super().complete(request)
            return web.Response(text="not json")

    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            await r.read()
        assert 'frontier_router_requests_total{endpoint="completions",outcome="error"} 1.0' in await metrics(s, url)
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (0, 1) and snap.ttft_s == ()

    run_router([FakeInstance("P"), Garbled("D")], ["prefill", "decode"], fn)


def test_request_bodies_above_a_mebibyte_are_accepted():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        prompt = "x" * (2 << 20)  # aiohttp's default limit is 1 MiB; long prompts are normal
        async with s.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r:
            assert r.status == 200
        assert D.seen[0]["prompt"] == prompt

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


# ---- the command ----------------------------------------------------------------------------
def test_help_names_the_command_and_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as e:
        R.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: vllm-frontier router ")
    assert ("P/D router: an OpenAI-compatible front that sends each request through a prefill and a "
            "decode instance") in " ".join(out.split())


def _router_of(app):
    (router,) = {h.__self__ for h in app.on_startup if isinstance(getattr(h, "__self__", None), R.Router)}
    return router


def test_main_serves_the_router_app_on_the_given_address(monkeypatch):
    served = []

    def run_app(app, **kw):
        served.append((app, kw))

    monkeypatch.setattr(R.web, "run_app", run_app)
    assert R.main(["--both", "http://127.0.0.1:9", "--host", "0.0.0.0", "--port", "8123"]) == 0
    ((app, kw),) = served
    assert kw == {"host": "0.0.0.0", "port": 8123, "print": None}  # no aiohttp banner on stdout
    router = _router_of(app)
    assert router.pool.urls() == ["http://127.0.0.1:9"] and router.args.port == 8123
    assert app.on_startup[-1] == router.start  # no controller without --auto-ratio


def test_main_with_auto_ratio_starts_the_controller_on_the_router_pool(monkeypatch):
    served, started = [], []
    monkeypatch.setattr(R.web, "run_app", lambda app, **kw: served.append(app))
    monkeypatch.setattr("vllm_frontier.schedulers.auto_ratio.start_auto_ratio",
                        lambda pool, args, registry=None: started.append((pool, args, registry)))
    assert R.main(["--both", "http://127.0.0.1:9", "--auto-ratio", "--slo-ttft", "100", "--slo-tpot", "20"]) == 0
    (app,) = served
    router = _router_of(app)
    assert app.on_startup[-1] != router.start
    asyncio.run(app.on_startup[-1](app))
    ((pool, args, registry),) = started
    assert pool is router.pool and registry is router.metrics.registry
    assert (args.slo_ttft, args.slo_tpot, args.auto_ratio) == (100.0, 20.0, True)


def test_wire_accepts_its_two_encodings_only(capsys):
    assert R.parse_args(["--both", "http://a:1", "--wire", "raw"]).wire == "raw"
    assert R.parse_args(["--both", "http://a:1", "--wire", "fp8"]).wire == "fp8"
    with pytest.raises(SystemExit):
        R.parse_args(["--both", "http://a:1", "--wire", "zstd"])
    assert "invalid choice: 'zstd'" in capsys.readouterr().err


def test_auto_ratio_without_slos_is_one_error_line(capsys):
    with pytest.raises(SystemExit):
        R.parse_args(["--both", "http://a:1", "--auto-ratio", "--slo-tpot", "20"])
    assert capsys.readouterr().err.splitlines()[-1] == \
        "vllm-frontier router: error: --auto-ratio needs --slo-ttft MS and --slo-tpot MS"


def test_decode_move_pressure_flag_reaches_the_controller(capsys):
    from vllm_frontier.schedulers.auto_ratio import controller_from_args

    base = ["--both", "http://a:1", "--auto-ratio", "--slo-ttft", "100", "--slo-tpot", "20"]
    default = controller_from_args(R.parse_args(base)).config.decode_move_pressure
    assert default == 0.9
    assert controller_from_args(R.parse_args(base + ["--decode-move-pressure", "1.5"])).config.decode_move_pressure \
        == 1.5
    assert controller_from_args(R.parse_args(base + ["--decode-move-pressure", "off"])).config.decode_move_pressure \
        is None
    for bad in ("-1", "lots", "inf"):
        with pytest.raises(SystemExit):
            R.parse_args(base + ["--decode-move-pressure", bad])
        assert capsys.readouterr().err.splitlines()[-1].startswith(
            "vllm-frontier router: error: --decode-move-pressure takes a number >= 0 or 'off'")
