"""
A fake model server that answers like llama-server, Ollama or an OpenAI-style server.

It is a fake: nothing is generated.  Content chunk ``i`` of a response is the
text ``Tok{i % 10}`` plus optional padding, and the counts and timings it
reports are *simulated*, computed from the request and the server's configured
speeds, not measured.  That makes every number predictable, so a test can
assert exactly what a router should extract:

* prompt tokens: the number of whitespace-separated words in the prompt or
  messages (token-id lists count one per id), at least 1;
* completion tokens: the number of content chunks actually sent;
* ``predicted_ms == n / gen_tok_s * 1000`` and
  ``prompt_ms == prompt_n / prompt_tok_s * 1000`` (llama.cpp, milliseconds);
* ``eval_duration == round(n / gen_tok_s * 1e9)`` and
  ``prompt_eval_duration == round(prompt_n / prompt_tok_s * 1e9)`` (Ollama,
  nanoseconds); ``load_duration`` is always :data:`OLLAMA_LOAD_NS`.

The bytes follow the captures of real servers (``/work/shared/fixtures``): one
SSE ``data: {json}\\n\\n`` event or one NDJSON line per ``write`` (so per HTTP
chunk), the same keys in the same places, llama.cpp's ``timings`` where
llama-server puts them, no ``[DONE]`` on ``/completion``.

Per request, these headers change the answer (the constructor's ``default_*``
arguments set them for every request):

``X-Fake-Delay-Ms``
    gap between content chunks; the first is sent at once.  Non-streamed
    answers wait as long as the whole stream would have taken.
``X-Fake-Chunk-Bytes``
    padding bytes (``x``) added to every chunk's text.
``X-Fake-Fail-After``
    close the connection, without finishing the response, after that many
    content chunks (a backend dying mid-stream).  The chunks already written are
    delivered, then the body ends short.
``X-Fake-Status``
    answer that status (400-599) with an OpenAI-shaped JSON error instead.
``X-Fake-Stamp``
    (any value) each streamed chunk's text becomes ``Tok{k}@{ns}`` where
    ``ns`` is ``time.monotonic_ns()`` at write time, for measuring transit.

Streams are produced by a push producer registered on the request: a slow
reader pauses the fake, so a response of any size never sits in its memory.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from jano.records import ModelSpec

__all__ = [
    "FakeModelServer",
    "Flavor",
    "OLLAMA_LOAD_NS",
    "SeenRequest",
    "SimulatedSwapper",
]

Flavor = Literal["llamacpp", "ollama", "openai"]
_FLAVORS: tuple[str, ...] = ("llamacpp", "ollama", "openai")

#: ``load_duration`` reported in every Ollama final object (1 ms).
OLLAMA_LOAD_NS = 1_000_000

#: Bounds that keep one request from exhausting the fake (answered with 400).
MAX_TOKENS = 10_000_000
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_STREAM_TEXT_BYTES = 8 * 1024 * 1024 * 1024
MAX_BODY_TEXT_BYTES = 256 * 1024 * 1024
MAX_DELAY = 60.0
MAX_REQUEST_BYTES = 64 * 1024 * 1024

# One producer tick writes at most this much before yielding to the reactor,
# so a fast reader gets big batches and other connections still get turns.
_BATCH_EVENTS = 256
_BATCH_BYTES = 256 * 1024
# Above this padding, chunks are built one at a time instead of ten kept per stream.
_PREBUILT_PAD_MAX = 4096

_JSON_LLAMA = b"application/json; charset=utf-8"
_JSON_PLAIN = b"application/json"
_SSE = b"text/event-stream"
_NDJSON = b"application/x-ndjson"
_DONE = b"data: [DONE]\n\n"

# A JSON string that marks where a template's varying part goes.
_SLOT = "\x00slot\x00"
_SLOT_JSON = json.dumps(_SLOT)

_Route = Literal["chat", "completions", "llama", "generate", "ochat",
                 "health", "models", "tags", "ps", "version"]
_INFERENCE: frozenset[str] = frozenset({"chat", "completions", "llama", "generate", "ochat"})
_ROUTES: dict[tuple[bytes, bytes], _Route] = {
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

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

_Outcome = Literal["completed", "disconnected", "aborted"]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _template(obj: Any) -> list[bytes]:
    """``obj`` as compact JSON split at each :data:`_SLOT` value, in document order."""
    return [part.encode() for part in json.dumps(obj, separators=(",", ":")).split(_SLOT_JSON)]


def _quoted(text: bytes) -> bytes:
    return b'"' + text + b'"'


def _fill(obj: Any, value: bytes) -> bytes:
    """``obj`` as JSON with its one slot replaced by the raw JSON ``value``."""
    pre, post = _template(obj)
    return pre + value + post


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request the fake received: never a body, only where it went and for what."""

    method: str
    path: str
    #: The body's ``model`` field, ``None`` when absent or not a JSON string.
    model: Optional[str]


