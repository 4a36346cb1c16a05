"""
What Jano notices, on real processes: a fake model server made to stall
mid-stream (stall timeout, then the model marked stalled and failing fast),
and one made to report a long Ollama ``load_duration`` (a hidden reload).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from procs import (get, jano_config, post_json, start_fake_backend, start_jano,
                   stream_until_closed, wait_until)

pytestmark = pytest.mark.integration


def test_a_stalling_backend_is_cut_then_marked_stalled_and_failing_fast(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    config = jano_config([("m", backend.url)], always_on=True,
                         extra="stall_timeout = 1.0\nstall_threshold = 2\nstall_cooldown = 60.0")
    jano = start_jano(tmp_path, config)
    try:
        for _ in range(2):
            raw = stream_until_closed(jano.url, {"model": "m", "stream": True, "max_tokens": 5,
                                                  "messages": []}, {"X-Fake-Delay-Ms": "30000"})
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"x-jano-request-id" in head.lower()
            assert body.count(b"Tok") == 1 and not body.endswith(b"0\r\n\r\n")  # cut, not ended
        usage = json.loads(get(jano.url + "/usage?limit=2")[2])["data"]
        assert [u["outcome"] for u in usage] == ["upstream_stalled", "upstream_stalled"]
        wait_until(lambda: json.loads(get(backend.url + "/fake/stats")[2])["disconnected"] == 2,
                   10, "the upstream requests were dropped")
        status = json.loads(get(jano.url + "/status")[2])
        assert status["backendHealth"]["m"] == "stalled"
        code, _, body_ = post_json(jano.url + "/v1/chat/completions", {"model": "m", "messages": []})
        assert code == 503 and "stalled" in json.loads(body_)["error"]["message"]
        assert 'jano_model_stalled{model="m"} 1.0' in get(jano.url + "/metrics")[2].decode()
    finally:
        jano.stop()
        backend.stop()


def test_a_backend_reporting_a_long_load_is_counted_as_a_hidden_reload(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m", flavor="ollama")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True))
    try:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        assert post_json(jano.url + "/api/chat", chat)[0] == 200
        code, headers, _ = post_json(jano.url + "/api/chat", chat,
                                     headers={"X-Fake-Load-Ms": "2500"})
        assert code == 200
        usage = json.loads(get(jano.url + "/usage?limit=2")[2])["data"]
        assert [u["backendLoadMs"] for u in usage] == [2500.0, 1.0]
        assert int(headers["x-jano-request-id"]) == usage[0]["id"]
        status = json.loads(get(jano.url + "/status")[2])
        assert status["hiddenReloadsLastHour"] == 1 and status["recentSwaps"][0]["kind"] == "reload"
        assert 'jano_backend_reloads_total{model="m"} 1.0' in get(jano.url + "/metrics")[2].decode()
    finally:
        jano.stop()
        backend.stop()
