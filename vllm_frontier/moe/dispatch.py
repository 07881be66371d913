"""All-to-all dispatch and combine for expert parallelism (plain torch.distributed).

Works on any backend with ``all_to_all_single`` and uneven splits (gloo on CPU,
NCCL on GPU).  One message unit is a (token, destination rank) *pair*: a token
whose k experts live on m distinct ranks is sent to each of those m ranks once
(its row of hidden state plus, per slot, the local expert index or -1 and the
routing weight).  The destination pre-reduces its experts' weighted outputs
into one row per pair, which travels back in the combine; the source then sums
the returned rows in ascending rank order (the order the reference uses).

Pairs are laid out destination-major (all pairs for rank 0, then rank 1, ...),
tokens ascending within a destination.  Pairs whose destination is the sending
rank go through the same collective as a local copy and are not counted as
traffic.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from vllm_frontier.moe.placement import ExpertPlacement


@dataclass
class ByteCounters:
    """Bytes this rank sent to / received from *other* ranks, by phase.

    ``dispatch_*``: hidden-state rows; ``meta_*``: per-pair expert ids + weights and
    the split sizes; ``combine_*``: returned partial rows; ``gather_*``: the
    all-gather that re-replicates outputs in the replicated (TP-style) mode.
    """

    dispatch_sent: int = 0
    dispatch_recv: int = 0
    meta_sent: int = 0
    meta_recv: int = 0
    combine_sent: int = 0
    combine_recv: int = 0
    gather_sent: int = 0
    gather_recv: int = 0
    calls: int = 0
    comm_seconds: float = 0.0
    """Wall time spent inside the collectives (dispatch, meta, combine, gather, counts)."""

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def a2a_sent(self) -> int:
        """Dispatch + meta + combine bytes sent (the all-to-all traffic)."""
        return self.dispatch_sent + self.meta_sent + self.combine_sent


class AllToAll:
    """``all_to_all_single`` with uneven splits and cross-rank byte accounting."""

    def __init__(self, group: dist.ProcessGroup | None = None, counters: ByteCounters | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.counters = counters if counters is not None else ByteCounters()

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """Tell every rank how many rows it will get from us; return what we get."""
        send = torch.tensor(send_counts, dtype=torch.int64)
        recv = torch.empty_like(send)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, group=self.group)
        self.counters.comm_seconds += time.perf_counter() - start
        off = (self.world_size - 1) * send.element_size()
        self.counters.meta_sent += off
        self.counters.meta_recv += off
        return recv.tolist()

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], phase: str
    ) -> torch.Tensor:
        """Send ``rows`` (split by ``send_counts`` along dim 0) and receive ``sum(recv_counts)`` rows.

        Args:
            rows: ``[sum(send_counts), *D]`` contiguous.
            phase: counter prefix: ``dispatch``, ``meta``, ``combine`` or ``gather``.
        """
        rows = rows.contiguous()
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        start = time.perf_counter()
        dist.all_to_all_single(out, rows, recv_counts, send_counts, group=self.group)
        self.counters.comm_seconds += time.perf_counter() - start
        row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
        sent = (sum(send_counts) - send_counts[self.rank]) * row_bytes
        recv = (sum(recv_counts) - recv_counts[self.rank]) * row_bytes
        setattr(self.counters, f"{phase}_sent", getattr(self.counters, f"{phase}_sent") + sent)
        setattr(self.counters, f"{phase}_recv", getattr(self.counters, f"{phase}_recv") + recv)
        return out


@dataclass
class DispatchState:
    """What :func:`combine` needs to route partial rows back (one per pair).

    Attributes:
        pair_token: ``[P]`` local token index of each pair, destination-major.
        send_counts / recv_counts: rows per rank in the dispatch direction.
        num_tokens: tokens on this rank before dispatch.
    """

    pair_token: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


def dispatch(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    placement: ExpertPlacement,
    comm: AllToAll,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchState]:
    """Send every token to each rank that holds at least one of its experts.

    Args:
        x: ``[T, H]`` tokens on this rank.
        topk_weights: ``[T, k]`` float32.
        topk_ids: ``[T, k]`` global expert ids.
        placement: expert -> rank map (world size = ``comm.world_size``).
        comm: the all-to-all wrapper (its counters are updated).

    Returns:
        ``(recv_x [R, H], recv_slots [R, k] int64 local expert index or -1,
        recv_weights [R, k] float32, state)``.
    """
    n = comm.world_size
    if placement.num_ranks != n:
        raise ValueError(f"placement is for {placement.num_ranks} ranks, group has {n}")
    t, k = topk_ids.shape
    dest = placement.rank_of(topk_ids)  # [T, k]
    local = placement.local_index(topk_ids).to(torch.int32)  # [T, k]
    hit = torch.zeros((n, t), dtype=torch.bool)
    if t:
        hit[dest.t().reshape(-1), torch.arange(t).repeat(k)] = True
    pair_dest, pair_token = hit.nonzero(as_tuple=True)  # destination-major
    send_counts = torch.bincount(pair_dest, minlength=n).tolist()
    recv_counts = comm.exchange_counts(send_counts)

    slots = torch.where(dest[pair_token] == pair_dest.unsqueeze(1), local[pair_token], -1)
    weights = topk_weights[pair_token].float().contiguous()
    meta = torch.cat([slots.to(torch.int32), weights.view(torch.int32)], dim=1)
    recv_x = comm.exchange(x[pair_token], send_counts, recv_counts, "dispatch")
    recv_meta = comm.exchange(meta, send_counts, recv_counts, "meta")
    recv_slots = recv_meta[:, :k].long()
    recv_weights = recv_meta[:, k:].contiguous().view(torch.float32)
    return recv_x, recv_slots, recv_weights, DispatchState(pair_token, send_counts, recv_counts, t)


def combine(partials: torch.Tensor, state: DispatchState, comm: AllToAll) -> torch.Tensor:
    """Return partial rows to their tokens and sum them in ascending rank order.

    Args:
        partials: ``[R, H]`` one pre-reduced row per received pair (dispatch order).
        state: from :func:`dispatch`.

    Returns:
        ``[T, H]`` float32 routed output for this rank's tokens.
    """
    back = comm.exchange(partials, state.recv_counts, state.send_counts, "combine")
    out = torch.zeros((state.num_tokens, partials.shape[1]), dtype=torch.float32)
    start = 0
    for count in state.send_counts:  # ascending source rank of the partials
        seg = slice(start, start + count)
        out.index_add_(0, state.pair_token[seg], back[seg].float())
        start += count
    return out
