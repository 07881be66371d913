"""Whether MTP is expected to pay on a device: the `--plugin all` decision for MTP, with its reason.

With the adaptive draft length and plain k = 0 steps (no drafter, no spec-decode metadata, no draft RPC), an
MTP engine that stops drafting costs what a plain engine costs plus the rule's scheduling and probes, so MTP
is never a large loss; on vLLM CPU the rule, pricing steps from measured step times, drafts little (V3 view:
4 of 7679 steps at batch 1, 10 of 2604 at batch 16 in `mtp_cpu_v14.json`; V3.2 at batch 1, where k = 1 is near
break-even, a fifth of its steps in `mtp_cpu_v12.json`, only its probes in `mtp_cpu_v14.json`). It is a gain
only where some draft length beats no speculation, which depends on what a drafting step costs next to a
plain one: the drafter's passes (one decoder layer each, about 1 / num_hidden_layers of the target's compute)
plus the per-pass fixed cost of launching them (input preparation, attention metadata, sampling).

- CPU (vLLM's CPU build): measured with `benchmarks/mtp.py` on the embedded model (V3 and V3.2 views,
  batch 1 to 16): no fixed k beats no speculation. A drafting step costs about 2-3x a plain step at batch 1
  (`benchmarks/results/mtp/mtp_cpu_v11.json`: k = 1 / 2 / 3 steps 2.4x / 2.7x / 3.1x a plain one on the V3
  view, 1.9x / 2.3x / 2.7x on V3.2, for 1.68 / 2.13 / 2.41 tokens per target forward; fixed k at 0.27-0.90x
  of no speculation; drafting steps are vLLM's), because
  each drafter pass and the verification carry vLLM's per-pass Python and metadata work, which on CPU is of
  the order of a whole forward of a small model; even 1.5-2.7 tokens per target forward do not make up for
  it. The adaptive rule then holds k = 0 and MTP only adds its probes: left off.
- GPUs (CUDA, ROCm): a drafter pass is one decoder layer on a device where decoding is bound by reading
  the weights, so a draft costs a few percent of a step; DeepSeek-V3 reports 85-90 % acceptance of the
  second token and 1.8x tokens per second with one MTP module. Expected to pay at small and medium batch
  sizes, where the adaptive rule drafts; at large batch sizes it stops drafting. Not measured in this
  project: vLLM does not run on the GPU machine lent to it.
"""

from __future__ import annotations

CPU_RESULT = "benchmarks/results/mtp/mtp_cpu_v11.json"


def mtp_pays(device_type: str | None = None) -> tuple[bool, str]:
    """(switch MTP on under `--plugin all`, one-line reason) for a vLLM device type ("cpu", "cuda", ...).

    ``device_type`` None: vLLM's current platform. A device not listed (xpu, tpu, ...): off, no measurement.
    """
    if device_type is None:
        from vllm.platforms import current_platform

        device_type = current_platform.device_type
    if device_type == "cpu":
        return False, ("on vLLM CPU no draft length beats no speculation (a drafting step costs 2-3x a plain "
                       f"step at batch 1: per-pass overhead of the drafter and verification; {CPU_RESULT}); pass "
                       "--plugin mtp to switch it on anyway (the adaptive rule then holds k = 0)")
    if device_type in ("cuda", "rocm"):
        return True, ("on GPUs a draft costs about one decoder layer of a weight-bound decode step; the "
                      "adaptive draft length stops drafting where it does not pay (not measured here)")
    return False, f"MTP is not measured on device type {device_type!r}; pass --plugin mtp to switch it on"
