"""
Token counts and timings read from the end of a model server's response.

Sans-IO: :class:`TailBuffer` keeps the last bytes of a body while the tee
streams it to the client, and :func:`extract_usage` turns those bytes into a
:class:`~jano.records.Usage` once the body has ended.  No Twisted here, so the
parser is tested with plain bytes.

Only a tail is kept because every format Jano knows puts its numbers at the
very end of the body (the final SSE event, the ``done`` NDJSON line, the last
members of a JSON object), while the body itself may be of any size.

Where the numbers are taken from:

``llamacpp-timings``
    A record with a ``timings`` object (llama-server ``/completion`` and its
    OpenAI-compatible routes).  Counts come from ``usage`` when present, else
    from ``tokens_evaluated``/``tokens_predicted`` (native ``/completion``),
    else from ``timings``, where the prompt is ``prompt_n + cache_n`` because
    llama-server's own ``usage.prompt_tokens`` counts the cached tokens too.
    ``cached_tokens`` is ``usage.prompt_tokens_details.cached_tokens`` or
    ``timings.cache_n``; never ``tokens_cached``, which is the slot's whole
    KV cache (prompt and generated tokens), not the prompt's cache hits.
    Rates are the backend's own ``predicted_per_second`` and
    ``prompt_per_second`` (llama-server leaves the first generated token out
    of its generation rate, so recomputing ``n / ms`` would disagree).

``openai-usage``
    A record with a ``usage`` object and no ``timings`` (Ollama ``/v1``,
    llama-cpp-python, vLLM, LM Studio): counts only, nobody timed it.

``ollama``
    A record with ``eval_count``, ``eval_duration``, ``prompt_eval_count`` or
    ``prompt_eval_duration`` (Ollama ``/api/generate`` and ``/api/chat``).
    Durations are nanoseconds; ``tok/s = count / duration * 1e9``.

A value that is absent, of the wrong JSON type (a string, a boolean, a float
where a count belongs), negative, non-finite or absurdly large is reported as
``None``; no number is ever invented.  A rate is ``None`` when the count or
the duration it rests on is zero.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator, Mapping, Optional

from jano.records import Usage

__all__ = ["DEFAULT_TAIL_LIMIT", "TailBuffer", "extract_usage", "with_router_timing"]

#: Enough for the final event of every captured format, with room to spare.
DEFAULT_TAIL_LIMIT = 65536


class TailBuffer:
    """Keeps only the last `limit` bytes of a body fed to it chunk by chunk."""

    __slots__ = ("_limit", "_buf", "_dropped")

    def __init__(self, limit: int = DEFAULT_TAIL_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"TailBuffer limit must be >= 0, not {limit!r}")
        self._limit = limit
        self._buf = bytearray()
        self._dropped = False

    @property
    def limit(self) -> int:
        return self._limit

    def feed(self, data: bytes) -> None:
        """
        Append one chunk.  Called for every streamed chunk, so the front is
        trimmed only once the buffer holds twice the limit: each byte is copied
        in once and dropped at most once.
        """
        buf = self._buf
        buf += data
        if len(buf) > 2 * self._limit:
            del buf[: len(buf) - self._limit]
            self._dropped = True

    def getvalue(self) -> bytes:
        """The last ``limit`` bytes fed (fewer if fewer were fed)."""
        buf = self._buf
        return bytes(buf[max(0, len(buf) - self._limit) :])

    @property
    def truncated(self) -> bool:
        """True if :meth:`getvalue` lacks bytes from the front of the body."""
        return self._dropped or len(self._buf) > self._limit


def extract_usage(
    tail: bytes, content_type: Optional[str] = None, *, truncated: bool = False
) -> Optional[Usage]:
    """
    Read token counts and timings from the end of a response body.

    Never raises: whatever the bytes, the answer is a :class:`Usage` or
    ``None``.

    :param tail: the whole body, or its end (as kept by :class:`TailBuffer`),
        with any HTTP chunked framing already removed.  Compressed bodies give
        ``None``.
    :param content_type: the response ``Content-Type``, parameters allowed.
        ``text/event-stream`` is read as SSE; JSON and NDJSON types as JSON;
        anything else is sniffed.
    :param truncated: true when bytes are missing from the front of `tail`.
        Its first SSE event or NDJSON line is then partial: it is never
        handed to a JSON parser as if it were whole (see below).

    The last complete record that carries usage wins (for SSE, events are
    split on blank lines; ``[DONE]`` is skipped).  When `truncated` and no
    complete record carries usage (one huge final event, or a non-stream body
    whose start is gone, such as an Ollama ``context`` array or a long
    completion text), the last record's *top-level* members are read backwards
    from its closing brace.  Strings are skipped as whole tokens (a string
    ends at the first quote not preceded by an odd run of backslashes, and
    text inside it always escapes its quotes), nested values are skipped by
    bracket matching, and a member counts only once the ``,`` or ``{`` before
    its key is seen.  Reading stops at the first thing that is not a
    well-formed member, which is normally the cut; a quote whose escaping
    the cut makes uncertain also stops it.  So text inside a completion
    cannot pose as a member: members before the cut are lost, never forged.
    """
    try:
        return _extract(bytes(tail), content_type, truncated)
    except Exception:  # a parser bug must never cost a client its response
        return None


def with_router_timing(
    usage: Optional[Usage],
    first_chunk_at: Optional[float],
    last_chunk_at: Optional[float],
) -> Optional[Usage]:
    """
    Fill in a generation rate the backend did not report, from the router's
    own view of a *streamed* response.

    ``(completion_tokens - 1) / (last - first)``: the first chunk carries the
    first token, so the span covers the other ones (llama-server leaves out
    the first token in the same way).  ``generation_ms`` stays ``None``: the
    router saw arrivals, not the backend's own clock.  Call this for streamed
    responses only; a non-stream body arriving in a few reads would give a
    meaningless rate.  `usage` comes back unchanged when the backend timed it
    (``timed_by="backend"``), when fewer than two tokens were generated, or
    when the span is missing or not positive.
    """
    if usage is None or usage.gen_tok_s is not None:
        return usage
    n = usage.completion_tokens
    if n is None or n < 2 or first_chunk_at is None or last_chunk_at is None:
        return usage
    span = last_chunk_at - first_chunk_at
    if not (math.isfinite(span) and span > 0):
        return usage
    return usage._replace(gen_tok_s=(n - 1) / span, timed_by="router")


# -- framing -----------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
_JSON_TYPES = frozenset(
    {"application/json", "application/x-ndjson", "application/ndjson", "application/jsonl"}
)


def _extract(tail: bytes, content_type: Optional[str], truncated: bool) -> Optional[Usage]:
    """:func:`extract_usage` without its safety net (the tests call this one)."""
    if not tail or tail.startswith(_GZIP_MAGIC):
        return None
    media = content_type.split(";", 1)[0].strip().lower() if isinstance(content_type, str) else ""
    if media == "text/event-stream" or (media not in _JSON_TYPES and _looks_like_sse(tail)):
        records = _sse_records(tail, truncated)
    else:
        records = _json_records(tail, truncated)
    for record in records:
        usage = _usage_from(record)
        if usage is not None:
            return usage
    return None


def _looks_like_sse(data: bytes) -> bool:
    return data.startswith(b"data:") or b"\ndata:" in data or b"\rdata:" in data


def _sse_records(data: bytes, truncated: bool) -> Iterator[Mapping[str, Any]]:
    """JSON payloads of the SSE events in `data`, last first."""
    # JSON text never holds a raw CR, so normalising line ends is safe.
    events = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")
    for event in reversed(events[1:] if truncated else events):
        payload = _sse_data(event)
        if payload is None or payload.strip() == b"[DONE]":
            continue
        record = _loads(payload)
        if record is not None:
            yield record
    if truncated:
        yield _suffix_members(events[0])


def _sse_data(event: bytes) -> Optional[bytes]:
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def _json_records(data: bytes, truncated: bool) -> Iterator[Mapping[str, Any]]:
    """The JSON object(s) in a JSON or NDJSON body, last first."""
    if truncated:
        # The last object's end is intact whatever came before it, for one
        # big object and for the last NDJSON line alike.
        yield _suffix_members(data)
        return
    whole = _loads(data)
    if whole is not None:
        yield whole
    else:  # NDJSON, whatever its label says
        for line in reversed(data.split(b"\n")):
            if line.strip():
                record = _loads(line)
                if record is not None:
                    yield record


def _loads(raw: bytes) -> Optional[Mapping[str, Any]]:
    try:
        # Decoded here, not by json.loads, which would also accept UTF-16/32.
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


# -- reading a JSON object backwards from its closing brace ------------------

_WANTED = frozenset(
    {
        "timings",
        "usage",
        "tokens_evaluated",
        "tokens_predicted",
        "done",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }
)
# These run over the text reversed, so "}" and "]" open a value.
_WS = re.compile(r"[ \t\r\n]*")
_SCALAR = re.compile(r"[0-9A-Za-z+.\-]+")
_STRUCTURAL = re.compile(r'["{}\[\]]')
# A quote preceded (followed, reversed) by an even run of backslashes, with
# something other than a backslash beyond the run, so the run is known whole.
_OPENING_QUOTE = re.compile(r'"(?=(?:\\\\)*[^\\])')
_OPENER_OF = {"}": "{", "]": "["}
_INVALID = object()


def _suffix_members(data: bytes) -> dict[str, Any]:
    """
    The wanted top-level members of the last JSON object in `data`, read
    backwards; see :func:`extract_usage` for why this cannot be fooled.
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
        if isinstance(key, str) and key in _WANTED and key not in found:
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


# -- records to Usage --------------------------------------------------------

_OLLAMA_KEYS = ("eval_count", "eval_duration", "prompt_eval_count", "prompt_eval_duration")
_MAX_COUNT = 10**9  # tokens in one response; more is nonsense, not data
_MAX_MS = 1e10  # about 115 days
_MAX_RATE = 1e9  # tokens per second


def _usage_from(record: Mapping[str, Any]) -> Optional[Usage]:
    timings = record.get("timings")
    if isinstance(timings, dict):
        return _from_llamacpp(record, timings)
    usage = record.get("usage")
    if isinstance(usage, dict):
        return _from_openai(usage)
    if record.get("done") is not False and any(k in record for k in _OLLAMA_KEYS):
        return _from_ollama(record)
    return None


def _from_llamacpp(record: Mapping[str, Any], timings: Mapping[str, Any]) -> Optional[Usage]:
    usage = _dict(record.get("usage"))
    prompt_n = _count(timings.get("prompt_n"))
    cache_n = _count(timings.get("cache_n"))
    predicted_n = _count(timings.get("predicted_n"))
    prompt = _first(
        _count(usage.get("prompt_tokens")),
        _count(record.get("tokens_evaluated")),
        None if prompt_n is None else prompt_n + (cache_n or 0),
    )
    completion = _first(
        _count(usage.get("completion_tokens")),
        _count(record.get("tokens_predicted")),
        predicted_n,
    )
    cached = _first(_count(_dict(usage.get("prompt_tokens_details")).get("cached_tokens")), cache_n)
    prompt_ms = _duration_ms(timings.get("prompt_ms"), 1.0)
    generation_ms = _duration_ms(timings.get("predicted_ms"), 1.0)
    gen_tok_s = _rate(timings.get("predicted_per_second"))
    if predicted_n == 0 or generation_ms == 0:
        gen_tok_s = None
    prompt_tok_s = _rate(timings.get("prompt_per_second"))
    if prompt_n == 0 or prompt_ms == 0:
        prompt_tok_s = None
    return _usage(
        "llamacpp-timings",
        prompt,
        cached,
        completion,
        prompt_ms,
        generation_ms,
        gen_tok_s,
        prompt_tok_s,
    )


def _from_openai(usage: Mapping[str, Any]) -> Optional[Usage]:
    return _usage(
        "openai-usage",
        _count(usage.get("prompt_tokens")),
        _count(_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        _count(usage.get("completion_tokens")),
        None,
        None,
        None,
        None,
    )


def _from_ollama(record: Mapping[str, Any]) -> Optional[Usage]:
    prompt = _count(record.get("prompt_eval_count"))
    completion = _count(record.get("eval_count"))
    prompt_ms = _duration_ms(record.get("prompt_eval_duration"), 1e6)
    generation_ms = _duration_ms(record.get("eval_duration"), 1e6)
    prompt_ns = None if prompt_ms is None else _number(record.get("prompt_eval_duration"))
    eval_ns = None if generation_ms is None else _number(record.get("eval_duration"))
    return _usage(
        "ollama",
        prompt,
        None,
        completion,
        prompt_ms,
        generation_ms,
        _per_second(completion, eval_ns, 1e9),
        _per_second(prompt, prompt_ns, 1e9),
    )


def _usage(
    source: Any,
    prompt: Optional[int],
    cached: Optional[int],
    completion: Optional[int],
    prompt_ms: Optional[float],
    generation_ms: Optional[float],
    gen_tok_s: Optional[float],
    prompt_tok_s: Optional[float],
) -> Optional[Usage]:
    if (prompt is None and cached is None and completion is None and prompt_ms is None
            and generation_ms is None and gen_tok_s is None and prompt_tok_s is None):
        return None
    return Usage(source, prompt, cached, completion, prompt_ms, generation_ms, gen_tok_s,
                 prompt_tok_s, "backend" if gen_tok_s is not None else None)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _first(*values: Optional[int]) -> Optional[int]:
    for value in values:
        if value is not None:
            return value
    return None


def _count(value: Any) -> Optional[int]:
    # type() rather than isinstance(): a JSON true is a bool, not a count.
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return value
    return None


def _number(value: Any) -> Optional[float]:
    """A finite, non-negative JSON number (huge ints would overflow float())."""
    if type(value) is int:
        return float(value) if 0 <= value <= 10**18 else None
    if type(value) is float and math.isfinite(value) and value >= 0:
        return value
    return None


def _duration_ms(value: Any, per_ms: float) -> Optional[float]:
    number = _number(value)
    if number is None:
        return None
    ms = number / per_ms
    return ms if ms <= _MAX_MS else None


def _rate(value: Any) -> Optional[float]:
    number = _number(value)
    return number if number is not None and 0 < number < _MAX_RATE else None


def _per_second(
    count: Optional[int], duration: Optional[float], per_second: float
) -> Optional[float]:
    """`count` tokens in `duration` units, of which there are `per_second` in a second."""
    if not count or not duration:
        return None
    return _rate(count / duration * per_second)
