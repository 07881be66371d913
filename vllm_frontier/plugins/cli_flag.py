"""The `--plugin dsa,fp4,...` command-line flag, added to vLLM's serve parser by our platform hook.

The flag sets the same `FRONTIER_*` toggles as the environment (spawned engine processes inherit them) and
re-runs registration in this process (general plugins ran before the command line was parsed). What each
feature then changes in vLLM's config happens in `check_and_update_config`, as for every launch path.
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_frontier.errors import FeatureError

from .features import VALID_PLUGIN_NAMES, parse_plugin_list

PLUGIN_HELP = (
    "vllm-frontier features to switch on, comma separated: " + ", ".join(VALID_PLUGIN_NAMES)
    + ". Same effect as the FRONTIER_* environment variables."
)


def apply_plugin_value(value: str) -> dict[str, str]:
    """Validate a `--plugin` value, export its toggles to os.environ and register the features. Returns the toggles.

    Raises FeatureError on an invalid value (the caller turns it into a one-line error, exit code 2).
    """
    toggles = parse_plugin_list(value)
    os.environ.update(toggles)
    from . import register, reload_settings

    reload_settings()  # validates the combination with the rest of the environment
    register()
    return toggles


class PluginAction(argparse.Action):
    """argparse action for `--plugin`: applies the value as soon as it is parsed."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            apply_plugin_value(values)
        except FeatureError as e:
            fail(str(e))  # one line, exit code 2, no traceback
        setattr(namespace, self.dest, values)


def add_plugin_argument(parser) -> None:
    """Add `--plugin` to a vLLM argument parser once (vLLM may call the platform hook several times)."""
    if parser is None or any("--plugin" in a.option_strings for a in parser._actions):
        return
    parser.add_argument("--plugin", action=PluginAction, default=None, metavar="NAMES", help=PLUGIN_HELP)


def fail(message: str) -> "NoReturn":  # noqa: F821
    """One-line error and exit code 2, as argparse does for a wrong flag."""
    print(f"vllm-frontier: error: {message}", file=sys.stderr)
    raise SystemExit(2)
