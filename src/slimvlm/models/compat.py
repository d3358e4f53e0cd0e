"""Keyword names that differ across the transformers 5.x releases slimvlm supports."""

from __future__ import annotations

import inspect
from typing import Callable


def cache_kwarg(forward: Callable) -> str:
    """The keyword under which ``forward`` takes the KV cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name stays a deprecated alias until 5.40), and code
    that reads or passes the cache must use the name the installed release binds."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
