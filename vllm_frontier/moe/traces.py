"""Routing traces: recorded expert choices per token per MoE layer (torch only).

File format (``torch.save`` of a dict, read by :func:`load_traces`)::

    {"format": "vllm-frontier/routing-traces", "version": 2,
     "topk_ids": int [L, T, k],        # expert ids per MoE layer, best slot first
     "token_ids": int [T] or None,     # the token at each position (for token-table prediction)
     "predicted_topk_ids": int [L, T, k] or None,
                                       # lookahead gate: layer L's gate on layer L's input
                                       # (see shuffle.LookaheadPredictor)
     "num_experts": E, "meta": {...}}

Integer tensors are stored in the narrowest of int16 / int32 / int64 that holds them and
read back as int64.  Version-1 files (no ``predicted_topk_ids``) still load.

Tokens are positions of a flattened stream (sequences concatenated).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import torch

FORMAT = "vllm-frontier/routing-traces"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def _compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """The narrowest of int16 / int32 / int64 holding ``t`` (smaller files)."""
    if t is None or t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    for dtype in (torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t.long()


def _long(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.long()


@dataclass
class RoutingTraces:
    """Expert choices of ``T`` tokens at ``L`` MoE layers.

    Attributes:
        topk_ids: ``[L, T, k]`` int64.
        num_experts: E.
        token_ids: ``[T]`` int64, or None when unknown.
        meta: provenance (model, corpus, generator parameters).
        predicted_topk_ids: ``[L, T, k]`` int64 expert ids predicted by the lookahead gate
            (:class:`~vllm_frontier.moe.shuffle.LookaheadPredictor`), or None.
    """

    topk_ids: torch.Tensor
    num_experts: int
    token_ids: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    predicted_topk_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.topk_ids.dim() != 3:
            raise ValueError(f"topk_ids must be [L, T, k], got {tuple(self.topk_ids.shape)}")
        if self.topk_ids.numel() and (self.topk_ids.min() < 0 or self.topk_ids.max() >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts})")
        if self.token_ids is not None and self.token_ids.shape != (self.topk_ids.shape[1],):
            raise ValueError("token_ids must be [T] with T = topk_ids.shape[1]")
        pred = self.predicted_topk_ids
        if pred is not None:
            if pred.shape != self.topk_ids.shape:
                raise ValueError(f"predicted_topk_ids must be {tuple(self.topk_ids.shape)}, got {tuple(pred.shape)}")
            if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_experts):
                raise ValueError(f"predicted expert ids must lie in [0, {self.num_experts})")

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def split(self, fraction: float) -> tuple["RoutingTraces", "RoutingTraces"]:
        """``(first fraction of tokens, the rest)``: fit predictors/placements on one, evaluate on the other."""
        cut = int(self.num_tokens * fraction)
        return self.slice(0, cut), self.slice(cut, self.num_tokens)

    def slice(self, start: int, stop: int) -> "RoutingTraces":
        """Tokens ``[start, stop)`` of the stream (all fields)."""
        tok, pred = self.token_ids, self.predicted_topk_ids
        return RoutingTraces(self.topk_ids[:, start:stop], self.num_experts,
                             None if tok is None else tok[start:stop], self.meta,
                             None if pred is None else pred[:, start:stop])

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        torch.save(
            {"format": FORMAT, "version": VERSION, "topk_ids": _compact(self.topk_ids),
             "token_ids": _compact(self.token_ids), "predicted_topk_ids": _compact(self.predicted_topk_ids),
             "num_experts": self.num_experts, "meta": self.meta},
            path,
        )
        return path


def load_traces(path: str | pathlib.Path) -> RoutingTraces:
    """Read a trace file written by :meth:`RoutingTraces.save`."""
    doc = torch.load(path, weights_only=False)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} is not a version-{'/'.join(map(str, READABLE_VERSIONS))} {FORMAT} file; record one with "
            "`python benchmarks/spec_moe.py --record-traces MODEL_DIR --traces-out FILE`"
        )
    return RoutingTraces(doc["topk_ids"].long(), int(doc["num_experts"]), _long(doc["token_ids"]),
                         doc.get("meta", {}), _long(doc.get("predicted_topk_ids")))


def synthetic_skewed_traces(
    *,
    num_layers: int = 4,
    num_tokens: int = 20_000,
    num_experts: int = 64,
    top_k: int = 4,
    vocab_size: int = 4096,
    num_topics: int = 16,
    topic_focus: float = 0.8,
    zipf_s: float = 1.1,
    seed: int = 0,
) -> RoutingTraces:
    """A synthetic trace with the structure real MoE routing shows: skewed and clustered.

    Model: token ids follow a Zipf(``zipf_s``) law over the vocabulary; each token id has a
    fixed topic; each (layer, topic) prefers a fixed random set of ``2 * top_k`` experts.  A
    token draws its k distinct experts from ``topic_focus`` x (its topic's preferred set,
    uniformly) + (1 - ``topic_focus``) x (a Zipf-skewed global expert popularity).  So experts
    co-activate within topics, some experts are hot, and a token's experts are predictable
    from its id, but not perfectly.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    token_ids = torch.multinomial(ranks.pow(-zipf_s), num_tokens, replacement=True, generator=g)
    topic_of_token = torch.randint(0, num_topics, (vocab_size,), generator=g)
    pop = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-zipf_s)
    layers = []
    for _ in range(num_layers):
        pop_perm = pop[torch.randperm(num_experts, generator=g)]
        pop_perm = pop_perm / pop_perm.sum()
        pref = torch.zeros((num_topics, num_experts), dtype=torch.float64)
        for topic in range(num_topics):
            pref[topic, torch.randperm(num_experts, generator=g)[: 2 * top_k]] = 1.0 / (2 * top_k)
        probs = topic_focus * pref[topic_of_token[token_ids]] + (1 - topic_focus) * pop_perm
        layers.append(torch.multinomial(probs, top_k, replacement=False, generator=g))
    return RoutingTraces(
        torch.stack(layers), num_experts, token_ids,
        {"source": "synthetic_skewed_traces", "num_topics": num_topics, "topic_focus": topic_focus,
         "zipf_s": zipf_s, "seed": seed, "vocab_size": vocab_size},
    )
