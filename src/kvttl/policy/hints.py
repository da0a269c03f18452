"""Explicit TTL hints in the vocabulary users already know from Anthropic's
prompt caching: ``cache_control: {"type": "ephemeral", "ttl": "5m"}``."""

from __future__ import annotations

import math
import re

from kvttl.errors import BadArgumentError

__all__ = ["parse_ttl", "MAX_TTL_S"]

#: The longest pin a hint may ask for. Longer asks are refused, not clamped:
#: a client that asks for a day has a bug worth hearing about.
MAX_TTL_S = 24 * 3600.0

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_ttl(hint: str | int | float) -> float:
    """Seconds from a TTL hint: ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, or a
    number of seconds. Raises BadArgumentError naming the bad hint."""
    if isinstance(hint, bool):
        raise BadArgumentError(f"ttl hint must be a duration like '30s', '5m', '1h', got {hint!r}")
    if isinstance(hint, (int, float)):
        seconds = float(hint)
    elif isinstance(hint, str):
        match = _PATTERN.match(hint)
        if not match:
            raise BadArgumentError(
                f"ttl hint {hint!r} is not a duration; use a number with a unit: '250ms', '30s', '5m', '1h'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise BadArgumentError(f"ttl hint must be a str or a number of seconds, got {type(hint).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise BadArgumentError(f"ttl hint must be a finite, non-negative duration, got {hint!r}")
    if seconds > MAX_TTL_S:
        raise BadArgumentError(f"ttl hint {hint!r} is {seconds:g} s, above the {MAX_TTL_S:g} s maximum")
    return seconds
