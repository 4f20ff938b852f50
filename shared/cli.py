"""What the command lines share: --help that shows each flag's default."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no '(default: None)' or '(default: False)', and nothing
    added where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS  # `in (None, False)` would also match 0
        if quiet or "default" in text:
            return text
        return super()._get_help_string(action) or ""
