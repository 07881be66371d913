"""`MTPMultiprocExecutor`: vLLM's multiprocess executor that does not ask the workers for drafts after a step
that drafted none.

With speculative decoding on and synchronous scheduling, vLLM's engine core calls
`executor.take_draft_token_ids()` after every step: one more round trip to the workers per step (about 0.4 ms
on vLLM CPU, a tenth of a small model's decode step). After a step scheduled with k = 0 the workers hold no
drafts (`SkippingMTPProposer` made none), so this executor answers that call itself, with None: the
scheduler then keeps no drafts for the next step, as an empty answer from the workers would have it (vLLM's
scheduler clears a request's drafts when it schedules the request). Installed by `update_vllm_config` in place
of vLLM's "mp" backend (the CPU platform's default; GPUs with tensor parallelism), through vLLM's
`distributed_executor_backend` option, which takes an executor class by its qualified name.
"""

from __future__ import annotations

from vllm_frontier import compat


class MTPMultiprocExecutor(compat.multiproc_executor_cls()):
    """vLLM's `MultiprocExecutor`; `take_draft_token_ids` after a k = 0 step costs no worker round trip."""

    _drafted = True   # whether the last executed step was scheduled with drafts (k > 0)

    def execute_model(self, scheduler_output, non_block: bool = False):
        self._drafted = scheduler_output.num_spec_tokens_to_schedule > 0
        return super().execute_model(scheduler_output, non_block=non_block)

    def take_draft_token_ids(self):
        if not self._drafted:
            return None
        return super().take_draft_token_ids()


EXECUTOR_CLS = f"{__name__}.MTPMultiprocExecutor"
