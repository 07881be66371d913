"""Move expert weights between EP ranks to realise a placement (once, after loading).

vLLM loads each rank's experts in its own placement (linear by default).  The
pre-grouped placement of :mod:`vllm_frontier.moe.pregroup` puts co-activated
experts together instead; rather than reach into vLLM's weight loader, the
experts travel once after loading with one ``all_to_all_single`` per weight.
Torch only, no vLLM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm_frontier.moe.placement import ExpertPlacement


def gather_held(held: list[int], group: dist.ProcessGroup | None = None) -> list[list[int]]:
    """Every rank's held global expert ids (local index order), from each rank's own list. Collective."""
    n = dist.get_world_size(group)
    mine = torch.tensor(held, dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(everyone, mine, group=group)
    return [t.tolist() for t in everyone]


def relocate_experts(
    weights: list[torch.Tensor],
    held_by_rank: list[list[int]],
    target: ExpertPlacement,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Return this rank's experts under ``target`` (ascending global id). Collective.

    Args:
        weights: per-expert tensors ``[E_l, ...]`` held now, rows in ``held_by_rank[rank]`` order.
        held_by_rank: every rank's held global ids (from :func:`gather_held`).
        target: the placement to realise (same number of experts per rank).

    Returns:
        the same tensors re-sliced: rows = ``target.local_experts(rank)``.
    """
    n = len(held_by_rank)
    if target.num_ranks != n:
        raise ValueError(f"placement is for {target.num_ranks} ranks, the EP group has {n}")
    all_held = sorted(e for held in held_by_rank for e in held)
    if all_held != list(range(target.num_experts)):
        raise ValueError(
            f"the EP ranks hold experts {all_held}, the placement covers {target.num_experts}"
        )
    rank = dist.get_rank(group)
    if dist.get_world_size(group) != n:
        raise ValueError(f"{n} held-expert lists for an EP group of {dist.get_world_size(group)}")
    held = held_by_rank[rank]
    dest = [target.expert_to_rank[e] for e in held]
    send_order = sorted(range(len(held)), key=lambda i: (dest[i], i))
    send_counts = [dest.count(d) for d in range(n)]
    incoming = [[e for e in held_by_rank[s] if target.expert_to_rank[e] == rank] for s in range(n)]
    recv_counts = [len(ids) for ids in incoming]
    recv_ids = [e for ids in incoming for e in ids]
    order = sorted(range(len(recv_ids)), key=lambda i: recv_ids[i])
    out = []
    for w in weights:
        if w.shape[0] != len(held):
            raise ValueError(f"weight has {w.shape[0]} experts, this rank holds {len(held)}")
        send = w[send_order].contiguous()
        recv = w.new_empty((sum(recv_counts), *w.shape[1:]))
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
        out.append(recv[order].contiguous())
    return out
