"""The P/D router's bookkeeping against fake instances with known timings (no engines).

What is checked: which instance served which stage (the pool's served / failed counts and its
per-stage leases, during and after a request), what a retry after a failed decode sends, and
TTFT / TPOT as the router measures them, against the delays the fake instances are told to take."""

import asyncio

import pytest
from aiohttp import web
from fake_instance import FakeInstance, metrics, run_router

from vllm_frontier.schedulers import router as R


def served(pool):
    return {i.url: (i.served_prefill, i.served_decode) for i in pool.snapshot().instances}


def no_leases(pool):
    return all(i.inflight_prefill == 0 and i.inflight_decode == 0 for i in pool.snapshot().instances)


def test_served_counts_the_stage_each_instance_ran():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        for _ in range(3):
            async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
        assert served(pool) == {P.url: (3, 0), D.url: (0, 3)}
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (3, 0) and no_leases(pool)

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_leases_are_counted_per_stage_while_a_request_runs():
    gate_p, gate_d = asyncio.Event(), asyncio.Event()

    async def fn(s, url, insts, pool, router):
        P, D = insts
        P.gate, D.gate = gate_p, gate_d
        req = asyncio.ensure_future(s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}))

        async def until(cond):
            for _ in range(500):
                if cond():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("condition never held")

        # sequential dispatch: while P computes, one prefill lease on P and nothing on D
        await until(lambda: P.seen)
        snap = {i.url: (i.inflight_prefill, i.inflight_decode) for i in pool.snapshot().instances}
        assert snap == {P.url: (1, 0), D.url: (0, 0)}
        assert f'frontier_router_inflight{{instance="{P.url}",stage="prefill"}} 1.0' in await metrics(s, url)
        gate_p.set()
        await until(lambda: D.seen)
        snap = {i.url: (i.inflight_prefill, i.inflight_decode) for i in pool.snapshot().instances}
        assert snap == {P.url: (0, 0), D.url: (0, 1)}
        gate_d.set()
        r = await req
        assert r.status == 200
        r.release()
        assert no_leases(pool)
        text = await metrics(s, url)
        assert f'frontier_router_inflight{{instance="{D.url}",stage="decode"}} 0.0' in text

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_retry_after_a_failed_decode_recomputes_the_prompt_elsewhere():
    """D1 answers 500 to the request that consumed P's KV; the retry on D2 must not ask for that
    KV again (the failed consumer may have pulled it, and P releases a transfer once it is sent):
    D2 computes the prompt. The failure is not counted as served anywhere."""
    async def fn(s, url, insts, pool, router):
        P, D1, D2 = insts
        # make D1 the one the first attempt gets: D2 holds a decode lease for a moment
        pool.acquire("decode", exclude=[D1.url])
        task = asyncio.ensure_future(s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
        for _ in range(500):
            if D1.seen:
                break
            await asyncio.sleep(0.01)
        pool.release(D2.url, "decode", ok=False)
        r = await task
        assert r.status == 200 and (await r.json())["choices"][0]["text"] == "GGG"
        (first,), (retry,) = D1.seen, D2.seen
        assert first["kv_transfer_params"]["frontier_pd"] == "consume"
        assert first["kv_transfer_params"]["remote_addr"] == "tcp://P:1"
        assert "kv_transfer_params" not in retry  # computed on D2, not pulled
        assert retry["prompt"] == "hi" and retry["max_tokens"] == 3
        assert served(pool) == {P.url: (1, 0), D1.url: (0, 0), D2.url: (0, 1)}
        assert not pool.get(D1.url).healthy and pool.get(D1.url).failures == 1
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (1, 0) and no_leases(pool)
        text = await metrics(s, url)
        assert 'frontier_router_retries_total{stage="decode"} 1.0' in text
        assert 'frontier_router_requests_total{endpoint="completions",outcome="ok"} 1.0' in text

    run_router([FakeInstance("P"), FakeInstance("B", status=500), FakeInstance("G")], ["prefill", "decode", "decode"], fn,
         "--dispatch", "sequential")


def test_no_retry_left_is_a_502_counted_as_failed():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 502
            assert "decode failed on" in (await r.json())["error"]["message"]
        assert len(D.seen) == 1  # --max-retries 0: one attempt
        assert served(pool) == {P.url: (1, 0), D.url: (0, 0)}
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (0, 1) and snap.ttft_s == () and no_leases(pool)
        assert 'frontier_router_requests_total{endpoint="completions",outcome="decode_failed"} 1.0' in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D", drop=True)], ["prefill", "decode"], fn, "--max-retries", "0")


def test_client_error_from_decode_is_passed_through_not_retried():
    async def fn(s, url, insts, pool, router):
        P, D1, D2 = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 400
        # a 4xx is the request's fault: no retry, the instance stays in rotation
        assert len(D1.seen) + len(D2.seen) == 1
        assert pool.get(D1.url).healthy and pool.get(D2.url).healthy
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (0, 1) and no_leases(pool)
        assert all(i.served_decode == 0 for i in snap.instances)
        assert 'frontier_router_requests_total{endpoint="completions",outcome="http_400"} 1.0' in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D", status=400), FakeInstance("E", status=400)], ["prefill", "decode", "decode"], fn)


def test_failed_prefill_is_not_served_and_the_decode_computes_the_prompt():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        assert "kv_transfer_params" not in D.seen[0]
        assert served(pool) == {P.url: (0, 0), D.url: (0, 1)}
        assert not pool.get(P.url).healthy  # 5xx: out of rotation
        assert pool.get(P.url).down_reason == f"prefill answered {P.status}"
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (1, 0) and no_leases(pool)

    for status in (500, 503):
        run_router([FakeInstance("P", status=status), FakeInstance("D")], ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_prefill_refusing_the_request_is_not_a_failed_instance():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        assert "kv_transfer_params" not in D.seen[0]  # no KV was produced: D computes the prompt
        assert pool.get(P.url).healthy and served(pool)[P.url] == (0, 0)

    run_router([FakeInstance("P", status=400), FakeInstance("D")], ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_prefill_connection_drop_is_recorded_with_its_cause():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        reason = pool.get(P.url).down_reason
        assert reason not in (None, "None", "") and "disconnect" in reason.lower(), reason

    run_router([FakeInstance("P", drop=True), FakeInstance("D")], ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_decode_timeout_takes_the_instance_out_with_the_error_type():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 502
        assert pool.get(D.url).down_reason == "TimeoutError"  # the exception has no message: its type

    run_router([FakeInstance("P"), FakeInstance("D", first_s=1.0)], ["prefill", "decode"], fn, "--request-timeout", "0.5",
         "--max-retries", "0")


def test_no_prefill_instance_is_a_503_counted_as_failed():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        pool.mark_down(P.url, "test")
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
            assert "prefill stage" in (await r.json())["error"]["message"]
        snap = pool.snapshot()
        assert (snap.completed, snap.failed) == (0, 1) and snap.waiting_prefill == 0
        assert 'frontier_router_requests_total{endpoint="completions",outcome="no_instance"} 1.0' in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_waiting_requests_are_counted_until_an_instance_comes_back():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        pool.mark_down(P.url, "test")
        req = asyncio.ensure_future(s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
        for _ in range(300):
            if pool.snapshot().waiting_prefill == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.snapshot().waiting_prefill == 1
        assert 'frontier_router_queue{stage="prefill"} 1.0' in await metrics(s, url)
        pool.mark_up(P.url)
        r = await req
        assert r.status == 200
        r.release()
        assert pool.snapshot().waiting_prefill == 0
        assert 'frontier_router_queue{stage="prefill"} 0.0' in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn, "--queue-timeout", "5")


# ---- TTFT and TPOT --------------------------------------------------------------------------
# asyncio.sleep never returns early, so each measured time is at least the delay it covers; the
# upper slack absorbs scheduling noise on a loaded 2-core machine.
PREFILL_S, FIRST_S, GAP_S, TOKENS = 0.30, 0.20, 0.10, 5
SLACK = 0.15


def test_streaming_ttft_is_the_first_token_and_tpot_the_mean_gap_after_it():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions",
                          json={"prompt": "hi", "max_tokens": TOKENS, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            body = await r.text()
        assert body.count("data: {") == TOKENS + 1  # and the usage chunk, which is no token
        snap = pool.snapshot()
        (ttft,), (tpot,) = snap.ttft_s, snap.tpot_s
        # sequential: P's answer, then D's first token
        assert PREFILL_S + FIRST_S <= ttft < PREFILL_S + FIRST_S + SLACK, ttft
        # (TOKENS - 1) gaps after the first token
        assert GAP_S <= tpot < GAP_S + SLACK / (TOKENS - 1), tpot
        # per-token SLO samples: the P90 / P99 of its 4 gaps (each >= GAP_S; the largest of them)
        (p90,), (p99,) = snap.tbt_p90_s, snap.tbt_p99_s
        assert GAP_S <= p90 == p99 < GAP_S + SLACK, (p90, p99)
        assert snap.prompt_tokens == (7,)
        text = await metrics(s, url)
        assert "frontier_router_ttft_seconds_count 1.0" in text
        assert "frontier_router_tpot_seconds_count 1.0" in text
        (e2e,) = [float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("frontier_router_e2e_seconds_sum")]
        assert PREFILL_S + FIRST_S + GAP_S * (TOKENS - 1) <= e2e < PREFILL_S + FIRST_S + GAP_S * (TOKENS - 1) + SLACK

    run_router([FakeInstance("P", prefill_s=PREFILL_S), FakeInstance("D", first_s=FIRST_S, gap_s=GAP_S, tokens=TOKENS)],
         ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_non_streaming_ttft_is_when_the_prefill_answered():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": TOKENS}) as r:
            assert r.status == 200
        snap = pool.snapshot()
        (ttft,), (tpot,) = snap.ttft_s, snap.tpot_s
        assert PREFILL_S <= ttft < PREFILL_S + SLACK, ttft  # not P + D
        decode_s = FIRST_S + GAP_S * (TOKENS - 1)
        assert decode_s / (TOKENS - 1) <= tpot < (decode_s + SLACK) / (TOKENS - 1), tpot
        assert snap.tbt_p90_s == () and snap.tbt_p99_s == ()  # no token arrival times without a stream

    run_router([FakeInstance("P", prefill_s=PREFILL_S), FakeInstance("D", first_s=FIRST_S, gap_s=GAP_S, tokens=TOKENS)],
         ["prefill", "decode"], fn, "--dispatch", "sequential")


def test_single_token_answer_has_a_ttft_and_no_tpot():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True}) as r:
            await r.text()
        snap = pool.snapshot()
        assert len(snap.ttft_s) == 1 and snap.tpot_s == () and snap.completed == 1
        assert "frontier_router_tpot_seconds_count 0.0" in await metrics(s, url)
        # two tokens: one gap, one TPOT sample
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as r:
            await r.text()
        snap = pool.snapshot()
        assert len(snap.ttft_s) == 2 and len(snap.tpot_s) == 1 and snap.completed == 2

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_failed_request_records_no_latency():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
            assert r.status == 502
        snap = pool.snapshot()
        assert snap.ttft_s == () and snap.tpot_s == () and snap.failed == 1
        assert "frontier_router_e2e_seconds_count 0.0" in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D", status=500)], ["prefill", "decode"], fn, "--max-retries", "0")


@pytest.mark.parametrize("argv,match", [
    (["--both", "http://a:1", "--max-retries", "-1"], "--max-retries must be >= 0"),
    (["--both", "http://a:1", "--queue-timeout", "-2"], "--queue-timeout must be >= 0"),
    (["--decode", "http://a:1"], "give at least one prefill-capable (--prefill/--both) and one decode-capable "
                                 "(--decode/--both) instance URL"),
    (["--prefill", "http://a:1"], "(--decode/--both) instance URL"),
    (["--both", "http://a:1", "--auto-ratio", "--slo-ttft", "100"], "--auto-ratio needs --slo-ttft MS and --slo-tpot MS"),
    (["--both", "http://a:1", "--request-timeout", "-1"], "--request-timeout must be >= 0"),
    (["--both", "http://a:1", "--health-interval", "-1"], "--health-interval must be >= 0"),
    (["--both", "http://a:1", "--dispatch", "parallel"], "invalid choice: 'parallel'"),
])
def test_cli_rejects_bad_values_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        R.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_cli_defaults():
    a = R.parse_args(["--both", "http://a:1"])
    assert (a.dispatch, a.max_retries, a.queue_timeout, a.request_timeout, a.health_interval, a.wire) == \
        ("sequential", 1, 30.0, 600.0, 5.0, None)
    assert (a.host, a.port, a.auto_ratio, a.slo_ttft, a.slo_tpot) == ("127.0.0.1", 8100, False, None, None)
    assert (a.prefill, a.decode, a.both) == ([], [], ["http://a:1"])
    a = R.parse_args(["--both", "http://a:1", "--dispatch", "concurrent", "--wire", "fp8", "--port", "9",
                      "--max-retries", "3", "--auto-ratio", "--slo-ttft", "500", "--slo-tpot", "50.5"])
    assert (a.dispatch, a.wire, a.port, a.max_retries, a.auto_ratio, a.slo_ttft, a.slo_tpot) == \
        ("concurrent", "fp8", 9, 3, True, 500.0, 50.5)
    pool = R.make_pool(R.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1", "--both", "http://b:1"]))
    assert [(u, pool.get(u).role.value) for u in pool.urls()] == \
        [("http://p:1", "prefill"), ("http://d:1", "decode"), ("http://b:1", "both")]


# ---- /health, /metrics, /v1/models and error bodies -------------------------------------------
def test_health_lists_every_instance_and_is_503_without_a_decode_instance():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        pool.acquire("prefill")
        async with s.get(url + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"ok": True, "instances": [
                {"url": P.url, "role": "prefill", "healthy": True, "inflight_prefill": 1, "inflight_decode": 0},
                {"url": D.url, "role": "decode", "healthy": True, "inflight_prefill": 0, "inflight_decode": 0}]}
        pool.mark_down(D.url, "test")
        async with s.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["ok"] is False
        pool.mark_up(D.url)
        pool.mark_down(P.url, "test")
        async with s.get(url + "/health") as r:
            assert r.status == 503

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_prometheus_reports_health_per_instance_and_sums_kv_bytes_of_healthy_ones():
    async def fn(s, url, insts, pool, router):
        P, D1, D2 = insts
        pool.mark_down(D1.url, "test")
        async with s.get(url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            assert "version=0.0.4" in r.headers["Content-Type"]
            text = await r.text()
        assert f'frontier_router_instance_up{{instance="{P.url}",role="prefill"}} 1.0' in text
        assert f'frontier_router_instance_up{{instance="{D1.url}",role="decode"}} 0.0' in text
        assert f'frontier_router_instance_up{{instance="{D2.url}",role="decode"}} 1.0' in text
        # P reports 10 + 5 (two engines), D2 reports 7; D1 is out of rotation and not scraped
        assert "frontier_router_kv_bytes_moved 22.0" in text

    lines = {"P": 'frontier_pd_recv_bytes_total{engine="0"} 10.0\nfrontier_pd_recv_bytes_total{engine="1"} 5\n',
             "D1": 'frontier_pd_recv_bytes_total{engine="0"} 1000.0\n',
             "D2": 'other_metric 3\nfrontier_pd_recv_bytes_total{engine="0"} 7.0\n'}

    run_router([FakeInstance(n, metrics_text=lines[n]) for n in ("P", "D1", "D2")], ["prefill", "decode", "decode"], fn)


def test_models_come_from_the_first_healthy_instance():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        pool.mark_down(P.url, "test")
        async with s.get(url + "/v1/models") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
            assert await r.json() == {"data": [{"id": "m"}]}
        pool.mark_down(D.url, "test")
        async with s.get(url + "/v1/models") as r:
            assert r.status == 503
            assert await r.json() == {"error": {"message": "no healthy instance", "type": "frontier_router_error",
                                                "code": 503}}

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_models_skips_an_instance_that_refuses_connections():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        await P.stop()  # still marked healthy: the router has not noticed yet
        async with s.get(url + "/v1/models") as r:
            assert r.status == 200 and await r.json() == {"data": [{"id": "m"}]}
        P.runner = web.AppRunner(web.Application())  # stop() again at the end is harmless
        await P.runner.setup()

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_error_bodies_are_openai_shaped():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", data=b"[1, 2]") as r:
            assert r.status == 400
            assert await r.json() == {"error": {"message": "invalid JSON body: body must be a JSON object",
                                                "type": "frontier_router_error", "code": 400}}
        assert 'frontier_router_requests_total{endpoint="completions",outcome="bad_request"} 1.0' in await metrics(s, url)

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_probe_learns_the_model_and_kv_address_and_marks_health():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        assert pool.get(P.url).kv_addr == "tcp://P:1" and pool.get(D.url).kv_addr == "tcp://D:1"
        assert router._models == {P.url: "m", D.url: "m"}
        await D.stop()
        assert await router._probe(D.url) is False
        inst = pool.get(D.url)
        assert not inst.healthy and inst.failures == 1 and inst.down_reason
        D.runner = web.AppRunner(web.Application())
        await D.runner.setup()

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_probe_marks_down_an_instance_without_a_kv_listener_or_health():
    class NoKV(FakeInstance):
        def hello_answer(self):
            return {"choices": [{"text": "x"}]}

    async def fn(s, url, insts, pool, router):
        P, D = insts
        inst = pool.get(D.url)
        assert not inst.healthy and "did not report a KV listener" in inst.down_reason
        assert "FRONTIER_PD=1" in inst.down_reason
        assert pool.get(P.url).healthy

    run_router([FakeInstance("P"), NoKV("D")], ["prefill", "decode"], fn)


def test_prefill_request_is_one_token_and_carries_the_wire_choice():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        body = {"prompt": "hi", "max_tokens": 3, "max_completion_tokens": 3, "stream": True, "n": 2,
                "stream_options": {"include_usage": True}}
        async with s.post(url + "/v1/completions", json=body) as r:
            await r.text()
        (pb,), (db,) = P.seen, D.seen
        assert (pb["stream"], pb["n"], pb["max_tokens"], pb["max_completion_tokens"]) == (False, 1, 1, 1)
        assert "stream_options" not in pb and pb["model"] == "m"
        kp = pb["kv_transfer_params"]
        assert kp == {"frontier_pd": "produce", "transfer_id": kp["transfer_id"], "wire": "fp8"}
        assert len(kp["transfer_id"]) == 32
        # the decode request is the client's, plus the consume parameters
        assert db["stream"] is True and db["n"] == 2 and db["max_tokens"] == 3
        assert db["stream_options"] == {"include_usage": True}
        assert db["kv_transfer_params"] == {"frontier_pd": "consume", "transfer_id": kp["transfer_id"],
                                            "remote_addr": "tcp://P:1", "do_remote_prefill": True}

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn, "--wire", "fp8")


def test_without_wire_choice_the_prefill_keeps_its_own():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "model": "x"}) as r:
            assert r.status == 200
        assert "wire" not in P.seen[0]["kv_transfer_params"] and "max_completion_tokens" not in P.seen[0]
        assert P.seen[0]["model"] == "x" and D.seen[0]["model"] == "x"  # the client's model name is kept

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_main_reports_a_bad_instance_url_in_one_line(capsys, monkeypatch):
    assert R.main(["--both", "ftp://h:1"]) == 2
    err = capsys.readouterr().err
    assert err == "vllm-frontier router: error: instance URL must start with http:// or https://, got 'ftp://h:1'\n"
    monkeypatch.setattr("sys.argv", ["vllm-frontier-router", "--both", "ftp://h:2"])
    assert R.main() == 2  # the command line by default
    assert "got 'ftp://h:2'" in capsys.readouterr().err


def test_models_passes_the_instance_status_through():
    class Locked(FakeInstance):
        """Serves its model name once (the router's probe), then refuses."""
        calls = 0

        async def models(self, request):
            self.calls += 1
            if self.calls == 1:
                return await super().models(request)
            return web.json_response({"error": "no"}, status=401)

    async def fn(s, url, insts, pool, router):
        async with s.get(url + "/v1/models") as r:
            assert r.status == 401 and await r.json() == {"error": "no"}

    run_router([Locked("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_chat_requests_are_routed_and_counted_as_chat():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        assert P.seen[0]["messages"] == body["messages"] and D.seen[0]["messages"] == body["messages"]
        async with s.post(url + "/v1/chat/completions", data=b"nope") as r:
            assert r.status == 400
        text = await metrics(s, url)
        assert 'frontier_router_requests_total{endpoint="chat",outcome="ok"} 1.0' in text
        assert 'frontier_router_requests_total{endpoint="chat",outcome="bad_request"} 1.0' in text

    run_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)
