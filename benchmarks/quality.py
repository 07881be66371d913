r"""Quality of the embedded model through vLLM itself, for a given view and vLLM / plugin settings.

Held-out text: the corpus's held-out files (whole CPython stdlib files, ``corpus_files.txt``), tokenized
with the model's tokenizer and cut into non-overlapping windows of ``--seq-len`` tokens; each window is
one prompt, and every token after the first is scored from vLLM's prompt logprobs.

Measured through vLLM (one engine per configuration, in a subprocess so ``--env`` toggles apply):
  perplexity (exp of the mean negative log-likelihood) and top-1 next-token accuracy (vLLM's rank 1).
With ``--mtp-acceptance``: a second engine runs MTP speculative decoding (1 draft token, greedy) on
held-out prompts and reports vLLM's draft acceptance rate.
With ``--reference``: the torch reference (``vllm_frontier.models.reference``) on the same windows gives
the MTP module's next-next-token top-1 accuracy, the indexer's top-k recall of dense attention, sparse
(top-k) perplexity, and the parity of vLLM's logprobs with the reference (max |difference|).

    python benchmarks/quality.py --view v3 --reference --mtp-acceptance \
        --json benchmarks/results/quality/quality_v3.json
    python benchmarks/quality.py --view v32 --env FRONTIER_DSA=1 --json benchmarks/results/quality/quality_v32_dsa.json
    python benchmarks/quality.py --view v3 --dtype bfloat16 --engine-args '{"kv_cache_dtype": "fp8"}'

Later features report their deltas by running this twice (baseline and feature) and comparing the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from harness import header  # beside this script (its folder is on sys.path when run or imported from there)


def heldout_windows(model_dir: Path, n: int, seq_len: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from vllm_frontier.models.corpus import read_split
    from vllm_frontier.models.train import eval_windows, token_stream

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = token_stream(read_split("heldout"), tok, tok.token_to_id("<|eos|>"))
    return eval_windows(stream, n, seq_len).tolist()


def vllm_metrics(res: dict) -> dict:
    lps = [x for w in res["logprobs"] for x in w]
    ranks = [r for w in res["ranks"] for r in w]
    return {"scored_tokens": len(lps), "perplexity": math.exp(-sum(lps) / len(lps)),
            "top1_accuracy": sum(r == 1 for r in ranks) / len(ranks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--view", choices=["v32", "v3"], default="v3", help="embedded model view (default v3)")
    p.add_argument("--model", type=Path, default=None, help="another checkpoint directory instead of --view")
    p.add_argument("--dtype", default="float32", help="vLLM dtype (default float32)")
    p.add_argument("--engine-args", default="{}", help="JSON dict of extra vllm.LLM arguments")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the engine")
    p.add_argument("--windows", type=int, default=16, help="held-out windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--reference", action="store_true", help="also run the torch reference (MTP, indexer, parity)")
    p.add_argument("--mtp-acceptance", action="store_true", help="also measure vLLM MTP draft acceptance")
    p.add_argument("--mtp-prompts", type=int, default=8, help="prompts for --mtp-acceptance (default 8)")
    p.add_argument("--mtp-tokens", type=int, default=64, help="generated tokens per MTP prompt (default 64)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)

    from vllm_frontier.models import embedded_model_path
    from vllm_frontier.models.train_eval import run_vllm

    try:
        engine_args = json.loads(a.engine_args)
    except json.JSONDecodeError as e:
        p.error(f"--engine-args must be a JSON object: {e}")
    if not isinstance(engine_args, dict):
        p.error("--engine-args must be a JSON object, e.g. '{\"kv_cache_dtype\": \"fp8\"}'")
    env = {}
    for kv in a.env:
        if "=" not in kv:
            p.error(f"--env takes K=V, got {kv!r}")
        k, v = kv.split("=", 1)
        env[k] = v
    if a.windows <= 0 or a.seq_len < 3:
        p.error("--windows must be positive and --seq-len at least 3")
    model_dir = a.model if a.model is not None else embedded_model_path(a.view)
    windows = heldout_windows(model_dir, a.windows, a.seq_len)

    result: dict = {"header": header(), "model": str(model_dir), "view": None if a.model else a.view,
                    "dtype": a.dtype, "engine_args": engine_args, "env": env,
                    "windows": len(windows), "seq_len": a.seq_len}
    t = time.time()
    res = run_vllm(model_dir, windows, dtype=a.dtype, engine_args=engine_args, env=env)
    result["vllm"] = dict(vllm_metrics(res), seconds=time.time() - t)
    print(json.dumps({"vllm": result["vllm"]}), flush=True)

    if a.reference:
        import torch

        from vllm_frontier.models.reference import DeepseekReference
        from vllm_frontier.models.train_eval import evaluate_reference

        torch.set_num_threads(1)
        ref = DeepseekReference.from_pretrained(model_dir)
        ids = torch.tensor(windows)
        result["reference"] = evaluate_reference(ref, ids)
        ref_lp = ref.token_logprobs(ids, sparse=False) if not ref.cfg.has_indexer else ref.token_logprobs(ids)
        diff = (torch.tensor(res["logprobs"]) - ref_lp).abs()
        result["parity"] = {"max_abs_logprob_diff": diff.max().item(), "mean_abs_logprob_diff": diff.mean().item(),
                            "reference_attention": "sparse top-k" if ref.cfg.has_indexer else "dense"}
        print(json.dumps({"reference": result["reference"], "parity": result["parity"]}), flush=True)

    if a.mtp_acceptance:
        prompts = [w[: a.seq_len // 2] for w in windows[: a.mtp_prompts]]
        t = time.time()
        m = run_vllm(model_dir, [], dtype=a.dtype, engine_args=engine_args, env=env, mtp_prompts=prompts,
                     mtp_max_tokens=a.mtp_tokens)
        result["vllm_mtp"] = dict(m, prompts=len(prompts), max_tokens=a.mtp_tokens, seconds=time.time() - t)
        print(json.dumps({"vllm_mtp": result["vllm_mtp"]}), flush=True)

    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
