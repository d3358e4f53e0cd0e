"""The one exception slimvlm raises for bad input: its message names the problem and the fix."""

from __future__ import annotations

import sys
from typing import Callable


class SlimVLMError(ValueError):
    """Bad input to slimvlm (unknown method, option out of range, unsupported model...)."""


def exit_code(action: Callable[[], object], program: str) -> int:
    """Run a command-line entry point's work: 0 when it succeeds, 2 with the message on stderr (no
    traceback: the message already names the fix) when it raises SlimVLMError."""
    try:
        action()
    except SlimVLMError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    return 0