@dataclass(frozen=True, slots=True)
class _Knobs:
    delay: float
    chunk_bytes: int
    fail_after: Optional[int]
    status: Optional[int]
    stamp: bool


@dataclass(frozen=True, slots=True)
class _Gen:
    """Everything one simulated generation needs; counts are final before the first byte."""

    flavor: Flavor
    model: str
    n: int
    #: The client set a token limit: stop reason ``length``/``limit``, else ``stop``/``eos``.
    limited: bool
    prompt_n: int
    pad: int
    stamp: bool
    include_usage: bool
    stream: bool
    created: float
    serial: int
    gen_tok_s: float
    prompt_tok_s: float
    prompt_text: str

    @property
    def created_s(self) -> int:
        return int(self.created)

    @property
    def created_at(self) -> str:
        return _iso_ns(self.created)

    @property
    def predicted_ms(self) -> float:
        return self.n / self.gen_tok_s * 1000.0

    @property
    def prompt_ms(self) -> float:
        return self.prompt_n / self.prompt_tok_s * 1000.0

    def texts(self) -> list[bytes]:
        """The ten chunk texts, indexed by ``i % 10``."""
        padding = b"x" * self.pad
        return [b"Tok%d" % k + padding for k in range(10)]

    def stamped(self, i: int) -> bytes:
        return b"Tok%d@%d" % (i % 10, time.monotonic_ns()) + b"x" * self.pad

    def all_text(self) -> bytes:
        texts = self.texts()
        full, rest = divmod(self.n, 10)
        return b"".join(texts) * full + b"".join(texts[:rest])

    def timings(self) -> dict[str, Any]:
        prompt_ms = self.prompt_ms
        predicted_ms = self.predicted_ms
        return {
            "cache_n": 0,
            "prompt_n": self.prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / self.prompt_n,
            "prompt_per_second": self.prompt_tok_s,
            "predicted_n": self.n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / self.n if self.n else 0.0,
            "predicted_per_second": self.gen_tok_s,
        }

    def usage(self) -> dict[str, Any]:
        if self.flavor == "llamacpp":
            return {
                "completion_tokens": self.n,
                "prompt_tokens": self.prompt_n,
                "total_tokens": self.n + self.prompt_n,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
        return {
            "prompt_tokens": self.prompt_n,
            "completion_tokens": self.n,
            "total_tokens": self.n + self.prompt_n,
        }

    def ollama_durations(self) -> dict[str, int]:
        prompt_ns = round(self.prompt_n / self.prompt_tok_s * 1e9)
        eval_ns = round(self.n / self.gen_tok_s * 1e9)
        return {
            "total_duration": OLLAMA_LOAD_NS + prompt_ns + eval_ns,
            "load_duration": OLLAMA_LOAD_NS,
            "prompt_eval_count": self.prompt_n,
            "prompt_eval_duration": prompt_ns,
            "eval_count": self.n,
            "eval_duration": eval_ns,
        }

    @property
    def openai_id(self) -> str:
        if self.flavor == "llamacpp":
            return "chatcmpl-fake%028d" % self.serial
        return "chatcmpl-%d" % self.serial

    @property
    def fingerprint(self) -> str:
        return {"llamacpp": "b0-unknown", "ollama": "fp_ollama"}.get(self.flavor, "fp_jano_fake")

    @property
    def finish_reason(self) -> str:
        return "length" if self.limited else "stop"


def _set_status(request: Request, status: int) -> None:
    """Set ``status`` with its standard reason phrase (Twisted lacks some, e.g. 429)."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = None
    request.setResponseCode(status, phrase)


def _iso_ns(t: float) -> str:
    """Ollama's ``created_at``: RFC 3339 with nanoseconds, UTC."""
    whole = math.floor(t)
    ns = min(int(round((t - whole) * 1e9)), 999_999_999)
    stamp = datetime.fromtimestamp(whole, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns:09d}Z"


@dataclass(frozen=True, slots=True)
class _Plan:
    """A stream: ``head`` before content chunk 0, ``n`` content chunks, then ``tail``."""

    n: int
    head: bytes
    chunk: Callable[[int], bytes]
    tail: tuple[bytes, ...]


def _modular(g: _Gen, pre: bytes, post: bytes) -> Callable[[int], bytes]:
    """Chunk ``i`` is ``pre + text(i) + post``: ten pre-built variants when small and unstamped."""
    if g.stamp:
        return lambda i: pre + g.stamped(i) + post
    if g.pad > _PREBUILT_PAD_MAX:  # build each when written: memory stays one chunk
        padding = b"x" * g.pad
        return lambda i: b"".join((pre, b"Tok%d" % (i % 10), padding, post))
    variants = [pre + text + post for text in g.texts()[: min(g.n, 10)]]
    return lambda i: variants[i % 10]


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _sse_template(obj: Any) -> tuple[bytes, bytes]:
    pre, post = _template(obj)
    return b'data: ' + pre + b'"', b'"' + post + b"\n\n"


# --- OpenAI-compatible: /v1/chat/completions, /v1/completions ---------------------------


def _chat_objects(g: _Gen) -> tuple[Any, Any, Any, Optional[Any]]:
    """Role, content (with a slot), finish and usage chunks of a chat stream."""
    fr = g.finish_reason
    if g.flavor == "llamacpp":
        tail = {"created": g.created_s, "id": g.openai_id, "model": g.model,
                "system_fingerprint": g.fingerprint, "object": "chat.completion.chunk"}
        role = {"choices": [{"finish_reason": None, "index": 0,
                             "delta": {"role": "assistant", "content": None}}], **tail}
        content = {"choices": [{"finish_reason": None, "index": 0,
                                "delta": {"content": _SLOT}}], **tail}
        finish: dict[str, Any] = {"choices": [{"finish_reason": fr, "index": 0, "delta": {}}],
                                  **tail}
        usage = None
        if g.include_usage:
            usage = {"choices": [], **tail, "usage": g.usage(), "timings": g.timings()}
        else:
            finish["timings"] = g.timings()
        return role, content, finish, usage
    head = {"id": g.openai_id, "object": "chat.completion.chunk", "created": g.created_s,
            "model": g.model, "system_fingerprint": g.fingerprint}
    role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]}
    content = {**head, "choices": [{"index": 0, "delta": {"content": _SLOT},
                                    "finish_reason": None}]}
    finish = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": fr}]}
    usage = {**head, "choices": [], "usage": g.usage()} if g.include_usage else None
    return role, content, finish, usage


