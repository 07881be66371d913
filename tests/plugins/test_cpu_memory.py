"""The CPU KV cache the plugin sizes when the user set none (make serve on a machine whose NUMA node is small)."""

from __future__ import annotations

import pytest

from vllm_frontier.errors import FeatureError
from vllm_frontier.plugins.cpu_memory import GiB, KV_SHARE, plan_kv_cache_bytes


def test_room_for_every_sequence_when_memory_allows():
    # 7308 B/token (the embedded V3.2 model in float32 with its indexer cache), 512 tokens, 4 sequences
    assert plan_kv_cache_bytes(7308, 512, 4, 20 * GiB) == 7308 * 512 * 4


def test_capped_at_a_share_of_free_memory_but_never_below_one_sequence():
    per_token, max_len = 7308, 4096
    got = plan_kv_cache_bytes(per_token, max_len, 256, 8 * GiB)
    assert got == int(8 * GiB * KV_SHARE)  # 256 full sequences would be 7.1 GiB
    one_seq = per_token * max_len
    assert plan_kv_cache_bytes(per_token, max_len, 256, one_seq * 5) == max(one_seq, int(one_seq * 5 * KV_SHARE))


def test_one_line_when_one_sequence_does_not_fit():
    with pytest.raises(FeatureError, match="lower --max-model-len, or set VLLM_CPU_KVCACHE_SPACE"):
        plan_kv_cache_bytes(100_000, 100_000, 1, 8 * GiB)
