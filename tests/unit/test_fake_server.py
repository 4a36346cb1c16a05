"""
The fake model server, in memory: ``StubTreq`` for whole exchanges, a ``Site``
on a ``StringTransport`` where the test needs the raw bytes or must pause the
transport, and a ``Clock`` for every delay.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from typing import Any, Callable, NoReturn, Optional, Protocol, TypeVar, cast

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol as BodyProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IResponse
from twisted.web.server import Site

import jano.testing.__main__ as cli
from jano.demo import OLLAMA_LOAD_NS, FakeModelServer, SeenRequest, SimulatedSwapper
from jano.demo.server import CRASH_FLUSH
from jano.records import ModelSpec
from wire import header_value, load_capture

BASE = "http://fake.invalid"
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "say hello to me"}]  # 6 words


T = TypeVar("T")


class Client(Protocol):
    """What these tests use of ``StubTreq``, which sets its methods per instance (untyped)."""

    def get(self, url: str) -> Deferred[IResponse]: ...

    def post(self, url: str, data: bytes, headers: Optional[dict[str, str]] = None
             ) -> Deferred[IResponse]: ...

    def content(self, response: IResponse) -> Deferred[bytes]: ...

    def collect(self, response: IResponse, collector: Callable[[bytes], None]
                ) -> Deferred[None]: ...

    def flush(self) -> None: ...


class Harness:
    """One fake server behind ``StubTreq``, its ``Clock``, and a pump."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.server = FakeModelServer(self.clock, **kwargs)
        self.treq = cast(Client, StubTreq(self.server.resource()))

    def wait(self, d: Deferred[T], rounds: int = 2000) -> T:
        """Run the fake's clock at the current instant and pump bytes until ``d`` fires."""
        box: list[T | Failure] = []
        d.addBoth(box.append)
        for _ in range(rounds):
            if box:
                break
            self.clock.advance(0)
            self.treq.flush()
        assert box, "the deferred never fired"
        result = box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def post(self, path: str, body: Any, headers: Optional[dict[str, str]] = None
             ) -> tuple[IResponse, bytes]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.wait(self.treq.post(BASE + path, data=raw, headers=headers or {}))
        return response, self.wait(self.treq.content(response))

    def get(self, path: str) -> tuple[IResponse, bytes]:
        response = self.wait(self.treq.get(BASE + path))
        return response, self.wait(self.treq.content(response))


