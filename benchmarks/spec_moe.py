"""Speculative MoE: cross-rank dispatch+combine traffic and time vs plain expert parallelism.

For each routing-trace source (recorded from a model with ``--traces FILE``, and a synthetic
skewed trace), the first ``--train-fraction`` of tokens fits the offline pieces (expert
pre-grouping, the token-id -> rank predictor) and the rest is evaluated, in batches of
``--batch`` tokens (the tokens of one forward step, replicated over the EP ranks as after a
tensor-parallel attention all-reduce).  Variants:

* ``plain``: linear expert placement, tokens run on contiguous chunks (vLLM's layout);
* ``pregroup``: pre-grouped placement, contiguous chunks;
* ``shuffle[P]``: linear placement, tokens placed by predictor P;
* ``spec[P]``: pre-grouped placement + tokens placed by predictor P (Speculative MoE).

Predictors P (``vllm_frontier.moe.shuffle``): ``token_table`` (token id), ``prev_layer`` (previous
layer's experts; no prediction at the first MoE layer), ``lookahead`` (the layer's gate on its
pre-attention input, recorded in the trace file), ``chain`` (token_table, else prev_layer, else
lookahead; this order was picked on the validation split below) and ``oracle`` (the real routing:
the bound the capacity plan leaves; not available where tokens are placed before the gate runs, but inside
vLLM's TP attention layout every rank holds the gate's output before dispatch, and the vLLM adapter places
tokens by it).  Tokens are placed by ``plan_from_scores``
(``--planner first`` for the first-choice planner).  At the measured sizes a validation split
(fit on the first half of the fit tokens, score the second half) is reported too.

At ``--ranks-measured`` sizes the EP layer really runs on that many gloo processes: bytes come
from its counters, time from the collectives' wall clock, and the outputs are checked
(``spec`` bit-equal to plain EP with the same placement; every variant close to the reference).
At ``--ranks-computed`` sizes the same placement and prediction code counts the pairs
analytically (checked against the measured counters where both exist).

Bytes per remote (token, rank) pair: dispatch ``H * elem`` + meta ``k * 8`` + combine ``H * elem``.

    python benchmarks/spec_moe.py --record-traces vllm_frontier/models/embedded/v3 --record-tokens 51200 \
        --traces-out benchmarks/results/spec_moe/spec_moe_traces_v3.pt
    python benchmarks/spec_moe.py --traces benchmarks/results/spec_moe/spec_moe_traces_v3.pt --measured-layers 2 \
        --json benchmarks/results/spec_moe/spec_moe.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import header  # noqa: E402

from vllm_frontier.moe.dispatch import ByteCounters  # noqa: E402
from vllm_frontier.moe.ep_layer import EPMoELayer  # noqa: E402
from vllm_frontier.moe.experts import MoEWeights  # noqa: E402
from vllm_frontier.moe.launch import run_distributed  # noqa: E402
from vllm_frontier.moe.placement import ExpertPlacement, save_placements  # noqa: E402
from vllm_frontier.moe.pregroup import placement_stats, pregroup  # noqa: E402
from vllm_frontier.moe.reference import reference_moe  # noqa: E402
from vllm_frontier.moe.routing import RouterConfig  # noqa: E402
from vllm_frontier.moe.shuffle import (  # noqa: E402
    NO_PREDICTION,
    LookaheadPredictor,
    TokenTablePredictor,
    TransitionPredictor,
    chain_scores,
    contiguous_ranks,
    plan_from_scores,
    plan_token_ranks,
    prediction_accuracy,
    rank_presence,
)
from vllm_frontier.moe.traces import RoutingTraces, load_traces, synthetic_skewed_traces  # noqa: E402

PREDICTORS = ("token_table", "prev_layer", "lookahead", "chain", "oracle")
"""Token-placement predictors (see vllm_frontier.moe.shuffle); ``oracle`` places every token by its real
routing, which no deployment can do before the gate: it is the bound the capacity plan allows."""
MEASURED_PREDICTORS = ("token_table", "prev_layer", "lookahead", "chain", "oracle")


def variants_for(traces: RoutingTraces, predictors=PREDICTORS) -> list[str]:
    """``plain``, ``pregroup``, then ``shuffle[p]`` / ``spec[p]`` for every predictor the traces support."""
    out = ["plain", "pregroup"]
    for p in predictors:
        if p == "token_table" and traces.token_ids is None:
            continue
        if p == "prev_layer" and traces.num_layers < 2:
            continue
        if p == "lookahead" and traces.predicted_topk_ids is None:
            continue
        out += [f"shuffle[{p}]", f"spec[{p}]"]
    return out


def parse_variant(variant: str) -> tuple[str, str | None]:
    """``(placement name, predictor or None)``: ``spec[chain]`` -> ``("grouped", "chain")``."""
    if variant == "plain":
        return "linear", None
    if variant == "pregroup":
        return "grouped", None
    kind, pred = variant.rstrip("]").split("[")
    return ("linear" if kind == "shuffle" else "grouped"), pred


# ---------------------------------------------------------------- offline fit (placement, predictors)
def fit_layer(train: RoutingTraces, layer: int, n: int, max_imbalance: float):
    """Linear and pre-grouped placements and, per placement, the predictors fitted on ``train``."""
    e = train.num_experts
    linear = ExpertPlacement.linear(e, n)
    grouped = pregroup(train.topk_ids[layer], e, n, max_imbalance=max_imbalance)
    preds = {}
    for name, p in (("linear", linear), ("grouped", grouped)):
        d = {"placement": p, "token_table": None, "prev_layer": None, "lookahead": LookaheadPredictor(p)}
        if train.token_ids is not None:
            vocab = int(train.token_ids.max()) + 1
            d["token_table"] = TokenTablePredictor(vocab, p).fit(train.token_ids, train.topk_ids[layer])
        if layer > 0:
            d["prev_layer"] = TransitionPredictor(e, p).fit(train.topk_ids[layer - 1], train.topk_ids[layer])
        preds[name] = d
    return linear, grouped, preds


def batch_scores(pred: str, layer: int, b: RoutingTraces, d: dict) -> torch.Tensor:
    """``[T, N]`` rank scores of predictor ``pred`` for the batch ``b`` at ``layer`` (zero rows = none)."""
    p = d["placement"]
    zeros = torch.zeros((b.num_tokens, p.num_ranks), dtype=torch.float64)
    if pred == "oracle":
        return rank_presence(b.topk_ids[layer], p)
    parts = []
    if pred in ("token_table", "chain") and d["token_table"] is not None and b.token_ids is not None:
        parts.append(d["token_table"].scores(b.token_ids))
    if pred in ("prev_layer", "chain") and d["prev_layer"] is not None:
        parts.append(d["prev_layer"].scores(b.topk_ids[layer - 1]))
    if pred in ("lookahead", "chain") and b.predicted_topk_ids is not None:
        parts.append(d["lookahead"].scores(b.predicted_topk_ids[layer]))
    return chain_scores(*parts) if parts else zeros


def token_ranks_for(variant: str, layer: int, b: RoutingTraces, n: int, preds: dict, capacity: float,
                    planner: str = "scores") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(token ranks [T], raw predicted ranks [T] or None)`` for one batch."""
    t = b.num_tokens
    home = contiguous_ranks(t, n)
    place, pred = parse_variant(variant)
    if pred is None:
        return home, None
    scores = batch_scores(pred, layer, b, preds[place])
    raw = scores.argmax(dim=1)
    raw = torch.where(scores.sum(dim=1) > 0, raw, torch.full_like(raw, NO_PREDICTION))
    if planner == "first":
        # tokens without a prediction keep their contiguous chunk (as plain) unless it is full
        return plan_token_ranks(torch.where(raw == NO_PREDICTION, home, raw), n, capacity), raw
    return plan_from_scores(scores, capacity, home=home), raw


