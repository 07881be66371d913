"""`vllm-frontier train-tiny`: train the embedded DeepSeek-V3.2-architecture model on CPU.

DeepSeek's recipe in miniature (the reference model in ``reference.py`` is the model being trained):

1. tokenizer: byte-level BPE (``tokenizer.train_bpe_tokenizer``) on the corpus's training split;
2. dense pre-training: next-token cross-entropy + ``mtp_weight`` x the MTP module's next-next-token
   cross-entropy (DeepSeek-V3 uses 0.3 early); MoE balance by DeepSeek-V3's aux-loss-free bias update
   (``e_score_correction_bias += bias_rate * sign(mean_load - load)`` after every step); sequences of
   ``short_seq_len`` tokens first, ``seq_len`` for the last ``1 - short_frac`` of the steps;
3. indexer warm-up: everything but the indexers frozen; each indexer learns
   ``KL(p || softmax(I))`` with ``p`` the dense attention of its layer summed over heads and
   L1-normalized, on detached inputs (DeepSeek-V3.2's dense warm-up stage);
4. (DeepSeek's sparse fine-tune stage is not run: the shipped weights are the dense-trained ones.)

Deterministic given ``--seed`` and ``--threads`` (fixed data order from a seeded generator). Default
threads = 1: on a shared 2-core machine two OpenMP threads ran ~10x slower than one.
Writes the two HF views (see ``export.py``) and ``train_report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .reference import DeepseekReference, ModelConfig, count_parameters, indexer_target_distribution

DEFAULT_OUT = Path(__file__).with_name("embedded")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 1
    vocab_size: int = 2048
    steps: int = 260
    tokens_per_step: int = 1024
    seq_len: int = 512
    short_seq_len: int = 256
    short_frac: float = 0.7
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    bias_rate: float = 1e-3
    indexer_steps: int = 50
    indexer_lr: float = 3e-3
    eval_windows: int = 16
    train_files: int | None = None       # limit (tests); None = the whole training split


def model_hf_config(vocab_size: int) -> dict:
    """The HF config of the embedded model (V3.2 view)."""
    from .tiny_factory import tiny_config

    return tiny_config(
        "deepseek_v32", mtp_layers=1, vocab_size=vocab_size, dtype="bfloat16",
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=256,
        q_lora_rank=128, first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, intermediate_size=512, n_shared_experts=1,
        index_topk=64, index_n_heads=4, index_head_dim=128,
    )


def init_weights(model: DeepseekReference, seed: int) -> None:
    """N(0, 0.02) matrices and embeddings, unit norm weights, zero biases; MTP head tied to lm_head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    for layer in model.mtp_layers:
        layer.shared_head.head.weight = model.lm_head.weight   # DeepSeek-V3: shared output head