def header(response: IResponse, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None


def sse(body: bytes) -> list[Any]:
    """SSE events of a body: decoded JSON, or the raw ``[DONE]`` string."""
    assert body.endswith(b"\n\n")
    out: list[Any] = []
    for event in body.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        data = event[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def ndjson(body: bytes) -> list[Any]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.split(b"\n")[:-1]]


def texts(n: int, pad: int = 0) -> list[str]:
    return [f"Tok{i % 10}" + "x" * pad for i in range(n)]


def timings(prompt_n: int, n: int, gen: float = 50.0, prompt: float = 500.0) -> dict[str, Any]:
    return {
        "cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_n / prompt * 1000,
        "prompt_per_token_ms": prompt_n / prompt * 1000 / prompt_n, "prompt_per_second": prompt,
        "predicted_n": n, "predicted_ms": n / gen * 1000,
        "predicted_per_token_ms": n / gen * 1000 / n if n else 0.0, "predicted_per_second": gen,
    }


# --- OpenAI-compatible routes -----------------------------------------------------------------


def test_chat_stream_llamacpp_puts_timings_on_the_finish_chunk() -> None:
    h = Harness(gen_tok_s=40.0)
    response, body = h.post("/v1/chat/completions",
                            {"model": "m1", "messages": MESSAGES, "max_tokens": 7, "stream": True})
    assert response.code == 200
    assert header(response, "content-type") == "text/event-stream"
    events = sse(body)
    assert len(events) == 1 + 7 + 1 + 1
    role, chunks, finish, done = events[0], events[1:8], events[8], events[9]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == texts(7)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m1" for c in chunks)
    assert finish["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    assert finish["timings"] == timings(6, 7, gen=40.0)
    assert finish["timings"]["predicted_ms"] == 7 / 40.0 * 1000
    assert "usage" not in finish
    assert done == "[DONE]"
    assert h.server.stats() == {"requests": 1, "completed": 1, "disconnected": 0,
                                "in_progress": 0, "aborted": 0}


def test_chat_stream_llamacpp_include_usage_adds_a_usage_chunk_with_timings() -> None:
    h = Harness()
    _, body = h.post("/v1/chat/completions",
                     {"messages": MESSAGES, "max_completion_tokens": 3, "stream": True,
                      "stream_options": {"include_usage": True}})
    events = sse(body)
    assert len(events) == 1 + 3 + 1 + 1 + 1
    finish, usage = events[4], events[5]
    assert "timings" not in finish and "usage" not in finish
    assert usage["choices"] == []
    assert usage["usage"] == {"completion_tokens": 3, "prompt_tokens": 6, "total_tokens": 9,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage["timings"] == timings(6, 3)
    assert usage["model"] == "fake-model"  # the first model when the request names none
    assert events[6] == "[DONE]"


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_openai_flavor_never_sends_timings(include_usage: bool) -> None:
    h = Harness(flavor="openai")
    _, body = h.post("/v1/chat/completions",
                     {"messages": MESSAGES, "max_tokens": 4, "stream": True,
                      "stream_options": {"include_usage": include_usage}})
    events = sse(body)
    assert b"timings" not in body
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["delta"]["content"] for e in events[1:5]] == texts(4)
    assert events[5]["choices"][0]["finish_reason"] == "length"
    if include_usage:
        assert events[6]["choices"] == []
        assert events[6]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4,
                                      "total_tokens": 10}
        assert events[7:] == ["[DONE]"]
    else:
        assert b'"usage"' not in body
        assert events[6:] == ["[DONE]"]


def test_chat_nonstream_llamacpp_and_openai() -> None:
    h = Harness()
    response, body = h.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12})
    assert header(response, "content-type") == "application/json; charset=utf-8"
    obj = json.loads(body)
    assert obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "".join(texts(12))}
    assert obj["choices"][0]["finish_reason"] == "length"
    assert obj["usage"]["completion_tokens"] == 12 and obj["usage"]["prompt_tokens"] == 6
    assert obj["timings"] == timings(6, 12)

    h = Harness(flavor="openai")
    response, body = h.post("/v1/chat/completions", {"messages": MESSAGES})
    assert header(response, "content-type") == "application/json"
    obj = json.loads(body)
    assert "timings" not in obj
    assert obj["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}
    assert obj["choices"][0]["finish_reason"] == "stop"  # no limit asked: a natural stop


def test_completions_stream_llamacpp_has_usage_and_timings_on_finish() -> None:
    h = Harness()
    _, body = h.post("/v1/completions", {"prompt": "one two three", "max_tokens": 5,
                                         "stream": True})
    events = sse(body)
    assert len(events) == 5 + 1 + 1
    assert [e["choices"][0]["text"] for e in events[:5]] == texts(5)
    assert all(e["object"] == "text_completion" for e in events[:6])
    finish = events[5]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["usage"]["completion_tokens"] == 5 and finish["usage"]["prompt_tokens"] == 3
    assert finish["timings"] == timings(3, 5)
    assert events[6] == "[DONE]"


def test_completions_openai_flavor_stream_and_body() -> None:
    h = Harness(flavor="openai")
    _, body = h.post("/v1/completions", {"prompt": "a b", "max_tokens": 2, "stream": True,
                                         "stream_options": {"include_usage": True}})
    events = sse(body)
    assert [e["choices"][0]["text"] for e in events[:2]] == texts(2)
    assert events[2]["choices"][0] == {"text": "", "index": 0, "finish_reason": "length"}
    assert events[3]["choices"] == [] and events[3]["usage"]["completion_tokens"] == 2
    assert events[4] == "[DONE]"
    _, body = h.post("/v1/completions", {"prompt": "a b", "max_tokens": 2})
    obj = json.loads(body)
    assert obj["choices"][0]["text"] == "Tok0Tok1"
    assert obj["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


# --- llama.cpp native ---------------------------------------------------------------------------


def test_llama_completion_stream_has_no_done_marker() -> None:
    h = Harness(gen_tok_s=62.5, prompt_tok_s=250.0)
    response, body = h.post("/completion", {"prompt": "The capital of France is",
                                            "n_predict": 9, "stream": True})
    assert header(response, "content-type") == "text/event-stream"
    assert b"[DONE]" not in body
    events = sse(body)
    assert len(events) == 9 + 1
    for i, event in enumerate(events[:9]):
        assert event["content"] == f"Tok{i % 10}"
        assert event["stop"] is False
        assert event["tokens_predicted"] == i + 1
        assert event["tokens_evaluated"] == 5
    final = events[9]
    assert final["stop"] is True and final["stop_type"] == "limit"
    assert final["tokens_predicted"] == 9 and final["tokens_evaluated"] == 5
    assert final["timings"] == timings(5, 9, gen=62.5, prompt=250.0)
    assert final["timings"]["predicted_ms"] == 144.0


def test_llama_completion_nonstream_by_default() -> None:
    h = Harness()
    response, body = h.post("/completion", {"prompt": [1, 2, 3, 4], "n_predict": 3})
    obj = json.loads(body)
    assert obj["content"] == "Tok0Tok1Tok2"
    assert obj["stop"] is True
    assert obj["tokens_predicted"] == 3 and obj["tokens_evaluated"] == 4  # one per token id
    assert obj["timings"]["predicted_n"] == 3


# --- Ollama native --------------------------------------------------------------------------------


@pytest.mark.parametrize("path,key", [("/api/generate", "response"), ("/api/chat", "message")])
def test_ollama_streams_ndjson_by_default_with_nanoseconds(path: str, key: str) -> None:
    h = Harness(flavor="ollama", models=("llama3:latest",), gen_tok_s=64.0, prompt_tok_s=800.0)
    body: dict[str, Any] = {"model": "llama3:latest", "options": {"num_predict": 8}}
    body.update({"prompt": "why is the sky blue"} if key == "response" else
                {"messages": MESSAGES})
    prompt_n = 5 if key == "response" else 6
    response, raw = h.post(path, body)
    assert header(response, "content-type") == "application/x-ndjson"
    lines = ndjson(raw)
    assert len(lines) == 8 + 1
    contents = [(ln[key]["content"] if key == "message" else ln[key]) for ln in lines[:8]]
    assert contents == texts(8)
    assert all(ln["done"] is False and ln["model"] == "llama3:latest" for ln in lines[:8])
    final = lines[8]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["eval_count"] == 8
    assert final["eval_duration"] == round(8 / 64.0 * 1e9) == 125_000_000
    assert final["prompt_eval_count"] == prompt_n
    assert final["prompt_eval_duration"] == round(prompt_n / 800.0 * 1e9)
    assert final["load_duration"] == OLLAMA_LOAD_NS
    assert final["total_duration"] == (OLLAMA_LOAD_NS + final["prompt_eval_duration"]
                                       + final["eval_duration"])
    assert final["created_at"] == "1970-01-01T00:00:00.000000000Z"


def test_ollama_stream_false_is_one_json_object() -> None:
    h = Harness(flavor="ollama")
    response, raw = h.post("/api/chat", {"model": "m", "messages": MESSAGES, "stream": False})
    assert header(response, "content-type") == "application/json; charset=utf-8"
    obj = json.loads(raw)
    assert obj["message"] == {"role": "assistant", "content": "".join(texts(16))}
    assert obj["done"] is True and obj["done_reason"] == "stop"
    assert obj["eval_count"] == 16 and obj["eval_duration"] == round(16 / 50.0 * 1e9)


def test_ollama_load_and_unload_requests() -> None:
    h = Harness(flavor="ollama")
    _, raw = h.post("/api/generate", {"model": "m"})
    assert json.loads(raw) == {"model": "m", "created_at": "1970-01-01T00:00:00.000000000Z",
                               "response": "", "done": True, "done_reason": "load"}
    _, raw = h.post("/api/generate", {"model": "m", "keep_alive": 0})
    assert json.loads(raw)["done_reason"] == "unload"


# --- token counts, padding, bounds ----------------------------------------------------------------


def test_default_tokens_zero_tokens_and_padding() -> None:
    h = Harness(default_tokens=3)
    _, body = h.post("/v1/chat/completions", {"stream": True, "messages": MESSAGES},
                     headers={"X-Fake-Chunk-Bytes": "100"})
    events = sse(body)
    assert [e["choices"][0]["delta"]["content"] for e in events[1:4]] == texts(3, pad=100)
    assert events[4]["choices"][0]["finish_reason"] == "stop"
    _, body = h.post("/v1/chat/completions", {"stream": True, "max_tokens": 0})
    events = sse(body)
    assert len(events) == 3 and events[1]["timings"]["predicted_n"] == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"stream": True, "max_tokens": 12}),
    ("/completion", {"stream": True, "n_predict": 12}),
    ("/api/chat", {"model": "m", "messages": MESSAGES, "options": {"num_predict": 12}}),
])
def test_large_padding_and_stamps(path: str, body: dict[str, Any]) -> None:
    h = Harness()
    _, raw = h.post(path, body, headers={"X-Fake-Chunk-Bytes": "5000"})
    assert raw.count(b"Tok") == 12
    for i in range(12):
        assert raw.count(b"Tok%d" % (i % 10) + b"x" * 5000 + b'"') == (2 if i % 10 < 2 else 1)
    _, raw = h.post(path, body, headers={"X-Fake-Stamp": "1"})
    assert len(re.findall(rb'"Tok\d@\d+"', raw)) == 12


