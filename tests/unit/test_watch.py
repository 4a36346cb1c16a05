"""
What Jano notices (issue: stalls, a stuck scheduler, queue positions, request
ids), in memory through the listener users run, on one Clock.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from jano.config import Config, SchedulerConfig, ServerConfig
from jano.records import ModelSpec
from jano.service import JanoService
from jano.testing._memory import MemoryClient
from test_proxy import CHAT, World


def metric(w: World, name: str, **labels: str) -> float:
    text = w.call("GET", "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name} {labels} not exported")


def pump(w: World, rounds: int = 20) -> None:
    for _ in range(rounds):
        w.clock.advance(0)
        w.client.flush()
        w.agent.flush()


def open_stream(w: World, **headers: str) -> list[Any]:
    got: list[Any] = []
    w.client.post("http://jano/v1/chat/completions",
                  data=json.dumps(dict(CHAT, stream=True, max_tokens=20)).encode(),
                  headers=headers).addBoth(got.append)
    pump(w)
    return got


def test_each_proxied_response_carries_its_request_id_and_usage_has_the_same() -> None:
    w = World()
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT)
    rid = resp.headers.getRawHeaders("x-jano-request-id")
    assert rid is not None and w.usage(1)[0]["id"] == int(rid[0])
    resp, _ = w.call("POST", "/v1/chat/completions", dict(CHAT, model="nope"))  # refused
    assert resp.code == 404 and int(resp.headers.getRawHeaders("x-jano-request-id")[0]) == \
        w.usage(1)[0]["id"]
    w = World(server=ServerConfig(request_id_header=""))
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.headers.getRawHeaders("x-jano-request-id") is None


def test_a_stream_that_goes_quiet_ends_as_stalled_and_three_in_a_row_stall_the_model() -> None:
    w = World(server=ServerConfig(stall_timeout=10.0, stall_threshold=3, stall_cooldown=30.0),
              scheduler=SchedulerConfig(initial_model={"default": "a"}))
    for i in range(3):
        got = open_stream(w, **{"X-Fake-Delay-Ms": "60000"})  # one chunk, then a minute of nothing
        assert got and got[0].code == 200
        w.clock.advance(10.5)
        pump(w)
        rec = w.usage(1)[0]
        assert rec["outcome"] == "upstream_stalled", rec
    assert w.fakes["a"].stats()["disconnected"] == 3  # each upstream request was dropped
    assert metric(w, "jano_upstream_stalls_total", model="a") == 3.0
    status = json.loads(w.call("GET", "/status")[1])
    assert status["backendHealth"]["a"] == "stalled"
    assert "stalled" in status["modelsDown"]["a"]["reason"]
    assert metric(w, "jano_model_stalled", model="a") == 1.0
    resp, body = w.call("POST", "/v1/chat/completions", CHAT)  # fails fast, cause named
    assert resp.code == 503 and "stalled" in json.loads(body)["error"]["message"]
    w.clock.advance(31.0)  # the cooldown is over: one may try again, and succeeds
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == 200
    assert json.loads(w.call("GET", "/status")[1])["backendHealth"]["a"] != "stalled"
    assert metric(w, "jano_model_stalled", model="a") == 0.0


def test_one_stall_and_then_a_success_do_not_stall_the_model() -> None:
    w = World(server=ServerConfig(stall_timeout=10.0, stall_threshold=2))
    open_stream(w, **{"X-Fake-Delay-Ms": "60000"})
    w.clock.advance(10.5)
    pump(w)
    assert w.call("POST", "/v1/chat/completions", CHAT)[0].code == 200
    open_stream(w, **{"X-Fake-Delay-Ms": "60000"})
    w.clock.advance(10.5)
    pump(w)
    assert w.call("POST", "/v1/chat/completions", CHAT)[0].code == 200  # the streak restarted


def test_a_slow_but_steady_stream_is_not_a_stall() -> None:
    w = World(server=ServerConfig(stall_timeout=10.0))
    got = open_stream(w, **{"X-Fake-Delay-Ms": "8000"})  # 8 s between chunks < 10 s
    for _ in range(50):  # 20 chunks 8 s apart
        w.clock.advance(4.0)
        pump(w)
    body: list[Any] = []
    w.client.content(got[0]).addBoth(body.append)
    pump(w)
    assert w.usage(1)[0]["outcome"] == "completed" and b"[DONE]" in body[0]


class NeverSwaps:
    """A swapper whose swaps never end (a wedged script without a timeout)."""

    def __init__(self) -> None:
        self.calls = 0

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]:
        self.calls += 1
        return Deferred()

    def unload(self, group: str, model: ModelSpec) -> Deferred[None]:
        return Deferred()


def test_a_scheduler_that_dispatches_nothing_for_too_long_is_reported_stuck() -> None:
    clock = Clock()
    config = Config(models=(ModelSpec("a", "http://127.0.0.1:9001"),
                            ModelSpec("b", "http://127.0.0.1:9002")),
                    scheduler=SchedulerConfig(initial_model={"default": "a"}, max_wait=10.0,
                                              swap_timeout=20.0, ready_timeout=30.0, collate=0.0))
    swapper = NeverSwaps()
    svc = JanoService(config, clock, swapper=swapper, agent=None,
                      probe=lambda url: fail(ConnectionRefusedError()), listen=False)
    client = MemoryClient(svc.site)
    client.post("http://jano/v1/chat/completions", data=json.dumps(dict(CHAT, model="b")).encode())

    def stuck() -> Any:
        got: list[Any] = []
        client.get("http://jano/metrics").addCallback(client.content).addBoth(got.append)
        for _ in range(10):
            clock.advance(0)
            client.flush()
        text = got[0].decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name.startswith("jano_scheduler_")}
        return values

    for _ in range(10):
        clock.advance(0)
        client.flush()
    assert swapper.calls == 1
    clock.advance(60.0)  # max_wait + swap_timeout + ready_timeout, exactly: not yet
    assert stuck() == {"jano_scheduler_stuck": 0.0, "jano_scheduler_max_wait_seconds": 10.0}
    clock.advance(0.5)
    assert stuck()["jano_scheduler_stuck"] == 1.0


def test_the_queue_shows_positions_waits_and_labelled_estimates() -> None:
    w = World(default_delay=1.0, scheduler=SchedulerConfig(initial_model={"default": "a"},
                                                           collate=0.0))
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT, advance=0.5)  # a's service time
    assert resp.code == 200
    for _ in range(4):  # a's 4 slots full, with long streams
        w.client.post("http://jano/v1/chat/completions",
                      data=json.dumps(dict(CHAT, stream=True, max_tokens=50)).encode())
    for _ in range(2):
        w.client.post("http://jano/v1/chat/completions", data=json.dumps(CHAT).encode())
    w.client.post("http://jano/v1/chat/completions",
                  data=json.dumps(dict(CHAT, model="b")).encode())
    pump(w)
    w.clock.advance(2.0)
    pump(w)
    q = json.loads(w.call("GET", "/queue")[1])
    assert (q["inFlight"], q["waiting"]) == (4, 3)
    waiting = [e for e in q["data"] if e["state"] == "waiting"]
    assert [(e["model"], e["position"]) for e in waiting] == [("a", 1), ("a", 2), ("b", 1)]
    assert all(e["estimated"] is True and e["waitedMs"] >= 2000 for e in waiting)
    assert waiting[0]["estimatedStartAt"] is not None  # a's service time is known
    assert waiting[2]["estimatedStartAt"] is None  # b needs a swap nobody has timed yet
    assert {e["phase"] for e in q["data"] if e["state"] == "in_flight"} == {"streaming"}
    assert "prompt" not in json.dumps(q) and "hello" not in json.dumps(q)


def test_a_long_backend_load_on_a_request_that_caused_no_swap_is_a_hidden_reload() -> None:
    w = World(flavor="ollama", swap_delay=2.0)
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    resp, _ = w.call("POST", "/api/chat", chat)  # the usual 1 ms load: nothing to see
    assert resp.code == 200 and w.usage(1)[0]["backendLoadMs"] == 1.0
    resp, _ = w.call("POST", "/api/chat", chat, headers={"X-Fake-Load-Ms": "3000"})
    assert resp.code == 200 and w.usage(1)[0]["backendLoadMs"] == 3000.0
    status = json.loads(w.call("GET", "/status")[1])
    assert (status["hiddenReloadsLastHour"], status["hiddenReloadSecondsLastHour"]) == (1, 3.0)
    event = status["recentSwaps"][0]
    assert (event["kind"], event["from"], event["to"], event["durationMs"]) == (
        "reload", "a", "a", 3000.0)
    assert status["lastSwap"] is None  # not a swap of Jano's
    assert metric(w, "jano_backend_reloads_total", model="a") == 1.0
    # A long load on a request that waited for Jano's own swap is that swap, not a hidden one.
    resp, _ = w.call("POST", "/api/chat", dict(chat, model="b"), advance=0.5,
                     headers={"X-Fake-Load-Ms": "3000"})
    assert resp.code == 200 and w.usage(1)[0]["waitedForSwap"] is True
    assert metric(w, "jano_backend_reloads_total", model="b") == 0.0


def test_llamacpp_reports_no_load_time_so_the_field_is_null() -> None:
    w = World()
    w.call("POST", "/v1/chat/completions", CHAT)
    assert w.usage(1)[0]["backendLoadMs"] is None