def token_stream(texts: list[str], tok, eos_id: int) -> torch.Tensor:
    """All texts tokenized and joined, each followed by ``eos_id``: 1-D int64."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def batch_at(stream: torch.Tensor, gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """``batch`` windows of ``seq_len`` tokens at seeded random offsets: [batch, seq_len]."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """Up to ``n`` non-overlapping windows from the start of ``stream``: [n', seq_len]."""
    n = min(n, stream.numel() // seq_len)
    if n == 0:
        raise ValueError(f"the held-out stream has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


def lm_losses(out, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    V = out.logits.shape[-1]
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    mtp = F.cross_entropy(out.mtp_logits[:, :-1].reshape(-1, V), ids[:, 2:].reshape(-1))
    return main, mtp


def indexer_kl(out) -> torch.Tensor:
    """Mean over layers and queries of KL(p || softmax(I)), p = head-summed dense attention (L1-normed)."""
    losses = []
    for probs, scores in zip(out.attn_probs, out.index_scores):
        p = indexer_target_distribution(probs.detach())
        valid = torch.isfinite(scores)
        logq = scores.log_softmax(-1).masked_fill(~valid, 0.0)
        logp = p.clamp_min(1e-30).log().masked_fill(~valid, 0.0)
        losses.append((p * (logp - logq)).sum(-1).mean())
    return torch.stack(losses).mean()


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def update_router_bias(model: DeepseekReference, routing: list[torch.Tensor], rate: float,
                       layers: list | None = None) -> None:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower overloaded ones.

    routing: the expert ids of each MoE layer of ``layers`` (default: every layer), in order.
    """
    layers = model.model.layers if layers is None else layers
    moe_layers = [layer for layer in layers if hasattr(layer.mlp, "gate")]
    for layer, ids in zip(moe_layers, routing):
        E = layer.mlp.gate.weight.shape[0]
        load = torch.bincount(ids.reshape(-1), minlength=E).float()
        layer.mlp.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


def pretrain(model: DeepseekReference, stream: torch.Tensor, tc: TrainConfig, log) -> list[dict]:
    from tqdm import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and ".indexer." not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and ".indexer." not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(tc.seed + 1)
    history = []
    n_short = int(tc.steps * tc.short_frac)
    bar = tqdm(range(tc.steps), desc="pretrain", file=sys.stderr, mininterval=5)
    for step in bar:
        T = tc.short_seq_len if step < n_short else tc.seq_len
        ids = batch_at(stream, gen, max(1, tc.tokens_per_step // T), T)
        lr = lr_at(step, tc.steps, tc.lr, tc.warmup, tc.min_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        out = model(ids, sparse=False, run_indexer=False)
        main, mtp = lm_losses(out, ids)
        loss = main + tc.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, 1.0)
        opt.step()
        update_router_bias(model, out.routing, tc.bias_rate)
        rec = {"step": step, "T": T, "lr": lr, "loss": main.item(), "mtp_loss": mtp.item()}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", mtp=f"{rec['mtp_loss']:.3f}")
        if step % 20 == 0 or step == tc.steps - 1:
            log(json.dumps(rec))
    return history


def warmup_indexer(model: DeepseekReference, stream: torch.Tensor, tc: TrainConfig, log,
                   only: tuple[str, ...] | None = None) -> list[dict]:
    """The dense warm-up stage of the indexers; ``only``: train just the indexers under these name prefixes."""
    from tqdm import tqdm

    def trained(name: str) -> bool:
        return ".indexer." in name and (only is None or name.startswith(only))

    params = [p for n, p in model.named_parameters() if trained(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(trained(n))
    opt = torch.optim.AdamW(params, lr=tc.indexer_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(tc.seed + 2)
    history = []
    bar = tqdm(range(tc.indexer_steps), desc="indexer warm-up", file=sys.stderr, mininterval=5)
    for step in bar:
        ids = batch_at(stream, gen, max(1, tc.tokens_per_step // tc.seq_len), tc.seq_len)
        lr = lr_at(step, tc.indexer_steps, tc.indexer_lr, min(10, tc.indexer_steps), tc.min_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        out = model(ids, sparse=False, return_attn=True, detach_indexer_input=True)
        loss = indexer_kl(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "lr": lr, "kl": loss.item()}
        history.append(rec)
        bar.set_postfix(kl=f"{rec['kl']:.3f}")
        if step % 10 == 0 or step == tc.indexer_steps - 1:
            log(json.dumps(rec))
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def train(tc: TrainConfig, out_dir: Path, log=print) -> dict:
    """Run the whole recipe and export into ``out_dir``; returns the report (also in train_report.json)."""
    from .corpus import read_split
    from .export import export_views
    from .tokenizer import train_bpe_tokenizer
    from .train_eval import evaluate_reference

    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    t0 = time.time()
    out_dir = Path(out_dir)
    tok_dir = out_dir / "v32"
    train_texts = read_split("train", limit=tc.train_files)
    held_texts = read_split("heldout")
    tok = train_bpe_tokenizer(train_texts, tc.vocab_size, tok_dir)
    eos = tok.token_to_id("<|eos|>")
    train_stream = token_stream(train_texts, tok, eos)
    held_stream = token_stream(held_texts, tok, eos)
    log(f"corpus: {len(train_texts)} train files {train_stream.numel()} tokens, "
        f"{len(held_texts)} held-out files {held_stream.numel()} tokens")

    hf_cfg = model_hf_config(tc.vocab_size)
    model = DeepseekReference(ModelConfig.from_hf(hf_cfg))
    init_weights(model, tc.seed)
    log(f"parameters: {count_parameters(model)} unique")

    t1 = time.time()
    pre = pretrain(model, train_stream, tc, log)
    t2 = time.time()
    idx = warmup_indexer(model, train_stream, tc, log) if tc.indexer_steps else []
    t3 = time.time()
    v32, v3 = export_views(model, hf_cfg, tok_dir, out_dir)

    # Metrics of the exported (bf16-rounded) weights, so they describe what ships.
    shipped = DeepseekReference.from_pretrained(v32)
    windows = eval_windows(held_stream, tc.eval_windows, tc.seq_len)
    metrics = evaluate_reference(shipped, windows)
    report = {
        "train_config": asdict(tc),
        "model_parameters": count_parameters(model),
        "corpus_tokens": {"train": train_stream.numel(), "heldout": held_stream.numel()},
        "seconds": {"tokenizer_and_data": t1 - t0, "pretrain": t2 - t1, "indexer_warmup": t3 - t2,
                    "total_training": t3 - t0, "with_export_and_eval": time.time() - t0},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": tc.threads},
        "final_pretrain": pre[-1] if pre else None,
        "final_indexer": idx[-1] if idx else None,
        "heldout_reference_metrics": metrics,
        "history": {"pretrain": pre, "indexer": idx},
    }
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(json.dumps({k: report[k] for k in ("seconds", "heldout_reference_metrics")}, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """Train the embedded model (see module docstring) and write its two HF views."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="vllm-frontier train-tiny", description=main.__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default 1)")
    p.add_argument("--steps", type=int, default=d.steps, help="pre-training steps")
    p.add_argument("--indexer-steps", type=int, default=d.indexer_steps)
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows)
    p.add_argument("--train-files", type=int, default=None, help="use only the first N training files")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 3 steps, 2 indexer steps, 20 files, 128-token sequences")
    a = p.parse_args(argv)
    kw = dict(seed=a.seed, threads=a.threads, steps=a.steps, indexer_steps=a.indexer_steps,
              tokens_per_step=a.tokens_per_step, seq_len=a.seq_len, vocab_size=a.vocab_size,
              eval_windows=a.eval_windows, train_files=a.train_files)
    if a.quick:
        kw.update(steps=3, indexer_steps=2, train_files=20, seq_len=128, tokens_per_step=256, eval_windows=2)
    for name in ("steps", "tokens_per_step", "seq_len", "threads", "eval_windows"):
        if kw[name] <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if kw["seq_len"] < 4:
        p.error("--seq-len must be at least 4 (the MTP loss needs 3 tokens)")
    short = min(d.short_seq_len, kw["seq_len"])
    train(TrainConfig(short_seq_len=short, **kw), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