def test_bounds_and_bad_input_answer_400() -> None:
    h = Harness()
    response, body = h.post("/completion", {"n_predict": 10_000_001})
    assert response.code == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    response, _ = h.post("/v1/chat/completions", {"max_tokens": "many"})
    assert response.code == 400
    response, _ = h.post("/v1/chat/completions", b"{not json")
    assert response.code == 400
    response, _ = h.post("/v1/chat/completions", {}, headers={"X-Fake-Delay-Ms": "soon"})
    assert response.code == 400
    response, body = h.post("/api/generate", b"[]")
    assert response.code == 400 and isinstance(json.loads(body)["error"], str)  # Ollama shape
    assert h.server.stats()["completed"] == 5


# --- headers that simulate trouble ------------------------------------------------------------------


def test_fake_status_answers_an_openai_error() -> None:
    h = Harness()
    response, body = h.post("/v1/chat/completions", {"stream": True},
                            headers={"X-Fake-Status": "503"})
    assert response.code == 503
    assert json.loads(body) == {"error": {"message": "fake error (X-Fake-Status: 503)",
                                          "type": "unavailable_error", "code": 503}}
    h.server.default_status = 500
    response, body = h.post("/api/chat", {"model": "x"})
    assert response.code == 500 and json.loads(body)["error"]["type"] == "server_error"