def _chat_stream(g: _Gen) -> _Plan:
    role, content, finish, usage = _chat_objects(g)
    pre, post = _sse_template(content)
    tail = [_sse(finish)] + ([_sse(usage)] if usage is not None else []) + [_DONE]
    return _Plan(g.n, _sse(role), _modular(g, pre, post), tuple(tail))


def _chat_body(g: _Gen) -> bytes:
    fr = g.finish_reason
    message = {"role": "assistant", "content": _SLOT}
    obj: dict[str, Any]
    if g.flavor == "llamacpp":
        obj = {"choices": [{"finish_reason": fr, "index": 0, "message": message}],
               "created": g.created_s, "model": g.model, "system_fingerprint": g.fingerprint,
               "object": "chat.completion", "usage": g.usage(), "id": g.openai_id,
               "timings": g.timings()}
    else:
        obj = {"id": g.openai_id, "object": "chat.completion", "created": g.created_s,
               "model": g.model, "system_fingerprint": g.fingerprint,
               "choices": [{"index": 0, "message": message, "finish_reason": fr}],
               "usage": g.usage()}
    return _fill(obj, _quoted(g.all_text()))


def _cmpl_id(g: _Gen) -> str:
    return g.openai_id if g.flavor == "llamacpp" else "cmpl-%d" % g.serial


def _completions_stream(g: _Gen) -> _Plan:
    fr = g.finish_reason
    cid = _cmpl_id(g)
    tail: list[bytes]
    if g.flavor == "llamacpp":
        # llama-server puts usage and timings on the finish chunk of /v1/completions,
        # whatever stream_options says (see llamacpp-v1-completions-stream.txt).
        common = {"created": g.created_s, "model": g.model,
                  "system_fingerprint": g.fingerprint, "object": "text_completion"}
        content = {"choices": [{"text": _SLOT, "index": 0, "logprobs": None,
                                "finish_reason": None}], **common, "id": cid}
        finish = {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": fr}],
                  **common, "usage": g.usage(), "id": cid, "timings": g.timings()}
        tail = [_sse(finish), _DONE]
    else:
        def obj(choices: list[Any]) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": g.created_s,
                    "choices": choices, "model": g.model, "system_fingerprint": g.fingerprint}

        content = obj([{"text": _SLOT, "index": 0, "finish_reason": None}])
        tail = [_sse(obj([{"text": "", "index": 0, "finish_reason": fr}]))]
        if g.include_usage:
            tail.append(_sse({**obj([]), "usage": g.usage()}))
        tail.append(_DONE)
    pre, post = _sse_template(content)
    return _Plan(g.n, b"", _modular(g, pre, post), tuple(tail))


def _completions_body(g: _Gen) -> bytes:
    fr = g.finish_reason
    cid = _cmpl_id(g)
    obj: dict[str, Any]
    if g.flavor == "llamacpp":
        obj = {"choices": [{"text": _SLOT, "index": 0, "logprobs": None, "finish_reason": fr}],
               "created": g.created_s, "model": g.model, "system_fingerprint": g.fingerprint,
               "object": "text_completion", "usage": g.usage(), "id": cid,
               "timings": g.timings()}
    else:
        obj = {"id": cid, "object": "text_completion", "created": g.created_s,
               "model": g.model, "system_fingerprint": g.fingerprint,
               "choices": [{"text": _SLOT, "index": 0, "finish_reason": fr}],
               "usage": g.usage()}
    return _fill(obj, _quoted(g.all_text()))


