"""vLLM side of the speculative EP MoE: our dispatch and combine inside vLLM's MoE layers.

``register()`` installs :class:`FrontierEPMoEMethod` with
``UnquantizedFusedMoEMethod.register_oot``, so every unquantized MoE layer vLLM
builds (in every worker) uses it.  With expert parallelism on, it replaces what
stock vLLM 0.32 does on CPU (DP+EP: the naive all-gather dispatch, which raises
on gloo; TP+EP: the CPU experts kernel, which ignores ``expert_map``):

* **DP+EP** (each rank has its own tokens): tokens go to the ranks holding their
  experts with ``all_to_all_single`` over the EP group and come back the same
  way (:func:`~vllm_frontier.moe.ep_layer.ep_routed_experts`).  Tokens cannot
  move between DP ranks (their KV cache is there), so speculation here is the
  pre-grouped expert placement only.
* **TP+EP** (every rank has the same tokens): each token is run by one rank
  (plain: contiguous chunks; speculative: the rank holding most of its experts,
  capacity-capped; worst: a rank holding the fewest), dispatched and combined
  the same way; each rank returns its tokens' rows and zeros elsewhere, and
  vLLM's existing all-reduce after the MoE (which also sums the TP-sharded
  shared expert) re-replicates them.  After the gate every TP rank holds the
  real routing, so the shuffle uses it instead of a guess: the prediction is
  exact by construction, and a wrong one would cost only correcting pairs
  (``worst`` mode measures that).  ``local`` skips the all-to-all altogether:
  every rank runs its own experts on every token and the same all-reduce sums
  the partial rows (what vLLM's GPU kernels do with ``expert_map``; the CPU
  kernel ignores it).  In vLLM's TP layout that all-reduce runs anyway, so
  ``local`` moves no dispatch bytes at all: the all-to-all modes pay off where
  tokens are not replicated (DP attention), and serve in TP as the measured
  comparison the issue asks for.

Expert weights load in vLLM's own placement and, when a placement file gives
another one for a layer, move once after loading (:mod:`.relocate`).  Outputs
do not depend on the token placement (the experts' math and the per-token sum
order are fixed), so every mode gives the same tokens.

The byte counters of this worker's MoE layers are :data:`COUNTERS` (read them
with ``LLM.collective_rpc(vllm_frontier.moe.vllm_adapter.worker_counters)``),
and ``FRONTIER_SPEC_MOE_LOG_EVERY=N`` logs them every N forwards.

Private vLLM pieces relied on (pinned in :mod:`vllm_frontier.compat`, tested): the runner
skips its naive dispatch when the method's ``supports_internal_mk`` is true;
``UnquantizedFusedMoEMethod.apply``'s signature; ``RoutedExperts.expert_map``;
the EP group's ``cpu_group``.
"""

from __future__ import annotations

import ast
import functools
import logging
import re
from dataclasses import dataclass

import torch

from vllm_frontier.moe.dispatch import AllToAll, ByteCounters
from vllm_frontier.moe.ep_layer import ep_routed_experts
from vllm_frontier.moe.placement import ExpertPlacement, load_placements
from vllm_frontier.moe.reference import expert_partials
from vllm_frontier.moe.relocate import gather_held, relocate_experts
from vllm_frontier.moe.settings import read_settings
from vllm_frontier.moe.shuffle import best_ranks, contiguous_ranks, plan_token_ranks, worst_ranks

logger = logging.getLogger("vllm.frontier.spec_moe")

COUNTERS = ByteCounters()
"""Cross-rank bytes of every MoE layer in this worker process."""

TOKEN_STATS = {"tokens": 0, "tokens_all_local": 0}
"""Tokens through the MoE layers of this worker, and those whose experts all sat on the rank running them."""


def worker_counters(_worker=None) -> dict[str, float]:
    """This worker's counters (for ``LLM.collective_rpc``; the worker argument is unused)."""
    return {**COUNTERS.as_dict(), **TOKEN_STATS}