def test_fail_after_drops_the_connection_after_that_many_chunks() -> None:
    h = Harness()
    response = h.wait(h.treq.post(BASE + "/v1/chat/completions",
                                  data=json.dumps({"max_tokens": 10, "stream": True}).encode(),
                                  headers={"X-Fake-Fail-After": "4"}))
    received: list[bytes] = []
    with pytest.raises(ResponseFailed):
        h.wait(h.treq.collect(response, received.append))
    events = sse(b"".join(received))
    assert len(events) == 1 + 4  # the role chunk and four content chunks, no end
    assert h.server.stats() == {"requests": 1, "completed": 0, "disconnected": 0,
                                "in_progress": 0, "aborted": 1}


def test_fail_after_on_a_nonstreamed_request_sends_nothing() -> None:
    h = Harness()
    with pytest.raises(ResponseFailed):
        h.wait(h.treq.post(BASE + "/completion", data=b'{"n_predict": 5}',
                           headers={"X-Fake-Fail-After": "2"}))
    assert h.server.aborted == 1
    _, body = h.post("/completion", {"n_predict": 2}, headers={"X-Fake-Fail-After": "2"})
    assert json.loads(body)["content"] == "Tok0Tok1"  # fail-after >= n: no failure


def test_delay_paces_chunks_on_the_clock() -> None:
    h = Harness()
    response = h.wait(h.treq.post(BASE + "/api/generate",
                                  data=json.dumps({"model": "m", "prompt": "hi",
                                                   "options": {"num_predict": 3}}).encode(),
                                  headers={"X-Fake-Delay-Ms": "250"}))
    received: list[bytes] = []
    done = h.treq.collect(response, received.append)
    h.treq.flush()
    assert b"".join(received).count(b"Tok") == 1  # the first chunk at once
    h.clock.advance(0.249)
    h.treq.flush()
    assert b"".join(received).count(b"Tok") == 1
    h.clock.advance(0.001)
    h.treq.flush()
    assert b"".join(received).count(b"Tok") == 2
    h.clock.advance(0.25)
    h.treq.flush()
    h.wait(done)
    assert len(ndjson(b"".join(received))) == 4
    assert h.clock.seconds() == 0.5


