"""Which model a request goes to, and API-shaped errors."""

from __future__ import annotations

import json

from jano.records import ModelSpec
from jano.routing import Refusal, Routed, error_body, route

A = ModelSpec("qwen", "http://127.0.0.1:1")
B = ModelSpec("llama3", "http://127.0.0.1:2", kind="ollama")
MODELS = {m.name: m for m in (A, B)}


def test_model_from_body_on_inference_routes() -> None:
    r = route(b"POST", b"/v1/chat/completions", b'{"model":"llama3","stream":true}', None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is B and r.admit and r.stream_hint


def test_ollama_latest_tag_finds_the_untagged_model() -> None:
    r = route(b"POST", b"/api/chat", b'{"model":"llama3:latest"}', None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is B
    assert r.stream_hint  # Ollama streams unless told otherwise


def test_no_model_field_uses_header_then_loaded_model() -> None:
    r = route(b"POST", b"/completion", b'{"prompt":"x"}', b"llama3", MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is B and r.admit
    r = route(b"POST", b"/completion", b'{"prompt":"x"}', None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is A and r.requested is None


def test_unknown_model_is_404() -> None:
    r = route(b"POST", b"/v1/completions", b'{"model":"gpt-9"}', None, MODELS, lambda: A)
    assert isinstance(r, Refusal) and r.status == 404 and "gpt-9" in r.message
    r = route(b"POST", b"/completion", b"{}", b"gpt-9", MODELS, lambda: A)
    assert isinstance(r, Refusal) and r.status == 404


def test_bad_bodies_are_400_on_inference_routes() -> None:
    for body in (b"not json", b"[1,2]", b'"x"', b"\xff\xfe{", b""):
        r = route(b"POST", b"/v1/chat/completions", body, None, MODELS, lambda: A)
        assert isinstance(r, Refusal) and r.status == 400, body
    r = route(b"POST", b"/api/generate", b'{"model": 7}', None, MODELS, lambda: A)
    assert isinstance(r, Refusal) and r.status == 400 and "string" in r.message


def test_other_routes_pass_through_without_admission() -> None:
    r = route(b"GET", b"/props", b"", None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is A and not r.admit
    r = route(b"POST", b"/api/show", b'{"model":"llama3"}', None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is B and not r.admit
    r = route(b"POST", b"/tokenize", b"garbage", None, MODELS, lambda: A)
    assert isinstance(r, Routed) and r.spec is A


def test_nothing_loaded_and_nothing_named() -> None:
    r = route(b"GET", b"/slots", b"", None, MODELS, lambda: None)
    assert isinstance(r, Refusal) and r.status == 503


def test_error_shapes() -> None:
    assert json.loads(error_body(b"/api/chat", 404, "model 'x' not found", "not_found_error")) == {
        "error": "model 'x' not found"}
    assert json.loads(error_body(b"/v1/chat/completions", 404, "nope", "not_found_error")) == {
        "error": {"message": "nope", "type": "not_found_error", "code": 404}}


def test_the_loaded_model_is_looked_up_only_when_needed() -> None:
    calls: list[int] = []

    def loaded() -> ModelSpec:
        calls.append(1)
        return A

    route(b"POST", b"/v1/chat/completions", b'{"model":"llama3"}', None, MODELS, loaded)
    assert calls == []
    route(b"POST", b"/completion", b"{}", None, MODELS, loaded)
    assert calls == [1]
