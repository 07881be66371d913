"""Expert placement: which EP rank holds which expert, and the placement file.

A placement maps every global expert id to one rank; each rank holds the same
number of experts (weights are memory, so the count per rank is fixed).  Local
expert index = position of the expert among its rank's experts in ascending id
order.  Torch only, no vLLM.

Placement file (JSON, written by :func:`save_placements`, read by
:func:`load_placements`)::

    {"format": "vllm-frontier/expert-placement", "version": 1,
     "num_experts": E, "num_ranks": N,
     "layers": {"<layer index>": [rank of expert 0, rank of expert 1, ...], ...},
     "meta": {...free-form provenance...}}
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import torch

FILE_FORMAT = "vllm-frontier/expert-placement"
FILE_VERSION = 1


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert -> rank map with equal experts per rank.

    Attributes:
        expert_to_rank: length-E tuple of rank ids.
        num_ranks: EP world size N (E must be a multiple of N).
    """

    expert_to_rank: tuple[int, ...]
    num_ranks: int
    _rank_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    _local_tensor: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        e, n = len(self.expert_to_rank), self.num_ranks
        if n < 1:
            raise ValueError(f"num_ranks must be >= 1, got {n}")
        if e % n:
            raise ValueError(
                f"{e} experts cannot be split evenly over {n} ranks; choose an EP size "
                "that divides the number of experts"
            )
        counts = [0] * n
        for r in self.expert_to_rank:
            if not 0 <= r < n:
                raise ValueError(f"expert placed on rank {r}, outside [0, {n})")
            counts[r] += 1
        if any(c != e // n for c in counts):
            raise ValueError(
                f"every rank must hold {e // n} experts, got per-rank counts {counts}"
            )
        ranks = torch.tensor(self.expert_to_rank, dtype=torch.long)
        local = torch.empty(e, dtype=torch.long)
        for r in range(n):
            ids = (ranks == r).nonzero().flatten()
            local[ids] = torch.arange(ids.numel())
        object.__setattr__(self, "_rank_tensor", ranks)
        object.__setattr__(self, "_local_tensor", local)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @staticmethod
    def linear(num_experts: int, num_ranks: int) -> "ExpertPlacement":
        """Contiguous blocks: rank r holds experts [r*E/N, (r+1)*E/N) (vLLM's default)."""
        if num_ranks < 1 or num_experts % num_ranks:
            raise ValueError(
                f"{num_experts} experts cannot be split evenly over {num_ranks} ranks"
            )
        per = num_experts // num_ranks
        return ExpertPlacement(tuple(e // per for e in range(num_experts)), num_ranks)

    def rank_of(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rank holding each expert id (any shape, int64 out)."""
        return self._rank_tensor.to(expert_ids.device)[expert_ids.long()]

    def local_index(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Index of each expert within its rank's local experts (any shape, int64 out)."""
        return self._local_tensor.to(expert_ids.device)[expert_ids.long()]

    def local_experts(self, rank: int) -> list[int]:
        """Global ids held by ``rank``, ascending (= local index order)."""
        return [e for e, r in enumerate(self.expert_to_rank) if r == rank]


def save_placements(
    path: str | pathlib.Path,
    placements: dict[int, ExpertPlacement],
    meta: dict | None = None,
) -> pathlib.Path:
    """Write per-layer placements to a JSON placement file and return its path."""
    if not placements:
        raise ValueError("no placements to save")
    first = next(iter(placements.values()))
    for layer, p in placements.items():
        if p.num_ranks != first.num_ranks or p.num_experts != first.num_experts:
            raise ValueError(f"layer {layer}: all layers must share num_experts and num_ranks")
    doc = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "num_experts": first.num_experts,
        "num_ranks": first.num_ranks,
        "layers": {str(k): list(v.expert_to_rank) for k, v in sorted(placements.items())},
        "meta": meta or {},
    }
    path = pathlib.Path(path)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_placements(path: str | pathlib.Path) -> dict[int, ExpertPlacement]:
    """Read a placement file written by :func:`save_placements` (validated)."""
    doc = json.loads(pathlib.Path(path).read_text())
    if doc.get("format") != FILE_FORMAT or doc.get("version") != FILE_VERSION:
        raise ValueError(
            f"{path} is not a version-{FILE_VERSION} {FILE_FORMAT} file; regenerate it "
            "with `python benchmarks/spec_moe.py --write-placement` or save_placements()"
        )
    n = int(doc["num_ranks"])
    out = {int(k): ExpertPlacement(tuple(int(r) for r in v), n) for k, v in doc["layers"].items()}
    for layer, p in out.items():
        if p.num_experts != int(doc["num_experts"]):
            raise ValueError(f"{path}: layer {layer} lists {p.num_experts} experts")
    return out
