"""
The bytes of each answer, per wire format: llama.cpp, OpenAI-compatible and Ollama.

A streamed answer is a :class:`StreamPlan` (head, ``n`` content chunks, tail)
that :mod:`jano.demo.streams` writes one event per ``write``; a non-streamed
answer is one body.  Chunks come from JSON templates with a slot for the text,
so a long stream costs one template, not one ``json.dumps`` per chunk.  The
shapes follow captures of real servers (``/work/shared/fixtures``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from jano.demo.generation import Flavor, Generation, iso_ns

__all__ = [
    "EVENT_STREAM", "JSON_LLAMA", "JSON_PLAIN", "NDJSON", "StreamPlan", "dumps",
    "error_body", "listing", "ollama_load", "stream_plan", "whole_body",
]

JSON_LLAMA = b"application/json; charset=utf-8"
JSON_PLAIN = b"application/json"
EVENT_STREAM = b"text/event-stream"
NDJSON = b"application/x-ndjson"
_DONE = b"data: [DONE]\n\n"

# Above this padding, chunks are built one at a time instead of ten kept per stream.
_PREBUILT_PAD_MAX = 4096

# A JSON string that marks where a template's varying part goes.
_SLOT = "\x00slot\x00"
_SLOT_JSON = json.dumps(_SLOT)

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def dumps(obj: Any) -> bytes:
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
class StreamPlan:
    """A stream: ``head`` before content chunk 0, ``n`` content chunks, then ``tail``."""

    n: int
    head: bytes
    chunk: Callable[[int], bytes]
    tail: tuple[bytes, ...]


def _modular(g: Generation, pre: bytes, post: bytes) -> Callable[[int], bytes]:
    """Chunk ``i`` is ``pre + text(i) + post``: ten pre-built variants when small and unstamped."""
    if g.stamp:
        return lambda i: pre + g.stamped(i) + post
    if g.pad > _PREBUILT_PAD_MAX:  # build each when written: memory stays one chunk
        padding = b"x" * g.pad
        return lambda i: b"".join((pre, b"Tok%d" % (i % 10), padding, post))
    variants = [pre + text + post for text in g.texts()[: min(g.n, 10)]]
    return lambda i: variants[i % 10]


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _sse_template(obj: Any) -> tuple[bytes, bytes]:
    pre, post = _template(obj)
    return b'data: ' + pre + b'"', b'"' + post + b"\n\n"


# --- OpenAI-compatible: /v1/chat/completions, /v1/completions ---------------------------


def _chat_objects(g: Generation) -> tuple[Any, Any, Any, Optional[Any]]:
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


def _chat_stream(g: Generation) -> StreamPlan:
    role, content, finish, usage = _chat_objects(g)
    pre, post = _sse_template(content)
    tail = [_sse(finish)] + ([_sse(usage)] if usage is not None else []) + [_DONE]
    return StreamPlan(g.n, _sse(role), _modular(g, pre, post), tuple(tail))


def _chat_body(g: Generation) -> bytes:
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


def _cmpl_id(g: Generation) -> str:
    return g.openai_id if g.flavor == "llamacpp" else "cmpl-%d" % g.serial


def _completions_stream(g: Generation) -> StreamPlan:
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
    return StreamPlan(g.n, b"", _modular(g, pre, post), tuple(tail))


def _completions_body(g: Generation) -> bytes:
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


def _llama_final(g: Generation, content: str) -> dict[str, Any]:
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True,
        "model": g.model, "tokens_predicted": g.n, "tokens_evaluated": g.prompt_n,
        "generation_settings": {"seed": 4294967295, "temperature": 0.8, "max_tokens": g.n,
                                "n_predict": g.n, "stream": g.stream},
        "prompt": g.prompt_text, "has_new_line": False, "truncated": False,
        "stop_type": "limit" if g.limited else "eos", "stopping_word": "",
        "tokens_cached": g.prompt_n + g.n, "timings": g.timings(),
    }


def _llama_stream(g: Generation) -> StreamPlan:
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
    return StreamPlan(g.n, b"", chunk, (_sse(_llama_final(g, "")),))


def _llama_body(g: Generation) -> bytes:
    return _fill(_llama_final(g, _SLOT), _quoted(g.all_text()))


# --- Ollama native: /api/generate, /api/chat ----------------------------------------------


_CONTEXT_CAP = 4096


def _ollama_final(g: Generation, chat: bool, content: str) -> dict[str, Any]:
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


def _ollama_stream(g: Generation, chat: bool) -> StreamPlan:
    line: dict[str, Any] = {"model": g.model, "created_at": g.created_at}
    if chat:
        line["message"] = {"role": "assistant", "content": _SLOT}
    else:
        line["response"] = _SLOT
    line["done"] = False
    pre, post = _template(line)
    final = dumps(_ollama_final(g, chat, "")) + b"\n"
    return StreamPlan(g.n, b"", _modular(g, pre + b'"', b'"' + post + b"\n"), (final,))


def _ollama_body(g: Generation, chat: bool) -> bytes:
    return _fill(_ollama_final(g, chat, _SLOT), _quoted(g.all_text()))


# --- by route ---------------------------------------------------------------------------------


def stream_plan(route: str, g: Generation) -> StreamPlan:
    """The stream answering inference ``route`` (``chat``, ``completions``, ``llama``, ...)."""
    if route == "chat":
        return _chat_stream(g)
    if route == "completions":
        return _completions_stream(g)
    if route == "llama":
        return _llama_stream(g)
    return _ollama_stream(g, chat=route == "ochat")


def whole_body(route: str, g: Generation) -> bytes:
    """The non-streamed body answering inference ``route``."""
    if route == "chat":
        return _chat_body(g)
    if route == "completions":
        return _completions_body(g)
    if route == "llama":
        return _llama_body(g)
    return _ollama_body(g, chat=route == "ochat")


def ollama_load(model: str, now: float, *, chat: bool, reason: str) -> bytes:
    """Ollama's answer to a request with nothing to generate: ``reason`` is load or unload."""
    obj: dict[str, Any] = {"model": model, "created_at": iso_ns(now)}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update(done=True, done_reason=reason)
    return dumps(obj)