def remote_pairs(topk_ids: torch.Tensor, placement: ExpertPlacement, token_ranks: torch.Tensor) -> int:
    """Number of (token, rank) pairs whose rank differs from the rank running the token."""
    ranks = placement.rank_of(topk_ids)
    present = torch.zeros((ranks.shape[0], placement.num_ranks), dtype=torch.bool)
    present.scatter_(1, ranks, True)
    present[torch.arange(ranks.shape[0]), token_ranks] = False
    return int(present.sum())


def evaluate(test: RoutingTraces, fits, n: int, batch: int, capacity: float, hidden: int, elem: int,
             variants: list[str], planner: str = "scores"):
    """Analytic pair counts and bytes for every variant, plus prediction accuracy.

    ``prediction_accuracy[variant]``: ``raw`` = the predictor's own first choice (before the capacity
    plan; tokens without a prediction count as misses), ``planned`` = the rank the plan gave the token.
    """
    k = test.top_k
    pair_bytes = 2 * hidden * elem + 8 * k
    out = {v: {"remote_pairs": 0, "remote_pairs_per_layer": [0] * len(fits)} for v in variants}
    acc = {v: {"raw": [], "planned": []} for v in variants if parse_variant(v)[1] is not None}
    stats = {"linear": [], "grouped": []}
    tokens = 0
    for layer, (linear, grouped, preds) in enumerate(fits):
        ids_all = test.topk_ids[layer]
        stats["linear"].append(placement_stats(ids_all, linear))
        stats["grouped"].append(placement_stats(ids_all, grouped))
        for start in range(0, test.num_tokens - batch + 1, batch):
            b = test.slice(start, start + batch)
            ids = b.topk_ids[layer]
            tokens += batch
            for v in variants:
                placement = linear if parse_variant(v)[0] == "linear" else grouped
                tr, raw = token_ranks_for(v, layer, b, n, preds, capacity, planner)
                pairs = remote_pairs(ids, placement, tr)
                out[v]["remote_pairs"] += pairs
                out[v]["remote_pairs_per_layer"][layer] += pairs
                if raw is not None:
                    acc[v]["raw"].append(prediction_accuracy(raw, ids, placement))
                    acc[v]["planned"].append(prediction_accuracy(tr, ids, placement))
    base = out["plain"]["remote_pairs"]
    for v in variants:
        out[v]["bytes"] = out[v]["remote_pairs"] * pair_bytes
        out[v]["pairs_per_token"] = out[v]["remote_pairs"] / max(tokens, 1)
        out[v]["reduction_vs_plain"] = 1 - out[v]["remote_pairs"] / base if base else 0.0
        out[v]["reduction_vs_plain_per_layer"] = [
            1 - a / b if b else 0.0
            for a, b in zip(out[v]["remote_pairs_per_layer"], out["plain"]["remote_pairs_per_layer"])]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    out["prediction_accuracy"] = {
        v: {stage: {key: mean(rows, key) for key in ("best", "hit", "covered")} for stage, rows in d.items()}
        for v, d in acc.items()
    }
    out["placement"] = {
        name: {key: mean(rows, key) for key in ("distinct_ranks", "local_all", "load_imbalance")}
        for name, rows in stats.items()
    }
    out["tokens_evaluated"] = tokens
    return out


