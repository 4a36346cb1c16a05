"""
Jano end to end in memory: treq's client -> the listener users run
(``JanoSite`` and the Klein app) -> in-memory fake model servers, all on one
Clock.  Real sockets live in tests/integration.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from jano.config import Config, SchedulerConfig, ServerConfig
from jano.records import ModelSpec
from jano.service import JanoService
from jano.testing import FakeModelServer, SimulatedSwapper
from jano.testing._memory import MemoryClient

HOSTS = {"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}


@implementer(IAgent)
class HostAgent:
    """Sends each upstream request to the in-memory agent of its host:port."""

    def __init__(self, agents: dict[str, Any]) -> None:
        self.agents = agents
        self.seen: list[tuple[bytes, bytes, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
                ) -> "Deferred[IResponse]":
        self.seen.append((method, uri, headers))
        d: Deferred[IResponse] = self.agents[urlsplit(uri.decode()).netloc].request(
            method, uri, headers, bodyProducer)
        return d

    def flush(self) -> None:
        for agent in self.agents.values():
            flush = getattr(agent, "flush", None)
            if flush:
                flush()


class World:
    """Two fake backends ('a' and 'b'), Jano in front, one clock."""

    def __init__(self, *, fakes: Optional[dict[str, Any]] = None, agents: Optional[dict[str, Any]] = None,
                 server: Optional[ServerConfig] = None, scheduler: Optional[SchedulerConfig] = None,
                 always_on: bool = False, swap_delay: float = 1.5, **fake_kw: Any) -> None:
        self.clock = Clock()
        self.fake_kw = fake_kw
        self.fakes = fakes if fakes is not None else {
            name: FakeModelServer(self.clock, models=(name,), **fake_kw) for name in HOSTS}
        upstream = agents if agents is not None else {
            HOSTS[name]: RequestTraversalAgent(fake.resource()) for name, fake in self.fakes.items()}
        self.agent = HostAgent(upstream)
        specs = tuple(ModelSpec(name, f"http://{HOSTS[name]}", always_on=always_on)
                      for name in HOSTS)
        self.config = Config(models=specs, server=server or ServerConfig(),
                             scheduler=scheduler or SchedulerConfig(initial_model={"default": "a"}))
        self.swapper = SimulatedSwapper(self.clock, self.fakes, delay=swap_delay)
        self.svc = JanoService(self.config, self.clock, swapper=self.swapper, agent=self.agent,
                               probe=lambda url: fail(ConnectionRefusedError()), listen=False)
        self.client = MemoryClient(self.svc.site)

    def pump(self, d: "Deferred[Any]", rounds: int = 5000, advance: float = 0.0) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(rounds):
            if box:
                break
            self.clock.advance(advance)
            self.client.flush()
            self.agent.flush()
        assert box, "never fired"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def call(self, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None,
             advance: float = 0.0) -> tuple[IResponse, bytes]:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        resp = self.pump(self.client.request(method, "http://jano" + path, data=data,
                                             headers=headers or {}), advance=advance)
        return resp, self.pump(self.client.content(resp), advance=advance)

    def direct(self, name: str, method: str, path: str, body: Any) -> tuple[IResponse, bytes]:
        """The same request straight to a fresh twin of fake ``name`` (same ids, same clock)."""
        twin = FakeModelServer(self.clock, models=(name,), **self.fake_kw)
        stub: Any = StubTreq(twin.resource())
        data = json.dumps(body).encode()
        box: list[Any] = []
        d = stub.request(method, "http://x" + path, data=data)
        d.addBoth(box.append)
        for _ in range(5000):
            if box:
                break
            self.clock.advance(0)
            stub.flush()
        resp = box[0]
        box.clear()
        stub.content(resp).addBoth(box.append)
        for _ in range(5000):
            if box:
                break
            self.clock.advance(0)
            stub.flush()
        return resp, box[0]

    def usage(self, limit: int = 50) -> list[dict[str, Any]]:
        resp, body = self.call("GET", f"/usage?limit={limit}")
        assert resp.code == 200
        data: list[dict[str, Any]] = json.loads(body)["data"]
        return data


def hdr(resp: IResponse, name: str) -> Optional[str]:
    v = resp.headers.getRawHeaders(name)
    return v[0] if v else None


CHAT = {"model": "a", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def test_non_streamed_response_is_byte_identical_to_direct() -> None:
    w = World()
    direct, direct_body = w.direct("a", "POST", "/v1/chat/completions", CHAT)
    resp, body = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == direct.code == 200
    # The fake's ids and timestamps come from the shared clock, so bodies match exactly.
    assert body == direct_body
    assert hdr(resp, "content-type") == hdr(direct, "content-type")
    rec = w.usage()[0]
    assert rec["outcome"] == "completed" and rec["model"] == "a" and rec["status"] == 200
    assert rec["completionTokens"] == 5 and rec["genTokSSource"] == "backend"
    assert rec["stream"] is False


def test_streamed_sse_passes_through_and_usage_is_tapped() -> None:
    w = World(gen_tok_s=40.0)
    body_in = dict(CHAT, stream=True, stream_options={"include_usage": True}, max_tokens=7)
    direct, direct_body = w.direct("a", "POST", "/v1/chat/completions", body_in)
    resp, body = w.call("POST", "/v1/chat/completions", body_in)
    assert resp.code == 200 and hdr(resp, "content-type") == hdr(direct, "content-type")
    assert body == direct_body and body.endswith(b"data: [DONE]\n\n")
    rec = w.usage()[0]
    assert rec["stream"] is True and rec["completionTokens"] == 7
    assert rec["genTokS"] == pytest.approx(40.0) and rec["usageSource"] == "llamacpp-timings"
    status = json.loads(w.call("GET", "/status")[1])
    assert status["tokensGeneratedTotal"] == 7 and status["recentGenTokS"] == pytest.approx(40.0)


def test_ollama_ndjson_passes_through_with_nanosecond_timings() -> None:
    w = World(gen_tok_s=25.0)
    req = {"model": "a", "prompt": "why is the sky blue", "options": {"num_predict": 4}}
    direct, direct_body = w.direct("a", "POST", "/api/generate", req)
    resp, body = w.call("POST", "/api/generate", req)
    assert body == direct_body and hdr(resp, "content-type") == "application/x-ndjson"
    rec = w.usage()[0]
    assert rec["usageSource"] == "ollama" and rec["completionTokens"] == 4
    assert rec["genTokS"] == pytest.approx(25.0) and rec["promptTokens"] == 5


def test_openai_style_counts_without_timing_are_router_timed_or_null() -> None:
    w = World(flavor="openai", default_delay=0.5)
    req = dict(CHAT, stream=True, stream_options={"include_usage": True}, max_tokens=5)
    w.call("POST", "/v1/chat/completions", req, advance=0.05)
    rec = w.usage()[0]
    assert rec["completionTokens"] == 5 and rec["usageSource"] == "openai-usage"
    assert rec["genTokSSource"] == "router" and rec["genTokS"] is not None
    # Non-streamed: nobody timed the generation, so nothing is claimed.
    w.call("POST", "/v1/chat/completions", dict(CHAT, max_tokens=3), advance=0.05)
    rec = w.usage()[0]
    assert rec["completionTokens"] == 3 and rec["genTokS"] is None and rec["genTokSSource"] is None
    # Router-timed speeds never enter the backend-reported rolling figure.
    assert json.loads(w.call("GET", "/status")[1])["recentGenTokS"] is None


def test_unknown_model_and_bad_bodies_get_api_shaped_errors() -> None:
    w = World()
    resp, body = w.call("POST", "/v1/chat/completions", dict(CHAT, model="gpt-9"))
    assert resp.code == 404
    assert json.loads(body)["error"]["type"] == "not_found_error"
    resp, body = w.call("POST", "/api/chat", {"model": "gpt-9", "messages": []})
    assert resp.code == 404 and json.loads(body) == {"error": "model 'gpt-9' not found"}
    resp, body = w.call("POST", "/v1/chat/completions", b"{not json")
    assert resp.code == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    resp, body = w.call("POST", "/api/generate", b"[1]")
    assert resp.code == 400 and "JSON object" in json.loads(body)["error"]
    assert all(f.stats()["requests"] == 0 for f in w.fakes.values())  # nothing forwarded
    assert [r["outcome"] for r in w.usage()] == ["rejected"] * 4


class Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.requests.append((request.method, request.uri,
                              {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                              request.content.read()))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"connection", b"x-private")
        request.setHeader(b"x-private", b"hop")
        request.setHeader(b"x-upstream", b"kept")
        return b'{"ok":true}'


def test_headers_path_query_and_body_forwarded_hop_by_hop_dropped() -> None:
    rec = Recorder()
    w = World(agents={HOSTS["a"]: RequestTraversalAgent(rec), HOSTS["b"]: RequestTraversalAgent(rec)})
    raw = b'{"model":"a",  "prompt":"x"}'  # odd spacing must survive
    resp, body = w.call("POST", "/completion?x=1&y=a+b%2F", raw, headers={
        "Connection": "x-secret", "X-Secret": "s", "Keep-Alive": "timeout=5", "TE": "trailers",
        "X-Custom": "yes", "Authorization": "Bearer backend-key"})
    method, uri, headers, got = rec.requests[0]
    assert (method, uri, got) == (b"POST", b"/completion?x=1&y=a+b%2F", raw)
    names = {k.lower() for k in headers}
    assert {b"x-custom", b"authorization", b"x-forwarded-for"} <= names
    assert not names & {b"x-secret", b"keep-alive", b"te"}
    # Twisted's client writes its own Connection header; the client's never passes.
    assert b"x-secret" not in b",".join(headers.get(b"Connection", [])).lower()
    assert resp.code == 200 and body == b'{"ok":true}'
    assert hdr(resp, "x-upstream") == "kept"
    assert hdr(resp, "connection") != "x-private"  # the upstream's Connection never passes


def test_refused_connection_is_502_and_jano_keeps_serving() -> None:
    @implementer(IAgent)
    class Refusing:
        def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
            return fail(ConnectionRefusedError())

    w = World(agents={HOSTS["a"]: Refusing(), HOSTS["b"]: Refusing()})
    resp, body = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == 502 and "refused" in json.loads(body)["error"]["message"]
    assert w.usage()[0]["outcome"] == "upstream_error"
    assert w.call("GET", "/health")[0].code == 200
    snap = w.svc.scheduler.snapshot()
    assert all(m.in_flight == 0 for m in snap.models)  # the slot was released


def test_no_response_headers_in_time_is_504() -> None:
    pending: list[Deferred[IResponse]] = []

    @implementer(IAgent)
    class Silent:
        def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
            d: Deferred[IResponse] = Deferred()
            pending.append(d)
            return d

    w = World(agents={HOSTS["a"]: Silent(), HOSTS["b"]: Silent()},
              server=ServerConfig(upstream_timeout=30.0))
    d = w.client.post("http://jano/v1/chat/completions", data=json.dumps(CHAT).encode())
    box: list[Any] = []
    d.addBoth(box.append)
    w.client.flush()
    w.clock.advance(29.9)
    w.client.flush()
    assert box == []
    w.clock.advance(0.2)
    w.client.flush()
    resp = box[0]
    assert resp.code == 504 and "no response within 30s" in json.loads(w.pump(w.client.content(resp)))["error"]["message"]
    assert pending[0].called  # the upstream request was cancelled, not left dangling


def test_backend_dying_mid_stream_cuts_the_client_connection_and_is_recorded() -> None:
    from twisted.web.client import ResponseFailed

    w = World()
    req = dict(CHAT, stream=True, max_tokens=50)
    d = w.client.post("http://jano/v1/chat/completions", data=json.dumps(req).encode(),
                      headers={"X-Fake-Fail-After": "3"})
    resp = w.pump(d)
    assert resp.code == 200
    got: list[bytes] = []
    done = w.client.collect(resp, got.append)
    with pytest.raises(ResponseFailed):  # no clean end of the chunked body: the client sees the cut
        w.pump(done)
    body = b"".join(got)
    assert b"Tok2" in body and b"[DONE]" not in body
    rec = w.usage()[0]
    assert rec["outcome"] == "upstream_error" and rec["completionTokens"] is None
    assert w.svc.scheduler.snapshot().models[0].in_flight == 0
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT)  # still serving
    assert resp.code == 200


def test_client_disconnect_while_streaming_aborts_upstream() -> None:
    w = World(default_delay=1.0)
    d = w.client.post("http://jano/v1/chat/completions",
                      data=json.dumps(dict(CHAT, stream=True, max_tokens=100)).encode(),
                      unbuffered=True)
    resp = w.pump(d, advance=0.0)
    w.clock.advance(1.0)
    w.client.flush(); w.agent.flush()
    # Drop the client's connection the way a closed socket would.
    w.client.disconnect()
    for _ in range(50):
        w.clock.advance(1.0)
        w.client.flush(); w.agent.flush()
    assert w.fakes["a"].stats()["disconnected"] == 1
    rec = w.usage()[0]
    assert rec["outcome"] == "client_disconnected"
    assert w.svc.scheduler.snapshot().models[0].in_flight == 0


def test_swap_happens_through_the_scheduler_and_is_reported() -> None:
    w = World(swap_delay=2.0)
    resp, _ = w.call("POST", "/v1/chat/completions", dict(CHAT, model="b"), advance=0.5)
    assert resp.code == 200
    assert list(w.swapper.history) == [("default", "a", "b")]
    status = json.loads(w.call("GET", "/status")[1])
    assert status["currentModel"] == "b" and status["lastSwap"]["result"] == "ok"
    assert status["lastSwapDurationMs"] == pytest.approx(2000.0, abs=600)
    assert w.usage()[0]["waitedForSwap"] is True
    # Health follows the swap at once, not at the next probe.
    assert status["backendHealth"] == {"a": "unloaded", "b": "up"}
    metrics = {f.name: f for f in text_string_to_metric_families(w.call("GET", "/metrics")[1].decode())}
    swaps = [s for s in metrics["jano_model_swaps"].samples
             if s.name == "jano_model_swaps_total" and s.labels["to_model"] == "b"]
    assert swaps[0].labels["result"] == "ok" and swaps[0].value == 1


def test_full_queue_is_429_with_retry_after() -> None:
    w = World(scheduler=SchedulerConfig(max_queue=1, initial_model={"default": "a"}), default_delay=10.0)
    for _ in range(4):  # max_concurrency 4 in flight
        w.client.post("http://jano/v1/chat/completions", data=json.dumps(dict(CHAT, stream=True)).encode())
    w.client.post("http://jano/v1/chat/completions", data=json.dumps(CHAT).encode())  # queued
    w.client.flush()
    resp, body = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == 429 and int(hdr(resp, "retry-after") or 0) >= 1
    assert json.loads(body)["error"]["type"] == "rate_limit_error"


def test_model_lists_come_from_the_config() -> None:
    w = World()
    data = json.loads(w.call("GET", "/v1/models")[1])
    assert [m["id"] for m in data["data"]] == ["a", "b"] and data["object"] == "list"
    tags = json.loads(w.call("GET", "/api/tags")[1])
    assert [m["name"] for m in tags["models"]] == ["a", "b"]


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=abc", "limit=100000", "limit=1&limit=2", "limit=1.5"])
def test_usage_limit_is_validated(query: str) -> None:
    w = World()
    resp, body = w.call("GET", "/usage?" + query)
    assert resp.code == 400 and "limit" in json.loads(body)["error"]["message"]


def test_own_routes_refuse_other_methods_with_405() -> None:
    w = World()
    for path in ("/status", "/usage", "/metrics", "/health"):
        resp, body = w.call("POST", path, b"{}")
        assert resp.code == 405 and hdr(resp, "allow") is not None and json.loads(body)["error"]


def test_bearer_tokens_guard_proxy_and_telemetry_separately() -> None:
    w = World(server=ServerConfig(api_key="k1", telemetry_key="k2"))
    resp, body = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    resp, body = w.call("POST", "/api/chat", {"model": "a"})
    assert resp.code == 401 and "error" in json.loads(body)
    assert w.call("GET", "/status", headers={"Authorization": "Bearer k1"})[0].code == 401
    assert w.call("GET", "/status", headers={"Authorization": "Bearer k2"})[0].code == 200
    assert w.call("GET", "/health")[0].code == 200  # open for load balancers
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT, headers={"Authorization": "Bearer k1"})
    assert resp.code == 200
    # Jano's key is not passed on to the backend.
    assert b"authorization" not in {k.lower() for k in dict(w.agent.seen[-1][2].getAllRawHeaders())}


def test_paths_with_dot_dot_or_nul_are_refused() -> None:
    w = World()
    for path in ("/v1/../admin", "/completion%00"):
        resp, body = w.call("POST", path, CHAT)
        assert resp.code == 400, path
    assert all(f.stats()["requests"] == 0 for f in w.fakes.values())


def test_mounted_under_a_prefix_forwards_the_path_below_it() -> None:
    rec = Recorder()
    w = World(agents={HOSTS["a"]: RequestTraversalAgent(rec), HOSTS["b"]: RequestTraversalAgent(rec)})
    root = Resource()
    root.putChild(b"llm", w.svc.resource)
    client: Any = StubTreq(root)
    box: list[Any] = []
    client.get("http://host/llm/props?x=1").addBoth(box.append)
    for _ in range(100):
        client.flush(); w.agent.flush()
    assert box[0].code == 200 and rec.requests[0][1] == b"/props?x=1"
    box.clear()
    client.get("http://host/llm/health").addBoth(box.append)
    client.flush()
    assert box[0].code == 200


def test_the_dashboard_with_a_trailing_slash_is_sent_to_its_real_address() -> None:
    w = World()
    resp = w.pump(w.client.get("http://jano/ui/", allow_redirects=False))
    assert resp.code == 308 and resp.headers.getRawHeaders("location") == ["../ui"]
    resp, body = w.call("GET", "/ui")
    assert resp.code == 200 and b'src="ui/app.js"' in body


def test_each_request_waiting_for_headers_times_out_at_its_own_deadline() -> None:
    pending: list[Deferred[IResponse]] = []

    @implementer(IAgent)
    class Silent:
        def request(self, *a: Any, **k: Any) -> "Deferred[IResponse]":
            d: Deferred[IResponse] = Deferred()
            pending.append(d)
            return d

    w = World(agents={HOSTS["a"]: Silent(), HOSTS["b"]: Silent()}, always_on=True,
              server=ServerConfig(upstream_timeout=30.0))
    first: list[Any] = []
    second: list[Any] = []
    w.client.post("http://jano/v1/chat/completions", data=json.dumps(CHAT).encode()).addBoth(first.append)
    w.client.flush()
    w.clock.advance(10)
    w.client.post("http://jano/v1/chat/completions", data=json.dumps(CHAT).encode()).addBoth(second.append)
    w.client.flush()
    w.clock.advance(20.1)
    w.client.flush()
    assert first and first[0].code == 504 and second == []
    w.clock.advance(9.8)
    w.client.flush()
    assert second == []
    w.clock.advance(0.2)
    w.client.flush()
    assert second and second[0].code == 504
    assert all(d.called for d in pending)