def counters_from_log(log: str) -> dict[str, dict]:
    """The last counter line each worker process wrote to a vLLM log (FRONTIER_SPEC_MOE_LOG_EVERY), by pid."""
    last = {}
    for m in re.finditer(r"\(\w+ pid=(\d+)\).*vllm-frontier spec_moe: (\{.*\})", log):
        last[m.group(1)] = ast.literal_eval(m.group(2))
    return last


def decoder_layer_index(layer_name: str) -> int | None:
    """``model.layers.7.mlp.experts`` -> 7 (the key of a placement file); None if there is no index."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", layer_name)
    return int(m.group(1)) if m else None


def held_experts(expert_map: torch.Tensor | None, num_experts: int) -> list[int]:
    """Global ids a rank holds, in local index order, from vLLM's global->local ``expert_map`` (-1 = not here)."""
    if expert_map is None:
        return list(range(num_experts))
    local = expert_map.tolist()
    held = sorted((loc, e) for e, loc in enumerate(local) if loc >= 0)
    return [e for _, e in held]


def token_ranks(mode: str, topk_ids: torch.Tensor, placement: ExpertPlacement, capacity: float) -> torch.Tensor:
    """Rank that runs each token of a replicated (TP) batch; identical on every rank."""
    t, n = topk_ids.shape[0], placement.num_ranks
    if mode == "plain" or t == 0:
        return contiguous_ranks(t, n)
    if mode == "worst":
        return worst_ranks(topk_ids, placement)
    return plan_token_ranks(best_ranks(topk_ids, placement), n, capacity)


@dataclass
class _EPState:
    """What one MoE layer needs at run time besides its weights (the layer's own parameters), set after loading."""

    placement: ExpertPlacement
    comm: AllToAll
    replicated: bool


def _ep_groups():
    """(EP group coordinator, attention-TP world size, DP world size) of this worker."""
    from vllm.distributed.parallel_state import get_dp_group, get_ep_group, get_tp_group

    return get_ep_group(), get_tp_group().world_size, get_dp_group().world_size


