"""Speculative MoE: cross-rank dispatch+combine traffic and time vs plain expert parallelism.

For each routing-trace source (recorded from a model with ``--traces FILE``, and a synthetic
skewed trace), the first ``--train-fraction`` of tokens fits the offline pieces (expert
pre-grouping, the token-id -> rank predictor) and the rest is evaluated, in batches of
``--batch`` tokens (the tokens of one forward step, replicated over the EP ranks as after a
tensor-parallel attention all-reduce).  Four variants:

* ``plain``: linear expert placement, tokens run on contiguous chunks (vLLM's layout);
* ``pregroup``: pre-grouped placement, contiguous chunks;
* ``shuffle``: linear placement, tokens placed by the predictor;
* ``spec``: pre-grouped placement + predicted token placement (Speculative MoE).

At ``--ranks-measured`` sizes the EP layer really runs on that many gloo processes: bytes come
from its counters, time from the collectives' wall clock, and the outputs are checked
(``spec`` bit-equal to plain EP with the same placement; every variant close to the reference).
At ``--ranks-computed`` sizes the same placement and prediction code counts the pairs
analytically (checked against the measured counters where both exist).

Bytes per remote (token, rank) pair: dispatch ``H * elem`` + meta ``k * 8`` + combine ``H * elem``.

    python benchmarks/spec_moe.py --json benchmarks/results/spec_moe.json [--traces FILE]
    python benchmarks/spec_moe.py --record-traces MODEL_DIR --traces-out traces.pt
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
    TokenTablePredictor,
    contiguous_ranks,
    plan_token_ranks,
    prediction_accuracy,
)
from vllm_frontier.moe.traces import RoutingTraces, load_traces, synthetic_skewed_traces  # noqa: E402

VARIANTS = ("plain", "pregroup", "shuffle", "spec")


# ---------------------------------------------------------------- offline fit (placement, predictor)
def fit_layer(train: RoutingTraces, layer: int, n: int, max_imbalance: float):
    """Pre-grouped placement and token-table predictors (for linear and pre-grouped placements)."""
    e = train.num_experts
    linear = ExpertPlacement.linear(e, n)
    grouped = pregroup(train.topk_ids[layer], e, n, max_imbalance=max_imbalance)
    preds = {}
    for name, p in (("linear", linear), ("grouped", grouped)):
        if train.token_ids is None:
            preds[name] = None
        else:
            vocab = int(train.token_ids.max()) + 1
            preds[name] = TokenTablePredictor(vocab, p).fit(train.token_ids, train.topk_ids[layer])
    return linear, grouped, preds


def token_ranks_for(variant: str, batch_tokens, n: int, preds, capacity: float) -> torch.Tensor:
    t = batch_tokens.shape[0] if batch_tokens is not None else None
    if variant in ("plain", "pregroup"):
        return contiguous_ranks(t, n)
    pred = preds["linear" if variant == "shuffle" else "grouped"]
    guess = pred.predict(batch_tokens) if pred is not None else torch.full((t,), NO_PREDICTION)
    # tokens without a prediction keep their contiguous chunk (as plain) unless it is full
    home = contiguous_ranks(t, n)
    guess = torch.where(guess == NO_PREDICTION, home, guess)
    return plan_token_ranks(guess, n, capacity)


def remote_pairs(topk_ids: torch.Tensor, placement: ExpertPlacement, token_ranks: torch.Tensor) -> int:
    """Number of (token, rank) pairs whose rank differs from the rank running the token."""
    ranks = placement.rank_of(topk_ids)
    present = torch.zeros((ranks.shape[0], placement.num_ranks), dtype=torch.bool)
    present.scatter_(1, ranks, True)
    present[torch.arange(ranks.shape[0]), token_ranks] = False
    return int(present.sum())


def evaluate(test: RoutingTraces, fits, n: int, batch: int, capacity: float, hidden: int, elem: int):
    """Analytic pair counts and bytes for every variant, plus prediction accuracy."""
    k = test.top_k
    pair_bytes = 2 * hidden * elem + 8 * k
    out = {v: {"remote_pairs": 0} for v in VARIANTS}
    acc = {"linear": [], "grouped": []}
    stats = {"linear": [], "grouped": []}
    tokens = 0
    for layer, (linear, grouped, preds) in enumerate(fits):
        ids_all = test.topk_ids[layer]
        stats["linear"].append(placement_stats(ids_all, linear))
        stats["grouped"].append(placement_stats(ids_all, grouped))
        for start in range(0, test.num_tokens - batch + 1, batch):
            ids = ids_all[start:start + batch]
            tok = None if test.token_ids is None else test.token_ids[start:start + batch]
            tokens += batch
            for v in VARIANTS:
                placement = linear if v in ("plain", "shuffle") else grouped
                tr = token_ranks_for(v, tok, n, preds, capacity)
                out[v]["remote_pairs"] += remote_pairs(ids, placement, tr)
                if v in ("shuffle", "spec"):
                    acc["linear" if v == "shuffle" else "grouped"].append(prediction_accuracy(tr, ids, placement))
    for v in VARIANTS:
        out[v]["bytes"] = out[v]["remote_pairs"] * pair_bytes
        out[v]["pairs_per_token"] = out[v]["remote_pairs"] / max(tokens, 1)
    base = out["plain"]["bytes"]
    for v in VARIANTS:
        out[v]["reduction_vs_plain"] = 1 - out[v]["bytes"] / base if base else 0.0

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    out["prediction_accuracy"] = {
        name: {key: mean(rows, key) for key in ("best", "hit", "covered")} for name, rows in acc.items()
    }
    out["placement"] = {
        name: {key: mean(rows, key) for key in ("distinct_ranks", "local_all", "load_imbalance")}
        for name, rows in stats.items()
    }
    out["tokens_evaluated"] = tokens
    return out


# ---------------------------------------------------------------- measured runs (real gloo ranks)
def _measure_worker(rank, n, test, fits, batch, capacity, hidden, inter, steps):
    torch.manual_seed(0)
    e = test.num_experts
    weights = MoEWeights.random(e, hidden, inter, shared_intermediate_size=inter, seed=1)
    cfg = RouterConfig(top_k=test.top_k)
    res = {v: {"bytes": 0, "dispatch_sent": 0, "comm_seconds": 0.0, "step_seconds": 0.0} for v in VARIANTS}
    max_diff = 0.0
    lossless = True
    for layer, (linear, grouped, preds) in enumerate(fits):
        layers = {"linear": EPMoELayer(weights, cfg, linear, counters=ByteCounters()),
                  "grouped": EPMoELayer(weights, cfg, grouped, counters=ByteCounters())}
        for step in range(steps):
            start = step * batch
            ids = test.topk_ids[layer, start:start + batch]
            tok = None if test.token_ids is None else test.token_ids[start:start + batch]
            x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(step))
            routing = (torch.full(ids.shape, 1.0 / ids.shape[1]), ids)
            outs = {}
            for v in VARIANTS:
                layer_obj = layers["linear" if v in ("plain", "shuffle") else "grouped"]
                tr = token_ranks_for(v, tok, n, preds, capacity)
                layer_obj.counters.reset()
                t0 = time.perf_counter()
                outs[v] = layer_obj.forward_replicated(x, tr, routing)
                res[v]["step_seconds"] += time.perf_counter() - t0
                c = layer_obj.counters
                res[v]["bytes"] += c.a2a_sent
                res[v]["dispatch_sent"] += c.dispatch_sent
                res[v]["comm_seconds"] += c.comm_seconds
            # lossless: speculation never changes the result for a given placement
            lossless &= torch.equal(outs["shuffle"], outs["plain"]) and torch.equal(outs["spec"], outs["pregroup"])
            if rank == 0:
                ref = reference_moe(x, weights, cfg, grouped, routing=routing)
                lossless &= torch.equal(outs["spec"], ref)
                max_diff = max(max_diff, (outs["spec"] - outs["plain"]).abs().max().item())
    return {"variants": res, "lossless": lossless, "max_abs_diff_spec_vs_plain": max_diff}


def measure(test, fits, n, args):
    steps = min(args.steps, test.num_tokens // args.batch)
    t0 = time.perf_counter()
    per_rank = run_distributed(_measure_worker, n, test, fits, args.batch, args.capacity, args.hidden,
                               args.inter, steps)
    out = {"ranks": n, "steps_per_layer": steps, "batch": args.batch, "wall_seconds": time.perf_counter() - t0,
           "lossless_all_ranks": all(r["lossless"] for r in per_rank),
           "max_abs_diff_spec_vs_plain": per_rank[0]["max_abs_diff_spec_vs_plain"]}
    for v in VARIANTS:
        out[v] = {
            "bytes_sent_total": sum(r["variants"][v]["bytes"] for r in per_rank),
            "comm_seconds_max_rank": max(r["variants"][v]["comm_seconds"] for r in per_rank),
            "step_seconds_max_rank": max(r["variants"][v]["step_seconds"] for r in per_rank),
        }
    base = out["plain"]["bytes_sent_total"]
    for v in VARIANTS:
        out[v]["reduction_vs_plain"] = 1 - out[v]["bytes_sent_total"] / base if base else 0.0
    # the analytic count must agree with what the layer really sent (counts metadata aside)
    sub = RoutingTraces(test.topk_ids[:, : steps * args.batch], test.num_experts,
                        None if test.token_ids is None else test.token_ids[: steps * args.batch])
    analytic = evaluate(sub, fits, n, args.batch, args.capacity, args.hidden, 4)
    counts_meta = n * (n - 1) * 8 * steps * len(fits)
    out["analytic_matches_measured"] = all(
        analytic[v]["bytes"] + counts_meta == out[v]["bytes_sent_total"] for v in VARIANTS
    )
    return out


# ---------------------------------------------------------------- trace recording (trained model)
def record_traces(model_dir: str, max_tokens: int, seq_len: int) -> RoutingTraces:
    """Run the project's torch reference model on held-out corpus text and keep its routing."""
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
    ids = ids[: max_tokens - max_tokens % seq_len]
    seqs = torch.tensor(ids).view(-1, seq_len)
    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for s in seqs:
            o = model(s.unsqueeze(0), mtp=False)
            main = [r for r, layer in zip(o.routing, o.routing_layers) if layer < model.cfg.num_hidden_layers]
            if not per_layer:
                per_layer = [[] for _ in main]
            for acc, r in zip(per_layer, main):
                acc.append(r[0])
    topk = torch.stack([torch.cat(rows) for rows in per_layer])
    return RoutingTraces(topk, model.cfg.n_routed_experts, seqs.flatten(),
                         {"source": "reference model", "model_dir": str(model_dir), "corpus": "heldout",
                          "seq_len": seq_len})


