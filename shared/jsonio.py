"""JSON in and out with limits: every JSON meshfed reads from a peer goes through loads(), and every
JSON it serves or stores goes through dumps().

loads() refuses what the standard library would accept but we must not: documents over a size,
nesting deeper than a bound (json's C parser raises RecursionError, not ValueError, at ~1000 levels),
NaN / Infinity (also 1e999, which json reads as inf) and integers longer than 20 digits. Every refusal
is a ValueError, so callers handle one exception. dumps() writes standard JSON: a non-finite float
becomes null instead of the NaN / Infinity tokens that browsers' JSON.parse rejects.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_BYTES = 1 << 20   # default document size bound
MAX_DEPTH = 32        # default nesting bound: meshfed's own messages nest 3 levels at most
MAX_INT_DIGITS = 20   # enough for any int64


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value: Any, limit: int) -> None:
    """Raise ValueError if `value` nests deeper than `limit` containers."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > limit:
                raise ValueError(f"JSON nests deeper than {limit} levels")
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))


def loads(data: str | bytes | bytearray, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
          allow_nan: bool = False) -> Any:
    """Parse JSON from an untrusted source; ValueError on anything over the bounds or not standard JSON.

    allow_nan=True reads NaN / Infinity (and 1e999) as non-finite floats instead of refusing them, for a
    caller that checks each value itself (shared/frames.py drops a non-finite advisory field, no more).
    """
    if len(data) > max_bytes:
        raise ValueError(f"JSON document is {len(data)} bytes, the limit is {max_bytes}")
    numbers = {} if allow_nan else {"parse_float": _parse_float, "parse_constant": _refuse_constant}
    try:
        value = json.loads(data, parse_int=_parse_int, **numbers)
    except RecursionError:
        raise ValueError(f"JSON nests deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:  # a ValueError subclass already; named for clarity
        raise ValueError(f"JSON is not UTF-8: {exc}") from None
    _depth(value, max_depth)
    return value


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (recursively through dicts, lists, tuples)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Standard JSON: NaN and infinities become null (fast path when there are none)."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, **kwargs)
