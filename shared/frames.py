"""One codec for meshfed's signed binary frames: updates (MFU1), offline contributions (MFS1) and mesh
gossip (MFG1) share it, so a header is described once, as a dataclass, and checked the same way everywhere.

A frame is   magic (4 bytes) | uint32 big-endian header length | header JSON | payload bytes.

Each header field carries its rule in its dataclass metadata (text, integer, number, strings, advisory,
local). decode() builds the dataclass from untrusted JSON and refuses ('malformed', with the field's name)
anything missing, of the wrong JSON type, out of range, too long or not matching its pattern; a
non-finite number in a signed field is refused, in an advisory field it is dropped with a note.
canonical_bytes() is what gets signed: the magic and the signed fields' validated values, in declaration
order, as a compact JSON array. It is built from typed values, never from the JSON that arrived, so two
encodings of one header cannot sign different things, and a field cannot spill into the next.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from shared import jsonio
from shared.errors import UpdateRefused

MAX_HEADER = 64 * 1024  # header JSON bytes; a frame's header is a few hundred bytes to ~3 KB (a PEM key)
MAX_DEPTH = 4           # header JSON nesting: an object of scalars, lists of strings, one metrics object
INT_MAX = 2**53 - 1     # the largest integer every JSON reader (JavaScript's too) holds exactly

# Patterns of the text fields (anchored with fullmatch).
CLIENT_ID = r"[A-Za-z0-9_.-]{1,64}"
TOKEN_ID = r"[A-Za-z0-9_-]{1,64}"
SHA256 = r"[0-9a-f]{64}"
BASE64 = r"[A-Za-z0-9+/]{0,1400}={0,2}"  # an RSA-PSS signature of a key up to 8192 bits fits ("" = unsigned)
VERSION = r"[A-Za-z0-9/._-]{1,32}"
PEM = r"[ -~\r\n]{1,8192}"               # printable ASCII and newlines


@dataclass(frozen=True)
class Rule:
    """How one header field is read: its JSON type and bounds, whether it is signed or only advisory."""

    kind: str                            # text | integer | number | strings | advisory | local
    lo: float = -math.inf
    hi: float = math.inf
    pattern: re.Pattern[str] | None = None
    max_items: int = 0                   # strings: list length; advisory: entries
    schema: Mapping[str, tuple[float, float]] | None = None  # advisory: known key -> (lo, hi)
    signed: bool = True


def _rule(**kwargs: Any) -> dict[str, Rule]:
    return {"rule": Rule(**kwargs)}


def text(pattern: str, signed: bool = True) -> dict[str, Rule]:
    return _rule(kind="text", pattern=re.compile(pattern), signed=signed)


def integer(lo: int, hi: int = INT_MAX) -> dict[str, Rule]:
    return _rule(kind="integer", lo=lo, hi=hi)


def number(lo: float, hi: float) -> dict[str, Rule]:
    return _rule(kind="number", lo=lo, hi=hi)


def strings(pattern: str, max_items: int) -> dict[str, Rule]:
    return _rule(kind="strings", pattern=re.compile(pattern), max_items=max_items)


def advisory(schema: Mapping[str, tuple[float, float]], max_items: int = 64) -> dict[str, Rule]:
    """Unsigned numbers for display: known keys within bounds are kept, anything else is dropped with a note."""
    return _rule(kind="advisory", schema=schema, max_items=max_items, signed=False)


def local() -> dict[str, Rule]:
    """Never on the wire: filled in by decode() (the notes about dropped advisory values)."""
    return _rule(kind="local", signed=False)


H = TypeVar("H")


def _check(name: str, rule: Rule, value: Any) -> Any:
    """The field's value as its Python type, or UpdateRefused('malformed') naming the field."""
    def bad(what: str) -> UpdateRefused:
        return UpdateRefused("malformed", f"header field {name!r} {what}")

    if rule.kind == "text":
        if not isinstance(value, str) or not rule.pattern.fullmatch(value):
            raise bad(f"must match {rule.pattern.pattern}")
        return value
    if rule.kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool) or not rule.lo <= value <= rule.hi:
            raise bad(f"must be an integer from {rule.lo:.0f} to {rule.hi:.0f}")
        return value
    if rule.kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not rule.lo <= value <= rule.hi:
            raise bad(f"must be a finite number from {rule.lo:g} to {rule.hi:g}")
        return float(value)
    if rule.kind == "strings":
        if not isinstance(value, list) or len(value) > rule.max_items or \
                not all(isinstance(v, str) and rule.pattern.fullmatch(v) for v in value):
            raise bad(f"must be a list of at most {rule.max_items} strings matching {rule.pattern.pattern}")
        return list(value)
    raise AssertionError(rule.kind)  # advisory and local are handled by decode()


