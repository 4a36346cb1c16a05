"""
The three wire formats: from the end of a body to a :class:`~jano.records.Usage`.

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
from typing import Any, Iterator, Mapping, Optional

from jano.records import Usage
from jano.usage.suffix import suffix_members

__all__ = ["extract_usage", "with_router_timing"]


def extract_usage(
    tail: bytes, content_type: Optional[str] = None, *, truncated: bool = False
) -> Optional[Usage]:
    """
    Read token counts and timings from the end of a response body.

    Never raises: whatever the bytes, the answer is a :class:`Usage` or
    ``None``.

    :param tail: the whole body, or its end (as kept by :class:`~jano.usage.tail.TailBuffer`),
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
    from its closing brace (see :mod:`jano.usage.suffix`), so text inside a
    completion cannot pose as a member: members before the cut are lost,
    never forged.
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
#: The members the readers below look at: all a cut record is read for.
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
        "load_duration",
    }
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
        yield suffix_members(events[0], _WANTED)


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
        yield suffix_members(data, _WANTED)
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
    usage = _usage(
        "ollama",
        prompt,
        None,
        completion,
        prompt_ms,
        generation_ms,
        _per_second(completion, eval_ns, 1e9),
        _per_second(prompt, prompt_ns, 1e9),
    )
    load_ms = _duration_ms(record.get("load_duration"), 1e6)
    if usage is not None and load_ms is not None:
        usage = usage._replace(load_ms=load_ms)
    return usage


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
