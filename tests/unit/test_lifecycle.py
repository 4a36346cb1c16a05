"""
Model lifecycle over HTTP, in memory through the listener users run: load and
unload on request, the model lists' states, ``/api/ps``, preload, and the
idle unload as ``/status`` and ``/metrics`` show it.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from jano.config import SchedulerConfig, ServerConfig
from test_proxy import CHAT, World


def states(w: World) -> dict[str, str]:
    data = json.loads(w.call("GET", "/v1/models")[1])["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def test_unload_then_load_on_request_through_the_swap_mechanism() -> None:
    w = World(swap_delay=2.0)
    assert states(w) == {"a": "loaded", "b": "unloaded"}
    resp, body = w.call("POST", "/models/a/unload")
    assert resp.code == 202 and json.loads(body) == {"model": "a", "status": "unloading"}
    assert states(w) == {"a": "unloading", "b": "unloaded"}
    w.clock.advance(0.2)  # the simulated unload takes a tenth of a swap
    assert states(w) == {"a": "unloaded", "b": "unloaded"}
    assert json.loads(w.call("GET", "/api/ps")[1]) == {"models": []}
    resp, body = w.call("POST", "/models/b/load")
    assert resp.code == 202 and json.loads(body)["status"] == "loading"
    w.clock.advance(0.0)
    assert states(w)["b"] == "loading"
    w.clock.advance(2.0)
    assert states(w) == {"a": "unloaded", "b": "loaded"}
    ps = json.loads(w.call("GET", "/api/ps")[1])["models"]
    assert [(m["name"], m["expires_at"], m["size_vram"]) for m in ps] == [("b", None, None)]
    resp, body = w.call("POST", "/models/b/load")  # already there
    assert resp.code == 200 and json.loads(body)["status"] == "loaded"
    assert list(w.swapper.history) == [("default", "a", ""), ("default", None, "b")]
    status = json.loads(w.call("GET", "/status")[1])
    kinds = [(s["kind"], s["from"], s["to"], s["reason"]) for s in status["recentSwaps"]]
    assert kinds == [("swap", None, "b", None), ("unload", "a", None, "requested")]


def test_load_and_unload_refuse_what_would_evict_work_or_makes_no_sense() -> None:
    w = World(default_delay=5.0)
    w.client.post("http://jano/v1/chat/completions",
                  data=json.dumps(dict(CHAT, stream=True, max_tokens=50)).encode())
    for _ in range(20):
        w.clock.advance(0)
        w.client.flush()
        w.agent.flush()
    resp, body = w.call("POST", "/models/b/load")
    assert resp.code == 409 and "in flight" in json.loads(body)["error"]["message"]
    resp, body = w.call("POST", "/models/a/unload")
    assert resp.code == 409 and "never evicted" in json.loads(body)["error"]["message"]
    resp, body = w.call("POST", "/models/nope/load")
    assert resp.code == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    resp, body = w.call("POST", "/models/b/unload")  # not loaded: nothing to do
    assert resp.code == 200 and json.loads(body)["status"] == "unloaded"
    resp, _ = w.call("GET", "/models/a/load")
    assert resp.code == 405 and resp.headers.getRawHeaders("allow") == ["POST"]
    assert list(w.swapper.history) == []


def test_always_on_models_are_always_loaded_and_cannot_be_unloaded() -> None:
    w = World(always_on=True)
    assert states(w) == {"a": "loaded", "b": "loaded"}
    for action in ("load", "unload"):
        resp, body = w.call("POST", f"/models/a/{action}")
        assert resp.code == 409 and "always_on" in json.loads(body)["error"]["message"]


def test_the_endpoints_take_the_admin_key_or_else_the_api_key() -> None:
    w = World(server=ServerConfig(api_key="k1", admin_key="adm"))
    assert w.call("POST", "/models/a/unload")[0].code == 401
    assert w.call("POST", "/models/a/unload", headers={"Authorization": "Bearer k1"})[0].code == 401
    assert w.call("POST", "/models/a/unload",
                  headers={"Authorization": "Bearer adm"})[0].code == 202
    w = World(server=ServerConfig(api_key="k1"))
    assert w.call("POST", "/models/a/unload")[0].code == 401
    assert w.call("POST", "/models/a/unload", headers={"Authorization": "Bearer k1"})[0].code == 202


def test_no_load_or_unload_while_draining() -> None:
    w = World()
    w.svc.app.draining = True
    resp, body = w.call("POST", "/models/b/load")
    assert resp.code == 503 and resp.headers.getRawHeaders("retry-after") == ["5"]


def test_an_idle_model_is_unloaded_after_its_ttl_and_telemetry_says_so() -> None:
    w = World(scheduler=SchedulerConfig(initial_model={"default": "a"}, ttl=30.0))
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT)
    assert resp.code == 200
    ps = json.loads(w.call("GET", "/api/ps")[1])["models"]
    assert ps[0]["name"] == "a" and ps[0]["expires_at"] is not None
    w.clock.advance(31.0)
    w.clock.advance(1.0)
    assert states(w) == {"a": "unloaded", "b": "unloaded"}
    text = w.call("GET", "/metrics")[1].decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("jano_model_unloads_total",
                    (("model", "a"), ("reason", "idle"), ("result", "ok")))] == 1.0
    assert all(v == 0 for (name, _), v in samples.items() if name == "jano_model_loaded")
    resp, _ = w.call("POST", "/v1/chat/completions", CHAT, advance=0.5)  # loads it again
    assert resp.code == 200 and states(w)["a"] == "loaded"


def test_preload_loads_at_start_up() -> None:
    w = World(scheduler=SchedulerConfig(preload=("b",)))
    w.svc.startService()
    try:
        w.clock.advance(0)
        assert states(w)["b"] == "loading"
        w.clock.advance(1.5)
        assert states(w) == {"a": "unloaded", "b": "loaded"}
        assert list(w.swapper.history) == [("default", None, "b")]
    finally:
        w.svc.stopService()
        w.clock.advance(60)