# --- llama.cpp native: /completion --------------------------------------------------------


def _llama_final(g: _Gen, content: str) -> dict[str, Any]:
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True,
        "model": g.model, "tokens_predicted": g.n, "tokens_evaluated": g.prompt_n,
        "generation_settings": {"seed": 4294967295, "temperature": 0.8, "max_tokens": g.n,
                                "n_predict": g.n, "stream": g.stream},
        "prompt": g.prompt_text, "has_new_line": False, "truncated": False,
        "stop_type": "limit" if g.limited else "eos", "stopping_word": "",
        "tokens_cached": g.prompt_n + g.n, "timings": g.timings(),
    }


def _llama_stream(g: _Gen) -> _Plan:
    # Three slots: content text, token id, tokens_predicted.
    event = {"index": 0, "content": _SLOT, "tokens": [_SLOT], "stop": False, "id_slot": -1,
             "tokens_predicted": _SLOT, "tokens_evaluated": g.prompt_n}
    p0, p1, p2, p3 = _template(event)
    start = b"data: " + p0
    end = p3 + b"\n\n"
    if g.stamp or g.pad > _PREBUILT_PAD_MAX:
        def chunk(i: int) -> bytes:
            text = g.stamped(i) if g.stamp else b"Tok%d" % (i % 10) + b"x" * g.pad
            return (start + _quoted(text) + p1 + b"%d" % (100 + i % 10) + p2
                    + b"%d" % (i + 1) + end)
    else:
        heads = [start + _quoted(text) + p1 + b"%d" % (100 + k) + p2
                 for k, text in enumerate(g.texts())]

        def chunk(i: int) -> bytes:
            return heads[i % 10] + b"%d" % (i + 1) + end
    return _Plan(g.n, b"", chunk, (_sse(_llama_final(g, "")),))


def _llama_body(g: _Gen) -> bytes:
    return _fill(_llama_final(g, _SLOT), _quoted(g.all_text()))


# --- Ollama native: /api/generate, /api/chat ----------------------------------------------


_CONTEXT_CAP = 4096


def _ollama_final(g: _Gen, chat: bool, content: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"model": g.model, "created_at": g.created_at}
    if chat:
        obj["message"] = {"role": "assistant", "content": content}
    else:
        obj["response"] = content
    obj["done"] = True
    obj["done_reason"] = g.finish_reason
    if not chat:
        obj["context"] = [2 + k % 1000 for k in range(min(g.prompt_n + g.n, _CONTEXT_CAP))]
    obj.update(g.ollama_durations())
    return obj


def _ollama_stream(g: _Gen, chat: bool) -> _Plan:
    line: dict[str, Any] = {"model": g.model, "created_at": g.created_at}
    if chat:
        line["message"] = {"role": "assistant", "content": _SLOT}
    else:
        line["response"] = _SLOT
    line["done"] = False
    pre, post = _template(line)
    final = _dumps(_ollama_final(g, chat, "")) + b"\n"
    return _Plan(g.n, b"", _modular(g, pre + b'"', b'"' + post + b"\n"), (final,))


def _ollama_body(g: _Gen, chat: bool) -> bytes:
    return _fill(_ollama_final(g, chat, _SLOT), _quoted(g.all_text()))


# --- request parsing ------------------------------------------------------------------------


def _count_words(value: Any, depth: int = 0) -> int:
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
                total += _count_words(item, depth + 1)
        return total
    if isinstance(value, dict):
        return _count_words(value.get("content"), depth + 1) + _count_words(
            value.get("text"), depth + 1)
    return 0


def _token_limit(route: str, body: Mapping[str, Any]) -> Union[int, None, str]:
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


def _is_unload(keep_alive: Any) -> bool:
    return keep_alive in (0, 0.0, "0", "0s", "0m", "0h")


# --- the server -----------------------------------------------------------------------------