def test_nonstreamed_answer_waits_for_the_whole_generation() -> None:
    h = Harness(default_delay=0.1)
    d = h.treq.post(BASE + "/v1/completions", data=b'{"max_tokens": 5}')
    box: list[Any] = []
    d.addBoth(box.append)
    h.treq.flush()
    h.clock.advance(0.39)
    h.treq.flush()
    assert box == [] and h.server.in_progress == 1
    h.clock.advance(0.01)
    h.treq.flush()
    assert box and box[0].code == 200
    assert h.server.stats()["completed"] == 1


# --- disconnects and backpressure, on the raw transport -----------------------------------------------


def raw_request(server: FakeModelServer, path: str, body: Any,
                headers: str = "") -> tuple[Any, StringTransport]:
    site = Site(server.resource(), reactor=Clock())  # its idle timeout never on the global reactor
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    data = json.dumps(body).encode()
    protocol.dataReceived(
        b"POST %s HTTP/1.1\r\nHost: fake\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path.encode(), len(data), headers.encode(), data))
    return protocol, transport


def dechunk(raw: bytes) -> tuple[bytes, list[bytes]]:
    """Headers and the list of HTTP chunks of a chunked response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        chunks.append(rest[:size])
        rest = rest[size + 2:]
        if size == 0:
            break
    return head, chunks


def test_each_event_is_its_own_http_chunk() -> None:
    clock = Clock()
    server = FakeModelServer(clock)
    _, transport = raw_request(server, "/v1/chat/completions",
                               {"stream": True, "max_tokens": 3})
    head, chunks = dechunk(transport.value())
    assert b"Transfer-Encoding: chunked" in head
    assert chunks[-1] == b""
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"data: ") == 1
               for c in chunks[:-1])
    assert len(chunks) - 1 == 1 + 3 + 1 + 1


def test_a_paused_transport_stops_the_stream_and_resume_restarts_it() -> None:
    clock = Clock()
    server = FakeModelServer(clock)
    _, transport = raw_request(server, "/v1/chat/completions",
                               {"stream": True, "max_tokens": 2000})
    channel = transport.producer
    assert IPushProducer.providedBy(channel)
    first = transport.value().count(b"Tok")
    assert 0 < first < 2000  # one batch, then a tick is scheduled
    channel.pauseProducing()
    clock.advance(0)
    assert transport.value().count(b"Tok") == first
    assert clock.getDelayedCalls() == []  # paused: nothing scheduled, nothing buffered
    channel.resumeProducing()
    for _ in range(100):
        clock.advance(0)
    assert transport.value().count(b"Tok") == 2000
    assert transport.value().endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert server.stats()["completed"] == 1


def test_client_disconnect_while_a_nonstreamed_answer_waits() -> None:
    clock = Clock()
    server = FakeModelServer(clock, default_delay=0.1)
    protocol, transport = raw_request(server, "/completion", {"n_predict": 20})
    assert len(clock.getDelayedCalls()) == 1 and server.in_progress == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []
    assert server.stats()["disconnected"] == 1 and server.in_progress == 0


def test_client_disconnect_mid_stream_is_counted_and_stops_the_timer() -> None:
    clock = Clock()
    server = FakeModelServer(clock)
    protocol, transport = raw_request(server, "/v1/chat/completions",
                                      {"stream": True, "max_tokens": 50},
                                      headers="X-Fake-Delay-Ms: 100\r\n")
    clock.advance(0.1)
    assert transport.value().count(b"Tok") == 2
    assert server.in_progress == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert transport.value().count(b"Tok") == 2
    assert server.stats() == {"requests": 1, "completed": 0, "disconnected": 1,
                              "in_progress": 0, "aborted": 0}


class HangUp(BodyProtocol):
    """A response body reader that hangs up on the first bytes, as a closed browser tab does."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        IPushProducer(self.transport).stopProducing()


def test_client_going_away_through_treq_is_counted() -> None:
    h = Harness(default_delay=0.05)
    response = h.wait(h.treq.post(BASE + "/v1/chat/completions",
                                  data=b'{"stream": true, "max_tokens": 100}'))
    hang_up = HangUp()
    response.deliverBody(hang_up)
    for _ in range(5):
        h.treq.flush()
    assert hang_up.received
    assert h.server.stats()["disconnected"] == 1
    assert h.server.in_progress == 0
    assert h.clock.getDelayedCalls() == []


def test_fake_stats_route_and_seen() -> None:
    h = Harness()
    h.post("/v1/chat/completions", {"model": "a", "stream": True})
    h.post("/api/chat", {"model": "b", "messages": MESSAGES})
    h.get("/health")
    response, body = h.get("/fake/stats")
    assert json.loads(body) == {"requests": 2, "completed": 2, "disconnected": 0,
                                "in_progress": 0, "aborted": 0}
    assert list(h.server.seen) == [SeenRequest("POST", "/v1/chat/completions", "a"),
                                   SeenRequest("POST", "/api/chat", "b"),
                                   SeenRequest("GET", "/health", None)]
    assert h.server.seen.maxlen == 1000


# --- readiness and listings ------------------------------------------------------------------------


def test_loading_answers_llama_servers_503_everywhere_but_fake_routes() -> None:
    h = Harness()
    response, body = h.get("/health")
    assert (response.code, json.loads(body)) == (200, {"status": "ok"})
    h.server.loading = True
    response, body = h.get("/health")
    assert response.code == 503
    assert body == b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
    response, body = h.post("/v1/chat/completions", {"stream": True})
    assert response.code == 503 and b"Loading model" in body
    assert h.get("/fake/stats")[0].code == 200
    h.server.set_loaded("fake-model")
    assert h.get("/health")[0].code == 200
    h.server.set_loaded(None)
    response, body = h.get("/health")
    assert response.code == 503 and b"Model not loaded" in body


def test_listings_and_not_found() -> None:
    h = Harness(models=("a", "b"))
    obj = json.loads(h.get("/v1/models")[1])
    assert [d["id"] for d in obj["data"]] == ["a", "b"]
    assert [m["name"] for m in obj["models"]] == ["a", "b"]  # llama-server lists both shapes
    obj = json.loads(Harness(models=("a",), flavor="ollama").get("/v1/models")[1])
    assert obj == {"object": "list", "data": [{"id": "a", "object": "model", "created": 0,
                                                "owned_by": "library"}]}
    assert [m["name"] for m in json.loads(h.get("/api/tags")[1])["models"]] == ["a", "b"]
    assert json.loads(h.get("/api/version")[1]) == {"version": "0.0.0-fake"}
    assert [m["name"] for m in json.loads(h.get("/api/ps")[1])["models"]] == ["a"]
    response, body = h.get("/nope")
    assert response.code == 404
    assert body == b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}'


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FakeModelServer(Clock(), models=())
    with pytest.raises(ValueError):
        FakeModelServer(Clock(), flavor="vllm")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FakeModelServer(Clock(), gen_tok_s=0)


