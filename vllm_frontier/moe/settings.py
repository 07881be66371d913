"""Settings of the speculative EP MoE inside vLLM: one frozen dataclass, one reader.

Read from the environment in every vLLM worker (the plugin's ``register`` runs there):

| environment                  | default      | meaning |
|------------------------------|--------------|---------|
| FRONTIER_SPEC_MOE_DISPATCH   | speculative  | ``plain``: tokens run where vLLM puts them (DP: their own rank; TP: contiguous chunks), experts in vLLM's linear placement unless a placement file is given; ``speculative``: TP tokens run on the rank holding most of their experts (capacity-capped) and experts follow the placement file; ``worst``: TP tokens run on a rank holding none of their experts (a test of losslessness: every dispatch is a correction); ``local`` (TP only): no all-to-all, every rank runs its experts on every token and vLLM's all-reduce sums them |
| FRONTIER_SPEC_MOE_PLACEMENT  | (none)       | expert placement file (``vllm-frontier spec-moe-placement``); layers it lacks keep vLLM's placement |
| FRONTIER_SPEC_MOE_CAPACITY   | 1.5          | most tokens one TP rank takes, as a multiple of an even split (>= 1) |
| FRONTIER_SPEC_MOE_LOG_EVERY  | 0            | log the byte counters every N MoE forwards per worker (0 = never) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vllm_frontier.errors import FeatureError

DISPATCH_MODES = ("plain", "speculative", "worst", "local")


class SpecMoESettingsError(FeatureError):
    """A FRONTIER_SPEC_MOE_* variable is invalid; the message names it and the valid values."""


@dataclass(frozen=True)
class SpecMoESettings:
    dispatch: str = "speculative"
    placement_path: Path | None = None
    capacity: float = 1.5
    log_every: int = 0


def read_settings(env: dict[str, str] | None = None) -> SpecMoESettings:
    """Parse the FRONTIER_SPEC_MOE_* variables (``os.environ`` when ``env`` is None)."""
    env = os.environ if env is None else env
    dispatch = env.get("FRONTIER_SPEC_MOE_DISPATCH", "").strip().lower() or "speculative"
    if dispatch not in DISPATCH_MODES:
        raise SpecMoESettingsError(
            f"FRONTIER_SPEC_MOE_DISPATCH={dispatch!r}: valid values are {', '.join(DISPATCH_MODES)}"
        )
    raw_path = env.get("FRONTIER_SPEC_MOE_PLACEMENT", "").strip()
    path = Path(raw_path) if raw_path else None
    if path is not None and not path.is_file():
        raise SpecMoESettingsError(f"FRONTIER_SPEC_MOE_PLACEMENT={raw_path!r}: no such file")
    raw_cap = env.get("FRONTIER_SPEC_MOE_CAPACITY", "").strip() or "1.5"
    try:
        capacity = float(raw_cap)
    except ValueError:
        capacity = float("nan")
    if not capacity >= 1.0:
        raise SpecMoESettingsError(f"FRONTIER_SPEC_MOE_CAPACITY={raw_cap!r}: must be a number >= 1")
    raw_log = env.get("FRONTIER_SPEC_MOE_LOG_EVERY", "").strip() or "0"
    if not raw_log.isdigit():
        raise SpecMoESettingsError(f"FRONTIER_SPEC_MOE_LOG_EVERY={raw_log!r}: must be an integer >= 0")
    return SpecMoESettings(dispatch, path, capacity, int(raw_log))
