"""Torch reference of the DeepSeek-V3 / V3.2 architecture as vLLM 0.32 computes it (the project's oracle).

Readable, float32-exact, no vLLM import. Module names equal the HF / vLLM checkpoint names, so
``state_dict()`` keys are the checkpoint keys (``model.layers.{i}.self_attn.kv_b_proj.weight`` ...).

What it computes, and where each convention comes from (vLLM 0.32 ``deepseek_v2.py``, ``deepseek_mtp.py``,
``layers/mla.py``, ``fused_moe/router/grouped_topk_router.py``):

- **MLA** (multi-head latent attention). ``kv_a_proj_with_mqa(x) = [c_kv (kv_lora_rank) | k_pe (rope)]``;
  ``c_kv`` is RMS-normed by ``kv_a_layernorm`` and expanded by ``kv_b_proj`` into per-head
  ``[k_nope (qk_nope) | v (v_head)]``. Queries: ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)``
  without q_lora_rank), per head ``[q_nope | q_pe]``. RoPE on the rope part is *interleaved* (GPT-J
  style, vLLM ``is_neox_style=False``). Scale ``(qk_nope + qk_rope) ** -0.5``; no rope scaling supported.
- **Lightning indexer** (V3.2, configs with ``index_topk``). ``q = wq_b(q_c)`` with ``q_c`` the normed
  query latent, per index head ``[q_pe (rope) | q_nope]``; ``k = LayerNorm(wk(x))`` (one head shared by all
  index heads), ``[k_pe | k_nope]``; RoPE NeoX-style (vLLM: ``is_neox_style = not indexer_rope_interleave``).
  ``w = weights_proj(x) * index_head_dim**-0.5 * index_n_heads**-0.5``;
  ``score[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])`` for ``s <= t``. Top-k per query with a stable
  tie rule: higher score first, on equal scores the lower position wins; fewer than k causal keys means
  all of them are selected (index -1 pads). Sparse attention attends to the selected keys only.
  (vLLM quantizes indexer q/k to fp8; this reference is the exact fp32 math.)
- **MoE** (DeepSeek-V3 ``noaux_tc``): ``scores = sigmoid(x @ gate.T)``; experts chosen by
  ``scores + e_score_correction_bias`` (grouped top-k with ``n_group``/``topk_group``); weights are the
  unbiased scores of the chosen experts, renormalized if ``norm_topk_prob``, times
  ``routed_scaling_factor``; output ``sum_k w_k * expert_k(x) + shared_experts(x)``. SiLU-gated MLPs.
- **Decoder layer**: pre-norm residual blocks (``input_layernorm``, ``post_attention_layernorm``);
  layer ``i`` is MoE when ``i >= first_k_dense_replace and i % moe_layer_freq == 0``.
- **MTP** (``model.layers.{num_hidden_layers + j}``): input at position ``i`` is the embedding of token
  ``i + 1`` (zeroed where position == 0, as vLLM does) and the main model's final-normed hidden state
  ``h_i``: ``eh_proj([enorm(emb) | hnorm(h)])`` -> one decoder block -> ``shared_head.head(shared_head.norm(.))``
  gives logits for token ``i + 2``. The block attends causally over the MTP-layer sequence.

Shapes: ``B`` batch, ``T`` tokens per sequence (positions ``0..T-1``), ``H`` hidden, ``V`` vocab,
``N`` attention heads. All sequences in a batch have the same length (no padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelConfig",
    "ReferenceOutput",
    "DeepseekReference",
    "stable_topk_indices",
    "indexer_target_distribution",
]


@dataclass(frozen=True)
class ModelConfig:
    """The subset of an HF DeepSeek-V3 / V3.2 ``config.json`` the reference needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    num_nextn_predict_layers: int = 0
    index_topk: int | None = None
    index_n_heads: int = 0
    index_head_dim: int = 0
    indexer_rope_interleave: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """Build from an HF config dict; raise ``ValueError`` for features the reference does not model."""
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; the reference implements silu")
        rope_scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default")
        if rope_scaling not in (None, "default") and rope_scaling != {}:
            raise ValueError("rope_scaling is not supported by the reference; remove it from config.json")
        if cfg.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func {cfg['scoring_func']!r} is not supported; use sigmoid or softmax")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        return cls(**kw)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_topk is not None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)