# --- simulated swaps --------------------------------------------------------------------------------


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, upstream="http://127.0.0.1:1")


def test_simulated_swap_takes_delay_and_moves_the_loaded_state() -> None:
    clock = Clock()
    a, b = FakeModelServer(clock, models=("a",)), FakeModelServer(clock, models=("b",))
    swapper = SimulatedSwapper(clock, {"a": a, "b": b}, delay=1.5)
    fired: list[Any] = []
    swapper.swap("gpu", spec("a"), spec("b")).addBoth(fired.append)
    assert b.loading and not fired
    clock.advance(1.49)
    assert b.loading and not fired and a.loaded_model == "a"
    clock.advance(0.01)
    assert fired == [None]
    assert not b.loading and b.loaded_model == "b"
    assert a.loaded_model is None and not a.loading
    assert list(swapper.history) == [("gpu", "a", "b")]


def test_simulated_swap_on_one_server_keeps_it_loaded() -> None:
    clock = Clock()
    shared = FakeModelServer(clock, models=("a", "b"), flavor="ollama")
    swapper = SimulatedSwapper(clock, {"a": shared, "b": shared}, delay=1.0)
    fired: list[Any] = []
    swapper.swap("g", spec("a"), spec("b")).addBoth(fired.append)
    clock.advance(1.0)
    assert fired == [None] and shared.loaded_model == "b" and not shared.loading


