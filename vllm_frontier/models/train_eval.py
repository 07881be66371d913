"""Quality metrics of a ``DeepseekReference`` on held-out windows (the torch side of ``benchmarks/quality.py``)."""

from __future__ import annotations

import math
import os

import torch

from .reference import DeepseekReference, indexer_target_distribution, stable_topk_indices


def indexer_recall(attn_probs: torch.Tensor, topk: torch.Tensor, k: int) -> tuple[float, int]:
    """Recall of the dense attention's top-k keys by the indexer's selection, over queries with > k keys.

    attn_probs: [B, N, T, T] dense attention; topk: [B, T, k] indexer selection (-1 = none).
    The dense top-k ranks keys by head-summed probability (lower position wins ties).
    Returns (mean recall, number of queries counted); (nan, 0) when T <= k.
    """
    B, N, T, _ = attn_probs.shape
    if T <= k:
        return float("nan"), 0
    p = indexer_target_distribution(attn_probs)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    dense = stable_topk_indices(p.masked_fill(~causal, float("-inf")), k)       # [B, T, k]
    q = slice(k, T)                                   # query t has t + 1 keys; > k from t = k on
    d, s = dense[:, q], topk[:, q]
    hit = (d[..., :, None] == s[..., None, :]) & (d[..., :, None] >= 0)
    rec = hit.any(-1).sum(-1).float() / k
    return rec.mean().item(), rec.numel()


@torch.no_grad()
def evaluate_reference(model: DeepseekReference, windows: torch.Tensor) -> dict:
    """Held-out metrics on ``windows [n, T]`` (token ids; each window scored on its tokens 1..T-1).

    Returns perplexity / top-1 accuracy of the main model (dense attention, and sparse top-k attention
    when the model has an indexer), the MTP module's next-next-token top-1 accuracy, and the indexer's
    top-k recall of dense attention per layer.
    """
    cfg = model.cfg
    nll = correct = count = 0.0
    mtp_correct = mtp_count = 0.0
    sparse_nll = sparse_correct = 0.0
    recalls: dict[int, list[tuple[float, int]]] = {}
    for w in windows:
        ids = w[None]
        o = model(ids, sparse=False, return_attn=cfg.has_indexer)
        lp = o.logits[0, :-1].log_softmax(-1)
        tgt = ids[0, 1:]
        nll += -lp.gather(-1, tgt[:, None]).sum().item()
        correct += (lp.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
        if o.mtp_logits is not None and ids.shape[1] >= 3:
            mtp_correct += (o.mtp_logits[0, :-1].argmax(-1) == ids[0, 2:]).sum().item()
            mtp_count += ids.shape[1] - 2
        if cfg.has_indexer:
            attn_layers = [layer.layer_idx for layer in model.model.layers]
            for li, probs, topk in zip(attn_layers, o.attn_probs, o.topk_indices):
                recalls.setdefault(li, []).append(indexer_recall(probs, topk, cfg.index_topk))
            s = model(ids, sparse=True, mtp=False)
            slp = s.logits[0, :-1].log_softmax(-1)
            sparse_nll += -slp.gather(-1, tgt[:, None]).sum().item()
            sparse_correct += (slp.argmax(-1) == tgt).sum().item()
    out = {
        "windows": int(windows.shape[0]),
        "window_tokens": int(windows.shape[1]),
        "scored_tokens": int(count),
        "perplexity": math.exp(nll / count),
        "top1_accuracy": correct / count,
        "vocab_size": cfg.vocab_size,
    }
    if mtp_count:
        out["mtp_next_next_top1_accuracy"] = mtp_correct / mtp_count
    if cfg.has_indexer:
        out["sparse_topk"] = cfg.index_topk
        out["sparse_perplexity"] = math.exp(sparse_nll / count)
        out["sparse_top1_accuracy"] = sparse_correct / count
        per_layer = {}
        for li, vals in recalls.items():
            n = sum(c for _, c in vals)
            per_layer[str(li)] = sum(r * c for r, c in vals) / n if n else float("nan")
        out["indexer_recall_per_layer"] = per_layer
        finite = [v for v in per_layer.values() if v == v]
        out["indexer_recall"] = sum(finite) / len(finite) if finite else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------
# vLLM side: one engine per configuration, in a subprocess, so environment toggles and engine args apply
# cleanly and the engine's memory is returned when it exits.

PARITY_CUSTOM_OPS = ["-rotary_embedding"]   # vLLM CPU's rotary op is wrong for 3-D inputs (facts doc)


def run_vllm(model_dir, windows: list[list[int]], *, dtype: str = "float32", engine_args: dict | None = None,
             env: dict | None = None, mtp_prompts: list[list[int]] | None = None, mtp_max_tokens: int = 64,
             gen_prompts: list[list[int]] | None = None, gen_total_len: int = 256,
             timeout: float = 900.0) -> dict:
    """Score ``windows`` (token-id lists) with vLLM's prompt logprobs in a fresh subprocess.

    Returns ``{"logprobs": [[float]*(T-1)], "ranks": [[int]*(T-1)]}`` (entry i: token i+1 given tokens
    <= i; rank 1 = vLLM's top-1). With ``mtp_prompts`` the engine instead runs MTP speculative decoding
    (one draft token, greedy, ``mtp_max_tokens`` each) and returns ``{"drafts", "accepted",
    "acceptance"}`` from vLLM's spec-decode counters. With ``gen_prompts`` it returns ``{"generated":
    [[int]]}``: greedy continuations (EOS ignored) that fill each prompt up to ``gen_total_len`` tokens.
    """
    import json as _json
    import subprocess
    import sys
    import tempfile

    req = {"model": str(model_dir), "windows": windows, "dtype": dtype, "engine_args": engine_args or {},
           "mtp_prompts": mtp_prompts, "mtp_max_tokens": mtp_max_tokens,
           "gen_prompts": gen_prompts, "gen_total_len": gen_total_len}
    with tempfile.TemporaryDirectory(prefix="frontier-quality-") as td:
        rq, rs, lg = (os.path.join(td, n) for n in ("request.json", "result.json", "engine.log"))
        with open(rq, "w") as f:
            _json.dump(req, f)
        e = dict(os.environ)
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        e.update(env or {})
        with open(lg, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "vllm_frontier.models.train_eval", rq, rs],
                                  stdout=log, stderr=subprocess.STDOUT, env=e, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(rs):
            tail = open(lg, errors="replace").read()[-4000:]
            raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}); log tail:\n{tail}")
        with open(rs) as f:
            return _json.load(f)