class FakeModelServer:
    """
    A model server that streams for real but generates nothing.

    :param reactor_or_clock: ``callLater``/``seconds`` provider: the reactor when
        serving sockets, a :class:`twisted.internet.task.Clock` in tests (call
        ``advance(0)`` to let a stream produce its next batch).
    :param models: model names served (listed by ``/v1/models`` and
        ``/api/tags``; the first is echoed when a request names none).
    :param flavor: whose OpenAI-compatible shapes to imitate: ``"llamacpp"``
        (llama-server: ``timings`` beside ``usage``), ``"ollama"`` or
        ``"openai"`` (``usage`` only).  Every flavor serves every route.
    :param gen_tok_s: simulated generation speed behind the reported timings.
    :param prompt_tok_s: simulated prompt-processing speed.
    :param default_tokens: completion length when the request sets none.
    :param default_delay: seconds between content chunks (``X-Fake-Delay-Ms``).
    :param default_chunk_bytes: padding per chunk (``X-Fake-Chunk-Bytes``).
    :param default_fail_after: drop connections after this many chunks.
    :param default_status: answer every inference request with this error status.
    :param start_loaded: start with ``models[0]`` loaded (else unloaded: 503).

    ``loading`` (503 ``Loading model`` on every route but ``/fake/*``) and
    ``loaded_model`` (``None``: unloaded, 503 ``Model not loaded``) simulate
    swaps; :class:`SimulatedSwapper` drives them.  The ``default_*`` values are
    plain attributes a test may change at any time.
    """

    def __init__(self, reactor_or_clock: IReactorTime, *,
                 models: Sequence[str] = ("fake-model",),
                 flavor: Flavor = "llamacpp",
                 gen_tok_s: float = 50.0,
                 prompt_tok_s: float = 500.0,
                 default_tokens: int = 16,
                 default_delay: float = 0.0,
                 default_chunk_bytes: int = 0,
                 default_fail_after: Optional[int] = None,
                 default_status: Optional[int] = None,
                 start_loaded: bool = True) -> None:
        if isinstance(models, str) or not models or not all(isinstance(m, str) and m
                                                            for m in models):
            raise ValueError("models must be a non-empty sequence of non-empty names")
        if flavor not in _FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(_FLAVORS)}, not {flavor!r}")
        if not (gen_tok_s > 0 and math.isfinite(gen_tok_s)):
            raise ValueError("gen_tok_s must be a positive number")
        if not (prompt_tok_s > 0 and math.isfinite(prompt_tok_s)):
            raise ValueError("prompt_tok_s must be a positive number")
        if not 0 <= default_tokens <= MAX_TOKENS:
            raise ValueError(f"default_tokens must be between 0 and {MAX_TOKENS}")
        if not 0 <= default_delay <= MAX_DELAY:
            raise ValueError(f"default_delay must be between 0 and {MAX_DELAY} seconds")
        if not 0 <= default_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"default_chunk_bytes must be between 0 and {MAX_CHUNK_BYTES}")
        if default_fail_after is not None and default_fail_after < 0:
            raise ValueError("default_fail_after must be at least 0")
        if default_status is not None and not 400 <= default_status <= 599:
            raise ValueError("default_status must be between 400 and 599")
        self.clock = reactor_or_clock
        self.models: tuple[str, ...] = tuple(models)
        self.flavor: Flavor = flavor
        self.gen_tok_s = float(gen_tok_s)
        self.prompt_tok_s = float(prompt_tok_s)
        self.default_tokens = default_tokens
        self.default_delay = float(default_delay)
        self.default_chunk_bytes = default_chunk_bytes
        self.default_fail_after = default_fail_after
        self.default_status = default_status
        #: True while a (simulated) load runs: everything but /fake/* answers 503.
        self.loading = False
        #: The resident model; ``None`` means unloaded (503 until :meth:`set_loaded`).
        self.loaded_model: Optional[str] = self.models[0] if start_loaded else None
        #: Recent requests, oldest first: every route but ``/fake/*``; never a body.
        self.seen: deque[SeenRequest] = deque(maxlen=1000)
        self.requests = 0
        self.completed = 0
        self.disconnected = 0
        self.aborted = 0
        self._serial = 0

    # -- state and counters ---------------------------------------------------------

    def set_loaded(self, model: Optional[str]) -> None:
        """End any loading; ``model`` is now resident (``None``: nothing is, answer 503)."""
        self.loading = False
        self.loaded_model = model

    @property
    def in_progress(self) -> int:
        """Inference requests received and not yet completed, disconnected or aborted."""
        return self.requests - self.completed - self.disconnected - self.aborted

    def stats(self) -> dict[str, int]:
        """
        Counts of inference requests (the five generation routes), as ``/fake/stats``.

        ``completed`` includes error answers; ``disconnected`` counts clients
        that went away before the end; ``aborted`` counts ``X-Fake-Fail-After``
        drops.
        """
        return {
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "in_progress": self.in_progress,
            "aborted": self.aborted,
        }

    def reset_stats(self) -> None:
        """Zero the counters and forget ``seen`` (requests in progress will go negative)."""
        self.requests = self.completed = self.disconnected = self.aborted = 0
        self.seen.clear()

    def _record(self, outcome: _Outcome) -> None:
        if outcome == "completed":
            self.completed += 1
        elif outcome == "disconnected":
            self.disconnected += 1
        else:
            self.aborted += 1

    def resource(self) -> IResource:
        """A leaf resource answering every path; mount it as a ``Site``'s root."""
        return _FakeResource(self)

    # -- dispatch -------------------------------------------------------------------

    def _render(self, request: Request) -> Union[bytes, int]:
        method = request.method
        path = request.path
        if path.startswith(b"/fake/"):
            if method == b"GET" and path == b"/fake/stats":
                return self._json(request, 200, _dumps(self.stats()), _JSON_PLAIN)
            return self._not_found(request)
        route = _ROUTES.get((method, path))
        body: Optional[dict[str, Any]] = None
        bad_body: Optional[str] = None
        if route in _INFERENCE:
            body, bad_body = self._read_body(request)
        model = body.get("model") if body is not None else None
        self.seen.append(SeenRequest(method.decode("latin-1"), path.decode("latin-1"),
                                     model if isinstance(model, str) else None))
        if route is None:
            return self._not_found(request)
        if route not in _INFERENCE:
            if self.loading or self.loaded_model is None:
                return self._unavailable(request)
            return self._info(request, route)
        self.requests += 1
        self._serial += 1
        result = self._inference(request, route, body, bad_body)
        if result is not NOT_DONE_YET:
            self._record("completed")
        return result

    def _read_body(self, request: Request) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        content = request.content
        raw = content.read(MAX_REQUEST_BYTES + 1) if content is not None else b""
        if len(raw) > MAX_REQUEST_BYTES:
            return None, f"request body larger than {MAX_REQUEST_BYTES} bytes"
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            return None, f"invalid JSON body: {e}"
        if not isinstance(parsed, dict):
            return None, "the request body must be a JSON object"
        return parsed, None

    def _inference(self, request: Request, route: str, body: Optional[dict[str, Any]],
                   bad_body: Optional[str]) -> Union[bytes, int]:
        native = route in ("generate", "ochat")
        if self.loading or self.loaded_model is None:
            return self._unavailable(request)
        knobs = self._knobs(request)
        if isinstance(knobs, str):
            return self._error(request, 400, knobs, ollama=native)
        if knobs.status is not None:
            return self._error(request, knobs.status,
                               f"fake error (X-Fake-Status: {knobs.status})")
        if body is None:
            return self._error(request, 400, bad_body or "no body", ollama=native)

        limit = _token_limit(route, body)
        if isinstance(limit, str):
            return self._error(request, 400, limit, ollama=native)
        n = self.default_tokens if limit is None else limit
        if n > MAX_TOKENS:
            return self._error(request, 400, f"the fake sends at most {MAX_TOKENS} tokens",
                               ollama=native)
        if native:
            stream = body.get("stream") is not False
        else:
            stream = body.get("stream") is True
        text_bytes = n * (len(b"Tok0@") + 20 + knobs.chunk_bytes)
        if text_bytes > (MAX_STREAM_TEXT_BYTES if stream else MAX_BODY_TEXT_BYTES):
            return self._error(request, 400, "response too large for the fake", ollama=native)

        requested = body.get("model")
        model = requested if isinstance(requested, str) and requested else self.models[0]
        if route == "chat" or route == "ochat":
            prompt: Any = body.get("messages")
        else:
            prompt = body.get("prompt")
        if native and (prompt is None or prompt == "" or prompt == []):
            # Ollama loads (or, with keep_alive 0, unloads) a model asked to generate nothing.
            reason = "unload" if _is_unload(body.get("keep_alive")) else "load"
            obj: dict[str, Any] = {"model": model, "created_at": _iso_ns(self.clock.seconds())}
            if route == "ochat":
                obj["message"] = {"role": "assistant", "content": ""}
            else:
                obj["response"] = ""
            obj.update(done=True, done_reason=reason)
            return self._json(request, 200, _dumps(obj), _JSON_LLAMA)

        options = body.get("stream_options")
        g = _Gen(
            flavor=self.flavor, model=model, n=n, limited=limit is not None,
            prompt_n=max(1, _count_words(prompt)), pad=knobs.chunk_bytes, stamp=knobs.stamp,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            stream=stream, created=self.clock.seconds(), serial=self._serial,
            gen_tok_s=self.gen_tok_s, prompt_tok_s=self.prompt_tok_s,
            prompt_text=prompt if route == "llama" and isinstance(prompt, str) else "",
        )
        if stream:
            if route == "chat":
                plan = _chat_stream(g)
            elif route == "completions":
                plan = _completions_stream(g)
            elif route == "llama":
                plan = _llama_stream(g)
            else:
                plan = _ollama_stream(g, chat=route == "ochat")
            request.setResponseCode(200)
            self._headers(request, _NDJSON if native else _SSE, sse=not native)
            _Stream(self, request, plan, knobs.delay, knobs.fail_after).start()
            return NOT_DONE_YET

        if route == "chat":
            payload = _chat_body(g)
        elif route == "completions":
            payload = _completions_body(g)
        elif route == "llama":
            payload = _llama_body(g)
        else:
            payload = _ollama_body(g, chat=route == "ochat")
        json_type = _JSON_LLAMA if self.flavor == "llamacpp" or native else _JSON_PLAIN
        fails = knobs.fail_after is not None and knobs.fail_after < n
        sent = knobs.fail_after if fails and knobs.fail_after is not None else n
        wait = max(0, sent - 1) * knobs.delay
        if not fails and wait == 0:
            return self._json(request, 200, payload, json_type)
        request.setResponseCode(200)
        self._headers(request, json_type)
        _Delayed(self, request, wait, None if fails else payload)
        return NOT_DONE_YET

    def _knobs(self, request: Request) -> Union[_Knobs, str]:
        headers = request.requestHeaders

        def raw(name: bytes) -> Optional[bytes]:
            values = headers.getRawHeaders(name)
            return values[-1] if values else None

        delay_ms = _parse_header(raw(b"x-fake-delay-ms"), "X-Fake-Delay-Ms", float,
                                 0.0, MAX_DELAY * 1000)
        chunk = _parse_header(raw(b"x-fake-chunk-bytes"), "X-Fake-Chunk-Bytes", int,
                              0, MAX_CHUNK_BYTES)
        fail_after = _parse_header(raw(b"x-fake-fail-after"), "X-Fake-Fail-After", int,
                                   0, MAX_TOKENS + 1)
        status = _parse_header(raw(b"x-fake-status"), "X-Fake-Status", int, 400, 599)
        for value in (delay_ms, chunk, fail_after, status):
            if isinstance(value, str):
                return value
        return _Knobs(
            delay=self.default_delay if delay_ms is None else float(delay_ms) / 1000.0,
            chunk_bytes=self.default_chunk_bytes if chunk is None else int(chunk),
            fail_after=self.default_fail_after if fail_after is None else int(fail_after),
            status=self.default_status if status is None else int(status),
            stamp=raw(b"x-fake-stamp") is not None,
        )

    # -- answers --------------------------------------------------------------------

    def _headers(self, request: Request, content_type: bytes, sse: bool = False) -> None:
        request.setHeader(b"content-type", content_type)
        if self.flavor == "llamacpp":
            request.setHeader(b"server", b"llama.cpp")
            request.setHeader(b"access-control-allow-origin", b"")
            if sse:
                request.setHeader(b"x-accel-buffering", b"no")

    def _json(self, request: Request, status: int, payload: bytes,
              content_type: bytes) -> bytes:
        _set_status(request, status)
        self._headers(request, content_type)
        return payload

    def _error(self, request: Request, status: int, message: str, *,
               ollama: bool = False) -> bytes:
        if ollama:
            payload = _dumps({"error": message})
            return self._json(request, status, payload, _JSON_LLAMA)
        kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        payload = _dumps({"error": {"message": message, "type": kind, "code": status}})
        return self._json(request, status, payload,
                          _JSON_LLAMA if self.flavor == "llamacpp" else _JSON_PLAIN)

    def _not_found(self, request: Request) -> bytes:
        return self._error(request, 404, "File Not Found")

    def _unavailable(self, request: Request) -> bytes:
        message = "Loading model" if self.loading else "Model not loaded"
        return self._error(request, 503, message)

    def _info(self, request: Request, route: str) -> bytes:
        now = self.clock.seconds()
        obj: Any
        if route == "health":
            obj = {"status": "ok"}
        elif route == "version":
            obj = {"version": "0.0.0-fake"}
        elif route == "models" and self.flavor == "llamacpp":
            obj = {
                "models": [{"name": m, "model": m, "modified_at": "", "size": "", "digest": "",
                            "type": "model", "description": "", "tags": [""],
                            "capabilities": ["completion"], "parameters": "",
                            "details": {"parent_model": "", "format": "gguf", "family": "",
                                        "families": [""], "parameter_size": "",
                                        "quantization_level": ""}}
                           for m in self.models],
                "object": "list",
                "data": [{"id": m, "aliases": [m], "tags": [], "object": "model",
                          "architecture": {"input_modalities": ["text"],
                                           "output_modalities": ["text"]},
                          "created": int(now), "owned_by": "llamacpp",
                          "meta": {"n_ctx": 4096, "n_params": 0, "size": 0}}
                         for m in self.models],
            }
        elif route == "models":
            owner = "library" if self.flavor == "ollama" else "jano-fake"
            obj = {"object": "list",
                   "data": [{"id": m, "object": "model", "created": int(now), "owned_by": owner}
                            for m in self.models]}
        else:
            names = self.models if route == "tags" else (
                (self.loaded_model,) if self.loaded_model is not None else ())
            entries = []
            for m in names:
                entry: dict[str, Any] = {
                    "name": m, "model": m, "modified_at": _iso_ns(now), "size": 0,
                    "digest": "0" * 64,
                    "details": {"parent_model": "", "format": "gguf", "family": "fake",
                                "families": ["fake"], "parameter_size": "",
                                "quantization_level": ""}}
                if route == "ps":
                    entry.update(expires_at=_iso_ns(now + 300.0), size_vram=0,
                                 context_length=4096)
                entries.append(entry)
            obj = {"models": entries}
        charset = route in ("tags", "ps", "version") or self.flavor == "llamacpp"
        return self._json(request, 200, _dumps(obj), _JSON_LLAMA if charset else _JSON_PLAIN)


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, server: FakeModelServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> Union[bytes, int]:
        return self._server._render(request)


