"""Per-token request layout of a vLLM batch, shared by our MLA/DSA backends and the indexer.

vLLM packs the tokens of a step request by request (`query_start_loc`); the last `query_len` positions of
request `r` are new. Our kernels take one row per query token: its request's block table and its causal
length (`position + 1`), which covers decode, MTP verification (s_q > 1) and (chunked) prefill alike.
"""

from __future__ import annotations

import torch


def token_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request index and causal length of every query token.

    Args:
        query_start_loc: ``[num_reqs + 1]`` int, token offsets of each request in the batch.
        seq_lens: ``[num_reqs]`` int, tokens of each request after this step (context + new).
        num_tokens: tokens in the batch (``query_start_loc[-1]``, without padding).
    Returns:
        ``req [num_tokens]`` int64 and ``visible [num_tokens]`` int32: token ``t`` sits at position
        ``visible[t] - 1`` of request ``req[t]`` and may attend to positions ``< visible[t]``.
    """
    qsl = query_start_loc.long()
    num_reqs = qsl.numel() - 1
    query_lens = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(num_reqs, device=qsl.device), query_lens, output_size=num_tokens)
    offset_in_query = torch.arange(num_tokens, device=qsl.device) - qsl[req]
    visible = seq_lens.long()[req] - query_lens[req] + offset_in_query + 1
    return req, visible.to(torch.int32)
