"""CUDA graphs with our attention backends (no GPU needed).

1. vLLM's own cudagraph-mode resolution, fed what it is fed for DeepSeek-V3.2 on a CUDA GPU (the default
   optimization level's cudagraph mode; breakable CUDA graphs, which V3.2 turns on by default and which set
   the compile mode to NONE; the minimum graph support of the attention builders), keeps full decode graphs
   with our builders; the same resolution with a builder that reports NEVER falls back to no graphs.
2. No host sync in the per-layer forward path: the backends' forward and cache writes run, as on an sm_90 GPU
   (launchers pick that GPU's configs; Triton launches are intercepted, not run), with every Python-level way to
   read a tensor on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``int()``, ``float()``,
   ``bool()``, indexing by a tensor scalar) made to raise. Runs in a subprocess without the Triton interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import types

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _v32_compilation_config():
    """CompilationConfig as vLLM 0.32 sets it up for DeepseekV32ForCausalLM on CUDA (VllmConfig.__post_init__:
    the optimization level's defaults, then _maybe_enable_breakable_cudagraph)."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig
    from vllm.config.vllm import DEFAULT_BREAKABLE_CUDAGRAPH_ARCHITECTURES, OPTIMIZATION_LEVEL_TO_CONFIG

    level = VllmConfig.__dataclass_fields__["optimization_level"].default
    mode = OPTIMIZATION_LEVEL_TO_CONFIG[level]["compilation_config"]["cudagraph_mode"]
    assert "DeepseekV32ForCausalLM" in DEFAULT_BREAKABLE_CUDAGRAPH_ARCHITECTURES, "V3.2 uses breakable graphs"
    return CompilationConfig(cudagraph_mode=mode, mode=CompilationMode.NONE)


def _resolve(support, uniform_decode_query_len: int):
    cc = _v32_compilation_config()
    return cc.resolve_cudagraph_mode_and_sizes(support, "backend", uniform_decode_query_len=uniform_decode_query_len,
                                               max_num_reqs=256)


@pytest.mark.parametrize("mtp", [0, 1, 3])
def test_v32_keeps_full_decode_graphs_with_our_sparse_backend(mtp):
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_frontier.attention_backends.sparse_mla import FrontierSparseMLABackend

    ours = FrontierSparseMLABackend.get_builder_cls().get_cudagraph_support(None, None)
    # vLLM's indexer-cache builder (DeepseekV32IndexerMetadataBuilder) reports UNIFORM_BATCH without DeepGEMM's
    # varlen kernel, ALWAYS with it: the minimum over the model's builders is ours or UNIFORM_BATCH.
    support = min(ours, AttentionCGSupport.UNIFORM_BATCH, key=lambda s: s.value)
    mode = _resolve(support, 1 + mtp)
    assert mode.decode_mode() == CUDAGraphMode.FULL, mode
    assert mode.has_full_cudagraphs()
    # the check can fail: a builder that reports NEVER (as ours did) loses every graph
    assert _resolve(AttentionCGSupport.NEVER, 1 + mtp) == CUDAGraphMode.NONE


def test_dense_backend_keeps_full_decode_graphs_without_mtp():
    from vllm.config import CUDAGraphMode

    from vllm_frontier.attention_backends.dense_mla import FrontierMLABackend

    support = FrontierMLABackend.get_builder_cls().get_cudagraph_support(None, None)
    assert _resolve(support, 1).decode_mode() == CUDAGraphMode.FULL
    # multi-token decode (MTP) is prefill to vLLM's dense MLA builder: vLLM drops full decode graphs
    assert _resolve(support, 2).decode_mode() != CUDAGraphMode.FULL


# ------------------------------------------------------------------------------ the indexer's op boundary
def _bare_indexer(rows: int = 4, topk: int = 8):
    from vllm_frontier.attention_backends.indexer_op import INDEXER_SUFFIX, FrontierSparseAttnIndexer

    ix = FrontierSparseAttnIndexer.__new__(FrontierSparseAttnIndexer)  # no vLLM config here
    torch.nn.Module.__init__(ix)
    ix.topk_indices_buffer = torch.zeros(rows, topk, dtype=torch.int32)
    ix.layer_name = "model.layers.0.self_attn.indexer.k_cache" + INDEXER_SUFFIX
    return ix


def test_indexer_forward_is_one_opaque_registered_op(monkeypatch):
    """torch.compile sees the indexer as one node of `torch.ops.vllm_frontier.sparse_attn_indexer` (fullgraph:
    tracing into its Python would break the graph at the forward context), and the op runs the layer it names,
    found in the forward context, writing the shared top-k buffer in place."""
    from vllm_frontier.attention_backends import indexer_op

    ix = _bare_indexer()
    calls = []

    def run(q, k, w):
        calls.append(tuple(q.shape))
        ix.topk_indices_buffer.copy_(torch.arange(ix.topk_indices_buffer.numel()).view_as(ix.topk_indices_buffer))

    ix.run = run
    monkeypatch.setattr(indexer_op, "get_forward_context",
                        lambda: types.SimpleNamespace(no_compile_layers={ix.layer_name: ix}))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, w: ix.forward_cuda(None, q, k, w), backend=backend, fullgraph=True)
    q, k, w = torch.randn(4, 2, 16), torch.randn(4, 16), torch.randn(4, 2)
    out = fn(q, k, w)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets == ["vllm_frontier.sparse_attn_indexer"], targets
    assert calls == [(4, 2, 16)]
    assert out is ix.topk_indices_buffer and out.flatten().tolist() == list(range(32))
    schema = torch.ops.vllm_frontier.sparse_attn_indexer.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["topk_indices_buffer"] and not schema.returns


