"""
Model lifecycle on real processes: ``twistd -n jano``, two fake backends and a
real shell swap script; preload at start-up, idle unload (TTL), and load and
unload on request, as the script's own record of its calls shows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from procs import get, request, start_fake_backend, start_jano, wait_until

pytestmark = pytest.mark.integration

SCRIPT = """#!/bin/sh
# Record each call: "<action> <model> <previous>"; an empty model is an unload.
echo "$JANO_ACTION ${{1:--}} ${{2:--}}" >> "{calls}"
sleep 0.2
"""


def calls(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def states(url: str) -> dict[str, str]:
    data = json.loads(get(url + "/v1/models")[2])["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def post(url: str) -> tuple[int, Any]:
    status, _, body = request("POST", url, b"")
    return status, json.loads(body)


def test_preload_idle_unload_and_load_and_unload_on_request(tmp_path: Path) -> None:
    a = start_fake_backend(tmp_path, model="model-a")
    b = start_fake_backend(tmp_path, model="model-b")
    record = tmp_path / "calls.txt"
    script = tmp_path / "swap.sh"
    script.write_text(SCRIPT.format(calls=record))
    script.chmod(0o755)
    jano = start_jano(tmp_path, f"""
[server]
listen = "tcp:{{port}}:interface=127.0.0.1"
[scheduler]
preload = ["model-a"]
ttl = 1.5
swap_timeout = 10.0
ready_timeout = 10.0
[swap]
command = ["{script}", "{{model}}", "{{previous}}"]
[[models]]
name = "model-a"
upstream = "{a.url}"
[[models]]
name = "model-b"
upstream = "{b.url}"
ttl = 0
""")
    try:
        # Preload: swapped in at start-up, before any request.
        wait_until(lambda: states(jano.url)["model-a"] == "loaded", 10, "preloaded")
        assert calls(record)[0] == ["swap", "model-a", "-"]
        # Idle for its TTL: unloaded through the script, with an empty {model}.
        wait_until(lambda: states(jano.url)["model-a"] == "unloaded", 10, "idle unload")
        assert calls(record)[1] == ["unload", "-", "model-a"]
        status = json.loads(get(jano.url + "/status")[2])
        unload = status["recentSwaps"][0]
        assert (unload["kind"], unload["from"], unload["to"], unload["reason"], unload["result"]) == (
            "unload", "model-a", None, "idle", "ok")
        metrics = get(jano.url + "/metrics")[2].decode()
        assert 'jano_model_unloads_total{model="model-a",reason="idle",result="ok"} 1.0' in metrics
        # Load on request: 202 at once, then loaded; model-b has ttl 0, so it stays.
        code, body = post(jano.url + "/models/model-b/load")
        assert code == 202 and body == {"model": "model-b", "status": "loading"}
        wait_until(lambda: states(jano.url)["model-b"] == "loaded", 10, "loaded on request")
        assert calls(record)[2] == ["swap", "model-b", "-"]
        ps = json.loads(get(jano.url + "/api/ps")[2])["models"]
        assert [(m["name"], m["expires_at"]) for m in ps] == [("model-b", None)]
        # Unload on request.
        code, body = post(jano.url + "/models/model-b/unload")
        assert code == 202 and body["status"] == "unloading"
        wait_until(lambda: states(jano.url)["model-b"] == "unloaded", 10, "unloaded on request")
        assert calls(record)[3] == ["unload", "-", "model-b"]
        # Nothing wedged: a request loads its model again and is answered.
        code, _, body_ = request("POST", jano.url + "/v1/chat/completions",
                                 json.dumps({"model": "model-a", "messages": []}).encode())
        assert code == 200 and b"Tok" in body_
        assert calls(record)[4] == ["swap", "model-a", "-"]
    finally:
        jano.stop()
        a.stop()
        b.stop()