@dataclass
class ReferenceOutput:
    """What ``DeepseekReference.forward`` returns.

    logits: [B, T, V] float32, next-token logits of the main model.
    hidden: [B, T, H] final-normed hidden states (what vLLM hands to the MTP drafter).
    mtp_logits: [B, T-1, V] logits of the first MTP module for token ``i + 2`` at position ``i``
        (``None`` when the model has no MTP layer or ``mtp=False``).
    routing: per MoE layer (main layers in order, then MTP layers), ``[B, T', k]`` int64 expert ids in
        descending routing order (``T' = T`` for main layers, ``T - 1`` for MTP).
    routing_layers: the layer index of each entry of ``routing``.
    topk_indices: per attention layer with an indexer, ``[B, T', index_topk]`` int64 selected key
        positions (``-1`` = no key), ordered by descending indexer score; empty when no indexer ran.
    attn_probs: per attention layer (when ``return_attn``), ``[B, N, T', T']`` float32 attention
        probabilities actually used (sparse-masked when sparse).
    index_scores: per attention layer whose indexer ran, ``[B, T', T']`` float32 indexer scores with
        ``-inf`` at future positions (differentiable w.r.t. the indexer weights).
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: torch.Tensor | None = None
    routing: list[torch.Tensor] = field(default_factory=list)
    routing_layers: list[int] = field(default_factory=list)
    topk_indices: list[torch.Tensor] = field(default_factory=list)
    attn_probs: list[torch.Tensor] = field(default_factory=list)
    index_scores: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Small pieces


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as vLLM)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``[*positions.shape, dim // 2]`` (float32), frequencies ``theta ** (-2i / dim)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = positions.to(torch.float32)[..., None] * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [..., T, (heads,) D]``; ``cos/sin [..., T, 1 or heads, D/2]`` broadcast over heads.

    interleaved=True rotates pairs (x[2i], x[2i+1]) (GPT-J, vLLM ``is_neox_style=False``);
    interleaved=False rotates (x[i], x[i + D/2]) (NeoX).
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        return torch.stack((o1, o2), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` positions along the last dim with a deterministic tie rule; ``-inf`` entries are never chosen.

    scores: [..., S] float. Returns [..., k] int64: positions by descending score, equal scores ordered by
    ascending position (lower position wins), ``-1`` where fewer than ``k`` finite scores exist.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    S = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    idx, val = order.indices[..., :k], order.values[..., :k]
    idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx)
    if k > S:
        pad = torch.full((*idx.shape[:-1], k - S), -1, dtype=idx.dtype, device=idx.device)
        idx = torch.cat((idx, pad), dim=-1)
    return idx


def indexer_target_distribution(attn_probs: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3.2's indexer warm-up target: attention summed over heads, L1-normalized per query.

    attn_probs: [B, N, T, S] -> [B, T, S] (rows sum to 1).
    """
    p = attn_probs.sum(dim=1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)


