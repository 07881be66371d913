"""The one error type every feature's settings raise for a wrong value (shared by plugins/ and the features).

It lives outside `plugins/` so that feature packages never import the registration layer.
"""


class FeatureError(ValueError):
    """A toggle, a `--plugin` value or a feature's own setting is invalid; the message lists the valid values.

    The plugin layer turns it into one line on stderr and exit code 2, as argparse does for a wrong flag.
    """
