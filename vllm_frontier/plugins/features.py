"""Feature toggles: the one place that parses and validates `FRONTIER_*` variables and `--plugin` lists.

Installed is not enabled: with no toggle set every feature is off and the plugin changes nothing in vLLM.

| feature  | variable            | values                                   | `--plugin` name        |
|----------|---------------------|------------------------------------------|------------------------|
| dsa      | FRONTIER_DSA        | 0/1                                      | dsa                    |
| mla      | FRONTIER_MLA        | 0/1                                      | mla                    |
| fp4      | FRONTIER_FP4        | 0/1/nvfp4/mxfp4 (1 = nvfp4)              | fp4, fp4=mxfp4         |
| mtp      | FRONTIER_MTP        | 0/1 (FRONTIER_MTP_K: max draft length)   | mtp, mtp=K             |
| spec_moe | FRONTIER_SPEC_MOE   | 0/1                                      | spec_moe               |
| pd       | FRONTIER_PD         | 0/1                                      | pd                     |

`--plugin all` sets FRONTIER_ALL=1: every feature that applies to the served model is switched on, and the
ones that do not apply stay off with a log line saying why (instead of an error).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from vllm_frontier.errors import FeatureError

FEATURES = ("dsa", "mla", "fp4", "mtp", "spec_moe", "pd")
FP4_MODES = ("nvfp4", "mxfp4")
DEFAULT_MTP_K = 3
MAX_MTP_K = 8

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("", "0", "false", "off", "no")


def env_name(feature: str) -> str:
    return f"FRONTIER_{feature.upper()}"


@dataclasses.dataclass(frozen=True)
class Features:
    """Which features are on. `fp4` is None (off) or a mode; `mtp_k` caps the MTP draft length."""

    dsa: bool = False
    mla: bool = False
    fp4: str | None = None
    mtp: bool = False
    mtp_k: int = DEFAULT_MTP_K
    spec_moe: bool = False
    pd: bool = False
    all: bool = False

    def active(self) -> list[str]:
        """Names of the switched-on features, in FEATURES order (fp4 with its mode)."""
        return [f"fp4={self.fp4}" if f == "fp4" else f for f in FEATURES if getattr(self, f)]

    @property
    def any(self) -> bool:
        return bool(self.active())

    def describe(self) -> str:
        active = self.active()
        return "vllm-frontier features: " + (", ".join(active) if active else "none (plugin inactive)") + (
            " [--plugin all]" if self.all else "")


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise FeatureError(f"{name}={raw!r} is invalid; valid values: 1, 0 (also true/false, on/off, yes/no)")


def _parse_fp4(raw: str) -> str | None:
    v = raw.strip().lower()
    if v in _FALSE:
        return None
    if v in _TRUE:
        return "nvfp4"
    if v in FP4_MODES:
        return v
    raise FeatureError(f"FRONTIER_FP4={raw!r} is invalid; valid values: 0, 1 (= nvfp4), nvfp4, mxfp4")


def _parse_mtp_k(raw: str) -> int:
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_MTP_K:
        raise FeatureError(f"FRONTIER_MTP_K={raw!r} is invalid; valid values: an integer from 1 to {MAX_MTP_K}")
    return k


def load_features(environ: Mapping[str, str] | None = None) -> Features:
    """Parse the `FRONTIER_*` variables of `environ` (default: os.environ). Raises FeatureError on bad values."""
    env = os.environ if environ is None else environ
    kw: dict = {}
    for f in ("dsa", "mla", "mtp", "spec_moe", "pd"):
        kw[f] = _parse_bool(env_name(f), env.get(env_name(f), ""))
    kw["fp4"] = _parse_fp4(env.get("FRONTIER_FP4", ""))
    kw["all"] = _parse_bool("FRONTIER_ALL", env.get("FRONTIER_ALL", ""))
    if "FRONTIER_MTP_K" in env:
        kw["mtp_k"] = _parse_mtp_k(env["FRONTIER_MTP_K"])
    return Features(**kw)


_ALIASES = {"spec-moe": "spec_moe", "specmoe": "spec_moe", "nvfp4": "fp4=nvfp4", "mxfp4": "fp4=mxfp4"}
VALID_PLUGIN_NAMES = ("all", "dsa", "mla", "fp4", "fp4=nvfp4", "fp4=mxfp4", "mtp", "mtp=K", "spec_moe", "pd")


def parse_plugin_list(value: str) -> dict[str, str]:
    """Turn a `--plugin` value like "dsa,fp4=mxfp4,mtp=2" into the environment variables it sets.

    Raises FeatureError (message lists the valid names) for an unknown name or a bad mode.
    """
    env: dict[str, str] = {}
    items = [s.strip().lower() for s in value.split(",") if s.strip()]
    if not items:
        raise FeatureError(f"--plugin needs at least one name; valid names: {', '.join(VALID_PLUGIN_NAMES)}")
    for item in items:
        item = _ALIASES.get(item, item)
        name, _, mode = item.partition("=")
        name = _ALIASES.get(name, name)
        if name == "all" and not mode:
            env["FRONTIER_ALL"] = "1"
            for f in FEATURES:
                env.setdefault(env_name(f), "1")
        elif name == "fp4":
            env["FRONTIER_FP4"] = mode or "nvfp4"
            _parse_fp4(env["FRONTIER_FP4"])
        elif name == "mtp":
            env["FRONTIER_MTP"] = "1"
            if mode:
                env["FRONTIER_MTP_K"] = mode
                _parse_mtp_k(mode)
        elif name in FEATURES and not mode:
            env[env_name(name)] = "1"
        else:
            raise FeatureError(f"--plugin: unknown name {item!r}; valid names: {', '.join(VALID_PLUGIN_NAMES)}")
    return env
