"""
A small TOML writer for the shapes importers emit: tables and arrays of
tables whose values are strings, integers, floats, booleans, arrays of
strings or integers, and inline tables of strings.  The standard library reads TOML but
does not write it, and these few shapes do not justify a dependency.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Union

__all__ = ["Value", "dumps", "key", "string"]

Value = Union[str, bool, int, float, Sequence[Union[str, int]], Mapping[str, str]]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    """A key, bare when TOML allows it, quoted otherwise (``"qwen:7b"``)."""
    return name if _BARE_KEY.match(name) else string(name)


def value(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"not a finite number: {v!r}")
        return repr(v)  # always has a "." or an exponent, as TOML floats need
    if isinstance(v, str):
        return string(v)
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{key(k)} = {string(s)}" for k, s in v.items()) + " }"
    return "[" + ", ".join(string(s) if isinstance(s, str) else value(s) for s in v) + "]"


def dumps(comments: Sequence[str], tables: Sequence[tuple[str, Mapping[str, Value]]]) -> str:
    """
    The document: ``comments`` (each line gets ``# ``), then each table.

    :param tables: ``(header, values)`` pairs, the header written as given
        (``[scheduler]``, ``[[models]]``); a table without values is skipped.
    """
    lines = ["# " + "".join(c if c.isprintable() else "?" for c in line) for line in comments]
    for header, values in tables:
        if not values:
            continue
        lines += ["", header]
        lines += [f"{key(k)} = {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
