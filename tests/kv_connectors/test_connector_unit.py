"""FrontierPDConnector without an engine: scheduler bookkeeping and the worker data path
(stage layer by layer on one worker, pull into another worker's paged cache)."""

import socket
import time
from types import SimpleNamespace

import pytest
import torch

from vllm.config.kv_transfer import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from vllm_frontier.kv_connectors import nixl_plane
from vllm_frontier.kv_connectors.connector import FrontierPDConnector, FrontierPDMetadata, LoadSpec, SaveSpec

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn", "model.layers.0.indexer.k_cache"]
NB, BS = 12, 16


def _indexer_cache_layer():
    """A vLLM indexer K-cache layer (the connector recognises its type), without building its parameters."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV32IndexerCache

    return DeepseekV32IndexerCache.__new__(DeepseekV32IndexerCache)


# vLLM's static forward context: layer name -> module
FORWARD_CONTEXT = {LAYERS[0]: object(), LAYERS[1]: object(), LAYERS[2]: _indexer_cache_layer()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(role, port, secret="k", wire="raw", transport="zmq"):
    ktc = KVTransferConfig(kv_connector="FrontierPDConnector", kv_role="kv_both",
                           kv_connector_extra_config={"secret": secret, "port": port, "wire": wire,
                                                      "idle_timeout_s": 5, "timeout_s": 10,
                                                      "transport": transport})
    cfg = SimpleNamespace(kv_transfer_config=ktc, parallel_config=SimpleNamespace(pipeline_parallel_size=1, rank=0),
                          compilation_config=SimpleNamespace(static_forward_context=FORWARD_CONTEXT))
    kcc = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=LAYERS)], num_blocks=NB)
    return FrontierPDConnector(cfg, role, kcc)


def caches(seed):
    g = torch.Generator().manual_seed(seed)
    return {LAYERS[0]: torch.randn(NB, 1, BS, 576, generator=g),
            LAYERS[1]: torch.randn(NB, BS, 576, generator=g),
            LAYERS[2]: torch.randint(0, 255, (NB, 1, BS, 132), dtype=torch.uint8, generator=g)}  # as vLLM CPU has it


def rows(cache, blocks, n):
    """Token rows 0..n-1 of a request; for the block-layout indexer cache, the whole blocks covering them
    (a block holds all its tokens' FP8 values, then all their scales)."""
    if cache.dtype == torch.uint8:
        return cache[torch.tensor(blocks[: -(-n // BS)])]
    flat = cache.reshape(NB * BS, -1)
    pos = torch.arange(n)
    return flat[torch.tensor(blocks)[pos // BS] * BS + pos % BS]


def step(conn, meta, attn_layers=LAYERS[:2]):
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    for name in attn_layers:  # what the attention wrapper reports; the indexer cache is not
        conn.save_kv_layer(name, None, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()


def wait_results(conn, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = conn.get_transfer_results(set())
        if r.finished_recving:
            return r
        time.sleep(0.05)
    raise AssertionError("no transfer result")


@pytest.fixture(params=["zmq", "nixl"])
def pair(request):
    """Two worker-side connectors (prefill, decode) over each transport."""
    if request.param == "nixl" and (why := nixl_plane.import_error()):
        pytest.skip(f"NIXL cannot be imported here: {why}")
    pp, dp = _free_port(), _free_port()
    P, D = (make(KVConnectorRole.WORKER, p, transport=request.param) for p in (pp, dp))
    pc, dc = caches(1), caches(2)
    P.register_kv_caches(pc)
    D.register_kv_caches(dc)
    yield P, D, pc, dc, f"tcp://127.0.0.1:{pp}"
    P.shutdown()
    D.shutdown()


def test_chunked_prefill_then_pull_is_exact(pair):
    P, D, pc, dc, addr = pair
    n, pblocks, dblocks = 40, [7, 2, 9], [4, 11, 0]
    # prefill in two chunks (24 + 16 tokens), as chunked prefill schedules it
    step(P, FrontierPDMetadata(saves=[SaveSpec("t", ([7, 2],), 0, 24, n, True, "raw")]))
    step(P, FrontierPDMetadata(saves=[SaveSpec("t", (pblocks,), 24, 40, n, False, "raw")]))
    step(D, FrontierPDMetadata(loads=[LoadSpec("r1", "t", addr, (dblocks,), 0, n)]))
    res = wait_results(D)
    assert res.finished_recving == {"r1"} and not res.failed_recving
    for name in LAYERS:
        assert torch.equal(rows(dc[name], dblocks, n), rows(pc[name], pblocks, n)), name
    # rows outside the request's blocks are untouched
    assert torch.equal(dc[LAYERS[0]][1], caches(2)[LAYERS[0]][1])


def test_partial_local_hit_writes_only_missing_rows(pair):
    P, D, pc, dc, addr = pair
    n, pblocks, dblocks = 20, [3, 5], [6, 8]
    step(P, FrontierPDMetadata(saves=[SaveSpec("t2", (pblocks,), 0, n, n, True, "raw")]))
    original = rows(dc[LAYERS[1]], dblocks, n).clone()
    step(D, FrontierPDMetadata(loads=[LoadSpec("r2", "t2", addr, (dblocks,), 16, n)]))
    assert not wait_results(D).failed_recving
    got = rows(dc[LAYERS[1]], dblocks, n)
    assert torch.equal(got[:16], original[:16])  # the locally cached prefix stays
    assert torch.equal(got[16:], rows(pc[LAYERS[1]], pblocks, n)[16:])
    # the indexer cache moves whole blocks: the local block stays, the pulled one is the prefill's
    assert torch.equal(dc[LAYERS[2]][6], caches(2)[LAYERS[2]][6])
    assert torch.equal(dc[LAYERS[2]][8], pc[LAYERS[2]][5])


def test_indexer_cache_moves_whole_blocks_for_a_partial_last_block(pair):
    """Tokens 0..20 of a block-layout cache are block 0 and all of block 1 (its scales sit at the block's
    end): row-wise copying of the first 4 rows of block 1 would leave the scales behind."""
    P, D, pc, dc, addr = pair
    n, pblocks, dblocks = 20, [10, 1], [3, 7]
    step(P, FrontierPDMetadata(saves=[SaveSpec("t6", (pblocks,), 0, n, n, True, "raw")]))
    step(D, FrontierPDMetadata(loads=[LoadSpec("r6", "t6", addr, (dblocks,), 0, n)]))
    assert not wait_results(D).failed_recving
    assert torch.equal(dc[LAYERS[2]][7], pc[LAYERS[2]][1])
    assert torch.equal(dc[LAYERS[2]][3], pc[LAYERS[2]][10])


def test_fp8_wire_is_close_and_smaller():
    pp, dp = _free_port(), _free_port()
    P, D = make(KVConnectorRole.WORKER, pp, wire="fp8"), make(KVConnectorRole.WORKER, dp)
    pc, dc = caches(3), caches(4)
    P.register_kv_caches(pc)
    D.register_kv_caches(dc)
    try:
        step(P, FrontierPDMetadata(saves=[SaveSpec("t3", ([1],), 0, 16, 16, True, "fp8")]))
        step(D, FrontierPDMetadata(loads=[LoadSpec("r3", "t3", f"tcp://127.0.0.1:{pp}", ([2],), 0, 16)]))
        assert not wait_results(D).failed_recving
        ref, got = rows(pc[LAYERS[0]], [1], 16), rows(dc[LAYERS[0]], [2], 16)
        # latent: e4m3 rounding, <= 2**-4 of the 128-group amax; rope: bf16 rounding, 2**-9 relative
        amax = ref[:, :512].reshape(16, 4, 128).abs().amax(-1, keepdim=True)
        assert torch.all((got[:, :512] - ref[:, :512]).reshape(16, 4, 128).abs() <= amax * 2**-4 + 1e-6)
        assert torch.allclose(got[:, 512:], ref[:, 512:], rtol=2**-8, atol=0)
        assert torch.equal(rows(dc[LAYERS[2]], [2], 16), rows(pc[LAYERS[2]], [1], 16))  # uint8: raw
        stats = D.get_kv_connector_stats().data
        assert stats["recv_bytes"] == 16 * (2 * 656 + 132)
    finally:
        P.shutdown()
        D.shutdown()


def test_wrong_secret_and_dead_peer_report_failure():
    pp, dp = _free_port(), _free_port()
    P, D = make(KVConnectorRole.WORKER, pp, secret="a"), make(KVConnectorRole.WORKER, dp, secret="b")
    P.register_kv_caches(caches(5))
    dc = caches(6)
    D.register_kv_caches(dc)
    before = dc[LAYERS[0]].clone()
    try:
        step(P, FrontierPDMetadata(saves=[SaveSpec("t4", ([1],), 0, 16, 16, True, "raw")]))
        step(D, FrontierPDMetadata(loads=[LoadSpec("r4", "t4", f"tcp://127.0.0.1:{pp}", ([2],), 0, 16),
                                          LoadSpec("r5", "t5", f"tcp://127.0.0.1:{_free_port()}", ([3],), 0, 16)]))
        got = set()
        deadline = time.monotonic() + 20
        while got != {"r4", "r5"} and time.monotonic() < deadline:
            r = D.get_transfer_results(set())
            assert r.failed_recving == r.finished_recving  # both fail
            got |= r.failed_recving
            time.sleep(0.05)
        assert got == {"r4", "r5"}
        assert torch.equal(dc[LAYERS[0]], before)  # nothing written from the unauthenticated peer
        s = D.get_kv_connector_stats().data
        assert s["rejected_auth"] == 1 and s["recv_failed"] == 2
    finally:
        P.shutdown()
        D.shutdown()


def _req(rid, params, n):
    return SimpleNamespace(request_id=rid, kv_transfer_params=params, prompt_token_ids=list(range(n)),
                           num_computed_tokens=0)


def _blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def _sched_out(new=(), cached=(), n_sched=None):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, *_ in cached], resumed_req_ids=set(),
                                              new_block_ids=[(nb,) for _, nb, _ in cached],
                                              num_computed_tokens=[c for *_, c in cached]),
        num_scheduled_tokens=n_sched or {})


def test_scheduler_side_protocol():
    S = make(KVConnectorRole.SCHEDULER, 15000)
    prod = _req("p", {"frontier_pd": "produce", "transfer_id": "T"}, 40)
    cons = _req("c", {"frontier_pd": "consume", "transfer_id": "T", "remote_addr": "tcp://h:1"}, 40)
    plain = _req("x", None, 40)
    assert S.get_num_new_matched_tokens(plain, 0) == (0, False)
    assert S.get_num_new_matched_tokens(prod, 0) == (0, False)
    assert S.get_num_new_matched_tokens(cons, 16) == (24, True)
    S.update_state_after_alloc(prod, _blocks([1, 2]), 0)
    S.update_state_after_alloc(cons, _blocks([5, 6, 7]), 24)
    m = S.build_connector_meta(_sched_out(new=[("p", [1, 2], 0)], n_sched={"p": 24}))
    assert [(s.tid, s.start, s.end, s.first) for s in m.saves] == [("T", 0, 24, True)]
    assert [(l.tid, l.start, l.num_tokens, l.block_ids) for l in m.loads] == [("T", 16, 40, ([5, 6, 7],))]
    # second chunk: appended block, rows 24..40, transfer complete
    m = S.build_connector_meta(_sched_out(cached=[("p", [3], 24)], n_sched={"p": 16}))
    assert [(s.start, s.end, s.block_ids) for s in m.saves] == [(24, 40, ([1, 2, 3],))]
    # a consume request retried after a failed pull computes locally
    assert S.get_num_new_matched_tokens(cons, 0) == (0, False)
    done, params = S.request_finished(prod, [1, 2, 3])
    assert done is False and params["transfer_id"] == "T" and params["remote_addr"] == "tcp://127.0.0.1:15000"
    assert S.request_finished(_req("h", {"frontier_pd": "hello"}, 1), [])[1]["kv_addr"] == "tcp://127.0.0.1:15000"
    # a producer aborted before its prompt was staged fails its transfer on the worker
    ab = _req("a", {"frontier_pd": "produce", "transfer_id": "TA"}, 40)
    S.update_state_after_alloc(ab, _blocks([9]), 0)
    assert S.request_finished(ab, [9]) == (False, None)
    assert S.build_connector_meta(_sched_out()).aborted == ["TA"]


def test_missing_secret_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FRONTIER_PD_SECRET", raising=False)
    ktc = KVTransferConfig(kv_connector="FrontierPDConnector", kv_role="kv_both")
    cfg = SimpleNamespace(kv_transfer_config=ktc, parallel_config=SimpleNamespace(pipeline_parallel_size=1, rank=0))
    with pytest.raises(ValueError, match="FRONTIER_PD_SECRET"):
        FrontierPDConnector(cfg, KVConnectorRole.SCHEDULER, SimpleNamespace(kv_cache_groups=[], num_blocks=1))


@pytest.mark.parametrize("key,value,match", [("transport", "rdma", "transport must be one of"),
                                             ("wire", "fp4", "wire must be one of"),
                                             ("timeout_s", "soon", "timeout_s must be a number")])
def test_bad_settings_are_clear_errors(key, value, match):
    ktc = KVTransferConfig(kv_connector="FrontierPDConnector", kv_role="kv_both",
                           kv_connector_extra_config={"secret": "k", key: value})
    cfg = SimpleNamespace(kv_transfer_config=ktc, parallel_config=SimpleNamespace(pipeline_parallel_size=1, rank=0))
    with pytest.raises(ValueError, match=match):
        FrontierPDConnector(cfg, KVConnectorRole.SCHEDULER, SimpleNamespace(kv_cache_groups=[], num_blocks=1))
