"""Expert-parallel DeepSeek MoE layer over plain torch.distributed (no vLLM).

Each rank of the EP group holds the experts its :class:`ExpertPlacement`
assigns it, plus replicated router and shared-expert weights.  Two entry points:

* :meth:`EPMoELayer.forward` (data-parallel style): each rank brings its own
  tokens; they are dispatched to the ranks holding their experts and the
  results combined back.  Plain expert parallelism.
* :meth:`EPMoELayer.forward_replicated` (tensor-parallel style): every rank
  holds the same ``[T, H]`` batch; each token is run by one rank chosen by
  ``token_ranks`` (contiguous chunks when None = plain; a speculative shuffle
  plan from :mod:`vllm_frontier.moe.shuffle` otherwise), then an all-gather
  re-replicates the output.  Wrong predictions only cost remote pairs.

Outputs are bit-equal to :func:`vllm_frontier.moe.reference.reference_moe`
with the same placement, whatever the token placement (see ``reference``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm_frontier.moe.dispatch import AllToAll, ByteCounters, combine, dispatch
from vllm_frontier.moe.experts import MoEWeights
from vllm_frontier.moe.placement import ExpertPlacement
from vllm_frontier.moe.reference import expert_partials, finish, shared_expert
from vllm_frontier.moe.routing import RouterConfig, route
from vllm_frontier.moe.shuffle import contiguous_ranks


def ep_routed_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    placement: ExpertPlacement,
    comm: AllToAll,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Routed experts of this rank's tokens over the EP group. Collective.

    Args:
        x: ``[T, H]`` this rank's tokens; topk_weights ``[T, k]``; topk_ids ``[T, k]`` global ids.
        placement: expert -> rank map of the group.
        w13: ``[E_l, 2*I, H]`` / w2: ``[E_l, H, I]``: this rank's experts, ascending global id.

    Returns:
        ``[T, H]`` float32: dispatch to the ranks holding the experts, compute, combine.
    """
    recv_x, recv_slots, recv_w, state = dispatch(
        x, topk_weights.float(), topk_ids.long(), placement, comm
    )
    partials = expert_partials(recv_x, recv_slots, recv_w, w13, w2)
    comm.counters.calls += 1
    return combine(partials, state, comm)


class EPMoELayer:
    """One MoE layer sharded over an EP process group.

    Args:
        weights: the full layer weights (only this rank's experts are kept).
        cfg: router config.
        placement: expert -> rank map for this group's size.
        group: process group (None = the default group).
        counters: shared byte counters (a new one if None).
    """

    def __init__(
        self,
        weights: MoEWeights,
        cfg: RouterConfig,
        placement: ExpertPlacement,
        group: dist.ProcessGroup | None = None,
        counters: ByteCounters | None = None,
    ):
        if placement.num_experts != weights.num_experts:
            raise ValueError(
                f"placement covers {placement.num_experts} experts, layer has {weights.num_experts}"
            )
        self.comm = AllToAll(group, counters)
        if placement.num_ranks != self.comm.world_size:
            raise ValueError(
                f"placement is for {placement.num_ranks} ranks, process group has "
                f"{self.comm.world_size}"
            )
        self.cfg = cfg
        self.placement = placement
        mine = placement.local_experts(self.comm.rank)
        self.w13 = weights.w13[mine].clone()
        self.w2 = weights.w2[mine].clone()
        self.shared = MoEWeights(
            gate=weights.gate,
            w13=weights.w13[:0],
            w2=weights.w2[:0],
            shared_w13=weights.shared_w13,
            shared_w2=weights.shared_w2,
            e_score_correction_bias=weights.e_score_correction_bias,
        )

    @property
    def counters(self) -> ByteCounters:
        return self.comm.counters

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router on local tokens: ``(topk_weights [T, k] fp32, topk_ids [T, k] int64)``."""
        return route(x, self.shared.gate, self.cfg, self.shared.e_score_correction_bias)

    def experts(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Routed experts only, for given routing: ``[T, H]`` float32 (dispatch, compute, combine)."""
        return ep_routed_experts(
            x, topk_weights, topk_ids, self.placement, self.comm, self.w13, self.w2
        )

    def forward(
        self, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """MoE on this rank's own tokens ``x [T_r, H]`` -> ``[T_r, H]`` (x.dtype). Collective.

        ``routing``: optional ``(topk_weights, topk_ids)`` for these tokens (skips the router).
        """
        if x.dim() != 2:
            raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
        topk_w, topk_ids = self.route(x) if routing is None else routing
        routed = self.experts(x, topk_w, topk_ids)
        return finish(routed, shared_expert(x, self.shared), x.dtype)

    def forward_replicated(
        self,
        x: torch.Tensor,
        token_ranks: torch.Tensor | None = None,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """MoE on a batch replicated on every rank. Collective.

        Args:
            x: ``[T, H]``, identical on all ranks.
            token_ranks: ``[T]`` int64 rank that runs each token, identical on all
                ranks (e.g. from :func:`~vllm_frontier.moe.shuffle.plan_token_ranks`);
                None = contiguous chunks (plain EP).
            routing: optional replicated ``(topk_weights [T, k], topk_ids [T, k])``.

        Returns:
            ``[T, H]`` (x.dtype), identical on all ranks.
        """
        t = x.shape[0]
        n = self.world_size
        if token_ranks is None:
            token_ranks = contiguous_ranks(t, n)
        if token_ranks.shape != (t,):
            raise ValueError(f"token_ranks must be [{t}], got {tuple(token_ranks.shape)}")
        if t and (token_ranks.min() < 0 or token_ranks.max() >= n):
            raise ValueError(f"token_ranks must lie in [0, {n})")
        own = (token_ranks == self.rank).nonzero().flatten()
        own_routing = None if routing is None else (routing[0][own], routing[1][own])
        out_own = self.forward(x[own], own_routing)
        per_rank = torch.bincount(token_ranks, minlength=n).tolist()
        gathered = self.comm.exchange(
            out_own.repeat(n, 1), [own.numel()] * n, per_rank, "gather"
        )
        out = torch.empty_like(x)
        start = 0
        for r in range(n):
            idx = (token_ranks == r).nonzero().flatten()
            out[idx] = gathered[start:start + idx.numel()]
            start += idx.numel()
        return out