def test_cancelling_a_simulated_swap_cancels_its_timer() -> None:
    clock = Clock()
    b = FakeModelServer(clock, models=("b",))
    swapper = SimulatedSwapper(clock, {"b": b})
    d = swapper.swap("g", None, spec("b"))
    fired: list[Any] = []
    d.addBoth(fired.append)
    d.cancel()
    assert isinstance(fired[0], Failure) and fired[0].check(CancelledError)
    assert clock.getDelayedCalls() == []
    assert b.loaded_model is None and not b.loading


def test_swap_to_a_model_without_a_server_fails() -> None:
    swapper = SimulatedSwapper(Clock(), {})
    fired: list[Any] = []
    swapper.swap("g", None, spec("x")).addBoth(fired.append)
    assert isinstance(fired[0], Failure) and fired[0].check(LookupError)


# --- start-up load and simulated crashes (what a supervisor of llama-server sees) -----------------


def raw_get(server: FakeModelServer, path: str) -> StringTransport:
    protocol = Site(server.resource(), reactor=Clock()).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: fake\r\n\r\n" % path.encode())
    return transport


def test_simulate_load_answers_llama_servers_loading_capture_until_it_ends() -> None:
    status, headers, body = load_capture("llamacpp-health-loading.json")
    h = Harness()
    fired: list[Any] = []
    h.server.simulate_load(1.5).addBoth(fired.append)
    response, got = h.get("/health")
    assert (response.code, got) == (status, body)
    for name in ("Server", "Access-Control-Allow-Origin", "Content-Type"):  # and Connection:
        assert header(response, name) == header_value(headers, name), name  # see the next test
    assert response.length == int(header_value(headers, "Content-Length") or "")
    for path in ("/v1/models", "/nope"):  # every route, known or not
        response, got = h.get(path)
        assert (response.code, got) == (503, body)
    response, got = h.post("/v1/chat/completions", {"stream": True})
    assert (response.code, got) == (503, body)
    assert h.get("/fake/stats")[0].code == 200
    h.clock.advance(1.25)
    assert h.get("/health")[0].code == 503 and fired == []
    h.clock.advance(0.25)
    assert fired == [None]
    response, got = h.get("/health")
    assert (response.code, json.loads(got)) == (200, {"status": "ok"})
    assert h.server.loaded_model == "fake-model" and h.get("/nope")[0].code == 404


def test_loading_answers_close_the_connection_as_llama_server_does() -> None:
    clock = Clock()
    server = FakeModelServer(clock)
    loaded = raw_get(server, "/health")
    assert b"200 OK" in loaded.value() and not loaded.disconnecting
    server.loading = True
    loading = raw_get(server, "/health")
    assert b"503 Service Unavailable" in loading.value()
    assert b"Connection: close" in loading.value() and loading.disconnecting
    server.flavor = "openai"  # the capture is llama-server's: others keep the connection
    assert not raw_get(server, "/health").disconnecting


def test_simulate_load_zero_at_once_bad_values_and_cancel() -> None:
    clock = Clock()
    server = FakeModelServer(clock, models=("a", "b"), start_loaded=False)
    fired: list[Any] = []
    server.simulate_load(0).addBoth(fired.append)
    assert fired == [None] and server.loaded_model == "a" and not server.loading
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            server.simulate_load(bad)
    d = server.simulate_load(2.0)
    d.addBoth(fired.append)
    assert server.loading
    d.cancel()
    assert isinstance(fired[1], Failure) and fired[1].check(CancelledError)
    assert clock.getDelayedCalls() == [] and server.loaded_model is None and not server.loading


