"""Offline CUDA compile of vllm_frontier's Triton kernels for each GPU generation (no GPU needed).

Every launcher is called on small CPU tensors with its CUDA target pinned (``kernels._common.assume_target``)
and the Triton launch intercepted: what is recorded is exactly what the JIT would compile on that GPU (the
signature, constexprs, divisibility attributes, num_warps / num_stages the launcher picks there). Each launch is
then compiled with Triton's compiler and the ptxas in the Triton wheel; ``ptxas -v`` gives registers and spills,
Triton's metadata the shared memory. Speed, occupancy in practice and correctness are NOT measured here.

    python benchmarks/gpu_compile.py [--arch 80,86,89,90,100,120] [--heads 128] [--out FILE.json] [--sass]

--sass also disassembles each kernel (nvdisasm from the Triton wheel) and counts the instructions of its main loop
(the longest backward branch), by opcode; for the W4A16 kernels also per weight value per thread
(BLOCK_N * BLOCK_K / threads values per iteration): the decode cost the M <= 16 GEMMs must keep near one.

Exit status 1 when a launch fails to compile, needs more shared memory than its target has, or spills at the
default configs on sm_80 / sm_90. Imports torch, triton and vllm_frontier.kernels / .quantization (no vLLM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = (80, 86, 89, 90, 100, 120)
# Shared memory per block (opt-in maximum) and SM count of a typical part of each generation.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}  # A100, A6000, L40, H100 SXM, B200, RTX 5090
NO_SPILL_TARGETS = (80, 90)
# Spills a GPU run measured as the faster choice: (kernel, sm) -> where. On sm_90 the MLA kernel's 64 x 64 tiles
# spill and still run decode 3.2x faster than spill-free 32 x 32 tiles (H200 and H100).
MEASURED_SPILLS = {("_mla_attn_fwd_kernel", 90): "benchmarks/results/gpu_check/gpu_check_h200.json"}


@dataclasses.dataclass
class Launch:
    """One intercepted kernel launch: what the JIT would compile."""

    label: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def config(self) -> str:
        names = [p.name for p in self.fn.params]
        cx = {names[k[0]]: (str(v) if isinstance(v, tl.dtype) else v) for k, v in self.constexprs.items()
              if names[k[0]].isupper() or isinstance(v, tl.dtype)}
        return " ".join([f"{k}={v}" for k, v in cx.items()] + [f"{k}={v}" for k, v in sorted(self.options.items())])

    def key(self) -> tuple:
        return (self.fn, tuple(sorted(self.signature.items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())), tuple(sorted(self.options.items())))


@dataclasses.dataclass
class Result:
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    error: str | None = None
    seconds: float = 0.0
    loop: dict | None = None  # --sass: {"instructions", "ops": {opcode: count}} of the main loop


_PTXAS = {"regs": re.compile(r"Used (\d+) registers"), "spill_stores": re.compile(r"(\d+) bytes spill stores"),
          "spill_loads": re.compile(r"(\d+) bytes spill loads")}


def main_loop(cubin: bytes) -> dict | None:
    """Instruction count and opcode histogram of the longest loop (backward branch) in a cubin's SASS."""
    import collections
    import subprocess
    import tempfile

    nvdisasm = Path(knobs.nvidia.ptxas.path).parent / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    ins, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            if pending is not None:
                labels[pending], pending = addr, None
            ins.append((addr, m.group(2)))
    loops = [(labels[m.group(1)], addr) for addr, text in ins
             if (m := re.search(r"BRA.*\.L_x_(\d+)", text)) and labels.get(m.group(1), addr + 1) < addr]
    if not loops:
        return None
    start, end = max(loops, key=lambda ab: ab[1] - ab[0])
    ops = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0]
                              for a, t in ins if start <= a <= end)
    return {"instructions": sum(ops.values()), "ops": dict(ops.most_common())}


def compile_launch(launch: Launch, cc: int, sass: bool = False) -> Result:
    """Compile for sm_<cc>; read ptxas -v (printed by Triton's own ptxas call when dump_ptxas_log is on)."""
    t0 = time.perf_counter()
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                               target=GPUTarget("cuda", cc, 32), options=dict(launch.options))
    except Exception as e:  # noqa: BLE001 - a compile failure is a table cell
        cause = e
        while (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()] or [type(cause).__name__]
        msg = next((ln for ln in lines if "error" in ln.lower() or "not supported" in ln.lower()), lines[-1])
        return Result(error=f"{type(cause).__name__}: {msg.strip()[:200]}", seconds=time.perf_counter() - t0)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    r = Result(smem=int(getattr(k.metadata, "shared", 0) or 0), seconds=time.perf_counter() - t0)
    if sass:
        r.loop = main_loop(k.asm["cubin"])
    log = buf.getvalue()
    for field, rx in _PTXAS.items():
        found = rx.findall(log)
        setattr(r, field, max((int(x) for x in found), default=0))
    return r