# ---------------------------------------------------------------- measured runs (real gloo ranks)
def _measure_worker(rank, n, test, fits, batch, capacity, hidden, inter, steps, variants, planner):
    torch.manual_seed(0)
    e = test.num_experts
    weights = MoEWeights.random(e, hidden, inter, shared_intermediate_size=inter, seed=1)
    cfg = RouterConfig(top_k=test.top_k)
    res = {v: {"bytes": 0, "dispatch_sent": 0, "comm_seconds": 0.0, "step_seconds": 0.0} for v in variants}
    max_diff = 0.0
    lossless = True
    for layer, (linear, grouped, preds) in enumerate(fits):
        layers = {"linear": EPMoELayer(weights, cfg, linear, counters=ByteCounters()),
                  "grouped": EPMoELayer(weights, cfg, grouped, counters=ByteCounters())}
        for step in range(steps):
            start = step * batch
            b = test.slice(start, start + batch)
            ids = b.topk_ids[layer]
            x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(step))
            routing = (torch.full(ids.shape, 1.0 / ids.shape[1]), ids)
            outs = {}
            for v in variants:
                layer_obj = layers[parse_variant(v)[0]]
                tr, _ = token_ranks_for(v, layer, b, n, preds, capacity, planner)
                layer_obj.counters.reset()
                t0 = time.perf_counter()
                outs[v] = layer_obj.forward_replicated(x, tr, routing)
                res[v]["step_seconds"] += time.perf_counter() - t0
                c = layer_obj.counters
                res[v]["bytes"] += c.a2a_sent
                res[v]["dispatch_sent"] += c.dispatch_sent
                res[v]["comm_seconds"] += c.comm_seconds
            # lossless: speculation never changes the result for a given placement
            for v in variants:
                same = "plain" if parse_variant(v)[0] == "linear" else "pregroup"
                lossless &= torch.equal(outs[v], outs[same])
            if rank == 0:
                ref = reference_moe(x, weights, cfg, grouped, routing=routing)
                lossless &= torch.equal(outs["pregroup"], ref)
                for v in variants:
                    max_diff = max(max_diff, (outs[v] - outs["plain"]).abs().max().item())
    return {"variants": res, "lossless": lossless, "max_abs_diff_spec_vs_plain": max_diff}


