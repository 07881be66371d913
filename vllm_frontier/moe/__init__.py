"""Speculative expert-parallel MoE (Speculative MoE, arXiv 2503.04398).

vLLM-free core (torch / torch.distributed only):

* :mod:`.routing`    DeepSeek-style router (softmax or sigmoid + bias, grouped top-k)
* :mod:`.experts`    batch-invariant expert math and layer weights
* :mod:`.reference`  single-process reference layer (the oracle)
* :mod:`.placement`  expert -> rank placement and the placement file
* :mod:`.pregroup`   speculative expert pre-grouping from routing traces
* :mod:`.dispatch`   all-to-all dispatch / combine with byte counters
* :mod:`.shuffle`    speculative token shuffling (predictors, capacity plan)
* :mod:`.ep_layer`   the EP layer over a process group
* :mod:`.traces`     routing-trace files and synthetic skewed traces
* :mod:`.relocate`   move expert weights between ranks to realise a placement
* :mod:`.settings`   the FRONTIER_SPEC_MOE_* settings

vLLM side: :mod:`.vllm_adapter` (+ pinned private pieces in :mod:`vllm_frontier.compat`),
loaded only by :func:`register`.
"""

from __future__ import annotations


def register() -> None:
    """Install the plugin's MoE prepare/finalize into vLLM (idempotent).

    Called by ``vllm_frontier.plugins.register()`` in every vLLM process when
    ``FRONTIER_SPEC_MOE`` is on.  Imports vLLM only here.
    """
    from vllm_frontier.moe import vllm_adapter

    vllm_adapter.register()
