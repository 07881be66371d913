"""P/D with a DeepSeek-V3.2 (DSA) model: the latent rows and the indexer K cache both move.

Needs the DSA backend (FRONTIER_DSA=1) on both instances; tiny V3.2 model, float32.

`index_topk` is set above the longest prompt, so the DSA path runs in full (the indexer writes its FP8 K
cache, which moves, and scores every token) while the selection is all tokens. On the embedded trained V3.2
model, greedy outputs through P/D differed from colocated ones on 2 of 5 prompts (top-k 64); the same
colocated instance differs from itself on 4 of 5 of those prompts between running each alone and all in one
batch, with top-k 64 and with a top-k covering the prompt alike (`benchmarks/dsa_batch_variance.py`): vLLM's
CPU kernels are not batch-invariant, the model has near-tied logits, and P/D changes the batching of the
last prompt token. The tiny model used here has no such near-ties in these prompts.
Byte-exact transfer of the block-layout indexer cache is checked in test_connector_unit.py.

These two instances use the NIXL transport where NIXL can be imported (`make setup` installs it), so the
payloads move by NIXL READ between the two engines; the V3 module covers the ZeroMQ transport."""

import re

import pytest

from vllm_frontier.kv_connectors import nixl_plane

from pd_harness import Router, body, fresh_metrics, layer_names, metric, post, start_pair, token_ids, words

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair_v32(tiny_models):
    model = tiny_models("deepseek_v32", index_topk=1024)
    P, D, _, _ = start_pair(model, extra_env={"FRONTIER_DSA": "1", "FRONTIER_PD_TRANSPORT": "auto"})
    r = Router(["--prefill", P.url, "--decode", D.url])
    yield P, D, r
    r.stop()
    P.stop()
    D.stop()


def test_v32_router_output_equals_colocated(pair_v32):
    P, D, r = pair_v32
    names = layer_names(D)
    indexer = [n for n in names if "indexer" in n]
    assert indexer, f"no indexer K cache among the transferred layers: {names}"
    want_transport = "nixl" if nixl_plane.available() else "zmq"
    for srv in (P, D):
        assert re.search(rf"KV listener .* transport={want_transport},", srv.log_text()), want_transport
    before = fresh_metrics(D)
    tokens = 0
    for i, n in enumerate([9, 70, 200]):
        b = body(words(n, seed=20 + i), 10)
        base = post(D.url, b)
        tokens += base["usage"]["prompt_tokens"]
        assert token_ids(post(r.url, b)) == token_ids(base), f"prompt of {n} words"
    after = fresh_metrics(D)
    assert metric(after, "frontier_pd_recv_failed_total") == metric(before, "frontier_pd_recv_failed_total")
    moved = metric(after, "frontier_pd_recv_bytes_total") - metric(before, "frontier_pd_recv_bytes_total")
    mla_layers = len(names) - len(indexer)
    assert moved > tokens * mla_layers * 576 * 4  # latent rows plus the indexer K rows