def measure(test, fits, n, args):
    steps = min(args.steps, test.num_tokens // args.batch)
    t0 = time.perf_counter()
    variants = variants_for(test, MEASURED_PREDICTORS)
    per_rank = run_distributed(_measure_worker, n, test, fits, args.batch, args.capacity, args.hidden,
                               args.inter, steps, variants, args.planner)
    out = {"ranks": n, "steps_per_layer": steps, "batch": args.batch, "wall_seconds": time.perf_counter() - t0,
           "lossless_all_ranks": all(r["lossless"] for r in per_rank),
           "max_abs_diff_any_vs_plain": per_rank[0]["max_abs_diff_spec_vs_plain"], "variants": variants}
    for v in variants:
        out[v] = {
            "bytes_sent_total": sum(r["variants"][v]["bytes"] for r in per_rank),
            "comm_seconds_max_rank": max(r["variants"][v]["comm_seconds"] for r in per_rank),
            "step_seconds_max_rank": max(r["variants"][v]["step_seconds"] for r in per_rank),
        }
    base = out["plain"]["bytes_sent_total"]
    for v in variants:
        out[v]["reduction_vs_plain"] = 1 - out[v]["bytes_sent_total"] / base if base else 0.0
    # the analytic count must agree with what the layer really sent (counts metadata aside)
    sub = RoutingTraces(test.topk_ids[:len(fits), : steps * args.batch], test.num_experts,
                        None if test.token_ids is None else test.token_ids[: steps * args.batch], test.meta,
                        None if test.predicted_topk_ids is None
                        else test.predicted_topk_ids[:len(fits), : steps * args.batch])
    analytic = evaluate(sub, fits, n, args.batch, args.capacity, args.hidden, 4, variants, args.planner)
    counts_meta = n * (n - 1) * 8 * steps * len(fits)
    out["analytic_matches_measured"] = all(
        analytic[v]["bytes"] + counts_meta == out[v]["bytes_sent_total"] for v in variants
    )
    return out


# ---------------------------------------------------------------- trace recording (trained model)
def record_traces(model_dir: str, max_tokens: int, seq_len: int) -> RoutingTraces:
    """Run the project's torch reference model on held-out corpus text and keep its routing.

    Also records the lookahead prediction of every main MoE layer (its gate, bias and top-k rule via
    the layer's own ``mlp.route``, applied to ``post_attention_layernorm`` of the layer's *input*
    residual stream, i.e. before its attention; see ``LookaheadPredictor``).  Deterministic: the
    held-out files in listing order, cut into ``seq_len`` windows, at most ``max_tokens`` tokens.
    """
    from tokenizers import Tokenizer

    from vllm_frontier.models.corpus import read_split
    from vllm_frontier.models.reference import DeepseekReference

    model = DeepseekReference.from_pretrained(model_dir).eval()
    tok = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
    ids: list[int] = []
    for text in read_split("heldout"):
        ids.extend(tok.encode(text).ids)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    ids = ids[: len(ids) - len(ids) % seq_len]
    seqs = torch.tensor(ids).view(-1, seq_len)
    moe_layers = [layer for layer in model.main_layers if model.cfg.is_moe_layer(layer.layer_idx)]
    lookahead: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in moe_layers}

    def predict_before_attention(mod, args):
        h = args[0]  # the layer's input residual stream [B, T, H]
        _, pred_ids, _ = mod.mlp.route(mod.post_attention_layernorm(h).reshape(-1, h.shape[-1]))
        lookahead[mod.layer_idx].append(pred_ids)

    hooks = [layer.register_forward_pre_hook(predict_before_attention) for layer in moe_layers]
    per_layer: list[list[torch.Tensor]] = []
    try:
        with torch.no_grad():
            for s in seqs:
                o = model(s.unsqueeze(0), mtp=False)
                main = [r for r, layer in zip(o.routing, o.routing_layers)
                        if layer < model.cfg.num_hidden_layers]
                if not per_layer:
                    per_layer = [[] for _ in main]
                for acc, r in zip(per_layer, main):
                    acc.append(r[0])
    finally:
        for hk in hooks:
            hk.remove()
    topk = torch.stack([torch.cat(rows) for rows in per_layer])
    pred = torch.stack([torch.cat(lookahead[layer.layer_idx]) for layer in moe_layers])
    return RoutingTraces(topk, model.cfg.n_routed_experts, seqs.flatten(),
                         {"source": "reference model", "model_dir": str(model_dir), "corpus": "heldout",
                          "seq_len": seq_len, "max_tokens": max_tokens,
                          "predicted_topk_ids": "lookahead: layer L gate on post_attention_layernorm(input of L)"},
                         pred)


