"""Where one decode step's time goes, inside vLLM on CPU: a `torch.profiler` breakdown of decode steps only.

    python benchmarks/decode_profile.py --views v32,v3 --context 2000 --batch 1 \
        --json benchmarks/results/decode_profile/embedded_2k_b1.json

For each view of the embedded model (`v32`: DeepSeek-V3.2 with `--plugin dsa`; `v32-torch`: the same with the C++
DSA kernel switched off, the torch-op path; `v3`: the same weights on vLLM's dense CPU_MLA backend) one in-process engine (offline `vllm.LLM`, bf16, eager, `VLLM_ENABLE_V1_MULTIPROCESSING=0`
so the worker runs in this process) serves `--batch` random prompts of `--context` tokens. The engine is stepped
by hand: the prompts are prefilled first (not profiled), then `--steps` decode steps run under `torch.profiler`.
Module forward hooks open a named range around each component, so the report splits a step into:

- `indexer.vllm`: vLLM's `Indexer` module outside our op (the wq_b / wk / weights projections, k norm, rope,
  the FP8 quantization of q);
- `indexer.op`: `torch.ops.vllm_frontier.sparse_attn_indexer` (K-cache write, scores, top-k);
- `attention`: the MLA attention layer (latent cache write + dense or sparse attention, our backend or vLLM's);
- `mla.other`: the rest of the MLA wrapper (q / kv projections, norms, rope, o_proj);
- `mlp`: dense MLP and MoE layers;
- `model.other`: the decoder stack outside the ranges above (embedding, layer norms, residuals, final norm);
- `step.other`: everything else in an engine step (scheduler, input preparation, attention metadata builders,
  logits, sampling, output processing), the step's time minus the ranges above; of it, the runner's
  `_prepare_inputs` (slot mappings, positions), `_build_attention_metadata` (every backend's builder) and
  `_sample` are reported on their own (`step_other_includes_ms`).

Times are per decode step (mean over `--steps`), in milliseconds, and per layer call where that helps. Runs
one engine at a time; the numbers move with machine load (the JSON records the load average), the split
between components much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Report, run_process_group  # noqa: E402

# the clock of every range and of the whole step: wall time, or with `--threads 1` this thread's CPU time, which
# other load on the machine barely moves (set in `_worker`)
CLOCK = time.perf_counter

# module class name -> range label (outermost match wins: a range is only opened when none is open)
RANGES = {
    "Indexer": "indexer.vllm",
    "MLAAttention": "attention",
    "DeepseekV2MLAAttention": "mla.other",
    "DeepseekV2MLP": "mlp",
    "DeepseekV2MoE": "mlp",
}
OP_RANGE = "indexer.op"
VIEW_ENV = {"v32": {"FRONTIER_DSA": "1"}, "v32-torch": {"FRONTIER_DSA": "1", "FRONTIER_DSA_CPU_KERNEL": "0"},
            "v3": {}}
# runner phases outside the forward (their time is part of `step.other`, reported beside it)
RUNNER_RANGES = {"_prepare_inputs": "step.prepare_inputs", "_build_attention_metadata": "step.attn_metadata",
                 "_sample": "step.sample"}
COMPONENTS = ("indexer.vllm", "indexer.op", "attention", "mla.other", "mlp", "model.other", "step.other")


def _instrument(model, torch):
    """Forward hooks that time each component; nested ranges are subtracted from their parent."""
    stack: list[list] = []   # [label, start, child_seconds]
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}

    def enter(label):
        stack.append([label, CLOCK(), 0.0])

    def leave():
        label, t0, child = stack.pop()
        dt = CLOCK() - t0
        totals[label] = totals.get(label, 0.0) + dt - child
        calls[label] = calls.get(label, 0) + 1
        if stack:
            stack[-1][2] += dt

    for _, mod in model.named_modules():
        label = RANGES.get(type(mod).__name__)
        if label is None:
            continue
        mod.register_forward_pre_hook(lambda m, a, _l=label: enter(_l))
        mod.register_forward_hook(lambda m, a, o: leave())

    from vllm_frontier.attention_backends import indexer_op

    original = indexer_op.FrontierSparseAttnIndexer.run

    def timed_run(self, *a, **k):
        enter(OP_RANGE)
        try:
            return original(self, *a, **k)
        finally:
            leave()

    indexer_op.FrontierSparseAttnIndexer.run = timed_run
    # the decoder stack's own forward is wrapped by vLLM's compile decorator (module hooks do not fire there):
    # the range runs from the embedding to the final norm
    inner = model.model
    inner.embed_tokens.register_forward_pre_hook(lambda m, a: enter("model.other"))
    inner.norm.register_forward_hook(lambda m, a, o: leave())
    return totals, calls


def _time_methods(obj, names: dict[str, str], totals: dict, calls: dict) -> None:
    """Wrap bound methods of `obj` so their time (own, outside model ranges: these run outside the forward)
    adds to `totals[label]`."""
    for name, label in names.items():
        method = getattr(obj, name)

        def timed(*a, _m=method, _l=label, **k):
            t0 = CLOCK()
            try:
                return _m(*a, **k)
            finally:
                totals[_l] = totals.get(_l, 0.0) + CLOCK() - t0
                calls[_l] = calls.get(_l, 0) + 1

        setattr(obj, name, timed)


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=spec["max_model_len"],
              max_num_batched_tokens=max(spec["max_model_len"], 8192), max_num_seqs=max(spec["batch"], 4))
    global CLOCK
    if spec["threads"] == 1:
        torch.set_num_threads(1)   # the worker runs in this process: every op on this thread
        CLOCK = time.thread_time
    engine = llm.llm_engine
    runner = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    totals, calls = _instrument(runner.model, torch)
    _time_methods(runner, RUNNER_RANGES, totals, calls)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    warm = spec["warmup_steps"]
    steps_total = spec["steps"] * (2 if spec["python_top"] else 1) + warm + 2
    params = SamplingParams(temperature=0.0, max_tokens=steps_total, ignore_eos=True)
    for i in range(spec["batch"]):
        ids = torch.randint(10, vocab, (spec["context"],), generator=gen).tolist()
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), params)
    produced = {}

    def step():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids) if out.outputs else 0

    while len(produced) < spec["batch"] or min(produced.values()) < 1:   # prefill, not profiled
        step()
    for _ in range(warm):
        step()
    totals.clear()
    calls.clear()
    t0 = CLOCK()
    # the operator profiler costs a few microseconds per op (more ops, more cost): `--top-ops 0` leaves it off
    prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=spec["shapes"])
            if spec["top_ops"] else contextlib.nullcontext())
    with prof:
        for _ in range(spec["steps"]):
            step()
    wall = CLOCK() - t0
    python_top = None
    if spec["python_top"]:   # a second run of the same steps under cProfile: Python functions by own time
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(spec["steps"]):
            step()
        pr.disable()
        rows = sorted(pstats.Stats(pr).stats.items(), key=lambda kv: -kv[1][2])[: spec["python_top"]]
        python_top = [[f"{Path(f).name}:{line}:{fn}", n, round(tt * 1e3 / spec["steps"], 4),
                       round(ct * 1e3 / spec["steps"], 4)] for (f, line, fn), (_, n, tt, ct, _) in rows]
    while engine.has_unfinished_requests():
        engine.step()
    ops = []
    if spec["top_ops"]:
        averages = prof.key_averages(group_by_input_shape=spec["shapes"])
        ops = sorted(((e.key + (f" {e.input_shapes}" if spec["shapes"] else ""), e.self_cpu_time_total / 1e3,
                       e.count) for e in averages), key=lambda r: -r[1])[: spec["top_ops"]]
    Path(out_path).write_text(json.dumps({"wall_s": wall, "totals_s": totals, "calls": calls,
                                          "top_ops_ms": [[k, round(t, 3), c] for k, t, c in ops],
                                          "python_top": python_top}))


def run_view(model: str, env: dict, spec: dict, timeout: float) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        sp, out, log = Path(td) / "spec.json", Path(td) / "out.json", Path(td) / "log"
        sp.write_text(json.dumps({"model": model, **spec}))
        e = {k: v for k, v in os.environ.items() if not k.startswith("FRONTIER_")}
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        e["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env)
        returncode, text = run_process_group([sys.executable, __file__, "--worker", str(sp), str(out)], e, timeout,
                                             log=log)
        if returncode != 0:
            raise RuntimeError(text[-3000:])
        return json.loads(out.read_text())


def breakdown(raw: dict, steps: int) -> dict:
    """Per-step milliseconds per component; `step.other` is the wall time the ranges do not cover."""
    per_step = {c: raw["totals_s"].get(c, 0.0) * 1e3 / steps for c in COMPONENTS if c != "step.other"}
    step_ms = raw["wall_s"] * 1e3 / steps
    per_step["step.other"] = step_ms - sum(per_step.values())
    within = {label: raw["totals_s"].get(label, 0.0) * 1e3 / steps for label in RUNNER_RANGES.values()}
    return {"step_ms": round(step_ms, 3), "components_ms": {k: round(v, 3) for k, v in per_step.items()},
            "step_other_includes_ms": {k: round(v, 3) for k, v in within.items()},
            "share": {k: round(v / step_ms, 3) for k, v in per_step.items()},
            "calls_per_step": {k: v / steps for k, v in raw["calls"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default="v32,v3", help="comma-separated: v32 (--plugin dsa), v32-torch (the same on "
                   "torch ops, no C++ DSA kernel), v3 (vLLM's dense backend); default v32,v3")
    p.add_argument("--context", type=int, default=2000, help="prompt tokens per request (default 2000)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="profiled decode steps (default 32)")
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--top-ops", type=int, default=25, help="operators to keep by own time (0: no operator "
                   "profiler, whose per-op cost then stays out of the step times)")
    p.add_argument("--threads", type=int, choices=(0, 1), default=0,
                   help="1: run the engine's ops on one thread and time CPU time of that thread (robust to other "
                   "load on the machine); 0 (default): the engine's threads, wall time")
    p.add_argument("--python-top", type=int, default=0, help="also run the steps under cProfile and keep this many "
                   "Python functions by own time (ms per step: own, cumulative)")
    p.add_argument("--shapes", action="store_true", help="split the top operators by input shapes")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if not views or set(views) - set(VIEW_ENV):
        p.error(f"--views takes {', '.join(VIEW_ENV)}")
    if args.context < 1 or args.batch < 1 or args.steps < 1 or args.warmup_steps < 0:
        p.error("--context, --batch and --steps must be >= 1, --warmup-steps >= 0")
    from vllm_frontier.models.embedded import embedded_model_path

    max_len = json.loads((embedded_model_path("v32") / "config.json").read_text())["max_position_embeddings"]
    needed = args.context + args.steps * (2 if args.python_top else 1) + args.warmup_steps + 2
    if needed > max_len:
        p.error(f"--context {args.context} + {needed - args.context} generated tokens exceed the "
                f"model's {max_len} positions")
    spec = {"context": args.context, "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "top_ops": args.top_ops, "max_model_len": needed,
            "shapes": args.shapes, "threads": args.threads, "python_top": args.python_top}
    report = Report(args.json, meta={"command": " ".join([sys.executable, *sys.argv]), **spec,
                                     "loadavg_start": os.getloadavg()})
    for view in views:
        with report.section(view) as rec:
            raw = run_view(str(embedded_model_path(view.split("-")[0])), VIEW_ENV[view], spec, args.timeout)
            rec.update(breakdown(raw, args.steps))
            rec["top_ops_ms_total"] = raw["top_ops_ms"]
            if raw["python_top"]:
                rec["python_top_ms_per_step"] = raw["python_top"]
            print(view, json.dumps({"step_ms": rec["step_ms"], **rec["components_ms"],
                                    **rec["step_other_includes_ms"]}), flush=True)
    report.data["meta"]["loadavg_end"] = os.getloadavg()
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