def _method_class():
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    class FrontierEPMoEMethod(UnquantizedFusedMoEMethod):
        """Unquantized MoE whose expert-parallel dispatch and combine are ours (see module doc)."""

        def __init__(self, moe):
            super().__init__(moe)
            self._ep: _EPState | None = None
            self._settings = read_settings()

        @property
        def _use_ours(self) -> bool:
            return self.moe.moe_parallel_config.use_ep

        # The runner asks these before dispatching: with ours on, it must not all-gather the tokens.
        @property
        def supports_internal_mk(self) -> bool:
            return True if self._use_ours else super().supports_internal_mk

        @property
        def is_monolithic(self) -> bool:
            return False if self._use_ours else super().is_monolithic

        @property
        def supports_eplb(self) -> bool:
            return False

        def process_weights_after_loading(self, layer) -> None:
            if not self._use_ours:
                super().process_weights_after_loading(layer)
                return
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                raise RuntimeError(
                    "FRONTIER_SPEC_MOE: the vLLM integration of the speculative EP MoE runs on CPU "
                    "(gloo) in this build; on GPUs serve without the toggle"
                )
            group, tp, dp = _ep_groups()
            if tp > 1 and dp > 1:
                raise RuntimeError(
                    "FRONTIER_SPEC_MOE: expert parallelism with both tensor-parallel and data-parallel "
                    f"attention (TP={tp}, DP={dp}) is not supported; use one of them"
                )
            if self._settings.dispatch == "local" and tp == 1:
                raise RuntimeError(
                    "FRONTIER_SPEC_MOE_DISPATCH=local needs tensor-parallel attention (every rank holding "
                    "every token); with data parallelism use plain or speculative"
                )
            if getattr(layer, "has_bias", False) or self.moe.has_bias:
                raise RuntimeError("FRONTIER_SPEC_MOE: MoE layers with expert biases are not supported")
            cpu_group = group.cpu_group
            n = group.world_size
            e = layer.global_num_experts
            held_all = gather_held(held_experts(layer.expert_map, e), cpu_group)
            owner = {x: r for r, held_r in enumerate(held_all) for x in held_r}
            current = ExpertPlacement(tuple(owner[x] for x in range(e)), n)
            target = self._target_placement(layer, current)
            w13, w2 = layer.w13_weight.data, layer.w2_weight.data
            held = held_all[group.rank_in_group]
            if target != current:
                w13, w2 = relocate_experts([w13, w2], held_all, target, cpu_group)
            elif held != sorted(held):  # rows of the current placement in ascending global id
                order = sorted(range(len(held)), key=held.__getitem__)
                w13, w2 = w13[order].contiguous(), w2[order].contiguous()
            # The layer's parameters now hold our placement's experts (one copy in memory; vLLM's expert_map
            # no longer describes them, and nothing but this method reads them: EPLB is off).
            layer.w13_weight.data, layer.w2_weight.data = w13, w2
            self._ep = _EPState(target, AllToAll(cpu_group, COUNTERS), replicated=tp > 1)

        def _target_placement(self, layer, current: ExpertPlacement) -> ExpertPlacement:
            s = self._settings
            if s.placement_path is None:
                return current
            placements = _placements(s.placement_path)
            idx = decoder_layer_index(layer.layer_name)
            p = placements.get(idx) if idx is not None else None
            if p is None:
                return current
            if p.num_ranks != current.num_ranks or p.num_experts != current.num_experts:
                raise RuntimeError(
                    f"FRONTIER_SPEC_MOE_PLACEMENT={s.placement_path}: layer {idx} is placed for "
                    f"{p.num_experts} experts on {p.num_ranks} ranks; this engine has "
                    f"{current.num_experts} experts on {current.num_ranks} EP ranks"
                )
            return p

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            ep, settings = self._ep, self._settings
            if ep is None:
                return super().apply(layer, x, topk_weights, topk_ids, shared_experts,
                                     shared_experts_input)
            ids = topk_ids.long()
            w13, w2 = layer.w13_weight, layer.w2_weight
            if not ep.replicated:
                routed = ep_routed_experts(x, topk_weights, ids, ep.placement, ep.comm, w13, w2)
                _count_tokens(ids, ep.placement, torch.full((x.shape[0],), ep.comm.rank), settings.log_every)
                return routed.to(x.dtype)
            if settings.dispatch == "local":
                # every rank runs its own experts on every token; vLLM's all-reduce sums the partial rows
                mine = ep.placement.rank_of(ids) == ep.comm.rank
                slots = torch.where(mine, ep.placement.local_index(ids), -1)
                partial = expert_partials(x, slots, topk_weights.float(), w13, w2)
                COUNTERS.calls += 1
                _count_tokens(ids, ep.placement, torch.full((x.shape[0],), ep.comm.rank), settings.log_every)
                return partial
            ranks = token_ranks(settings.dispatch, ids, ep.placement, settings.capacity)
            own = (ranks == ep.comm.rank).nonzero().flatten()
            routed = ep_routed_experts(x[own], topk_weights[own], ids[own], ep.placement, ep.comm, w13, w2)
            _count_tokens(ids[own], ep.placement, ranks[own], settings.log_every)
            out = torch.zeros_like(x)
            out[own] = routed.to(x.dtype)
            return out

    return FrontierEPMoEMethod


@functools.lru_cache(maxsize=4)
def _placements(path) -> dict[int, ExpertPlacement]:
    """The placement file, read once per process (every MoE layer asks for its own entry)."""
    return load_placements(path)


def _count_tokens(ids: torch.Tensor, placement: ExpertPlacement, ranks: torch.Tensor, log_every: int) -> None:
    TOKEN_STATS["tokens"] += ids.shape[0]
    if ids.shape[0]:
        local = (placement.rank_of(ids) == ranks.unsqueeze(1)).all(dim=1)
        TOKEN_STATS["tokens_all_local"] += int(local.sum())
    if log_every and COUNTERS.calls % log_every == 0:
        logger.info("vllm-frontier spec_moe: %s", worker_counters())


_REGISTERED = False


def register() -> None:
    """Install :class:`FrontierEPMoEMethod` for vLLM's unquantized MoE layers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    read_settings()  # a bad variable fails here, in every process, with its message
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    UnquantizedFusedMoEMethod.register_oot(_method_class())
    _REGISTERED = True
