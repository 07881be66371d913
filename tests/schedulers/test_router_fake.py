"""Router behaviour against fake OpenAI instances (no engines): routing, retries, errors, metrics."""

import pytest
from fake_instance import FakeInstance, run_router

from vllm_frontier.schedulers import router as R


def _with_router(instances, roles, fn, dispatch="concurrent"):
    # a short health interval: the health loop runs during these tests
    return run_router(instances, roles, fn, "--health-interval", "0.2", "--dispatch", dispatch)


def test_request_goes_through_prefill_then_decode():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["text"] == "D" * 4
        (pb,), (db,) = P.seen, D.seen
        assert pb["max_tokens"] == 1 and pb["kv_transfer_params"]["frontier_pd"] == "produce"
        kp = db["kv_transfer_params"]
        assert kp["frontier_pd"] == "consume" and kp["remote_addr"] == "tcp://P:1"
        assert kp["transfer_id"] == pb["kv_transfer_params"]["transfer_id"]
        assert db["max_tokens"] == 5 and db["model"] == "m"
        snap = pool.snapshot()
        assert snap.completed == 1 and len(snap.ttft_s) == 1 and len(snap.tpot_s) == 1
        assert snap.prompt_tokens == (7,)  # from the prefill answer
        assert all(i.inflight_prefill == 0 and i.inflight_decode == 0 for i in snap.instances)
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        assert 'frontier_router_requests_total{endpoint="completions",outcome="ok"} 1.0' in text
        assert "frontier_router_ttft_seconds_count 1.0" in text
        assert "frontier_router_kv_bytes_moved 2000.0" in text  # P and D each report 1000

    _with_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_streaming_passthrough_counts_tokens():
    async def fn(s, url, insts, pool, router):
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}) as r:
            body = await r.text()
        assert body.count("data: {") == 3 and body.rstrip().endswith("data: [DONE]")
        snap = pool.snapshot()
        assert len(snap.tpot_s) == 1 and snap.tpot_s[0] > 0.005  # fake sleeps 10 ms between tokens

    _with_router([FakeInstance("P"), FakeInstance("D", gap_s=0.01)], ["prefill", "decode"], fn)


def test_dead_decode_is_retried_elsewhere_and_leaves_rotation():
    async def fn(s, url, insts, pool, router):
        P, D1, D2 = insts
        for _ in range(3):
            async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == "GG"
        assert len(D1.seen) == 1  # tried once, then out of rotation
        # the request D1 failed was retried on D2 without the remote KV (the prompt is computed there);
        # every other request consumed P's KV on D2
        (failed,) = D1.seen
        assert failed["kv_transfer_params"]["frontier_pd"] == "consume"
        retried = [b for b in D2.seen if "kv_transfer_params" not in b]
        consumed = [b for b in D2.seen if b.get("kv_transfer_params", {}).get("frontier_pd") == "consume"]
        assert len(retried) == 1 and len(consumed) == 2 and len(D2.seen) == 3
        assert not pool.get(D1.url).healthy
        async with s.get(url + "/health") as r:
            h = await r.json()
        assert h["ok"] and [i["healthy"] for i in h["instances"]] == [True, False, True]

    _with_router([FakeInstance("P"), FakeInstance("B", drop=True), FakeInstance("G")],
                             ["prefill", "decode", "decode"], fn)


def test_no_decode_instance_is_a_clear_503():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        await D.stop()  # the only decode instance dies
        async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
            assert "no healthy instance accepts the decode stage" in (await r.json())["error"]["message"]
        async with s.post(url + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
        assert pool.snapshot().instances[0].inflight_prefill == 0  # nothing leaked

    _with_router([FakeInstance("P"), FakeInstance("D")], ["prefill", "decode"], fn)


def test_set_role_moves_traffic():
    async def fn(s, url, insts, pool, router):
        A, B = insts
        pool.set_role(B.url, "prefill")
        pool.set_role(A.url, "decode")
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert (await r.json())["choices"][0]["text"] == "AA"
        assert B.seen[0]["kv_transfer_params"]["frontier_pd"] == "produce"

    _with_router([FakeInstance("A"), FakeInstance("B")], ["prefill", "decode"], fn)


def test_cli_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        R.parse_args(["--prefill", "http://a:1"])
    with pytest.raises(SystemExit):
        R.parse_args(["--both", "http://a:1", "--auto-ratio"])
    err = capsys.readouterr().err
    assert "--auto-ratio" in err


def test_sequential_dispatch_with_dead_prefill_computes_on_decode():
    async def fn(s, url, insts, pool, router):
        P, D = insts
        async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "DD"
        assert "kv_transfer_params" not in D.seen[0]  # no KV to pull: the prompt is computed on D
        assert len(P.seen) == 1

    _with_router([FakeInstance("P", drop=True), FakeInstance("D")],
                             ["prefill", "decode"], fn, dispatch="sequential")