def test_compiled_graphs_split_at_our_indexer_op():
    """With the DSA feature registered, vLLM's default piecewise splitting ops (VLLM_COMPILE on CUDA) hold our
    indexer op beside vLLM's own, so the graphs around it can be captured while it runs between them."""
    code = ("import vllm_frontier.plugins as p; p.register()\n"
            "from vllm.config import CompilationConfig, CompilationMode\n"
            "cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)\n"
            "cc.set_splitting_ops_for_v1(all2all_backend='naive')\n"
            "print('SPLIT', sorted(cc.splitting_ops))")
    ops = {}
    for dsa in ("1", "0"):
        env = {**os.environ, "FRONTIER_DSA": dsa}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        ops[dsa] = next(ln for ln in r.stdout.splitlines() if ln.startswith("SPLIT"))
    assert "vllm_frontier::sparse_attn_indexer" in ops["1"] and "vllm::sparse_attn_indexer" in ops["1"], ops
    assert "vllm_frontier::sparse_attn_indexer" not in ops["0"], ops


# ------------------------------------------------------------------------------------------- host syncs
_PROBE = r"""
import sys, types, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import gpu_compile
from vllm_frontier.kernels import _common
from vllm_frontier.attention_backends import sparse_mla, dense_mla, indexer_op
from vllm_frontier.attention_backends.token_layout import token_rows

class HostSync(RuntimeError):
    pass

def guard(name):
    def f(self, *a, **k):
        raise HostSync(f"Tensor.{{name}} in the forward path")
    return f

NAMES = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
saved = {{n: getattr(torch.Tensor, n) for n in NAMES}}

def run(label, fn):
    rec = gpu_compile._Recorder()
    with _common.assume_target((9, 0)), rec.active():
        for n in NAMES:
            setattr(torch.Tensor, n, guard(n))
        try:
            fn()
        except HostSync as e:
            print(f"SYNC {{label}}: {{e}}"); return
        except Exception as e:  # noqa: BLE001 - reported per path; the test of that path fails on it
            print(f"ERROR {{label}}: {{type(e).__name__}}: {{e}}"); return
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)
    assert rec.launches, label
    print(f"OK {{label}}: {{len(rec.launches)}} launches")

H, B, BS, TOPK, NB = 16, 3, 64, 128, 12
seq_lens = torch.tensor([70, 5, 200], dtype=torch.int32)
qsl = torch.tensor([0, 1, 3, 4], dtype=torch.int32)  # one decode, one MTP-like pair, one decode
n = 4
req, visible = token_rows(qsl, seq_lens, n)
bt = torch.arange(B * 4, dtype=torch.int32).reshape(B, 4)
slots = torch.tensor([69, 64 * 4 + 3, 64 * 4 + 4, 64 * 8 + 199 - 128], dtype=torch.int64)

for dtype_name, cache in (("auto", torch.zeros(NB, BS, 576, dtype=torch.bfloat16)),
                          ("fp8_ds_mla", torch.zeros(NB, BS, 656, dtype=torch.uint8))):
    sp = sparse_mla.FrontierSparseMLAImpl.__new__(sparse_mla.FrontierSparseMLAImpl)
    sp.num_heads, sp.scale, sp.kv_lora_rank, sp.kv_cache_dtype = H, 0.1, 512, dtype_name
    sp.topk_indices_buffer = torch.zeros(n, TOPK, dtype=torch.int32)
    md = sparse_mla.FrontierSparseMLAMetadata(
        causal=True, num_reqs=B, num_actual_tokens=n, query_start_loc=qsl, slot_mapping=slots, block_table=bt,
        seq_lens=seq_lens, token_req=req, token_visible=visible, max_seq_len=200, block_size=BS,
        topk_tokens=TOPK) if "causal" in sparse_mla.FrontierSparseMLAMetadata.__dataclass_fields__ else \
        sparse_mla.FrontierSparseMLAMetadata(
        num_reqs=B, num_actual_tokens=n, query_start_loc=qsl, slot_mapping=slots, block_table=bt,
        seq_lens=seq_lens, token_req=req, token_visible=visible, max_seq_len=200, block_size=BS, topk_tokens=TOPK)
    q = torch.randn(n, H, 576, dtype=torch.bfloat16)
    run(f"sparse MLA forward_mqa ({{dtype_name}})", lambda: sp.forward_mqa(q, cache, md, None))
    run(f"latent cache write ({{dtype_name}})", lambda: sp.do_kv_cache_update(
        torch.randn(n, 512, dtype=torch.bfloat16), torch.randn(n, 1, 64, dtype=torch.bfloat16), cache, slots,
        dtype_name, None))
    dn = dense_mla.FrontierMLAImpl.__new__(dense_mla.FrontierMLAImpl)
    dn.scale, dn.kv_lora_rank, dn.kv_cache_dtype = 0.1, 512, dtype_name
    dec_seq = torch.tensor([70, 5, 200], dtype=torch.int32)
    dmd = types.SimpleNamespace(
        decode=types.SimpleNamespace(seq_lens=dec_seq, block_table=bt), query_start_loc=torch.arange(4, dtype=torch.int32),
        num_decodes=3)
    # what FrontierMLAMetadataBuilder.build adds once per step
    splits = dense_mla.plan_num_splits(3, 1, H, 200, dec_seq.device)  # from host numbers (max_seq_len)
    dmd.frontier_schedule = dense_mla.get_mla_metadata(num_splits=splits)[0]
    run(f"dense MLA forward_mqa ({{dtype_name}})", lambda: dn.forward_mqa(torch.randn(3, H, 576, dtype=torch.bfloat16), cache, dmd, None))

# the indexer: k cache write, logits over the paged FP8 K cache, top-k into the shared buffer
kc = types.SimpleNamespace(prefix="idx", kv_cache=torch.zeros(NB, BS, 132, dtype=torch.uint8))
ix = indexer_op.FrontierSparseAttnIndexer.__new__(indexer_op.FrontierSparseAttnIndexer)  # no vLLM config here
torch.nn.Module.__init__(ix)
ix.k_cache, ix.quant_block_size, ix.scale_fmt, ix.topk_tokens, ix.head_dim = kc, 128, "ue8m0", TOPK, 128
ix.max_model_len = ix.max_total_seq_len = 4096
ix.topk_indices_buffer = torch.zeros(n, TOPK, dtype=torch.int32)
ix.skip_k_cache_insert, ix.use_fp4_cache, ix.compress_ratio, ix.dcp_world_size = False, False, 1, 1
ix.layer_name = "idx" + indexer_op.INDEXER_SUFFIX
index_md = types.SimpleNamespace(slot_mapping=slots, block_table=bt)
indexer_op.get_forward_context = lambda: types.SimpleNamespace(attn_metadata={{"idx": index_md, "mla": md}},
                                                               no_compile_layers={{ix.layer_name: ix}})
# warm-up: every split count of SPLIT_CHOICES, for dense and sparse decode, bf16 and FP8 cache
from vllm_frontier.kernels import flash_mla_interface as fmi
for sparse in (False, True):
    for fp8 in (False, True):
        rec = gpu_compile._Recorder()
        with _common.assume_target((9, 0)), rec.active():
            made = fmi.warm_up_split_variants(128, torch.bfloat16, fp8, sparse, torch.device("cpu"))
            again = fmi.warm_up_split_variants(128, torch.bfloat16, fp8, sparse, torch.device("cpu"))
        seen = sorted({{v for l in rec.launches for k, v in l.constexprs.items()
                        if l.fn.params[k[0]].name == "NUM_SPLITS"}})
        print(f"WARM sparse={{sparse}} fp8={{fp8}}: made={{made}} again={{again}} splits={{seen}}")
run("indexer forward", lambda: ix.forward_native(torch.randn(n, 64), torch.randn(n, 64, 128).to(torch.float8_e4m3fn),
                                                 torch.randn(n, 128, dtype=torch.bfloat16), torch.randn(n, 64)))
"""


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = _PROBE.format(root=str(ROOT), bench=str(ROOT / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"_raw": proc.stdout}


def _outcome(probe, label):
    lines = [ln for ln in probe["_raw"].splitlines() if ln.split(" ", 1)[-1].startswith(label)]
    assert lines, f"{label} did not run:\n{probe['_raw'][-2000:]}"
    return lines


@pytest.mark.parametrize("label", ["sparse MLA forward_mqa", "latent cache write", "dense MLA forward_mqa"])
def test_no_host_sync_in_the_attention_forward(probe, label):
    lines = _outcome(probe, label)
    assert len(lines) == 2 and all(ln.startswith("OK ") for ln in lines), "\n".join(lines)


def test_warm_up_compiles_every_split_variant_once(probe):
    from vllm_frontier.kernels.flash_mla_interface import SPLIT_CHOICES

    lines = [ln for ln in probe["_raw"].splitlines() if ln.startswith("WARM ")]
    assert len(lines) == 4, probe["_raw"][-2000:]
    for ln in lines:
        assert f"made={len(SPLIT_CHOICES)} again=0 splits={sorted(SPLIT_CHOICES)}" in ln, ln


def test_split_counts_come_from_the_fixed_set(monkeypatch):
    """Whatever the batch and context, dense and sparse decode pick a split count of SPLIT_CHOICES (each a
    separate compiled kernel), the largest one not above the SM-filling count."""
    from vllm_frontier.kernels import flash_mla_interface as fmi
    from vllm_frontier.kernels.mla_attention import KernelConfig

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    cfg = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
    seen = set()
    for programs in range(1, 140):
        for keys in (1, 100, 1000, 2048, 5000, 131072):
            n = fmi._splits(programs, keys, cfg, torch.device("cuda"))
            want = max(1, min(-(-132 // programs), -(-keys // 32) // 4, 32)) if programs < 132 else 1
            assert n in fmi.SPLIT_CHOICES and n <= want < 2 * n, (programs, keys, n, want)
            seen.add(n)
    assert seen == set(fmi.SPLIT_CHOICES)


def test_no_host_sync_in_the_indexer_forward(probe):
    lines = _outcome(probe, "indexer forward")
    assert all(ln.startswith("OK ") for ln in lines), "\n".join(lines)
