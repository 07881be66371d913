"""Mutation testing of the pure-Python modules with mutmut (`make mutation`; too slow for CI).

Each module runs in its own work folder ``build/mutation/<name>/`` (links to ``vllm_frontier`` and
``tests``, plus a ``pyproject.toml`` holding this project's pytest settings and a ``[tool.mutmut]``
section): mutmut copies the tree into ``mutants/`` there, mutates only that module, collects which of
the module's fast unit tests reach each function, then runs each mutant against those tests only.
Score = caught / (caught + survived + uncovered), caught = killed or timed out.

    python benchmarks/mutation.py                 # every module, results to benchmarks/results/mutation/
    python benchmarks/mutation.py auth staging    # some modules (merged into the existing result file)
    python benchmarks/mutation.py --report        # rebuild the report from finished work folders

The survivors' judgements (equivalent or not, and why) live in JUDGEMENTS below and are copied into
the markdown report next to each surviving mutant's diff.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
OUT = ROOT / "benchmarks" / "results" / "mutation"

# name -> (module path, the fast unit tests that cover it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "auth": ("vllm_frontier/kv_connectors/auth.py", ["tests/kv_connectors/test_auth_attacks.py"]),
    "staging": ("vllm_frontier/kv_connectors/staging.py", ["tests/kv_connectors/test_staging.py"]),
    "wire": ("vllm_frontier/kv_connectors/wire.py", ["tests/kv_connectors/test_wire.py"]),
    "instance_pool": ("vllm_frontier/schedulers/instance_pool.py",
                      ["tests/schedulers/test_instance_pool_accounting.py", "tests/schedulers/test_instance_pool.py"]),
    "router": ("vllm_frontier/schedulers/router.py",
               ["tests/schedulers/test_router_accounting.py", "tests/schedulers/test_router_fake.py",
                "tests/schedulers/test_router_paths.py"]),
    "simulator": ("vllm_frontier/schedulers/simulator.py",
                  ["tests/schedulers/test_simulator_physics.py", "tests/schedulers/test_simulator.py"]),
    "controller": ("vllm_frontier/schedulers/controller.py",
                   ["tests/schedulers/test_controller.py", "tests/schedulers/test_controller_model.py"]),
    "pregroup": ("vllm_frontier/moe/pregroup.py", ["tests/moe/test_pregroup.py"]),
    "features": ("vllm_frontier/plugins/features.py", ["tests/plugins/test_features.py"]),
}

CAUGHT = ("killed", "timeout")
MISSED = ("survived", "no tests")

# mutant name -> why it survives, after reviewing `mutmut show NAME`. "equivalent: ..." = no test can tell
# it from the original (it is left out of the second score); anything else is a gap, with what would close it.
_ROTATION = ("equivalent: ties among equally loaded instances still rotate over every instance, from another "
             "start or in the other direction; the contract (InstancePool.acquire) does not fix the order")
_CLAMP = ("equivalent: scale = amax / 448, so |x / scale| <= 448 up to one fp32 rounding, which rounds to the "
          "e4m3 code of 448 anyway; the clamp never changes a code")
_ON_DEVICE = ("not equivalent on a GPU (the payload would be built on the host, against encode_rows' contract); "
              "test_payload_stays_on_the_rows_device catches it, but it is skipped on a CPU-only machine")
_PENDING = ("equivalent: a pending direction of None never equals a proposed direction (+1 or -1), so the next "
            "proposal restarts the count at 1, exactly as after a reset to 0; nothing else reads them")
JUDGEMENTS: dict[str, str] = {
    "vllm_frontier.kv_connectors.auth.x__mac__mutmut_12":
        "equivalent on Python >= 3.11: int.to_bytes defaults to byteorder 'big' (on 3.10 it raises TypeError "
        "and every test fails)",
    "vllm_frontier.plugins.features.x_parse_plugin_list__mutmut_20":
        "equivalent: the second alias lookup only changes a name given with '=mode', and no alias takes a mode, "
        "so such an item is rejected with the same message (it quotes the item, not the name) either way",
    "vllm_frontier.schedulers.instance_pool.xǁInstancePoolǁ__init____mutmut_20": _ROTATION,
    "vllm_frontier.schedulers.instance_pool.xǁInstancePoolǁacquire__mutmut_13": _ROTATION,
    "vllm_frontier.schedulers.instance_pool.xǁInstancePoolǁacquire__mutmut_25": _ROTATION,
    "vllm_frontier.kv_connectors.wire.x__encode_fp8__mutmut_31": _CLAMP,
    "vllm_frontier.kv_connectors.wire.x__encode_fp8__mutmut_32": _CLAMP,
    "vllm_frontier.kv_connectors.wire.x__encode_fp8__mutmut_34": _CLAMP,
    "vllm_frontier.kv_connectors.wire.x__encode_fp8__mutmut_41": _ON_DEVICE,
    "vllm_frontier.kv_connectors.wire.x__encode_fp8__mutmut_45": _ON_DEVICE,
    "vllm_frontier.schedulers.router.xǁRouterǁ_lease__mutmut_5":
        "equivalent with the current failure handling: every failed decode attempt also marks its instance down, "
        "so it is no candidate for the retry anyway; the exclusion only matters if a health probe put it back "
        "between two attempts (a race no test reproduces)",
    "vllm_frontier.schedulers.router.xǁRouterǁ_prefill__mutmut_3":
        "equivalent: the prefill body only gets top-level keys replaced or popped, so a shallow copy leaves the "
        "client's body untouched as well",
    "vllm_frontier.schedulers.router.xǁRouterǁ_prefill__mutmut_44": "equivalent: None and False are both falsy",
    "vllm_frontier.schedulers.router.xǁRouterǁprometheus__mutmut_37": "equivalent: HTTP header names are case-insensitive",
    "vllm_frontier.schedulers.router.xǁRouterǁprometheus__mutmut_38": "equivalent: HTTP header names are case-insensitive",
    **{f"vllm_frontier.schedulers.router.xǁRouterǁprometheus__mutmut_{k}":
       "not covered: the scrape timeout of an instance's /metrics only shows with an instance that hangs; a test "
       "would need a multi-second hang and a timing bound, left out of the unit suite" for k in (17, 19, 23, 24)},
    "vllm_frontier.schedulers.router.xǁRouterǁ_acquire_waiting__mutmut_3": "equivalent: None and False are both falsy",
    "vllm_frontier.schedulers.router.xǁRouterǁ_acquire_waiting__mutmut_9":
        "equivalent with the current failure handling (see _lease__mutmut_5)",
    "vllm_frontier.schedulers.router.xǁRouterǁ_acquire_waiting__mutmut_10":
        "equivalent: > or >= on a continuous monotonic clock differ only at one instant",
    "vllm_frontier.schedulers.router.xǁRouterǁ_acquire_waiting__mutmut_21":
        "not covered: the polling interval of a queued request only changes how soon it notices a freed "
        "instance (latency); a bound tight enough to tell 0.05 s from 1.05 s is flaky on a loaded machine",
    "vllm_frontier.schedulers.router.xǁRouterǁhandle__mutmut_44": "equivalent: None and False are both falsy",
    **{f"vllm_frontier.schedulers.simulator.{k}": v for k, v in {
        "x_percentile__mutmut_14": "equivalent for q in [0, 100], the documented domain",
        "xǁ_Instanceǁ__init____mutmut_13": "equivalent: finish steps are counted relative to the step counter",
        "xǁ_Instanceǁ_admit__mutmut_11": "equivalent: nothing follows the admission loop, so break and return agree",
        "xǁ_Instanceǁloop__mutmut_22": "equivalent: at used == budget the next job gets a 0-token chunk (mixed) "
                                       "or the whole-prompt check breaks (pure prefill); nothing changes",
        "xǁ_Instanceǁloop__mutmut_60": "equivalent: DecodeCost.step_s is 0 for an empty batch",
        "xǁ_Simǁon_prefilled__mutmut_1": "equivalent: an instance has role 'both' exactly when the deployment "
                                         "is colocated (n_prefill None)",
        "xǁ_Simǁapply__mutmut_9": "equivalent: with n_prefill == len(pre) the slice is empty",
        "xǁ_Simǁapply__mutmut_20": "equivalent: with n_prefill == len(pre) the slice is empty",
        "xǁ_Simǁ_until_done__mutmut_4": "equivalent for the results: at most one more idle second is simulated",
        "xǁ_Instanceǁ_admit__mutmut_14": "gap: KV accounting with two requests admitted together is only seen in "
                                         "the end state; the conservation test's scenario admits one at a time",
        "xǁ_Instanceǁloop__mutmut_13": "gap: chunked prefill on an instance that still drains decodes (re-roled) "
                                       "is not checked by a hand-computed case",
        "xǁ_Instanceǁloop__mutmut_15": "gap: as loop__mutmut_13",
        "xǁ_Instanceǁloop__mutmut_29": "gap: two prompts chunked into one mixed step are not in a hand-computed case",
        "xǁ_Instanceǁloop__mutmut_33": "gap: whole prompts that fill the budget exactly are not in a hand-computed case",
        "xǁ_Simǁ__init____mutmut_7": "gap: instance indices only break ties; no test has a tie that reaches them",
        "xǁ_Simǁ_pick_prefill__mutmut_7": "gap: prefill choice with several prefill instances is not hand-checked",
        "xǁ_Simǁ_pick_prefill__mutmut_13": "gap: colocated placement by queued tokens + 0.1 ctx is not hand-checked",
        "xǁ_Simǁ_pick_prefill__mutmut_15": "gap: as _pick_prefill__mutmut_13",
        "xǁ_Simǁcontrol__mutmut_8": "gap: the sample test has one prefill and one decode instance, so counting "
                                    "non-prefill instances gives the same number",
        "xǁ_Simǁcontrol__mutmut_45": "gap: the sample test has no request waiting for KV admission",
        "xǁ_Simǁrun__mutmut_9": "gap: an empty trace is never simulated",
        "xǁ_Simǁrun__mutmut_12": "gap: an empty trace is never simulated",
        "xǁ_Simǁ_until_done__mutmut_5": "gap: an empty trace is never simulated",
        "xǁ_Simǁ_until_done__mutmut_6": "gap: an empty trace is never simulated",
        "xǁ_Simǁ_until_done__mutmut_9": "gap: an empty trace is never simulated",
        "xǁSimConfigǁ__post_init____mutmut_4": "gap: the message is matched as a substring",
        "xǁSimConfigǁ__post_init____mutmut_26": "gap: the message is matched as a substring",
        "xǁSimConfigǁ__post_init____mutmut_19": "gap: the boundary chunk_tokens = 1 is not tried",
        "xǁSimConfigǁ__post_init____mutmut_20": "gap: the boundary chunk_tokens = 1 is not tried",
        "xǁSimConfigǁ__post_init____mutmut_23": "gap: the boundary drain_s = 0 is not tried",
        "xǁSimConfigǁ__post_init____mutmut_24": "gap: the boundary drain_s = 0 is not tried",
        "x_simulate__mutmut_4": "gap: the error's token count is not checked",
    }.items()},
    **{f"vllm_frontier.moe.pregroup.{k}": v for k, v in {
        "x_placement_stats__mutmut_7": "equivalent: a float mask filled with True sums the same",
        "x_placement_stats__mutmut_9": "equivalent: a float mask filled with True sums the same",
        "x_pregroup__mutmut_11": "equivalent: `per` is only compared with ints; E / N is exact for a divisor N",
        "x_pregroup__mutmut_32": "equivalent: torch.full with an int fill already gives int64",
        "x_pregroup__mutmut_35": "equivalent: torch.full with an int fill already gives int64",
        "x_pregroup__mutmut_37": "equivalent: any negative fill means 'not placed yet'",
        "x_pregroup__mutmut_40": "equivalent below 2**24 routed tokens: float32 holds the integer loads exactly",
        "x_pregroup__mutmut_42": "equivalent below 2**24 routed tokens: float32 holds the integer loads exactly",
        "x_pregroup__mutmut_45": "equivalent: a float per-rank expert count compares the same with `per`",
        "x_pregroup__mutmut_47": "equivalent: a float per-rank expert count compares the same with `per`",
        "x_pregroup__mutmut_93": "equivalent: float('INF') is infinity too",
        "x_pregroup__mutmut_110": "equivalent: float('INF') is infinity too",
        "x_pregroup__mutmut_121": "equivalent: every rank holds at least one expert, so one_hot infers N classes",
        "x_pregroup__mutmut_127": "equivalent in practice: the search converges well within 2E swaps on every "
                                  "input tried; the bound only caps the run time",
    }.items()},
    **{f"vllm_frontier.schedulers.controller.{k}": v for k, v in {
        "xǁRatioControllerǁ_prefill_time__mutmut_37": "equivalent: cv^2 is only used when D > 0; with D = 0 the "
                                                      "P90 TTFT is 0 and the utilisation cap max_util for any cv^2",
        "xǁRatioControllerǁ_prefill_rho__mutmut_10": "equivalent: at slack exactly 0 the formula gives g = 0, "
                                                     "floored to the same 0.05",
        "xǁRatioControllerǁ_feedback__mutmut_56": "equivalent: at r = 1 the feedback step is 1 (dead band), so "
                                                  "skipping it or not changes nothing",
        "xǁRatioControllerǁstep__mutmut_62": _PENDING,
        "xǁRatioControllerǁstep__mutmut_114": _PENDING,
        "xǁRatioControllerǁstep__mutmut_163": _PENDING,
        "xǁRatioControllerǁstep__mutmut_232": _PENDING,
        "xǁRatioControllerǁstep__mutmut_103": "equivalent: the spare split is the largest p within the cap, and "
                                              "the least-pressure split (>= lo) is within it, so no p < lo wins",
        "xǁRatioControllerǁstep__mutmut_170": "equivalent: best == n_prefill has returned before this line",
        "xǁRatioControllerǁstep__mutmut_239": "equivalent: an applied target always differs from n_prefill (a "
                                              "move of at least one, or a repair from outside [lo, hi] into it)",
    }.items()},
    **{f"vllm_frontier.schedulers.router.x_main__mutmut_{k}":
       "equivalent: only the log level / format of the router process changes (cosmetic)" for k in range(7, 13)},
    **{f"vllm_frontier.schedulers.router.{k}": v for k, v in {
        "x_main__mutmut_3": "equivalent: argparse reads sys.argv[1:] itself when given None",
        "xǁRouterǁ__init____mutmut_4": "equivalent: start() (the app's first startup handler) sets the session "
                                       "before anything reads it",
        **{f"xǁRouterǁ_health_loop__mutmut_{k}": "equivalent: Router._probe turns every error an instance can "
           "cause (connection, timeout, status, malformed JSON) into mark_down, so no probe raises into the "
           "health loop's gather" for k in (3, 5, 7)},
        "xǁRouterǁ_prefill__mutmut_38": "equivalent: None and False are both falsy",
        "xǁRouterǁhandle__mutmut_124": "equivalent: None and False are both falsy",
        "xǁRouterǁhandle__mutmut_68": "equivalent: None and '' are both falsy (no KV to pull)",
        "xǁRouterǁhandle__mutmut_84": "equivalent with the current failure handling (see _lease__mutmut_5)",
        "xǁRouterǁhandle__mutmut_94": "equivalent: unreachable, every path that sets resp returns, so resp is "
                                      "None whenever no decode instance is left",
        "xǁRouterǁhandle__mutmut_98": "equivalent: the decode body only gets top-level keys set or popped, so a "
                                      "shallow copy leaves the client's body untouched as well",
        "xǁRouterǁhandle__mutmut_151": "equivalent: media types are case-insensitive (RFC 9110)",
        "xǁRouterǁhandle__mutmut_164": "equivalent: the token count is only compared with > 1; 0 and 1 agree",
        "xǁRouterǁhandle__mutmut_173": "equivalent: 200 is StreamResponse's default status",
        **{f"xǁRouterǁhandle__mutmut_{k}": "equivalent: HTTP header names are case-insensitive"
           for k in (177, 178, 184, 185, 189, 190)},
        "xǁRouterǁhandle__mutmut_187": "equivalent: media types are case-insensitive (RFC 9110)",
        **{f"xǁRouterǁhandle__mutmut_{k}": "not covered: the fallback Content-Type only shows with a decode "
           "server that streams without one; vLLM (and the aiohttp fakes) always send it" for k in (180, 182, 186)},
        **{f"xǁRouterǁ_probe__mutmut_{k}": "equivalent: the hello's prompt text is arbitrary; it only asks the "
           "instance for its KV address" for k in (37, 38)},
        "xǁRouterǁ_probe__mutmut_96": "equivalent: only whether the 'back in rotation' line is logged changes",
        **{f"xǁRouterǁ_probe__mutmut_{k}": "not covered: a probe's own timeout (5 s /health, 10 s /v1/models, "
           "60 s hello) only shows with an instance that hangs longer; too slow for the unit suite"
           for k in (2, 4, 8, 9, 18, 20, 24, 25, 46, 49, 53, 54)},
        "xǁRouterǁ_probe__mutmut_94": "not covered: the only caught error without a message is a probe timeout "
                                      "(>= 5 s); the decode path's TimeoutError name is tested",
        **{f"xǁRouterǁstart__mutmut_{k}": "not covered: the 5 s connect timeout only shows with an address that "
           "drops SYNs; a refused local connection fails at once" for k in (4, 6, 7)},
        **{f"x_build_app__mutmut_{k}": "not covered: the 64 MiB body cap only shows with a body above it; the "
           "test sends 2 MiB (above aiohttp's 1 MiB default)" for k in (7, 8, 9, 10)},
        **{f"x_parse_args__mutmut_{k}": "equivalent: only the --help text changes (cosmetic)"
           for k in (9, 96, 97, 98, 99, 100, 101)},
        **{f"x_parse_args__mutmut_{k}": "equivalent: argparse's default is None already" for k in (107, 188, 199)},
    }.items()},
}


def auto_judgement(name: str, diff: str) -> str | None:
    """Judgement for a mutant that only changes what a log line says (logging never raises into the
    caller, and no test reads log text). Everything else is judged by hand in JUDGEMENTS."""
    minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    if len(minus) == 1 and len(plus) == 1 and re.match(r"\s*logger\.(debug|info|warning|error)\(", minus[0]):
        return "equivalent: only the text or arguments of a log message change (cosmetic)"
    if minus and _strip_cli_text("\n".join(minus)) == _strip_cli_text("\n".join(plus)):
        return "equivalent: only argparse help / description / prog / metavar text changes (cosmetic)"
    return None


def _strip_cli_text(code: str) -> str:
    code = re.sub(r'\b(help|description|prog|metavar)=(None|(\s*"[^"]*")+)\s*,?', "", code)
    return re.sub(r"[\s,()]", "", code)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mutmut() -> list[str]:
    return [sys.executable, "-m", "mutmut"]


def prepare(name: str) -> Path:
    path, tests = MODULES[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for d in ("vllm_frontier", "tests"):
        (work / d).symlink_to(ROOT / d)
    base = (ROOT / "pyproject.toml").read_text()
    pytest_cfg = base[base.index("[tool.pytest.ini_options]"):]
    pytest_cfg = pytest_cfg[: pytest_cfg.index("\n[", 1) + 1] if "\n[" in pytest_cfg[1:] else pytest_cfg
    (work / "pyproject.toml").write_text(
        pytest_cfg.rstrip() + "\n\n[tool.mutmut]\n"
        f'source_paths = ["vllm_frontier"]\n'
        f"only_mutate = {json.dumps([path])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]\n'
    )
    return work


def run(name: str, max_children: int) -> None:
    work = prepare(name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutants/ must be what imports
    t0 = time.monotonic()
    with open(work / "run.log", "w") as log:
        rc = subprocess.call(_mutmut() + ["run", "--max-children", str(max_children)], cwd=work, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    (work / "run.json").write_text(json.dumps({"rc": rc, "seconds": round(time.monotonic() - t0, 1),
                                               "commit": _git("rev-parse", "HEAD")}))
    print(f"{name}: mutmut run exited {rc} after {time.monotonic() - t0:.0f} s (log: {work / 'run.log'})")


def collect(name: str) -> dict | None:
    work = WORK / name
    if not (work / "mutants").exists():
        return None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(_mutmut() + ["results", "--all", "true"], cwd=work, env=env, capture_output=True,
                         text=True).stdout
    status: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    caught = sum(counts.get(s, 0) for s in CAUGHT)
    scored = caught + sum(counts.get(s, 0) for s in MISSED)
    survivors = []
    for m, s in sorted(status.items()):
        if s in MISSED:
            diff = subprocess.run(_mutmut() + ["show", m], cwd=work, env=env, capture_output=True,
                                  text=True).stdout
            judgement = JUDGEMENTS.get(m) or auto_judgement(m, diff) or "not reviewed"
            survivors.append({"mutant": m, "status": s, "judgement": judgement,
                              "diff": diff.strip()})
    return {
        "module": MODULES[name][0],
        "tests": MODULES[name][1],
        "mutants": len(status),
        "counts": counts,
        "score": round(caught / scored, 4) if scored else None,
        "equivalent": sum(1 for s in survivors if s["judgement"].startswith("equivalent")),
        "score_excluding_equivalent": round(caught / (scored - sum(
            1 for s in survivors if s["judgement"].startswith("equivalent"))), 4) if scored else None,
        "run": json.loads((work / "run.json").read_text()) if (work / "run.json").exists() else None,
        "survivors": survivors,
    }


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def report(names: list[str], argv: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "mutation.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    modules = old.get("modules", {})
    for n in names:
        r = collect(n)
        if r is not None:
            modules[n] = r
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    doc = {
        "command": "python benchmarks/mutation.py " + " ".join(argv),
        "make": "make mutation",
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"mutmut": _version("mutmut"), "pytest": _version("pytest"), "torch": _version("torch"),
                     "python": platform.python_version()},
        "load_average": load,
        "score_definition": "caught / (caught + survived + uncovered); caught = killed or timeout",
        "modules": modules,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Mutation testing: scores and surviving mutants", "",
             f"`{doc['command']}` (mutmut {doc['versions']['mutmut']}) at {doc['commit'][:10]}, {doc['utc']}.",
             "Score = caught / (caught + survived + no tests), caught = killed or timeout, over the mutants "
             "checked; the last column leaves out the survivors judged equivalent below.",
             "", "| module | mutants | killed | timeout | survived | no tests | not checked | score | "
             "score w/o equivalent |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in modules.items():
        c = r["counts"]
        lines.append(f"| {r['module']} | {r['mutants']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
                     f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('not checked', 0)} | {r['score']:.1%} | "
                     f"{r['score_excluding_equivalent']:.1%} |")
    for n, r in modules.items():
        if not r["survivors"]:
            continue
        lines += ["", f"## {r['module']}", ""]
        for s in r["survivors"]:
            lines += [f"### `{s['mutant']}` ({s['status']})", "", f"Judgement: {s['judgement']}", "",
                      "```diff", s["diff"], "```", ""]
    (OUT / "survivors.md").write_text("\n".join(lines) + "\n")
    for n in names:
        if n in modules:
            r = modules[n]
            print(f"{n}: {r['mutants']} mutants, score {r['score']:.1%} "
                  f"({r['score_excluding_equivalent']:.1%} without equivalent ones), {r['counts']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", choices=[[], *MODULES], metavar="MODULE",
                    help=f"modules to run (default: all): {', '.join(MODULES)}")
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    args = ap.parse_args(argv)
    names = args.modules or list(MODULES)
    if not args.report:
        for n in names:
            run(n, args.max_children)
    report(names, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