# --- one response in flight -------------------------------------------------------------------


class _Exchange:
    """One inference response that outlives ``render``: counts exactly one outcome."""

    def __init__(self, server: FakeModelServer, request: Request) -> None:
        self._server = server
        self._request = request
        self._clock = server.clock
        self._ended = False
        self._call: Optional[IDelayedCall] = None
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._end("disconnected")

    def _end(self, outcome: _Outcome) -> None:
        if self._ended:
            return
        self._ended = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._server._record(outcome)

    def _drop(self) -> None:
        """Close without finishing: what the client sees when a backend dies."""
        self._end("aborted")
        self._request.loseConnection()


class _Delayed(_Exchange):
    """A non-streamed answer sent after the simulated generation time (or a drop)."""

    def __init__(self, server: FakeModelServer, request: Request, wait: float,
                 payload: Optional[bytes]) -> None:
        super().__init__(server, request)
        self._payload = payload
        self._call = self._clock.callLater(wait, self._fire)

    def _fire(self) -> None:
        self._call = None
        if self._ended:
            return
        if self._payload is None:
            self._drop()
            return
        request = self._request
        request.setHeader(b"content-length", b"%d" % len(self._payload))
        request.write(self._payload)
        self._end("completed")
        request.finish()


@implementer(IPushProducer)
class _Stream(_Exchange):
    """
    Writes a :class:`_Plan` to the request as a push producer.

    With no delay, each tick writes a batch and schedules the next with
    ``callLater(0)`` so the reactor gets to send it; with a delay, one chunk per
    tick.  While paused nothing is written and nothing is scheduled:
    ``resumeProducing`` restarts the ticks.
    """

    def __init__(self, server: FakeModelServer, request: Request, plan: _Plan,
                 delay: float, fail_after: Optional[int]) -> None:
        super().__init__(server, request)
        self._plan = plan
        self._delay = delay
        self._fail_after = fail_after
        self._i = 0
        self._paused = False
        self._next_at = 0.0

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.write(b"")  # the status line and headers go out now
        self._tick()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._ended and self._call is None:
            wait = max(0.0, self._next_at - self._clock.seconds()) if self._delay else 0.0
            self._call = self._clock.callLater(wait, self._tick)

    def stopProducing(self) -> None:
        self._end("disconnected")

    def _tick(self) -> None:
        self._call = None
        if self._ended:
            return
        plan = self._plan
        write = self._request.write
        budget = 1 if self._delay else _BATCH_EVENTS
        sent = 0
        while True:
            if self._paused:
                return  # resumeProducing schedules the next tick
            i = self._i
            if self._fail_after is not None and i >= self._fail_after:
                self._request.unregisterProducer()
                self._drop()
                return
            if i >= plan.n:
                self._complete()
                return
            if budget == 0 or sent >= _BATCH_BYTES:
                break
            if i == 0 and plan.head:
                write(plan.head)
            data = plan.chunk(i)
            write(data)
            sent += len(data)
            self._i = i + 1
            budget -= 1
        self._next_at = self._clock.seconds() + self._delay
        self._call = self._clock.callLater(self._delay, self._tick)

    def _complete(self) -> None:
        request = self._request
        if self._i == 0 and self._plan.head:  # zero content chunks: the head still goes out
            request.write(self._plan.head)
        for event in self._plan.tail:
            request.write(event)
        request.unregisterProducer()
        self._end("completed")
        request.finish()


