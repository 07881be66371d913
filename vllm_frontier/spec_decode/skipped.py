"""The drafter inputs of positions whose MTP pass was skipped, kept until drafting resumes (torch only, no vLLM).

vLLM's MTP drafter writes its own KV cache in a "first pass" over every token the target computed: position
p of a request gets the drafter input (token p + 1, target hidden state at p). A step that drafts nothing
(k = 0) skips that pass; its inputs are kept here, per request, and replayed in one catch-up pass before the
next step that drafts, so the drafter's KV cache has no hole and acceptance after a pause is what it would
have been without the pause.

Per request the kept positions form one contiguous run ``[first, first + n)``: a step schedules the positions
that follow the last accepted token, so consecutive skipped steps extend the run; a run that does not follow
on (a request recomputed after preemption, or positions being recomputed now) replaces what it overlaps.

A plain decode step (one position per request) is kept as one record of the whole step (`keep_step`) and
folded into the per-request runs only when they are next read: a decode step then does no work per request,
and the positions of requests that finished before the fold (most of them, while the rule does not draft)
cost a membership test at the fold instead of a Python call each at every step.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Run:
    """Skipped drafter inputs of one request: positions ``first .. first + len - 1``.

    ids ``[n]`` int32 (token at position + 1), hidden ``[n, H]`` (target hidden state at the position).
    Each is a list of chunks, concatenated when replayed (one chunk per skipped step). Single positions added
    by `SkippedPositions.keep_step` (a decode step's) wait in ``pending`` as (token id, step rows, row) until
    the run is read: a plain decode step then costs no tensor op per request.
    """

    first: int
    ids: list[torch.Tensor]
    hidden: list[torch.Tensor]
    length: int = 0
    pending: list[tuple[int, torch.Tensor, int]] = dataclasses.field(default_factory=list)

    @property
    def end(self) -> int:
        """One past the last kept position."""
        return self.first + self.length

    def flush(self) -> None:
        """Turn the pending single positions into one chunk."""
        if self.pending:
            rows = self.pending[0][1]
            self.ids.append(torch.tensor([t for t, _, _ in self.pending], dtype=torch.int32, device=rows.device))
            self.hidden.append(torch.stack([r[i] for _, r, i in self.pending]))
            self.pending = []

    def truncate(self, before: int) -> None:
        """Drop kept positions >= ``before``."""
        keep = max(before - self.first, 0)
        if keep >= self.length:
            return
        self.flush()
        ids, hidden = torch.cat(self.ids)[:keep], torch.cat(self.hidden)[:keep]
        self.ids, self.hidden, self.length = [ids], [hidden], keep

    def take(self, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Remove and return the first ``n`` kept positions: (first position, ids [n], hidden [n, H])."""
        self.flush()
        ids, hidden = torch.cat(self.ids), torch.cat(self.hidden)
        first = self.first
        self.ids, self.hidden = [ids[n:]], [hidden[n:]]
        self.first, self.length = first + n, self.length - n
        return first, ids[:n], hidden[:n]


class SkippedPositions:
    """Per-request runs of skipped drafter inputs (module docstring)."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        # decode steps not yet folded into the runs: (request ids, positions, token ids, hidden rows [n, H])
        self._steps: list[tuple[tuple[str, ...], list[int], list[int], torch.Tensor]] = []
        self.total = 0   # kept positions over all requests (the unfolded steps' included)

    @property
    def runs(self) -> dict[str, Run]:
        """The runs per request, every kept step folded in."""
        self._fold()
        return self._runs

    def __bool__(self) -> bool:
        return self.total > 0

    def __contains__(self, req_id: str) -> bool:
        run = self.runs.get(req_id)
        return run is not None and run.length > 0

    def keep_step(self, req_ids: tuple[str, ...], positions: list[int], tokens: list[int],
                  rows: torch.Tensor) -> None:
        """Keep a decode step: request ``req_ids[i]`` at position ``positions[i]``, with token id ``tokens[i]``
        and hidden state ``rows[i]`` (``rows`` [n, H]: the caller's copy, shared by the step's requests).
        Costs no work per request now; folded into the runs (`_keep_one` for each) when they are next read."""
        self._steps.append((req_ids, positions, tokens, rows))
        self.total += len(req_ids)

    def _fold(self, live: set[str] | dict | None = None) -> None:
        """Fold the kept steps into the runs, in order; with ``live``, skip requests not in it (finished)."""
        if not self._steps:
            return
        steps, self._steps = self._steps, []
        for req_ids, positions, tokens, rows in steps:
            self.total -= len(req_ids)   # `_keep_one` counts the folded ones again
            for i, rid in enumerate(req_ids):
                if live is None or rid in live:
                    self._keep_one(rid, positions[i], tokens[i], rows, i)

    def keep(self, req_id: str, first: int, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the drafter inputs of positions ``first .. first + len(ids) - 1`` of a request."""
        n = ids.shape[0]
        if n == 0:
            return
        self._fold()
        run = self._runs.get(req_id)
        if run is not None and run.length and run.first <= first <= run.end:
            self.truncate(req_id, first)   # recomputed positions replace the kept ones
            run.flush()                    # pending single positions come first
            run.ids.append(ids)
            run.hidden.append(hidden)
            run.length += n
        else:   # first kept run, or a run that does not follow on: the older one is not replayable
            self.drop(req_id)
            self._runs[req_id] = Run(first, [ids], [hidden], n)
        self.total += n

    def _keep_one(self, req_id: str, position: int, token: int, rows: torch.Tensor, row: int) -> None:
        """Keep one position of a request (a kept step's, `_fold`): token id ``token`` and hidden state
        ``rows[row]`` (``rows``: the step's hidden states, shared by its requests). No tensor op when the position
        follows the request's run (the common case); `keep` otherwise."""
        run = self._runs.get(req_id)
        if run is not None and run.length and run.end == position:
            run.pending.append((token, rows, row))
            run.length += 1
            self.total += 1
            return
        ids = torch.tensor([token], dtype=torch.int32, device=rows.device)
        self.keep(req_id, position, ids, rows[row: row + 1])

    def truncate(self, req_id: str, before: int) -> None:
        """Forget the kept positions >= ``before`` of a request (they are being computed again)."""
        run = self.runs.get(req_id)
        if run is None:
            return
        old = run.length
        run.truncate(before)
        self.total -= old - run.length
        if run.length == 0:
            del self._runs[req_id]

    def drop(self, req_id: str) -> None:
        run = self.runs.pop(req_id, None)
        if run is not None:
            self.total -= run.length

    def retain(self, live: set[str] | dict) -> None:
        """Forget requests that are no longer live (finished or aborted)."""
        self._fold(live)
        for req_id in [r for r in self._runs if r not in live]:
            self.drop(req_id)

    def take(self, req_id: str, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Remove and return the first ``n`` kept positions of a request (see `Run.take`)."""
        run = self.runs[req_id]
        n = min(n, run.length)
        out = run.take(n)
        self.total -= n
        if run.length == 0:
            del self._runs[req_id]
        return out


def plan_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Split per-request catch-up lengths into passes of at most ``budget`` tokens.

    Returns one list per pass with the number of positions each request replays in it (0: none). A request
    replays its positions in order, so a later pass continues where the earlier one stopped; every pass gives
    each request with positions left an equal share of the budget (at least 1 position).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    left = list(lengths)
    passes = []
    while any(left):
        active = [i for i, n in enumerate(left) if n > 0]
        share = max(budget // len(active), 1)
        take = [0] * len(left)
        room = budget
        for i in active:
            t = min(left[i], share, room)
            take[i] = t
            room -= t
            if room == 0:
                break
        # hand what the equal shares left over to requests with positions left, in order
        for i in active:
            if room == 0:
                break
            extra = min(left[i] - take[i], room)
            take[i] += extra
            room -= extra
        for i in active:
            left[i] -= take[i]
        passes.append(take)
    return passes
