"""Registration in one place: the `vllm.general_plugins` entry point of vllm-frontier.

vLLM calls `register()` in every process it starts (API server, engine core, workers). It reads the feature
toggles, logs one line with the active features, and imports and registers a feature's vLLM adapter only when
that feature is on, so a disabled feature costs nothing and vLLM behaves as if the package were absent.
`register()` is idempotent: the `--plugin` flag calls it again after it has set the toggles.
"""

from __future__ import annotations

import logging
import sys

from .features import FeatureError, Features, load_features

logger = logging.getLogger("vllm.frontier")

# Features whose vLLM adapters are registered in this process (registration must happen once: vLLM's
# register_oot / register_connector refuse a second registration).
_registered: set[str] = set()
_logged: list[Features] = []


def _adapters(features: Features) -> dict[str, str]:
    """Feature name -> module whose `register()` hooks it into vLLM."""
    mods = {}
    if features.dsa or features.mla:
        mods["attention"] = "vllm_frontier.attention_backends"
    if features.fp4:
        mods["fp4"] = "vllm_frontier.quantization"
    if features.spec_moe:
        mods["spec_moe"] = "vllm_frontier.moe"
    if features.pd:
        mods["pd"] = "vllm_frontier.kv_connectors"
    if features.mtp:
        mods["mtp"] = "vllm_frontier.spec_decode"
    return mods


def announce(features: Features) -> None:
    """Log the one line with the active features, once per process and feature set.

    In vLLM's API process general plugins load before vLLM configures its loggers; the platform's
    `check_and_update_config` calls this again once they are configured.
    """
    if features in _logged or not logging.getLogger("vllm").handlers:
        return
    _logged.append(features)
    logger.info("%s", features.describe())


def register() -> None:
    """Entry point of `vllm.general_plugins`: register the adapters of the features that are on."""
    try:
        _register_adapters(load_features())
    except FeatureError as e:
        # A wrong toggle, or a feature's own wrong setting (e.g. FRONTIER_SPEC_MOE_*), ends the process with
        # one line and exit code 2, like a wrong CLI flag.
        print(f"vllm-frontier: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _register_adapters(features: Features) -> None:
    import importlib

    announce(features)
    for name, module in _adapters(features).items():
        if name in _registered:
            continue
        mod = importlib.import_module(module)
        if hasattr(mod, "register"):
            mod.register()
            _registered.add(name)
        else:
            logger.warning("vllm-frontier: feature %s has no vLLM adapter in this build yet; it stays off", name)
