"""Registration in one place: the `vllm.general_plugins` entry point of vllm-frontier, and the loop over the
feature objects (`plugins/dsa.py`, `mla.py`, `fp4.py`, `mtp.py`, `spec_moe.py`, `pd.py`).

vLLM calls `register()` in every process it starts (API server, engine core, workers): the feature toggles are
parsed once per process, and a feature's vLLM adapter is imported and registered only when that feature is on,
so a disabled feature costs nothing and vLLM behaves as if the package were absent.

`resolve(vllm_config)` runs from our platform's `check_and_update_config`, which vLLM calls on every config it
builds, whatever the launch path (`vllm-frontier serve`, `vllm serve --plugin`, the OpenAI server module with
`FRONTIER_*`, offline `LLM(...)`): it decides which switched-on features apply to the model and the deployment,
logs the ones that stay off and why, lets each feature update vLLM's config, and exports the decision to the
environment so that the engine core and workers, started after it, see the same feature set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from vllm_frontier.errors import FeatureError

from .dsa import DSAFeature
from .feature import Feature
from .features import FEATURES, Features, env_name, load_features
from .fp4 import FP4Feature
from .mla import MLAFeature
from .mtp import MTPFeature
from .pd import PDFeature
from .spec_moe import SpecMoEFeature

logger = logging.getLogger("vllm.frontier")

FEATURE_CLASSES: dict[str, type[Feature]] = {
    cls.name: cls for cls in (DSAFeature, MLAFeature, FP4Feature, MTPFeature, SpecMoEFeature, PDFeature)
}
assert tuple(FEATURE_CLASSES) == FEATURES

_settings: Features | None = None
# Features whose vLLM adapters are registered in this process (registration must happen once: vLLM's
# register_oot / register_connector refuse a second registration).
_registered: set[str] = set()
_logged: list[Features] = []


def settings() -> Features:
    """The feature toggles of this process, parsed once (FeatureError on a wrong value)."""
    global _settings
    if _settings is None:
        _settings = load_features()
    return _settings


def reload_settings() -> Features:
    """Parse the toggles again: the `--plugin` flag exports new ones after the entry point ran."""
    global _settings
    _settings = None
    return settings()


def active_features(features: Features) -> list[Feature]:
    """The feature objects of the switched-on features, in FEATURES order."""
    return [cls(features) for name, cls in FEATURE_CLASSES.items() if getattr(features, name)]


def announce(features: Features) -> None:
    """Log the one line with the active features, once per process and feature set.

    In vLLM's API process general plugins load before vLLM configures its loggers; `resolve` calls this again
    once they are configured.
    """
    if features in _logged or not logging.getLogger("vllm").handlers:
        return
    _logged.append(features)
    logger.info("%s", features.describe())


def exit_on_feature_error(fn):
    """Run `fn`; a FeatureError ends the process with one line and exit code 2, like a wrong CLI flag."""
    try:
        return fn()
    except FeatureError as e:
        print(f"vllm-frontier: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def register() -> None:
    """Entry point of `vllm.general_plugins`: register the adapters of the features that are on."""
    exit_on_feature_error(lambda: _register_adapters(settings()))


def _register_adapters(features: Features) -> None:
    announce(features)
    if features.any:
        from vllm_frontier import compat

        compat.check_vllm_version()
    for feature in active_features(features):
        if feature.name not in _registered:
            feature.register()
            _registered.add(feature.name)


def decide(features: Features, vllm_config) -> dict[str, str]:
    """For each switched-on feature that stays off: the reason. Raises FeatureError for a feature named on its
    own whose deployment needs are unmet (with `--plugin all` it stays off instead)."""
    hf_config = vllm_config.model_config.hf_config
    off: dict[str, str] = {}
    for feature in active_features(features):
        reason = feature.applies(hf_config)
        if reason is None and (unmet := feature.unmet(vllm_config)) is not None:
            if not features.all:
                raise FeatureError(f"--plugin {feature.name}: {unmet}")
            reason = unmet
        if reason is None and features.all and (cost := feature.not_worth_it()) is not None:
            reason = f"--plugin all leaves it off on this device: {cost}"
        if reason is not None:
            off[feature.name] = reason
    return off


def resolve(vllm_config) -> None:
    """Decide the feature set for this config and apply each feature's config changes (see module doc)."""
    exit_on_feature_error(lambda: _resolve(vllm_config))


def _resolve(vllm_config) -> None:
    global _settings
    features = settings()
    if vllm_config.model_config is None or not features.any:
        announce(features)
        return
    off = decide(features, vllm_config)
    for name, reason in off.items():
        logger.info("vllm-frontier: %s stays off: %s", name, reason)
        os.environ[env_name(name)] = "0"  # the engine core and workers start after this and inherit it
    features = dataclasses.replace(features, **{name: None if name == "fp4" else False for name in off})
    _settings = features
    announce(features)
    for feature in active_features(features):
        feature.update_config(vllm_config)


def attention_backend(selector) -> str | None:
    """Our backend's class path for this attention layer, or None to let vLLM choose."""
    for feature in active_features(settings()):
        if (path := feature.attention_backend(selector)) is not None:
            return path
    return None


def register_kernel_overrides(device_type: str, capability: tuple[int, int] | None) -> None:
    """Torch replacements for vLLM Triton kernels that the active features reach where they cannot run."""
    for feature in active_features(settings()):
        feature.register_kernel_overrides(device_type, capability)