# --------------------------------------------------------------------------------------------- interception
class _Recorder:
    """Replaces JITFunction.run while active: records what would be compiled, launches nothing."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.label = "?"
        self._backend = make_backend(GPUTarget("cuda", 90, 32))
        self._binders: dict = {}

    def run(self_rec, jit_fn, *args, grid, warmup, **kwargs):  # noqa: N805 - bound below
        if jit_fn not in self_rec._binders:
            self_rec._binders[jit_fn] = _jit.create_function_from_signature(jit_fn.signature, jit_fn.params,
                                                                            self_rec._backend)
        bound_args, specialization, options = self_rec._binders[jit_fn](*args, **kwargs)
        user_opts = {k: v for k, v in kwargs.items() if k not in bound_args}
        _, signature, constexprs, attrs = jit_fn._pack_args(self_rec._backend, dict(user_opts), bound_args,
                                                            specialization, options)
        self_rec.launches.append(Launch(self_rec.label, jit_fn, signature, constexprs, attrs, user_opts))

    @contextlib.contextmanager
    def active(self):
        old = _jit.JITFunction.run
        rec = self

        def run(jit_fn, *args, grid, warmup, **kwargs):
            return rec.run(jit_fn, *args, grid=grid, warmup=warmup, **kwargs)

        _jit.JITFunction.run = run
        try:
            yield self
        finally:
            _jit.JITFunction.run = old

    @contextlib.contextmanager
    def as_label(self, label: str):
        self.label = label
        yield


def project_launches(cc: int, heads: int = 128, only: set[str] | None = None) -> list[Launch]:
    """The launches vllm_frontier's kernels make on sm_<cc> at DeepSeek-V3.2 shapes (bf16 model)."""
    from vllm_frontier.kernels import _common, indexer, latent_cache
    from vllm_frontier.kernels import flash_mla_interface as fmi
    from vllm_frontier.kernels import mla_attention as mla

    bf16 = torch.bfloat16
    H, nblk, blk, topk = heads, 8, 64, 2048
    q = torch.randn(1, 1, H, 576, dtype=bf16)
    cache = torch.randn(nblk, blk, 576, dtype=bf16)
    cache8 = torch.zeros(nblk, blk, 656, dtype=torch.uint8)
    bt = torch.arange(4, dtype=torch.int32).reshape(1, 4)
    seqlens = torch.tensor([200], dtype=torch.int32)
    idx = torch.randint(0, 200, (1, 1, topk), dtype=torch.int32)
    rec = _Recorder()
    want = (lambda name: only is None or name in only)
    with _common.assume_target((cc // 10, cc % 10)), rec.active():
        cfg = mla.default_config(torch.device("cpu"), H)
        # split count as get_mla_metadata picks it for one sparse decode token on this GPU's SM count
        programs = fmi.cdiv(H, cfg.block_m)
        splits = max(1, min(fmi.cdiv(SM_COUNT[cc], programs), fmi.cdiv(topk, cfg.block_n) // 4, 32))
        if want("mla"):
            for fp8, c in ((False, cache), (True, cache8)):
                with rec.as_label(f"mla sparse decode {'fp8' if fp8 else 'bf16'} cache, 1 token"):
                    mla.mla_attention_fwd(q, c, bt, seqlens, 0.1, fp8=fp8, indices=idx, num_splits=splits)
                with rec.as_label(f"mla dense decode {'fp8' if fp8 else 'bf16'} cache, 1 request"):
                    mla.mla_attention_fwd(q, c, bt, seqlens, 0.1, fp8=fp8, num_splits=1)
            with rec.as_label("mla sparse prefill (ragged kv, max logits)"):
                fmi.flash_mla_sparse_fwd(q[0], cache[:1].transpose(0, 1), idx[0:1].reshape(1, 1, topk), 0.1,
                                         backend="triton")
        if want("latent_cache"):
            for fp8, c in ((False, cache), (True, cache8)):
                with rec.as_label(f"latent cache write {'fp8_ds_mla' if fp8 else 'bf16'}"):
                    latent_cache.write_latent_cache(torch.randn(4, 512, dtype=bf16), torch.randn(4, 64, dtype=bf16),
                                                    c, torch.arange(4), fp8=fp8, backend="triton")
        if want("indexer"):
            ih, idim = 64, 128
            kc = torch.zeros(nblk, blk, idim + 4, dtype=torch.uint8)
            with rec.as_label("indexer K write (ue8m0)"):
                indexer.write_indexer_k_cache(torch.randn(4, idim, dtype=bf16), kc, torch.arange(4),
                                              scale_fmt="ue8m0", backend="triton")
            qi = torch.randn(3, 1, ih, idim).to(torch.float8_e4m3fn)
            with rec.as_label("indexer paged logits (fp8 q, fp8 K)"):
                indexer.indexer_paged_logits(qi, torch.randn(3, 1, ih), kc, bt.expand(3, 4).contiguous(),
                                             torch.tensor([100, 150, 200], dtype=torch.int32), 256, causal=False,
                                             backend="triton")
            with rec.as_label("indexer ragged logits (fp8 q, fp8 K)"):
                indexer.indexer_ragged_logits(qi[:, 0], torch.randn(3, ih), torch.randn(256, idim).to(
                    torch.float8_e4m3fn), torch.rand(256), torch.zeros(3, dtype=torch.int32),
                    torch.tensor([100, 150, 200], dtype=torch.int32), backend="triton")
            with rec.as_label("indexer top-k (k=2048)"):
                indexer.topk_indices(torch.randn(3, 4096), 2048, backend="triton")
        if want("w4a16"):
            from vllm_frontier.quantization import fp4_formats
            from vllm_frontier.quantization import w4a16_gemm as wg

            N, K = 7168, 2048
            w = torch.randn(N, K) * 0.02
            orig = wg._num_sms
            wg._num_sms = lambda device: SM_COUNT[cc]
            try:
                for fmt in ("nvfp4", "mxfp4"):
                    qw = fp4_formats.quantize(w, fmt)
                    for M in (1, 256):
                        with rec.as_label(f"w4a16 {fmt} M={M} N={N} K={K}"):
                            wg.w4a16_gemm(torch.randn(M, K, dtype=bf16), qw)
                # the decode-shape kernel (layout permuted at load), as fp4_methods runs it at M <= 16
                from vllm_frontier.quantization import w4a16_decode_gemm as wd

                orig_d = wd._num_sms
                wd._num_sms = lambda device: SM_COUNT[cc]
                try:
                    for fmt in ("nvfp4", "mxfp4"):
                        dw = wd.permute_fp4(fp4_formats.quantize(w, fmt))
                        for M in (1, 16, 256):  # 256: prefill runs the same layout with 64-row tiles
                            with rec.as_label(f"w4a16 decode {fmt} M={M} N={N} K={K}"):
                                wd.w4a16_decode_gemm(torch.randn(M, K, dtype=bf16), dw)
                finally:
                    wd._num_sms = orig_d
                qe = fp4_formats.quantize(torch.randn(4, 2048, 512) * 0.02, "nvfp4")
                with rec.as_label("w4a16 grouped nvfp4 (4 experts N=2048 K=512)"):
                    wg.w4a16_grouped_gemm(torch.randn(8, 512, dtype=bf16), qe,
                                          torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32))
            finally:
                wg._num_sms = orig
    seen, out = set(), []
    for launch in rec.launches:  # identical launches (the combine kernel of both cache dtypes) compile once
        if launch.key() not in seen:
            seen.add(launch.key())
            out.append(launch)
    return out


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled row: a compile error, shared memory over the limit, spills (sm_80/90) unless
    a GPU run measured the spilling tiles faster (MEASURED_SPILLS)."""
    if row["error"]:
        return [f"does not compile: {row['error']}"]
    bad = []
    if row["smem"] > SMEM_LIMIT[row["sm"]]:
        bad.append(f"shared memory {row['smem']} B over the sm_{row['sm']} limit {SMEM_LIMIT[row['sm']]} B")
    if row["sm"] in NO_SPILL_TARGETS and row["spill_stores"] and (row.get("kernel"), row["sm"]) not in MEASURED_SPILLS:
        bad.append(f"{row['spill_stores']} B of spill stores per thread")
    return bad


# Launches whose code is compiled by another row too (same kernel, another flag): left out by --quick.
QUICK_SKIP = ("mla dense decode fp8 cache", "mla sparse prefill", "latent cache write bf16", "indexer ragged logits",
              "w4a16 mxfp4", "w4a16 decode nvfp4 M=16", "w4a16 decode mxfp4 M=16", "w4a16 decode mxfp4 M=256")


def _values_per_thread(launch: Launch) -> int | None:
    """Weight values one thread decodes per main-loop iteration, for the W4A16 kernels (else None)."""
    names = [p.name for p in launch.fn.params]
    cx = {names[k[0]]: v for k, v in launch.constexprs.items()}
    block_k = cx.get("KB", cx.get("BLOCK_K"))
    if not launch.fn.__name__.startswith("_w4a16") or block_k is None:
        return None
    return cx["BLOCK_N"] * block_k // (32 * launch.options.get("num_warps", 4))


def _arch_rows(cc: int, heads: int, only: set[str] | None, quick: bool, sass: bool = False) -> list[dict]:
    rows = []
    for launch in project_launches(cc, heads, only):
        if quick and launch.label.startswith(QUICK_SKIP):
            continue
        r = compile_launch(launch, cc, sass)
        row = {"sm": cc, "kernel": launch.fn.__name__, "use": launch.label, "config": launch.config(),
               **dataclasses.asdict(r)}
        per = _values_per_thread(launch)
        if row["loop"] and per:
            row["loop"]["weight_values_per_thread"] = per
            row["loop"]["instructions_per_value"] = round(row["loop"]["instructions"] / per, 2)
        row["problems"] = problems(row)
        rows.append(row)
    return rows


def compile_table(archs=TARGETS, heads: int = 128, only: set[str] | None = None, quick: bool = False,
                  jobs: int = 1, log=None, sass: bool = False) -> list[dict]:
    """Rows for every launch on every target; ``jobs`` targets compile in parallel processes."""
    rows = []
    if jobs > 1 and len(archs) > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("fork")  # no CUDA in this process: fork is safe and skips re-imports
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(archs)), mp_context=ctx) as ex:
            for part in ex.map(_arch_rows, archs, [heads] * len(archs), [only] * len(archs), [quick] * len(archs),
                               [sass] * len(archs)):
                rows += part
                for row in part if log else ():
                    log(format_row(row))
        return rows
    for cc in archs:
        part = _arch_rows(cc, heads, only, quick, sass)
        rows += part
        for row in part if log else ():
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    if row["error"]:
        cell = "ERROR " + row["error"][:120]
    else:
        cell = (f"regs {row['regs']:>3}  spill {row['spill_stores']}/{row['spill_loads']}  "
                f"smem {row['smem'] // 1024:>3} KiB")
    flag = ("  <-- " + "; ".join(row["problems"])) if row["problems"] and not row["error"] else ""
    loop = row.get("loop") or {}
    if "instructions_per_value" in loop:
        cell += f"  loop {loop['instructions']} instr, {loop['instructions_per_value']}/value"
    return f"sm_{row['sm']:<4} {row['kernel']:<22} {row['use']:<46} {cell}{flag}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, TARGETS)))
    ap.add_argument("--heads", type=int, default=128, help="MLA query heads per GPU (128 = TP1, 16 = TP8)")
    ap.add_argument("--only", default=None, help="comma list of: mla, latent_cache, indexer, w4a16")
    ap.add_argument("--quick", action="store_true", help=f"leave out launches another row covers: {QUICK_SKIP}")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4), help="targets compiled in parallel")
    ap.add_argument("--out", default=None, help="write the rows as JSON (with the harness header)")
    ap.add_argument("--sass", action="store_true", help="also count the main loop's SASS instructions by opcode")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("this compiles for GPUs: run it without TRITON_INTERPRET=1")
    archs = [int(x) for x in a.arch.split(",") if x]
    unknown = [x for x in archs if x not in SMEM_LIMIT]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {sorted(SMEM_LIMIT)}")
    t0 = time.perf_counter()
    rows = compile_table(archs, a.heads, set(a.only.split(",")) if a.only else None, a.quick, a.jobs, log=print,
                         sass=a.sass)
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.0f} s; {len(bad)} with problems")
    if a.out:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import harness

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        commit = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or None
        doc = {"header": {**harness.header(), "commit": commit}, "command": " ".join(sys.argv),
               "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        Path(a.out).write_text(json.dumps(doc, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