def _worker(request_path: str, result_path: str) -> None:
    import json as _json

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = _json.load(open(request_path))
    kw = dict(model=req["model"], dtype=req["dtype"], max_model_len=1024, enforce_eager=True,
              max_num_seqs=8, seed=0, compilation_config={"custom_ops": list(PARITY_CUSTOM_OPS)})
    if req["mtp_prompts"]:
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": 1}
        kw["disable_log_stats"] = False
    if req["gen_prompts"]:
        kw["max_num_seqs"] = 64
    kw.update(req["engine_args"])
    llm = LLM(**kw)
    if req["mtp_prompts"]:
        sp = SamplingParams(temperature=0.0, max_tokens=req["mtp_max_tokens"], ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["mtp_prompts"]], sp, use_tqdm=False)
        drafts = accepted = 0
        for m in llm.get_metrics():
            if m.name == "vllm:spec_decode_num_drafts":
                drafts += m.value
            elif m.name == "vllm:spec_decode_num_accepted_tokens":
                accepted += m.value
        res = {"drafts": drafts, "accepted": accepted, "acceptance": accepted / drafts if drafts else None}
    elif req["gen_prompts"]:
        prompts = req["gen_prompts"]
        sps = [SamplingParams(temperature=0.0, max_tokens=req["gen_total_len"] - len(p), ignore_eos=True)
               for p in prompts]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
        res = {"generated": [list(o.outputs[0].token_ids) for o in outs]}
    else:
        sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in req["windows"]], sp, use_tqdm=False)
        res = {"logprobs": [], "ranks": []}
        for w, o in zip(req["windows"], outs):
            lps, ranks = [], []
            for tok, entry in zip(w[1:], o.prompt_logprobs[1:]):
                lps.append(entry[tok].logprob)
                ranks.append(entry[tok].rank)
            res["logprobs"].append(lps)
            res["ranks"].append(ranks)
    # Written under a temporary name and renamed, so the parent never reads a partial result.
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        _json.dump(res, f)
    os.replace(tmp, result_path)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1], sys.argv[2])
    # Leave without interpreter teardown: on the 2-core CI machine a C++ thread of the CPU backend was seen
    # aborting the process ("terminate called without an active exception", exit -6) while static
    # destructors ran, after the result had been written and the engine shut down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
