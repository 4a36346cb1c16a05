"""
Callers: several named API keys, the caller in each usage record and in a
bounded Prometheus label, and per-caller limits that leave others alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jano.config import CallerKey, ConfigError, SchedulerConfig, ServerConfig, parse_config
from test_proxy import CHAT, World

LAPTOP = {"Authorization": "Bearer laptop-secret"}
DESKTOP = {"Authorization": "Bearer desktop-secret"}


def keys(**limits: int) -> ServerConfig:
    return ServerConfig(api_keys=(
        CallerKey("laptop", "laptop-secret", max_queued=limits.get("max_queued"),
                  requests_per_minute=limits.get("rpm")),
        CallerKey("desktop", "desktop-secret")))


def test_each_named_key_is_a_caller_in_usage_and_in_the_request_counter() -> None:
    w = World(server=keys())
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)[0].code == 200
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=DESKTOP)[0].code == 200
    assert w.call("POST", "/v1/chat/completions", CHAT)[0].code == 401  # refused from its head
    assert w.call("GET", "/props")[0].code == 401  # no body: refused by the app, recorded
    assert [u["caller"] for u in w.usage(3)] == [None, "desktop", "laptop"]
    text = w.call("GET", "/metrics")[1].decode()
    counts = {(s.labels["caller"], s.labels["code"]): s.value
              for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "jano_requests_total" and s.labels["model"] == "a"}
    assert counts[("laptop", "200")] == 1 and counts[("desktop", "200")] == 1
    rejected = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "jano_queue_rejections_total"}
    assert rejected["unauthorized"] == 2  # one from the headers alone, one by the app
    # The key never reaches the backend.
    assert b"authorization" not in {k.lower() for k in dict(w.agent.seen[-1][2].getAllRawHeaders())}


def test_a_body_from_no_known_caller_is_refused_before_it_is_read() -> None:
    w = World(server=keys())
    conn = w.client.agent.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: j\r\n"
                              b"Authorization: Bearer nope\r\nContent-Length: 5000000\r\n\r\n")
    assert conn.output.startswith(b"HTTP/1.1 401") and conn.closed


def test_a_caller_over_its_queue_limit_gets_429_and_others_are_unaffected() -> None:
    w = World(server=keys(max_queued=1), default_delay=10.0,
              scheduler=SchedulerConfig(initial_model={"default": "a"}))
    for _ in range(4):  # a's four slots, busy with desktop's long streams
        w.client.post("http://jano/v1/chat/completions", headers=DESKTOP,
                      data=json.dumps(dict(CHAT, stream=True)).encode())
    w.client.post("http://jano/v1/chat/completions", headers=LAPTOP,
                  data=json.dumps(CHAT).encode())  # queued: laptop's one
    w.client.flush()
    resp, body = w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)
    assert resp.code == 429 and resp.headers.getRawHeaders("retry-after") == ["1"]
    assert "laptop" in json.loads(body)["error"]["message"]
    w.client.post("http://jano/v1/chat/completions", headers=DESKTOP,
                  data=json.dumps(CHAT).encode())  # desktop has no limit: it queues
    w.client.flush()
    q = json.loads(w.call("GET", "/queue")[1])
    assert sorted(e["caller"] for e in q["data"] if e["state"] == "waiting") == ["desktop", "laptop"]


def test_a_caller_over_its_rate_gets_429_with_the_time_until_a_slot_frees() -> None:
    w = World(server=keys(rpm=2))
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)[0].code == 200
    w.clock.advance(10)
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)[0].code == 200
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)
    assert resp.code == 429 and resp.headers.getRawHeaders("retry-after") == ["50"]
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=DESKTOP)[0].code == 200
    w.clock.advance(50)
    assert w.call("POST", "/v1/chat/completions", CHAT, headers=LAPTOP)[0].code == 200


def test_api_keys_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("from-a-file\n")
    doc = {"models": [{"name": "a", "upstream": "http://127.0.0.1:1"}],
           "scheduler": {"initial_model": "a"},
           "server": {"api_keys": [{"name": "laptop", "key": "s1", "requests_per_minute": 30},
                                   {"name": "ci", "key_file": "k", "max_queued": 2}]}}
    srv = parse_config(doc, base=tmp_path).server
    assert [(k.name, k.key, k.max_queued, k.requests_per_minute) for k in srv.api_keys] == [
        ("laptop", "s1", None, 30), ("ci", "from-a-file", 2, None)]
    assert "s1" not in repr(srv) and "from-a-file" not in repr(srv)
    bad = [({"name": "x"}, "key: missing"), ({"key": "s"}, "name: missing"),
           ({"name": "x", "key": "s", "max_queued": 0}, "max_queued: expected at least 1")]
    for entry, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config(dict(doc, server={"api_keys": [entry]}), base=tmp_path)
    with pytest.raises(ConfigError, match="duplicate caller name"):
        parse_config(dict(doc, server={"api_keys": [{"name": "x", "key": "a"},
                                                    {"name": "x", "key": "b"}]}), base=tmp_path)
    with pytest.raises(ConfigError, match="same key"):
        parse_config(dict(doc, server={"api_keys": [{"name": "x", "key": "a"},
                                                    {"name": "y", "key": "a"}]}), base=tmp_path)
