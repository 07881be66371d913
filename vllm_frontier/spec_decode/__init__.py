"""MTP speculative decoding with an adaptive draft length, through vLLM 0.32's own hooks (no patches).

Switched on by `--plugin mtp` / `FRONTIER_MTP=1` for models with MTP layers (`num_nextn_predict_layers` > 0):
DeepSeek-V3 views on plain vLLM, V3.2 views through the DSA backend (`--plugin dsa,mtp`).
`FRONTIER_MTP_K` (default 3, at most 8) caps the draft length.

What vLLM 0.32 offers, read in its code:
- Drafting: `{"method": "mtp", "num_speculative_tokens": K}` loads the checkpoint's MTP layer as
  `DeepSeekMTP` and drafts with `EagleProposer`; the single MTP module is chained for positions > 1.
- A per-step draft length: every `SchedulerOutput` carries `num_spec_tokens_to_schedule`, which the V1
  model runner (also the CPU one) hands to `EagleProposer.propose`, 0 included. vLLM itself sets it only
  from a static batch-size table (`num_speculative_tokens_per_batch_size`, "dynamic SD").
- Not usable for MTP: the `custom_class` proposer gets token ids only (no target hidden states), and
  `enable_adaptive_verification` exists for method "dspark" only.
- A step asked for 0 drafts still runs the drafter's first pass (to keep its KV cache in sync): on vLLM CPU
  an MTP engine drafting nothing ran at 0.62x of the plain engine. `proposer.SkippingMTPProposer`, put in
  place of the model runner's drafter by the worker classes in `worker` (vLLM's `--worker-cls`,
  `WORKER_CLS`), runs no drafter forward in such a step; it keeps the skipped positions' drafter inputs
  (target hidden states) and replays them in one pass before the next draft, so acceptance after a pause
  is the steady one. Such a step runs as a plain step in vLLM's model runner (no speculative-decoding
  metadata, the plain sampler; `worker`), and the executor asks the workers for no drafts after it
  (`executor`), so it costs what a step of the engine without MTP costs. The vLLM internals this relies on
  are pinned in `compat`.

So the draft length can vary per step inside vLLM 0.32 without patching it: `AdaptiveDraftScheduler`
(`vllm_frontier.spec_decode.scheduler`, installed through vLLM's `--scheduler-cls`) rewrites the
batch-size -> k table before each step from measured acceptance and step times, and trims drafts made under
a larger k before they are verified. Verification stays vLLM's rejection sampler: the output is the target
model's (greedy: identical token ids).

The rule (details and symbols in `policy`):
    k*(B) = smallest k in [0, K] with B E(k) / T(B, k) >= 0.90 max_j B E(j) / T(B, j)
    E(k)  = 1 + sum_{j<=k} prod_{i<=j} a_i      a_i: acceptance of position i given 1..i-1 accepted,
                                                 counted over the last 128 engine steps
    T(B,k) = F + k D + B (k+1)(1+rho) + B max(k-1,0) rho   (k > 0);   T(B,0) = F + B (a plain step)
                                                 F: per-step fixed cost, D: fixed cost of each drafted
                                                 position, in token units, fitted online from decode-step
                                                 wall times; rho = 1 / num_hidden_layers
Bounds: 0 <= k <= K. B is the number of decoding requests, so k falls as the batch grows and as acceptance
drops. A position not drafted for 128 steps returns to an optimistic prior (the estimate of the position
before it) and is probed again: two k = 1 steps, at intervals doubling up to 1024 steps while the rule
keeps not drafting (1024 at once while the measured costs say no k pays even at full acceptance).

Limits: the rule needs synchronous scheduling (vLLM's CPU platform always uses it; on GPUs pass
`--no-async-scheduling`), because with async scheduling the drafts already in flight cannot be trimmed;
with async scheduling the plugin keeps vLLM's fixed K and says so in the log. One k per step for the whole
batch (vLLM drafts one k for all requests).

Whether MTP pays on the current device (the `--plugin all` decision, with its reason): `device.mtp_pays`.

Metrics: vLLM's `vllm:spec_decode_num_drafts_total`, `..._num_draft_tokens_total`,
`..._num_accepted_tokens_total` and `..._num_accepted_tokens_per_pos_total` still count; the scheduler adds
per-position conditional acceptance, tokens per target forward and the k histogram (`FRONTIER_MTP_STATS`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.frontier.spec_decode")

SCHEDULER_CLS = "vllm_frontier.spec_decode.scheduler.AdaptiveDraftScheduler"
# Worker classes installing `SkippingMTPProposer` (no drafter forward in steps that draft nothing), per the
# vLLM worker they extend (`worker.py`).
WORKER_CLS = {"cpu": "vllm_frontier.spec_decode.worker.CPUMTPWorker",
              "gpu": "vllm_frontier.spec_decode.worker.GPUMTPWorker"}
# vLLM's own synchronous scheduler: the fixed-K baseline, and what a user passes to opt out of adaptation.
FIXED_SCHEDULER_CLS = "vllm.v1.core.sched.scheduler.Scheduler"

__all__ = ["SCHEDULER_CLS", "FIXED_SCHEDULER_CLS", "WORKER_CLS", "speculative_config", "update_vllm_config",
           "worker_cls", "executor_backend", "register"]


def speculative_config(features, model_cfg: dict) -> dict | None:
    """The `--speculative-config` dict for a model's config.json (`model_cfg`), or None without MTP layers.

    `features.mtp_k` (FRONTIER_MTP_K) is the cap K: vLLM sizes its buffers for K drafts and the adaptive
    scheduler chooses k in [0, K] per step.
    """
    n_mtp = model_cfg.get("num_nextn_predict_layers") or 0
    if not isinstance(n_mtp, int) or n_mtp <= 0:
        return None
    k = features.mtp_k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"FRONTIER_MTP_K must be a positive integer, got {k!r}")
    return {"method": "mtp", "num_speculative_tokens": k}


def worker_cls(current: str = "auto") -> str | None:
    """Our worker class path replacing vLLM's worker ``current`` (`parallel_config.worker_cls`), or None.

    "auto" (before the platform resolved it) maps by the current platform: CPU or CUDA/ROCm. A worker class
    chosen by someone else (not one of vLLM's two) is left alone: None.
    """
    from vllm_frontier.compat import default_worker_paths

    if current in WORKER_CLS.values():
        return current
    if current == "auto":
        from vllm.platforms import current_platform

        kind = "cpu" if current_platform.is_cpu() else "gpu" if current_platform.is_cuda_alike() else None
    else:
        kind = default_worker_paths().get(current)
    return WORKER_CLS[kind] if kind else None


def executor_backend(current):
    """The executor backend for an MTP engine: ours (`executor`: no worker round trip for drafts after a k = 0
    step) in place of vLLM's "mp", anything else (a user's choice, "uni", "ray") unchanged."""
    from .executor import EXECUTOR_CLS

    return EXECUTOR_CLS if current == "mp" else current


def update_vllm_config(vllm_config) -> bool:
    """Install the adaptive scheduler and the drafter-skipping worker in a vLLM config that drafts with MTP;
    returns whether the scheduler was installed (unchanged meaning; the worker is installed on its own terms).

    Call from the platform's `check_and_update_config` (API process and engine core), before or after the
    platform resolves its worker class. Nothing changes when the method is not MTP or under async scheduling
    (logged: the draft length then stays vLLM's fixed K, the drafter runs every step). Otherwise:
    - the scheduler, unless the user chose one (`--scheduler-cls`);
    - the worker (`WORKER_CLS`: k = 0 steps run no drafter), in place of vLLM's own worker classes only,
      also under a user-chosen scheduler (vLLM's own `num_speculative_tokens_per_batch_size` table can ask
      for k = 0 too);
    - the executor (`executor_backend`) in place of vLLM's "mp" backend.
    """
    spec = getattr(vllm_config, "speculative_config", None)
    sched = vllm_config.scheduler_config
    if spec is None or spec.method != "mtp":
        return False
    if sched.async_scheduling:
        logger.info("vllm-frontier: MTP keeps vLLM's fixed draft length %d under async scheduling; "
                    "pass --no-async-scheduling for the adaptive draft length", spec.num_speculative_tokens)
        return False
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None:
        ours = worker_cls(parallel.worker_cls)
        if ours is None:
            logger.info("vllm-frontier: MTP keeps worker class %s (the drafter runs in every step)",
                        parallel.worker_cls)
        else:
            parallel.worker_cls = ours
        parallel.distributed_executor_backend = executor_backend(parallel.distributed_executor_backend)
    if sched.scheduler_cls is not None:
        return False
    sched.scheduler_cls = SCHEDULER_CLS
    logger.info("vllm-frontier: MTP draft length adapts per step (k <= %d)", spec.num_speculative_tokens)
    return True


def register() -> None:
    """General-plugin hook. MTP needs nothing registered in every process: vLLM's engine core imports the
    scheduler class by its dotted path (`SCHEDULER_CLS`), and the MTP draft model is vLLM's own. Importing
    the policy here checks, in every process, that the package's MTP code imports (fails loudly otherwise)."""
    from . import policy  # noqa: F401

