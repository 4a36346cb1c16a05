"""
What a request asks of the fake: its route, its JSON body, the ``X-Fake-*``
knobs, the token limit and the prompt size.  Pure: bytes and dicts in, values
or an error message (a ``str``, answered with 400) out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Union

__all__ = [
    "INFERENCE", "Knobs", "MAX_BODY_TEXT_BYTES", "MAX_CHUNK_BYTES", "MAX_DELAY",
    "MAX_REQUEST_BYTES", "MAX_STREAM_TEXT_BYTES", "MAX_TOKENS", "ROUTES", "Route",
    "count_words", "is_unload", "parse_body", "parse_knobs", "token_limit",
]

#: Bounds that keep one request from exhausting the fake (answered with 400).
MAX_TOKENS = 10_000_000
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_STREAM_TEXT_BYTES = 8 * 1024 * 1024 * 1024
MAX_BODY_TEXT_BYTES = 256 * 1024 * 1024
MAX_DELAY = 60.0
MAX_REQUEST_BYTES = 64 * 1024 * 1024

#: What the fake answers, by method and path: five inference routes and the listings.
Route = Literal["chat", "completions", "llama", "generate", "ochat",
                "health", "models", "tags", "ps", "version"]
INFERENCE: frozenset[str] = frozenset({"chat", "completions", "llama", "generate", "ochat"})
ROUTES: dict[tuple[bytes, bytes], Route] = {
    (b"POST", b"/v1/chat/completions"): "chat",
    (b"POST", b"/v1/completions"): "completions",
    (b"POST", b"/completion"): "llama",
    (b"POST", b"/api/generate"): "generate",
    (b"POST", b"/api/chat"): "ochat",
    (b"GET", b"/health"): "health",
    (b"GET", b"/v1/models"): "models",
    (b"GET", b"/models"): "models",
    (b"GET", b"/api/tags"): "tags",
    (b"GET", b"/api/ps"): "ps",
    (b"GET", b"/api/version"): "version",
}


@dataclass(frozen=True, slots=True)
class Knobs:
    """The ``X-Fake-*`` headers of one request, or the server's defaults where absent."""

    delay: float
    chunk_bytes: int
    fail_after: Optional[int]
    status: Optional[int]
    stamp: bool
    #: Ollama's reported ``load_duration`` in ms (``None``: the default 1 ms).
    load_ms: Optional[float] = None


def count_words(value: Any, depth: int = 0) -> int:
    """Prompt size: words of strings, one per token id, through message/part lists."""
    if isinstance(value, str):
        return len(value.split())
    if depth > 4:
        return 0
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                total += 1
            else:
                total += count_words(item, depth + 1)
        return total
    if isinstance(value, dict):
        return count_words(value.get("content"), depth + 1) + count_words(
            value.get("text"), depth + 1)
    return 0


def token_limit(route: str, body: Mapping[str, Any]) -> Union[int, None, str]:
    """The requested completion length; ``None`` when absent or unlimited; a str on error."""
    source: Mapping[str, Any] = body
    keys: tuple[str, ...]
    if route in ("chat", "completions"):
        keys = ("max_completion_tokens", "max_tokens")
    elif route == "llama":
        keys = ("n_predict", "max_tokens")
    else:
        options = body.get("options")
        source = options if isinstance(options, dict) else {}
        keys = ("num_predict",)
    for key in keys:
        value = source.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"'{key}' must be an integer"
        return value if value >= 0 else None  # negative: llama.cpp/Ollama's "no limit"
    return None


def _parse_header(raw: Optional[bytes], name: str, kind: Callable[[str], float],
                  low: float, high: float) -> Union[float, None, str]:
    if raw is None:
        return None
    try:
        value = kind(raw.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return f"bad {name} header: {raw!r}"
    if not (low <= value <= high):  # also rejects NaN
        return f"bad {name} header: {raw!r} (allowed {low:g} to {high:g})"
    return value


def is_unload(keep_alive: Any) -> bool:
    """Ollama's ``keep_alive`` values that unload the model now."""
    return keep_alive in (0, 0.0, "0", "0s", "0m", "0h")


def parse_body(raw: bytes) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The JSON object of an inference request, or ``None`` and why not."""
    if len(raw) > MAX_REQUEST_BYTES:
        return None, f"request body larger than {MAX_REQUEST_BYTES} bytes"
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        return None, f"invalid JSON body: {e}"
    if not isinstance(parsed, dict):
        return None, "the request body must be a JSON object"
    return parsed, None


def parse_knobs(header: Callable[[bytes], Optional[bytes]], *, delay: float, chunk_bytes: int,
                fail_after: Optional[int], status: Optional[int]) -> Union[Knobs, str]:
    """
    The ``X-Fake-*`` knobs of one request.

    :param header: the last value of a (lower-case) request header, ``None`` when absent.
    :param delay: and the other keywords: the server's defaults, for absent headers.
    """
    delay_ms = _parse_header(header(b"x-fake-delay-ms"), "X-Fake-Delay-Ms", float,
                             0.0, MAX_DELAY * 1000)
    chunk = _parse_header(header(b"x-fake-chunk-bytes"), "X-Fake-Chunk-Bytes", int,
                          0, MAX_CHUNK_BYTES)
    fails = _parse_header(header(b"x-fake-fail-after"), "X-Fake-Fail-After", int,
                          0, MAX_TOKENS + 1)
    code = _parse_header(header(b"x-fake-status"), "X-Fake-Status", int, 400, 599)
    load = _parse_header(header(b"x-fake-load-ms"), "X-Fake-Load-Ms", float, 0.0, 3_600_000.0)
    for value in (delay_ms, chunk, fails, code, load):
        if isinstance(value, str):
            return value
    return Knobs(
        delay=delay if delay_ms is None else float(delay_ms) / 1000.0,
        chunk_bytes=chunk_bytes if chunk is None else int(chunk),
        fail_after=fail_after if fails is None else int(fails),
        status=status if code is None else int(code),
        stamp=header(b"x-fake-stamp") is not None,
        load_ms=None if load is None else float(load),
    )