class Mlp(nn.Module):
    """SiLU-gated MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: ``weight [E, H]`` and the aux-loss-free selection bias ``e_score_correction_bias [E]`` (fp32)."""

    def __init__(self, hidden: int, n_experts: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        if with_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg.hidden_size, cfg.n_routed_experts, cfg.topk_method == "noaux_tc")
        self.experts = nn.ModuleList(Mlp(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (Mlp(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [M, H] -> (topk_weights [M, k] fp32, topk_ids [M, k] int64, scores [M, E] fp32 unbiased)."""
        c = self.cfg
        logits = F.linear(x, self.gate.weight).float()
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(-1)
        bias = self.gate.e_score_correction_bias
        choice = scores + bias if bias is not None else scores
        M, E = choice.shape
        if c.n_group > 1:
            grouped = choice.view(M, c.n_group, E // c.n_group)
            gscore = grouped.topk(2, dim=-1).values.sum(-1) if bias is not None else grouped.max(-1).values
            keep = stable_topk_indices(gscore, c.topk_group)
            gmask = torch.zeros_like(gscore).scatter_(1, keep, 1.0).bool()
            choice = choice.masked_fill(~gmask.repeat_interleave(E // c.n_group, dim=1), float("-inf"))
        ids = stable_topk_indices(choice, c.num_experts_per_tok)
        w = scores.gather(1, ids)
        if c.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w * c.routed_scaling_factor, ids, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] -> (out [..., H], topk_ids [..., k])."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        w, ids, _ = self.route(xf)
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(xf[tok]) * w[tok, slot, None].to(xf.dtype)
            out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        return out.view(shape), ids.view(*shape[:-1], -1)


class Indexer(nn.Module):
    """DeepSeek-V3.2 lightning indexer (see module docstring for the math)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.q_lora_rank is None:
            raise ValueError("the indexer needs q_lora_rank (it reads the query latent); set q_lora_rank")
        self.cfg = cfg
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)

    def scores(self, x: torch.Tensor, q_c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H], q_c [B, T, q_lora_rank] -> scores [B, T, T] fp32 with -inf where s > t."""
        c = self.cfg
        B, T, _ = x.shape
        rd, inter = c.qk_rope_head_dim, c.indexer_rope_interleave
        q = self.wq_b(q_c).view(B, T, c.index_n_heads, c.index_head_dim).float()
        q = torch.cat((apply_rope(q[..., :rd], cos[:, :, None], sin[:, :, None], interleaved=inter),
                       q[..., rd:]), dim=-1)
        k = self.k_norm(self.wk(x).float())
        k = torch.cat((apply_rope(k[..., :rd], cos, sin, interleaved=inter), k[..., rd:]), dim=-1)
        w = self.weights_proj(x).float() * (c.index_head_dim ** -0.5) * (c.index_n_heads ** -0.5)
        qk = torch.einsum("btjd,bsd->btjs", q, k).relu()                     # [B, T, heads, S]
        s = torch.einsum("btjs,btj->bts", qk, w)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return s.masked_fill(~causal, float("-inf"))


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, with_indexer: bool):
        super().__init__()
        self.cfg = cfg
        H, N = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, N * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(H, N * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, N * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(N * cfg.v_head_dim, H, bias=False)
        self.indexer = Indexer(cfg) if with_indexer else None
        self.scaling = cfg.qk_head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, sparse: bool,
                need_probs: bool, run_indexer: bool = True,
                detach_indexer_input: bool = False) -> tuple[torch.Tensor, dict]:
        """x [B, T, H] (already input-normed), cos/sin [B, T, rope/2] -> (out [B, T, H], extras).

        extras: ``topk`` [B, T, k] (indexer ran), ``index_scores`` [B, T, T], ``probs`` [B, N, T, T].
        """
        c = self.cfg
        B, T, _ = x.shape
        N, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        if c.q_lora_rank:
            q_c = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_c)
        else:
            q_c, q = None, self.q_proj(x)
        q = q.view(B, T, N, c.qk_head_dim)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], interleaved=True)

        kv_a = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv_a[..., :c.kv_lora_rank], kv_a[..., c.kv_lora_rank:]
        k_pe = apply_rope(k_pe, cos, sin, interleaved=True)                  # [B, T, dr], one shared head
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, N, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]

        qh = torch.cat((q_nope, q_pe), -1).transpose(1, 2)                   # [B, N, T, dqk]
        kh = torch.cat((k_nope, k_pe[:, :, None].expand(B, T, N, dr)), -1).transpose(1, 2)
        vh = v.transpose(1, 2)                                               # [B, N, T, dv]

        extras: dict = {}
        allowed = None
        if self.indexer is not None and (run_indexer or sparse):
            xi, qi = (x.detach(), q_c.detach()) if detach_indexer_input else (x, q_c)
            scores = self.indexer.scores(xi, qi, cos, sin)
            extras["index_scores"] = scores
            with torch.no_grad():
                topk = stable_topk_indices(scores.detach(), c.index_topk)
            extras["topk"] = topk
            if sparse:
                allowed = torch.zeros(B, T, T + 1, dtype=torch.bool, device=x.device)
                allowed.scatter_(2, torch.where(topk < 0, T, topk), True)
                allowed = allowed[..., :T]
        if allowed is None and not need_probs:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scaling)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal if allowed is None else (allowed & causal)[:, None]
            logits = (qh @ kh.transpose(-1, -2)).float() * self.scaling
            probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            if need_probs:
                extras["probs"] = probs
            o = probs.to(vh.dtype) @ vh
        o = o.transpose(1, 2).reshape(B, T, N * dv)
        return self.o_proj(o), extras


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAAttention(cfg, with_indexer=cfg.has_indexer)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else Mlp(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos, sin, **attn_kw) -> tuple[torch.Tensor, dict]:
        """h [B, T, H] residual stream in -> residual stream out, plus attention extras and ``routing``."""
        a, extras = self.self_attn(self.input_layernorm(h), cos, sin, **attn_kw)
        h = h + a
        m = self.mlp(self.post_attention_layernorm(h))
        if isinstance(m, tuple):
            m, extras["routing"] = m
        return h + m, extras


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 MTP module: enorm, hnorm, eh_proj, one decoder block, shared_head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: nn.Embedding | None = None   # only when a checkpoint carries its own copy


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(n)]
                                    + [MTPLayer(cfg, n + j) for j in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekReference(nn.Module):
    """DeepSeek-V3 / V3.2 causal LM with MTP, named like the HF checkpoint. See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -- construction ---------------------------------------------------------------------------------
    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.cfg.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.cfg.num_hidden_layers:])

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        strict: bool = True) -> DeepseekReference:
        """Load ``config.json`` and every ``*.safetensors`` in ``path`` (weights cast to ``dtype``).

        strict: raise ``ValueError`` on missing or unexpected weights (the MTP ``embed_tokens`` copy and
        ``shared_head.head`` are optional: missing ones fall back to the main embedding / ``lm_head``).
        """
        from safetensors.torch import load_file

        path = Path(path)
        cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        model = cls(cfg)
        sd: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {path}")
        for f in files:
            sd.update(load_file(str(f)))
        model.load_hf_state_dict(sd, strict=strict)
        return model.to(dtype)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load checkpoint-named tensors (any float dtype; cast to the parameter dtype)."""
        sd = dict(sd)
        handled = set()
        for layer in self.mtp_layers:
            p = f"model.layers.{layer.layer_idx}"
            emb = sd.pop(f"{p}.embed_tokens.weight", None)
            if emb is not None:
                dtype = self.model.embed_tokens.weight.dtype
                layer.embed_tokens = nn.Embedding.from_pretrained(emb.to(dtype), freeze=False)
                handled.add(f"{p}.embed_tokens.weight")
            else:
                layer.embed_tokens = None
            if f"{p}.shared_head.head.weight" not in sd and "lm_head.weight" in sd:
                sd[f"{p}.shared_head.head.weight"] = sd["lm_head.weight"]
        own = {k: v for k, v in self.state_dict().items() if k not in handled}
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
        with torch.no_grad():
            for name, t in own.items():
                if name in sd:
                    if sd[name].shape != t.shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(sd[name].shape)} != {tuple(t.shape)}")
                    t.copy_(sd[name].to(t.dtype))

    def hf_state_dict(self, *, with_indexer: bool = True) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by HF name (contiguous clones; tied tensors appear under each name)."""
        out = {}
        for name, t in self.state_dict().items():
            if not with_indexer and ".self_attn.indexer." in name:
                continue
            out[name] = t.detach().clone().contiguous()
        return out

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, sparse: bool | None = None, mtp: bool = True,
                return_attn: bool = False, run_indexer: bool = True,
                detach_indexer_input: bool = False) -> ReferenceOutput:
        """Run the model on ``input_ids [B, T]`` (int64, positions 0..T-1).

        sparse: attend only to the indexer's top-k keys (default: True iff the config has ``index_topk``,
            i.e. what vLLM does for a V3.2 checkpoint). ``sparse=False`` with an indexer still computes
            its top-k (reported in ``topk_indices``) but attends densely.
        mtp: also run the MTP layers (needs T >= 2).
        return_attn: fill ``attn_probs`` (memory O(N T^2) per layer).
        run_indexer: compute the indexer in dense mode too (training's dense stage turns it off).
        detach_indexer_input: the indexer sees detached inputs, so its loss trains only its own weights.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        c = self.cfg
        if sparse is None:
            sparse = c.has_indexer
        if sparse and not c.has_indexer:
            raise ValueError("sparse=True needs a config with index_topk (a V3.2 checkpoint)")
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(pos, c.qk_rope_head_dim, c.rope_theta)
        attn_kw = dict(sparse=sparse, need_probs=return_attn, run_indexer=run_indexer,
                       detach_indexer_input=detach_indexer_input)
        out = ReferenceOutput(logits=None, hidden=None)  # type: ignore[arg-type]

        h = self.model.embed_tokens(input_ids)
        for layer in self.main_layers:
            h, ex = layer(h, cos, sin, **attn_kw)
            self._collect(out, layer.layer_idx, ex)
        hidden = self.model.norm(h)
        out.hidden = hidden
        out.logits = self.lm_head(hidden).float()

        if mtp and self.mtp_layers:
            if T < 2:
                raise ValueError("the MTP layer needs at least 2 tokens")
            layer = self.mtp_layers[0]
            emb_table = layer.embed_tokens if layer.embed_tokens is not None else self.model.embed_tokens
            emb = emb_table(input_ids[:, 1:])
            emb = torch.where(pos[:, :-1, None] == 0, torch.zeros_like(emb), emb)
            m = layer.eh_proj(torch.cat((layer.enorm(emb), layer.hnorm(hidden[:, :-1])), -1))
            m, ex = layer(m, cos[:, :-1], sin[:, :-1], **attn_kw)
            self._collect(out, layer.layer_idx, ex)
            out.mtp_logits = layer.shared_head.head(layer.shared_head.norm(m)).float()
        return out

    @staticmethod
    def _collect(out: ReferenceOutput, layer_idx: int, ex: dict) -> None:
        if "routing" in ex:
            out.routing.append(ex["routing"])
            out.routing_layers.append(layer_idx)
        if "topk" in ex:
            out.topk_indices.append(ex["topk"])
        if "index_scores" in ex:
            out.index_scores.append(ex["index_scores"])
        if "probs" in ex:
            out.attn_probs.append(ex["probs"])

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        """Log-probability of each actual next token: ``[B, T-1]`` float32 (``out[:, i] = log p(t_{i+1} | t_<=i)``)."""
        o = self.forward(input_ids, mtp=False, **kw)
        lp = o.logits[:, :-1].log_softmax(-1)
        return lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied tensors counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