def test_crash_after_n_answers_kills_the_next_stream_after_its_first_chunk() -> None:
    clock = Clock()
    crashes: list[float] = []
    server = FakeModelServer(clock, crash_after=2, crash=lambda: crashes.append(clock.seconds()))
    for _ in range(3):  # health checks and listings do not count
        assert b"200 OK" in raw_get(server, "/health").value()
    _, first = raw_request(server, "/completion", {"n_predict": 2})
    _, second = raw_request(server, "/v1/chat/completions", {"stream": True, "max_tokens": 3})
    assert first.value().count(b"Tok") == 2 and second.value().endswith(b"\r\n0\r\n\r\n")
    assert server.answered == 2 and crashes == []

    _, third = raw_request(server, "/v1/chat/completions", {"stream": True, "max_tokens": 3})
    head, chunks = dechunk(third.value())
    assert b"200 OK" in head
    assert [sse(c)[0]["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": None}, {"content": "Tok0"}]  # and no end
    assert crashes == [] and not third.disconnecting  # the chunk gets time to leave
    clock.advance(CRASH_FLUSH)
    assert crashes == [CRASH_FLUSH] and third.disconnecting
    assert third.value().count(b"Tok") == 1 and clock.getDelayedCalls() == []

    _, fourth = raw_request(server, "/completion", {"n_predict": 2})  # not streamed: at once
    assert crashes == [CRASH_FLUSH, CRASH_FLUSH]
    assert fourth.value() == b"" and fourth.disconnecting
    assert server.crashes == 2 and server.answered == 2
    assert server.stats() == {"requests": 4, "completed": 2, "disconnected": 0,
                              "in_progress": 0, "aborted": 2}


def test_crash_after_zero_crashes_the_first_inference_request_whatever_it_is() -> None:
    h = Harness(crash_after=0)  # the default crash returns: the fake just hangs up
    assert h.get("/health")[0].code == 200
    with pytest.raises(ResponseFailed):  # a stream without content chunks: no chunk to wait for
        h.post("/v1/chat/completions", {"stream": True, "max_tokens": 0})
    with pytest.raises(ResponseFailed):  # an Ollama load request
        h.post("/api/generate", {"model": "m"})
    assert h.server.crashes == 2 and h.server.aborted == 2
    h.server.crash_after = None
    assert h.post("/completion", {"n_predict": 1})[0].code == 200
    with pytest.raises(ValueError):
        FakeModelServer(Clock(), crash_after=-1)


def test_cli_exit_at_start_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--exit-at-start", "3", "--model", "m", "--startup-delay", "0.25"]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["fake: loading model m (startup delay 0.25s)",
                                "fake: cannot load model: file not found"]
    assert cli.main(["--exit-at-start", "0", "--silent"]) == 0
    assert capsys.readouterr().err == "fake: cannot load model: file not found\n"


@pytest.mark.parametrize("argv", [
    ["--crash-exit", "3"], ["--crash-signal", "KILL"], ["--crash-after", "-1"],
    ["--crash-after", "1", "--crash-exit", "1", "--crash-signal", "KILL"],
    ["--crash-after", "1", "--crash-signal", "TERM"], ["--crash-after", "1", "--crash-exit", "256"],
    ["--startup-delay", "-1"], ["--startup-delay", "nan"], ["--startup-delay", "soon"],
    ["--exit-at-start", "-1"],
])
def test_cli_rejects_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


class Died(Exception):
    pass


def test_cli_crash_function_says_why_then_exits_or_signals(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[Any, ...]] = []

    def exit_(code: int) -> NoReturn:
        calls.append(("exit", code))
        raise Died()

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(os, "kill", lambda pid, sig: calls.append(("kill", pid, sig)))
    monkeypatch.setattr(signal, "signal", lambda sig, how: calls.append(("signal", sig, how)))
    monkeypatch.setattr(cli, "_no_core_dump", lambda: calls.append(("no core",)))

    with pytest.raises(Died):
        cli._crasher(4, None, 7)()
    assert calls == [("exit", 7)]
    assert capsys.readouterr().err == "fake: simulated crash after 4 requests\n"
    calls.clear()
    with pytest.raises(Died):  # the fallback exit, reached only because kill is faked
        cli._crasher(1, None, None)()
    assert calls == [("kill", os.getpid(), signal.SIGKILL), ("exit", 128 + 9)]
    calls.clear()
    with pytest.raises(Died):
        cli._crasher(1, "SEGV", None)()
    assert calls == [("no core",), ("signal", signal.SIGSEGV, signal.SIG_DFL),
                     ("kill", os.getpid(), signal.SIGSEGV), ("exit", 128 + 11)]
