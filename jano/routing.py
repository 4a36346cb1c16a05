"""
Stage 2, which model a request is for.  Pure: bytes in, decisions out.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, NamedTuple, Optional

from jano.errors import Refusal, error_body, is_ollama_path
from jano.records import ModelSpec

__all__ = ["INFERENCE_PATHS", "MODEL_HEADER", "Refusal", "Routed", "error_body",
           "is_inference", "is_ollama_path", "lookup", "parse_model", "route"]

#: POST routes that run a model: they need a JSON object body and go through
#: the scheduler (and so may cause a swap).
INFERENCE_PATHS = frozenset({
    # OpenAI-compatible (llama-server, Ollama /v1, vLLM, LM Studio)
    b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses",
    b"/v1/rerank", b"/v1/messages",
    # Ollama native
    b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings",
    # llama.cpp native
    b"/completion", b"/completions", b"/chat/completions", b"/embedding", b"/embeddings",
    b"/infill", b"/rerank", b"/reranking",
})

MODEL_HEADER = b"x-jano-model"


def is_inference(method: bytes, path: bytes) -> bool:
    return method == b"POST" and path in INFERENCE_PATHS


class Routed(NamedTuple):
    """Where a request goes: ``admit`` is true when the scheduler must admit it."""

    spec: ModelSpec
    admit: bool
    requested: Optional[str]
    stream_hint: bool


def lookup(models: Mapping[str, ModelSpec], name: str) -> Optional[ModelSpec]:
    """A configured model by name; ``name:latest`` also finds ``name`` (Ollama's default tag)."""
    spec = models.get(name)
    if spec is None and name.endswith(":latest"):
        spec = models.get(name[: -len(":latest")])
    return spec


def parse_model(body: bytes) -> tuple[Optional[object], Optional[str]]:
    """
    Read only what routing needs from a JSON body: the object, or an error
    message saying why it is unusable.
    """
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        return None, "request body is not valid UTF-8 JSON"
    except ValueError as e:
        return None, f"request body is not valid JSON: {e}"
    if not isinstance(obj, dict):
        return None, "request body must be a JSON object"
    return obj, None


def route(method: bytes, path: bytes, body: bytes, header_model: Optional[bytes],
          models: Mapping[str, ModelSpec],
          fallback: Callable[[], Optional[ModelSpec]]) -> Routed | Refusal:
    """
    Decide where a request goes.

    Inference routes need a JSON object; its ``"model"`` picks the model, else
    the ``X-Jano-Model`` header, else ``fallback`` (the loaded model).  Other
    routes go to the model they name if they name a configured one, else to
    ``fallback``, without admission (they never cause a swap).  ``fallback``
    is called only when needed: finding the loaded model is not free.
    """
    inference = is_inference(method, path)
    obj: Optional[object] = None
    if inference or (body[:1] == b"{" and method != b"GET"):
        obj, problem = parse_model(body)
        if problem is not None and inference:
            return Refusal(400, problem, "invalid_request_error", "bad_request")
    name: Optional[str] = None
    stream_hint = False
    if isinstance(obj, dict):
        raw = obj.get("model")
        if raw is not None and not isinstance(raw, str):
            if inference:
                return Refusal(400, "\"model\" must be a string", "invalid_request_error",
                               "bad_request")
            raw = None
        name = raw or None
        stream = obj.get("stream")
        stream_hint = stream if isinstance(stream, bool) else is_ollama_path(path)
    if name is None and header_model:
        try:
            name = header_model.decode("utf-8")
        except UnicodeDecodeError:
            return Refusal(400, "X-Jano-Model header is not UTF-8", "invalid_request_error",
                           "bad_request")
    if name is not None:
        spec = lookup(models, name)
        if spec is None:
            if inference or header_model:
                return Refusal(404, f"model {name!r} not found", "not_found_error",
                               "unknown_model")
        else:
            return Routed(spec, inference, name, stream_hint)
    loaded = fallback()
    if loaded is None:
        return Refusal(503, "no model is loaded and the request names none",
                       "unavailable_error", "model_down")
    return Routed(loaded, inference, None, stream_hint)