# ---------------------------------------------------------------- main
def run_source(name, traces, args):
    train, test = traces.split(args.train_fraction)
    e = traces.num_experts
    variants = variants_for(traces)
    result = {"num_experts": e, "top_k": traces.top_k, "layers": traces.num_layers,
              "tokens_train": train.num_tokens, "tokens_test": test.num_tokens, "meta": traces.meta,
              "variants": variants, "computed": {}, "measured": {}, "validation": {}, "skipped": {}}
    for n in sorted(set(args.ranks_measured) | set(args.ranks_computed)):
        if n > e or e % n:
            result["skipped"][n] = f"{e} experts cannot be split evenly over {n} ranks"
            continue
        t0 = time.perf_counter()
        fits = [fit_layer(train, layer, n, args.max_imbalance) for layer in range(traces.num_layers)]
        fit_s = time.perf_counter() - t0
        c = result["computed"][n] = evaluate(test, fits, n, args.batch, args.capacity, args.hidden, 4,
                                             variants, args.planner)
        c["fit_seconds"] = fit_s
        print(f"[{name}] N={n}: " + ", ".join(
            f"{v} {c[v]['reduction_vs_plain']:.1%}" for v in variants if v != "plain"), flush=True)
        if n in args.ranks_measured:
            if args.validate:
                # predictor choice is made here: fit on the first half of the fit tokens, score the second
                fit_a, fit_b = train.split(0.5)
                vfits = [fit_layer(fit_a, layer, n, args.max_imbalance) for layer in range(traces.num_layers)]
                val = evaluate(fit_b, vfits, n, args.batch, args.capacity, args.hidden, 4, variants, args.planner)
                result["validation"][n] = {v: {"reduction_vs_plain": val[v]["reduction_vs_plain"],
                                               "reduction_vs_plain_per_layer": val[v]["reduction_vs_plain_per_layer"]}
                                           for v in variants}
            mfits = fits[: args.measured_layers]
            m = result["measured"][n] = measure(test, mfits, n, args)
            print(f"[{name}] N={n} measured: " + ", ".join(
                f"{v} {m[v]['reduction_vs_plain']:.1%}" for v in m["variants"] if v != "plain")
                + f"; lossless={m['lossless_all_ranks']}, analytic==measured {m['analytic_matches_measured']}",
                flush=True)
        if args.write_placement and n == args.placement_ranks and name == args.placement_source:
            save_placements(args.write_placement, {layer: f[1] for layer, f in enumerate(fits)},
                            {"source": name, "max_imbalance": args.max_imbalance, "train_tokens": train.num_tokens})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", help="routing traces recorded from a model (see --record-traces)")
    ap.add_argument("--record-traces", metavar="MODEL_DIR", help="record traces with the reference model and exit")
    ap.add_argument("--traces-out", default="routing_traces.pt")
    ap.add_argument("--record-tokens", type=int, default=32768)
    ap.add_argument("--record-seq-len", type=int, default=256)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--synthetic-experts", type=int, default=256)
    ap.add_argument("--synthetic-top-k", type=int, default=8)
    ap.add_argument("--synthetic-tokens", type=int, default=16384)
    ap.add_argument("--synthetic-layers", type=int, default=2)
    ap.add_argument("--ranks-measured", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--ranks-computed", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    ap.add_argument("--measured-layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="measured batches per layer")
    ap.add_argument("--batch", type=int, default=256, help="tokens per step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=32)
    ap.add_argument("--capacity", type=float, default=1.5, help="per-rank token cap / (T/N)")
    ap.add_argument("--max-imbalance", type=float, default=1.1)
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument("--write-placement", help="write the pre-grouped placement file for --placement-ranks")
    ap.add_argument("--placement-ranks", type=int, default=8)
    ap.add_argument("--placement-source", default="trained")
    ap.add_argument("--planner", choices=("scores", "first"), default="scores",
                    help="scores: next-best rank when the first choice is full (plan_from_scores); "
                         "first: first choice or any free rank (plan_token_ranks)")
    ap.add_argument("--no-validate", dest="validate", action="store_false",
                    help="skip the validation split (fit on the first half of the fit tokens, score the rest)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    if args.record_traces:
        tr = record_traces(args.record_traces, args.record_tokens, args.record_seq_len)
        tr.save(args.traces_out)
        print(f"wrote {args.traces_out}: {tr.num_layers} layers x {tr.num_tokens} tokens, top-{tr.top_k} of {tr.num_experts}")
        return 0

    sources = {}
    if args.traces:
        sources["trained"] = load_traces(args.traces)
    if not args.no_synthetic:
        sources["synthetic"] = synthetic_skewed_traces(
            num_layers=args.synthetic_layers, num_tokens=args.synthetic_tokens,
            num_experts=args.synthetic_experts, top_k=args.synthetic_top_k)
    if not sources:
        ap.error("nothing to measure: give --traces or drop --no-synthetic")
    report = {"header": header(), "config": vars(args), "bytes_per_remote_pair":
              f"2 * hidden * 4 + 8 * top_k (fp32 rows; hidden={args.hidden})", "sources": {}}
    for name, tr in sources.items():
        report["sources"][name] = run_source(name, tr, args)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