def clean_advisory(raw: Any, rule: Rule) -> tuple[dict[str, float], list[str]]:
    """Keep known keys with finite numbers within bounds; say what was dropped and why."""
    if not isinstance(raw, dict):
        return {}, [f"advisory values dropped: expected an object, got {type(raw).__name__}"]
    kept: dict[str, float] = {}
    notes: list[str] = []
    for key, value in list(raw.items())[:rule.max_items]:
        bounds = rule.schema.get(key) if isinstance(key, str) else None
        if bounds is None:
            notes.append(f"{str(key)[:64]!r} dropped: not a known value")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or not bounds[0] <= value <= bounds[1]:
            notes.append(f"{key!r} dropped: must be a number from {bounds[0]:g} to {bounds[1]:g}")
        else:
            kept[key] = float(value)
    if len(raw) > rule.max_items:
        notes.append(f"{len(raw) - rule.max_items} values dropped: at most {rule.max_items} are read")
    return kept, notes


def decode(cls: type[H], raw: Any) -> H:
    """Build header class `cls` from parsed JSON, checking every field by its rule."""
    if not isinstance(raw, dict):
        raise UpdateRefused("malformed", "header is not a JSON object")
    values: dict[str, Any] = {}
    notes: list[str] = []
    for f in dataclasses.fields(cls):
        rule: Rule = f.metadata["rule"]
        if rule.kind == "local":
            continue
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UpdateRefused("malformed", f"header field {f.name!r} is missing")
            continue
        if rule.kind == "advisory":
            values[f.name], dropped = clean_advisory(raw[f.name], rule)
            notes += dropped
        else:
            values[f.name] = _check(f.name, rule, raw[f.name])
    header = cls(**values)
    if notes and "notes" in {f.name for f in dataclasses.fields(cls)}:
        header = dataclasses.replace(header, notes=tuple(notes))
    return header


def wire_dict(header: Any) -> dict[str, Any]:
    """The header's fields as they travel (local fields stay home)."""
    return {f.name: getattr(header, f.name) for f in dataclasses.fields(header)
            if f.metadata["rule"].kind != "local"}


def canonical_bytes(magic: bytes, header: Any) -> bytes:
    """The bytes a signature covers: the frame's magic, then the signed fields' values in order."""
    values = [getattr(header, f.name) for f in dataclasses.fields(header) if f.metadata["rule"].signed]
    return magic + b"\n" + json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode()


def frame(magic: bytes, header: Any, payload: bytes) -> bytes:
    """magic | uint32 header length | header JSON | payload."""
    head = jsonio.dumps(wire_dict(header), sort_keys=True).encode("utf-8")
    return magic + struct.pack(">I", len(head)) + head + payload


def unframe(magic: bytes, cls: type[H], body: bytes, max_header: int = MAX_HEADER) -> tuple[H, bytes]:
    """Inverse of frame: (header of class `cls`, payload), or UpdateRefused('malformed') with the reason."""
    if len(body) < 8 or body[:4] != magic:
        raise UpdateRefused("malformed", f"body does not start with the {magic.decode()} frame")
    (n,) = struct.unpack(">I", body[4:8])
    if n > max_header or 8 + n > len(body):
        raise UpdateRefused("malformed", f"header length {n} is out of range (at most {max_header}, "
                                         f"and within the body)")
    try:
        raw = jsonio.loads(bytes(body[8:8 + n]), max_bytes=max_header, max_depth=MAX_DEPTH, allow_nan=True)
    except ValueError as exc:
        raise UpdateRefused("malformed", f"header is not valid JSON: {exc}") from None
    return decode(cls, raw), body[8 + n:]
