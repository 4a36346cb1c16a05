"""
Reading the last JSON object of a cut body backwards, from its closing brace.

When bytes are missing from the front of a body, the record that carries the
usage may have lost its start: :func:`suffix_members` reads its *top-level*
members backwards instead.  Strings are skipped as whole tokens (a string
ends at the first quote not preceded by an odd run of backslashes, and text
inside it always escapes its quotes), nested values are skipped by bracket
matching, and a member counts only once the ``,`` or ``{`` before its key is
seen.  Reading stops at the first thing that is not a well-formed member,
which is normally the cut; a quote whose escaping the cut makes uncertain
also stops it.  So text inside a completion cannot pose as a member: members
before the cut are lost, never forged.
"""

from __future__ import annotations

import json
import re
from typing import Any, Collection

__all__ = ["suffix_members"]

# These run over the text reversed, so "}" and "]" open a value.
_WS = re.compile(r"[ \t\r\n]*")
_SCALAR = re.compile(r"[0-9A-Za-z+.\-]+")
_STRUCTURAL = re.compile(r'["{}\[\]]')
# A quote preceded (followed, reversed) by an even run of backslashes, with
# something other than a backslash beyond the run, so the run is known whole.
_OPENING_QUOTE = re.compile(r'"(?=(?:\\\\)*[^\\])')
_OPENER_OF = {"}": "{", "]": "["}
_INVALID = object()


def suffix_members(data: bytes, wanted: Collection[str]) -> dict[str, Any]:
    """
    The top-level members of the last JSON object in `data` whose keys are in
    `wanted`, read backwards; see the module docstring for why this cannot be
    fooled.
    """
    r = data.decode("utf-8", "replace")[::-1]
    n = len(r)
    i = _skip_ws(r, 0)
    if i >= n or r[i] != "}":
        return {}
    i = _skip_ws(r, i + 1)
    found: dict[str, Any] = {}
    if i < n and r[i] == "{":
        return found
    while True:
        value_end = _skip_value(r, i)
        if value_end < 0:
            return found
        value_start = i
        i = _skip_ws(r, value_end)
        if i >= n or r[i] != ":":
            return found
        i = _skip_ws(r, i + 1)
        if i >= n or r[i] != '"':
            return found
        key_end = _skip_string(r, i)
        if key_end < 0:
            return found
        raw_key = r[i:key_end][::-1]
        i = _skip_ws(r, key_end)
        if i >= n or r[i] not in ",{":
            return found
        # Confirmed: a top-level member.  Read backwards, the first one seen
        # is the last in the text, the one json.loads would keep.
        key = _parse(raw_key)
        if isinstance(key, str) and key in wanted and key not in found:
            value = _parse(r[value_start:value_end][::-1])
            if value is not _INVALID:
                found[key] = value
        if r[i] == "{":
            return found
        i = _skip_ws(r, i + 1)


def _skip_ws(r: str, i: int) -> int:
    m = _WS.match(r, i)
    return m.end() if m else i


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


def _skip_value(r: str, i: int) -> int:
    """Index past the (reversed) JSON value starting at ``r[i]``, or -1."""
    if i >= len(r):
        return -1
    c = r[i]
    if c == '"':
        return _skip_string(r, i)
    if c in "}]":
        return _skip_container(r, i)
    m = _SCALAR.match(r, i)
    return m.end() if m else -1


def _skip_string(r: str, i: int) -> int:
    """
    ``r[i]`` closes a string (it is reversed text): return the index past the
    quote that opens it, or -1 if that quote is not in `r` or the cut leaves
    its escaping uncertain (nothing but backslashes between it and the cut).
    """
    m = _OPENING_QUOTE.search(r, i + 1)
    return m.end() if m else -1


def _skip_container(r: str, i: int) -> int:
    """``r[i]`` is ``}`` or ``]``: return the index past its opening bracket, or -1."""
    stack = [r[i]]
    j = i + 1
    while stack:
        m = _STRUCTURAL.search(r, j)
        if m is None:
            return -1
        c, k = m.group(), m.start()
        if c == '"':
            j = _skip_string(r, k)
            if j < 0:
                return -1
        elif c in "}]":
            stack.append(c)
            j = k + 1
        else:
            if _OPENER_OF[stack.pop()] != c:
                return -1
            j = k + 1
    return j
