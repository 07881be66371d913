"""`SkippingMTPProposer`: vLLM's MTP proposer that runs no drafter forward in a step that drafts nothing.

vLLM 0.32's `EagleProposer.propose` (the MTP path) runs its first pass over every target token of every step,
even when the scheduler asked for 0 drafts, to keep the drafter's KV cache in sync; on vLLM CPU that makes an
MTP engine drafting nothing run at 0.62x of the plain engine. This subclass:
- k = 0 for the step: keeps the first pass's inputs of the accepted positions (token at p + 1, target hidden
  state at p; `skipped.SkippedPositions`) and returns no drafts, without any drafter forward;
- k > 0: first replays the kept positions of the step's requests in one catch-up pass (several if they
  exceed the drafter's token buffers), which writes the drafter KV they miss, then drafts as vLLM does.
The catch-up pass is a prefill-with-context pass of the drafter over the skipped positions, so drafts after
a pause see the same drafter KV as without it (acceptance returns to its steady level at once). The kept
positions are bounded: beyond `max_kept` positions over all requests (`max_kept_bytes` of hidden states, at
least one drafter pass worth), they are replayed at once.
Verification is untouched (vLLM's rejection sampler): outputs are the target model's.

Installed by `worker.install_proposer` (the worker classes of `worker`), in place of the runner's drafter.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_frontier import compat
from .skipped import SkippedPositions, plan_passes

logger = logging.getLogger("vllm.frontier.spec_decode")

# Test hook: "0" keeps vLLM's behaviour for the drafter KV of skipped steps (no replay), to show what the
# catch-up is worth. Not a user setting.
CATCH_UP_ENV = "FRONTIER_MTP_CATCH_UP"


class SkippingMTPProposer(compat.eagle_proposer_cls()):
    """`EagleProposer` that skips the drafter in k = 0 steps and catches its KV up when drafting resumes."""

    # memory for kept target hidden states (device memory vLLM did not budget for): 128 MiB
    max_kept_bytes = 128 << 20

    def __init__(self, vllm_config, device, runner):
        super().__init__(vllm_config, device, runner)
        self._runner = runner
        self.skipped = SkippedPositions()
        self.catch_up_enabled = os.environ.get(CATCH_UP_ENV, "1") != "0"
        # kept positions over all requests before they are replayed anyway (bounds the kept hidden states)
        row_bytes = self.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        self.max_kept = max(self.max_num_tokens, self.max_kept_bytes // row_bytes)
        self.counters = {"skipped_steps": 0, "drafting_steps": 0, "catch_up_passes": 0, "caught_up_tokens": 0,
                         "dropped_tokens": 0, "drafter_forwards": 0, "plain_steps": 0}
        self._hooked = False
        self._mtp_hidden_getter = None   # the target model's own MTP input getter (found at the first step)

    # -- vLLM hook ----------------------------------------------------------------------------------------

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        if not self._hooked:   # count every forward of the drafter model (the proof that k = 0 runs none)
            # on its inner module: vLLM's compile decorator replaces the top model's __call__ (no hooks there)
            getattr(self.model, "model", self.model).register_forward_pre_hook(self._count_forward)
            self._hooked = True
        cad = common_attn_metadata
        num_reqs = cad.num_reqs
        req_ids, live = compat.runner_requests(self._runner)
        req_ids = req_ids[:num_reqs]
        if self.skipped:
            self.skipped.retain(live)
        qsl = cad.query_start_loc_cpu[: num_reqs + 1]
        query_lens = (qsl[1:] - qsl[:-1])
        firsts = self._first_positions(cad, qsl, query_lens, target_positions)
        if num_speculative_tokens == 0:
            self.counters["skipped_steps"] += 1
            self._keep(req_ids, firsts, qsl, target_token_ids, target_hidden_states, next_token_ids,
                       token_indices_to_sample)
            if self.skipped.total > self.max_kept:
                self._catch_up(list(self.skipped.runs), req_ids, cad, firsts=None)
            return torch.empty(num_reqs, 0, device=self.device, dtype=torch.int64)
        self.counters["drafting_steps"] += 1
        if self.skipped:
            # positions from this step's first one on are computed by the first pass below
            for rid, first in zip(req_ids, firsts):
                self.skipped.truncate(rid, first)
            self._catch_up([r for r in req_ids if r in self.skipped], req_ids, cad, firsts)
        return super().propose(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                               next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                               mm_embed_inputs=mm_embed_inputs, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                               slot_mappings=slot_mappings)

    def _count_forward(self, module, args) -> None:
        self.counters["drafter_forwards"] += 1

    # -- steps the runner ran without speculation (`worker`) ------------------------------------------------

    def fits_plain_step(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` target tokens can run without speculation: its drafter inputs fit
        under `max_kept` (else the step keeps vLLM's speculative path, whose k = 0 `propose` replays at once)."""
        if not self.catch_up_enabled:
            return False
        if self.skipped.total + num_tokens > self.max_kept:
            # plain steps keep finished requests' positions until something reads the runs: forget them first
            self.skipped.retain(compat.runner_requests(self._runner)[1])
        return self.skipped.total + num_tokens <= self.max_kept

    def keep_plain_step(self, state, output) -> None:
        """Keep the drafter inputs of a step the runner ran as a plain (non-speculative) step, as `propose` does
        in a k = 0 step.

        ``state``: the runner's `ExecuteModelState` of the step (scheduler output, target hidden states);
        ``output``: its `ModelRunnerOutput` (sampled token ids per batch row, [] for a partial prompt chunk).
        The target token ids and positions are still in the runner's input buffers (the next step rewrites them).
        """
        counters = self.counters
        counters["skipped_steps"] += 1
        counters["plain_steps"] += 1
        runner = self._runner
        sched = state.scheduler_output.num_scheduled_tokens
        req_ids, live = compat.runner_requests(runner)
        hidden = self._target_hidden_states(state)
        sampled = output.sampled_token_ids
        n = state.scheduler_output.total_num_scheduled_tokens
        if n == len(sched) and len(req_ids) >= n and all(sampled[:n]):
            # one token per request (a decode step, the common case): position p's drafter input is the token
            # sampled after it; one copy of the step's hidden states, kept as one record of the step
            # (`keep_step`: no work per request now; finished requests are forgotten when the runs are read).
            # The runner reuses its hidden-state buffer next step, hence the copy (no slice when the runner's
            # tensor holds exactly the step's rows: each torch call costs microseconds on a CPU host).
            rows = (hidden if hidden.shape[0] == n else hidden[:n]).clone()
            self.skipped.keep_step(tuple(req_ids[:n]), runner._get_positions(n).tolist(),
                                   [s[-1] for s in sampled[:n]], rows)
            return
        req_ids = req_ids[: len(sched)]
        if self.skipped:
            self.skipped.retain(live)
        req_ids = list(req_ids)
        lens = torch.tensor([sched[r] for r in req_ids], dtype=torch.int32)
        qsl = torch.zeros(len(req_ids) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=qsl[1:])
        n = int(qsl[-1])
        target_positions = runner._get_positions(n)
        firsts = target_positions[qsl[:-1].to(target_positions.device)].tolist()
        next_token_ids = self.prepare_next_token_ids_cpu(sampled, runner.requests, runner.input_batch, sched)
        self._keep(req_ids, firsts, qsl, runner.input_ids.gpu[:n], hidden, next_token_ids, None)

    def _target_hidden_states(self, state) -> torch.Tensor:
        """The target hidden states the drafter reads for the runner's step ``state``: the model's own MTP input
        where it keeps one (`get_mtp_target_hidden_states`, as vLLM's runner asks), else the step's output."""
        getter = self._mtp_hidden_getter
        if getter is None:   # the model is loaded before the first step; looked up once, not per step
            getter = getattr(self._runner.get_model(), "get_mtp_target_hidden_states", None) or (lambda: None)
            self._mtp_hidden_getter = getter
        hidden = getter()
        return state.hidden_states if hidden is None else hidden

    # -- skipped steps ------------------------------------------------------------------------------------

    @staticmethod
    def _first_positions(cad, qsl, query_lens, target_positions) -> list[int]:
        """Position of each request's first scheduled token this step."""
        upper = cad.seq_lens_cpu_upper_bound
        if upper is not None:
            return (upper[: cad.num_reqs] - query_lens).tolist()
        return target_positions[qsl[:-1].to(target_positions.device)].tolist()

    def _keep(self, req_ids, firsts, qsl, target_token_ids, target_hidden_states, next_token_ids,
              token_indices_to_sample) -> None:
        """Keep what the first pass would have consumed for the accepted positions of each request."""
        n = target_token_ids.shape[0]
        if token_indices_to_sample is None:
            ends = (qsl[1:] - 1).tolist()
            ends_dev = (qsl[1:] - 1).to(self.device)
        else:   # drafts were verified: the request's last accepted token is its sampling index
            ends_dev = token_indices_to_sample[: len(req_ids)]
            ends = ends_dev.tolist()
        ids = torch.empty(n, dtype=torch.int32, device=self.device)
        ids[: n - 1] = target_token_ids[1:n]
        ids[ends_dev] = next_token_ids[: len(req_ids)].to(torch.int32)
        hidden = target_hidden_states[:n].clone()   # the runner reuses its hidden-state buffer next step
        starts = qsl[:-1].tolist()
        for rid, first, a, e in zip(req_ids, firsts, starts, ends):
            if not self.catch_up_enabled:
                continue
            self.skipped.keep(rid, first, ids[a: e + 1], hidden[a: e + 1])

    def _catch_up(self, todo: list[str], req_ids: list[str], cad, firsts) -> None:
        """Replay the kept positions of requests ``todo`` (all in this step's batch rows ``req_ids``)."""
        rows = {rid: i for i, rid in enumerate(req_ids)}
        for rid in [r for r in todo if r not in rows]:   # kept for a request not in this batch: no block table
            self.counters["dropped_tokens"] += self.skipped.runs[rid].length
            self.skipped.drop(rid)
        todo = [r for r in todo if r in rows and r in self.skipped]
        if not todo:
            return
        lengths = [self.skipped.runs[r].length for r in todo]
        for take in plan_passes(lengths, self.max_num_tokens):
            parts = [(rid, *self.skipped.take(rid, t)) for rid, t in zip(todo, take) if t > 0]
            self._replay(parts, rows, cad)

    def _replay(self, parts, rows, cad) -> None:
        """One drafter pass over kept positions: parts = [(req_id, first position, ids [n], hidden [n, H])]."""
        dev = self.device
        lens = [ids.shape[0] for _, _, ids, _ in parts]
        n = sum(lens)
        firsts = torch.tensor([f for _, f, _, _ in parts], dtype=torch.int64)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        qsl_cpu = torch.zeros(len(parts) + 1, dtype=torch.int32)
        torch.cumsum(lens_t, 0, out=qsl_cpu[1:])
        seq_cpu = (firsts + lens_t).to(torch.int32)
        positions = torch.cat([torch.arange(f, f + m, dtype=torch.int64) for (_, f, _, _), m in zip(parts, lens)])
        row_idx = torch.tensor([rows[rid] for rid, _, _, _ in parts], dtype=torch.int64, device=dev)
        block_table = cad.block_table_tensor[row_idx]
        pos_dev = positions.to(dev)
        req_of_tok = torch.repeat_interleave(torch.arange(len(parts), device=dev), lens_t.to(dev))
        slots = (block_table[req_of_tok, pos_dev // self.block_size].long() * self.block_size
                 + pos_dev % self.block_size)
        md = compat.attention_metadata(
            query_start_loc=qsl_cpu.to(dev), query_start_loc_cpu=qsl_cpu, seq_lens=seq_cpu.to(dev),
            num_reqs=len(parts), num_actual_tokens=n, max_query_len=max(lens), max_seq_len=int(seq_cpu.max()),
            block_table_tensor=block_table, slot_mapping=slots, causal=True, seq_lens_cpu_upper_bound=seq_cpu)
        self.input_ids[:n] = torch.cat([ids for _, _, ids, _ in parts])
        self._set_positions(n, pos_dev)
        self.hidden_states[:n] = torch.cat([h for _, _, _, h in parts])
        _, per_layer = self.build_per_group_and_layer_attn_metadata(md)
        mode, n_in, across_dp = self._determine_batch_execution_and_padding(n)
        model_kwargs, slot_size = self.build_model_inputs_first_pass(n, n_in, None)
        if self._share_mtp_indices and hasattr(self.model.model, "set_skip_topk"):
            self.model.model.set_skip_topk(False)   # the MTP layer's indexer computes its own top-k
        if self.eplb_state is not None:
            self.eplb_state.prepare_forward(self.draft_model_config, n)
        with compat.forward_context(per_layer, self.vllm_config, num_tokens=n_in, num_tokens_across_dp=across_dp,
                                    cudagraph_runtime_mode=mode, slot_mapping=self._get_slot_mapping(slot_size, slots)):
            self.model(**model_kwargs)   # writes the drafter KV of these positions; outputs unused
        self.counters["catch_up_passes"] += 1
        self.counters["caught_up_tokens"] += n