# ---------------------------------------------------------------- main
def run_source(name, traces, args):
    train, test = traces.split(args.train_fraction)
    e = traces.num_experts
    result = {"num_experts": e, "top_k": traces.top_k, "layers": traces.num_layers,
              "tokens_train": train.num_tokens, "tokens_test": test.num_tokens, "meta": traces.meta,
              "computed": {}, "measured": {}, "skipped": {}}
    for n in sorted(set(args.ranks_measured) | set(args.ranks_computed)):
        if n > e or e % n:
            result["skipped"][n] = f"{e} experts cannot be split evenly over {n} ranks"
            continue
        t0 = time.perf_counter()
        fits = [fit_layer(train, layer, n, args.max_imbalance) for layer in range(traces.num_layers)]
        fit_s = time.perf_counter() - t0
        result["computed"][n] = evaluate(test, fits, n, args.batch, args.capacity, args.hidden, 4)
        result["computed"][n]["fit_seconds"] = fit_s
        print(f"[{name}] N={n}: spec {result['computed'][n]['spec']['reduction_vs_plain']:.1%} less traffic "
              f"(pregroup {result['computed'][n]['pregroup']['reduction_vs_plain']:.1%}, shuffle "
              f"{result['computed'][n]['shuffle']['reduction_vs_plain']:.1%})", flush=True)
        if n in args.ranks_measured:
            mfits = fits[: args.measured_layers]
            result["measured"][n] = measure(test, mfits, n, args)
            m = result["measured"][n]
            print(f"[{name}] N={n} measured: spec {m['spec']['reduction_vs_plain']:.1%} less, lossless="
                  f"{m['lossless_all_ranks']}, analytic==measured {m['analytic_matches_measured']}", flush=True)
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