def error_body(flavor: Flavor, status: int, message: str, *,
               ollama: bool = False) -> tuple[bytes, bytes]:
    """An OpenAI-shaped error (or Ollama's ``{"error": message}``) and its content type."""
    if ollama:
        return dumps({"error": message}), JSON_LLAMA
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    payload = dumps({"error": {"message": message, "type": kind, "code": status}})
    return payload, JSON_LLAMA if flavor == "llamacpp" else JSON_PLAIN


def listing(route: str, flavor: Flavor, models: Sequence[str], loaded_model: Optional[str],
            now: float) -> tuple[bytes, bytes]:
    """The body of a ``GET`` route (health, models, tags, ps, version) and its content type."""
    obj: Any
    if route == "health":
        obj = {"status": "ok"}
    elif route == "version":
        obj = {"version": "0.0.0-fake"}
    elif route == "models" and flavor == "llamacpp":
        obj = {
            "models": [{"name": m, "model": m, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""],
                        "capabilities": ["completion"], "parameters": "",
                        "details": {"parent_model": "", "format": "gguf", "family": "",
                                    "families": [""], "parameter_size": "",
                                    "quantization_level": ""}}
                       for m in models],
            "object": "list",
            "data": [{"id": m, "aliases": [m], "tags": [], "object": "model",
                      "architecture": {"input_modalities": ["text"],
                                       "output_modalities": ["text"]},
                      "created": int(now), "owned_by": "llamacpp",
                      "meta": {"n_ctx": 4096, "n_params": 0, "size": 0}}
                     for m in models],
        }
    elif route == "models":
        owner = "library" if flavor == "ollama" else "jano-fake"
        obj = {"object": "list",
               "data": [{"id": m, "object": "model", "created": int(now), "owned_by": owner}
                        for m in models]}
    else:
        names = models if route == "tags" else (
            (loaded_model,) if loaded_model is not None else ())
        entries = []
        for m in names:
            entry: dict[str, Any] = {
                "name": m, "model": m, "modified_at": iso_ns(now), "size": 0,
                "digest": "0" * 64,
                "details": {"parent_model": "", "format": "gguf", "family": "fake",
                            "families": ["fake"], "parameter_size": "",
                            "quantization_level": ""}}
            if route == "ps":
                entry.update(expires_at=iso_ns(now + 300.0), size_vram=0,
                             context_length=4096)
            entries.append(entry)
        obj = {"models": entries}
    charset = route in ("tags", "ps", "version") or flavor == "llamacpp"
    return dumps(obj), JSON_LLAMA if charset else JSON_PLAIN
