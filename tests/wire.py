"""
Captured HTTP responses, as tests replay them.

Each capture in ``tests/fixtures/`` is a body file (the bytes on the wire,
chunked framing included) beside a ``<name>.headers`` file holding the status
line and the response headers.  See ``tests/fixtures/README.rst``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

FIXTURES = Path(__file__).resolve().parent / "fixtures"

__all__ = ["FIXTURES", "header_value", "load_capture", "load_capture_chunks"]

_STATUS = re.compile(r"\b([1-5][0-9][0-9])\b")
_HEX = re.compile(rb"[0-9A-Fa-f]+")


def load_capture(name: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """
    ``(status, headers, body)`` of capture `name`, with the chunked framing
    removed from the body when the headers say ``Transfer-Encoding: chunked``.

    Header names keep the case they were sent in; use :func:`header_value`.
    """
    status, headers = _read_head(name)
    return status, headers, b"".join(_body_chunks(name, headers))


def load_capture_chunks(name: str) -> list[bytes]:
    """
    The body of capture `name` as the HTTP chunks it was sent in, to replay
    chunk by chunk.  A body without chunked framing is one chunk (none if
    empty).
    """
    _, headers = _read_head(name)
    return _body_chunks(name, headers)


def header_value(headers: list[tuple[str, str]], name: str) -> Optional[str]:
    """The first value of header `name` (any case), or ``None``."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _read_head(name: str) -> tuple[int, list[tuple[str, str]]]:
    path = FIXTURES / (name + ".headers")
    lines = path.read_text("latin-1").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty")
    # One capture has "HTTP status 503" instead of a status line.
    match = _STATUS.search(lines[0])
    if not lines[0].startswith("HTTP") or match is None:
        raise ValueError(f"{path}: no status in {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{path}: not a header line: {line!r}")
        headers.append((key.strip(), value.strip()))
    return int(match.group(1)), headers


def _body_chunks(name: str, headers: list[tuple[str, str]]) -> list[bytes]:
    raw = (FIXTURES / name).read_bytes()
    encoding = header_value(headers, "Transfer-Encoding") or ""
    if "chunked" not in encoding.lower():
        return [raw] if raw else []
    return _dechunk(raw, name)


def _dechunk(raw: bytes, name: str) -> list[bytes]:
    """Strict: a capture whose framing is off is a broken fixture."""
    chunks = []
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError(f"{name}: no chunk-size line at byte {pos}")
        size_field = raw[pos:eol].split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_field):
            raise ValueError(f"{name}: bad chunk size {size_field!r} at byte {pos}")
        size = int(size_field, 16)
        pos = eol + 2
        if size == 0:
            break
        if raw[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError(f"{name}: chunk of {size} bytes at byte {pos} is not followed by CRLF")
        chunks.append(raw[pos : pos + size])
        pos += size + 2
    # Optional trailer fields, then the empty line that ends the message.
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError(f"{name}: unterminated trailer at byte {pos}")
        if eol == pos:
            pos += 2
            break
        pos = eol + 2
    if pos != len(raw):
        raise ValueError(f"{name}: {len(raw) - pos} bytes after the last chunk")
    return chunks
