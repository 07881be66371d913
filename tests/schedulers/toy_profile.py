"""The toy instance profile of the simulator tests: round coefficients make every step time a short sum.

prefill of a batch = 0.1 + 0.001 * sum(l) + 1e-8 * sum(l^2) s; decode step = `dstep(batch, ctx)` s; KV moves at
1 ms per token.
"""

import pytest

from vllm_frontier.schedulers.cost_model import DecodeCost, InstanceProfile, PrefillCost


def profile(kv_capacity=10_000, max_batch_tokens=1000):
    return InstanceProfile(
        name="toy", prefill=PrefillCost(0.1, 0.001, 1e-8), decode=DecodeCost(0.01, 0.001, 0.0001),
        kv_capacity_tokens=kv_capacity, max_batch_tokens=max_batch_tokens, kv_transfer_s_per_token=0.001,
        max_len=4096, source="test")


def dstep(batch, ctx):
    """Seconds of one decode step of `batch` requests holding `ctx` context tokens."""
    return 0.01 + 0.001 * batch + 0.0001 * ctx


def approx(x):
    return pytest.approx(x, abs=1e-9)