# --- simulated swaps ---------------------------------------------------------------------------


class SimulatedSwapper:
    """
    A swapper for demos and tests: a swap is a timer, not a process.

    :param clock: provides ``callLater``.
    :param servers: the fake server of each model, by model name.
    :param delay: seconds a swap takes.

    ``history`` keeps ``(group, previous name or None, target name)`` of each
    swap started, oldest first.
    """

    def __init__(self, clock: IReactorTime, servers: Mapping[str, FakeModelServer], *,
                 delay: float = 1.5) -> None:
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError("delay must be a non-negative number of seconds")
        self._clock = clock
        self._servers = dict(servers)
        self.delay = delay
        self.history: deque[tuple[str, Optional[str], str]] = deque(maxlen=1000)

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]:
        """
        Mark ``target``'s server loading; ``delay`` seconds later mark it loaded
        (and ``previous``'s server unloaded, if that is another server) and fire
        ``None``.

        :return: fails with :class:`LookupError` for a model without a server.
            Cancelling it stops the timer and leaves ``target``'s server unloaded.
        """
        server = self._servers.get(target.name)
        if server is None:
            return fail(LookupError(f"no fake server for model {target.name!r}"))
        self.history.append((group, previous.name if previous is not None else None,
                             target.name))
        server.loading = True
        calls: list[IDelayedCall] = []

        def cancel(_: Deferred[None]) -> None:
            if calls and calls[0].active():
                calls[0].cancel()
            server.set_loaded(None)

        done: Deferred[None] = Deferred(cancel)

        def loaded() -> None:
            if previous is not None:
                old = self._servers.get(previous.name)
                if old is not None and old is not server:
                    old.set_loaded(None)
            server.set_loaded(target.name)
            done.callback(None)

        calls.append(self._clock.callLater(self.delay, loaded))
        return done
