"""Unit tests of the DSA/MLA adapters' pieces that run without an engine."""

from __future__ import annotations

import subprocess
import sys

import torch

from vllm_frontier.attention_backends.token_layout import token_rows


def test_token_rows_mixed_decode_mtp_and_prefill():
    # request 0: decode (1 new token, 5 total); request 1: MTP verification (3 new, 9 total); request 2: prefill
    qsl = torch.tensor([0, 1, 4, 8])
    seq_lens = torch.tensor([5, 9, 4])
    req, visible = token_rows(qsl, seq_lens, 8)
    assert req.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert visible.tolist() == [5, 7, 8, 9, 1, 2, 3, 4]


def test_token_rows_empty_batch():
    req, visible = token_rows(torch.tensor([0]), torch.tensor([], dtype=torch.long), 0)
    assert req.numel() == 0 and visible.numel() == 0


def test_cpu_quant_override_matches_definition():
    from vllm_frontier.attention_backends.cpu_overrides import per_token_group_quant_fp8

    x = torch.randn(5, 256) * torch.tensor([0.01, 3.0]).repeat_interleave(128)
    q, s = per_token_group_quant_fp8(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    torch.testing.assert_close(s, x.view(5, 2, 128).abs().amax(-1) / 448.0)
    deq = (q.float().view(5, 2, 128) * s[..., None]).view(5, 256)
    assert ((deq - x).abs() <= x.abs() * 2**-3 + s.repeat_interleave(128, dim=1) * 2**-9).all()
    _, s8 = per_token_group_quant_fp8(x, 128, use_ue8m0=True)
    assert torch.equal(s8, torch.exp2(torch.ceil(torch.log2(s8)))) and (s8 >= s).all()


def test_cpu_prefill_chunk_metadata_override():
    from vllm_frontier.attention_backends.cpu_overrides import build_prefill_chunk_metadata

    # two prefill requests: 3 new of 5 tokens (2 cached), 2 new of 2; K rows gathered per request
    qsl = torch.tensor([0, 3, 5], dtype=torch.int32)
    seq_lens = torch.tensor([5, 2], dtype=torch.int32)
    cu = torch.tensor([0, 5, 7], dtype=torch.int32)
    t2s = torch.full((7,), -9, dtype=torch.int32)
    ks = torch.full((5,), -9, dtype=torch.int32)
    ke = torch.full((5,), -9, dtype=torch.int32)
    build_prefill_chunk_metadata(qsl, seq_lens, cu, cu, t2s, ks, ke, 0, 5, 0, 1, 1, BLOCK_SIZE=1024,
                                 COMPRESS_RATIO=1)
    assert ks.tolist() == [0, 0, 0, 5, 5]
    assert ke.tolist() == [3, 4, 5, 6, 7]
    assert t2s.tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_dsa_registration_is_idempotent():
    code = ("import vllm_frontier.plugins as p; p.register(); p.register()\n"
            "from vllm.model_executor.custom_op import op_registry_oot as r\n"
            "from vllm_frontier.attention_backends.indexer_op import FrontierSparseAttnIndexer as F\n"
            "from vllm_frontier.attention_backends.indexer_op import register_indexer; register_indexer()\n"
            "print('OK', r['SparseAttnIndexer'] is F)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "FRONTIER_DSA": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK True" in r.stdout


def test_absorbed_weights_are_made_contiguous_once_and_bmm_stops_copying_them():
    """vLLM's MLA layer keeps W_UK_T / W_UV as strided views of the split kv_b_proj weight; torch.bmm copies
    such a bf16 weight on every call. After `make_absorbed_weights_contiguous` the values are the same and a decode
    bmm copies nothing."""
    from vllm_frontier.attention_backends.absorbed_weights import make_absorbed_weights_contiguous

    L, N, P, V = 512, 4, 128, 128   # the embedded model's geometry (small shapes take a path that does not copy)
    kv_b = torch.randn(L, N, P + V).bfloat16()   # vLLM: kv_b_proj.weight.T viewed per head, then split
    layer = torch.nn.Module()
    layer.W_UK_T = torch.nn.Parameter(kv_b[..., :P].permute(1, 2, 0), requires_grad=False)   # [N, P, L]
    layer.W_UV = torch.nn.Parameter(kv_b[..., P:].transpose(0, 1), requires_grad=False)      # [N, L, V]
    want_uk, want_uv = layer.W_UK_T.clone(), layer.W_UV.clone()
    q = torch.randn(N, 1, P).bfloat16()   # bf16 (a bf16 model): torch.bmm copies such weights; fp32 does not

    def copies():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.bmm(torch.bmm(q, layer.W_UK_T), layer.W_UV)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")

    assert not layer.W_UK_T.is_contiguous() and copies() >= 2
    make_absorbed_weights_contiguous(layer)
    assert layer.W_UK_T.is_contiguous() and layer.W_UV.is_contiguous()
    assert torch.equal(layer.W_UK_T, want_uk) and torch.equal(layer.W_UV, want_uv)
    assert copies() == 0
    uk = layer.W_UK_T
    make_absorbed_weights_contiguous(layer)   # already contiguous: left as is
    assert layer.W_UK_T is uk
