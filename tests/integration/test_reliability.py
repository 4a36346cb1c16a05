"""
Faults survived, bad input refused, nothing lost, nothing wedged: each with a
real ``twistd -n jano`` process and real sockets.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from procs import (Proc, free_port, get, jano_config, post_json, request, source_env,
                   start_fake_backend, start_jano, twistd_argv, wait_until)

pytestmark = pytest.mark.integration


def _open_stream(url: str, body: dict[str, object], headers: dict[str, str]) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                 f"Content-Type: application/json\r\n{extra}\r\n".encode() + data)
    return sock


def _refused(url: str) -> bool:
    try:
        get(url + "/health", timeout=2)
    except OSError:
        return True
    return False


def _usage(url: str, n: int = 1) -> list[dict[str, object]]:
    data: list[dict[str, object]] = json.loads(get(f"{url}/usage?limit={n}")[2])["data"]
    return data


def test_client_that_stops_reading_is_dropped_and_frees_the_upstream(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True,
                                            extra="idle_write_timeout = 1.0"))
    try:
        sock = _open_stream(jano.url, {"model": "m", "stream": True, "max_tokens": 2000, "messages": []},
                            {"X-Fake-Chunk-Bytes": "1000000"})  # 2 GB: far more than any buffer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Never read.  Jano's send buffer fills, it pauses the upstream, and gives up after 1 s.
        wait_until(lambda: json.loads(get(backend.url + "/fake/stats")[2])["disconnected"] == 1,
                   15, "upstream freed after the stall")
        wait_until(lambda: _usage(jano.url)[0]["outcome"] == "client_disconnected", 5, "recorded")
        assert "read nothing for 1s" in jano.log_text()
        sock.close()
        assert post_json(jano.url + "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    finally:
        jano.stop()
        backend.stop()


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True,
                                            extra="shutdown_grace = 10.0"))
    result: list[tuple[int, bytes]] = []

    def slow() -> None:
        status, _, body = post_json(jano.url + "/v1/chat/completions",
                                    {"model": "m", "stream": True, "max_tokens": 20, "messages": []},
                                    headers={"X-Fake-Delay-Ms": "100"})
        result.append((status, body))

    try:
        t = threading.Thread(target=slow)
        t.start()
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["inFlight"] == 1, 5, "in flight")
        jano.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(jano.url), 5, "the listener closed")  # no longer accepting
        t.join(20)
        assert result and result[0][0] == 200 and result[0][1].count(b"Tok") == 20
        assert result[0][1].endswith(b"data: [DONE]\n\n")  # finished, not cut
        # twistd re-raises the signal after a clean shutdown, so the status names SIGTERM.
        assert jano.popen.wait(15) in (0, -signal.SIGTERM)
        assert "Server Shut Down" in jano.log_text()
    finally:
        jano.stop()
        backend.stop()


def test_sighup_reloads_models_and_refuses_a_bad_config(tmp_path: Path) -> None:
    b1 = start_fake_backend(tmp_path, model="one")
    b2 = start_fake_backend(tmp_path, model="two")
    port = free_port()
    jano = start_jano(tmp_path, jano_config([("one", b1.url)], always_on=True), port=port)
    cfg = tmp_path / "jano.toml"
    try:
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(post_json(
            jano.url + "/v1/chat/completions",
            {"model": "one", "stream": True, "max_tokens": 10, "messages": []},
            headers={"X-Fake-Delay-Ms": "100"})[0]))
        t.start()
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["inFlight"] == 1, 5, "in flight")
        cfg.write_text(jano_config([("one", b1.url), ("two", b2.url)], always_on=True)
                       .replace("{port}", str(port)))
        jano.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: [m["id"] for m in json.loads(get(jano.url + "/v1/models")[2])["data"]]
                   == ["one", "two"], 5, "reloaded")
        assert post_json(jano.url + "/v1/chat/completions", {"model": "two", "messages": []})[0] == 200
        t.join(10)
        assert result == [200]  # the in-flight request survived the reload
        cfg.write_text("[[models]]\nname = 1\n")
        jano.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reload refused" in jano.log_text(), 5, "refusal logged")
        assert "models[0].name: expected a string" in jano.log_text()
        assert post_json(jano.url + "/v1/chat/completions", {"model": "two", "messages": []})[0] == 200
    finally:
        jano.stop()
        b1.stop()
        b2.stop()


def test_backend_down_then_up(tmp_path: Path) -> None:
    backend_port = free_port()
    upstream = f"http://127.0.0.1:{backend_port}"
    jano = start_jano(tmp_path, jano_config([("m", upstream)], always_on=True)
                      + "[telemetry]\nhealth_interval = 0.2\n")
    backend = None
    try:
        t0 = time.monotonic()
        status, _, body = post_json(jano.url + "/v1/chat/completions", {"model": "m", "messages": []})
        assert status == 502 and time.monotonic() - t0 < 2.0
        assert json.loads(body)["error"]["type"] == "upstream_error"
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["backendHealth"]["m"] == "down",
                   5, "down")
        popen = subprocess.Popen([sys.executable, "-m", "jano.testing", "--port", str(backend_port),
                                  "--model", "m", "--quiet"], env=source_env(), cwd=tmp_path)
        backend = Proc(popen, backend_port, tmp_path / "none.log")
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["backendHealth"]["m"] == "up",
                   10, "up")
        assert post_json(jano.url + "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    finally:
        jano.stop()
        if backend is not None:
            backend.stop()


def test_missing_swap_script_is_a_start_up_error(tmp_path: Path) -> None:
    cfg = tmp_path / "jano.toml"
    cfg.write_text(jano_config([("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")],
                               swap=["./no-such-script.sh", "{model}"]).replace("{port}", str(free_port())))
    res = subprocess.run([*twistd_argv(), "-n", "--pidfile=", "jano", "--config", str(cfg)],
                         env=source_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "swap.command" in res.stderr and "no-such-script.sh" in res.stderr
    assert "Traceback" not in res.stderr


def test_malformed_requests_get_4xx_and_jano_stays_up(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True))
    try:
        host, port = "127.0.0.1", jano.port
        for raw in (b"GARBAGE\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd{"):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(raw)
                reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
        status, _, body = request("POST", jano.url + "/api/chat", b'{"model": ["m"]}')
        assert status == 400 and json.loads(body) == {"error": "\"model\" must be a string"}
        assert json.loads(get(backend.url + "/fake/stats")[2])["requests"] == 0  # nothing forwarded
        assert get(jano.url + "/health")[0] == 200
    finally:
        jano.stop()
        backend.stop()


def test_hundreds_of_concurrent_paced_streams_complete_uncorrupted(tmp_path: Path) -> None:
    """Quick version of the 1,000-stream benchmark scenario (see benchmarks/)."""
    n, tokens = 300, 10
    backend = start_fake_backend(tmp_path, model="m")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True,
                                            model_extra="max_concurrency = 1000"))
    try:
        rss0 = jano.rss_kib()
        peak = [rss0]

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", jano.port)
            body = json.dumps({"model": "m", "stream": True, "max_tokens": tokens, "messages": [],
                               "stream_options": {"include_usage": True}}).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"X-Fake-Delay-Ms: 100\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            data = await asyncio.wait_for(reader.read(-1), 60)
            writer.close()
            return data

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], jano.rss_kib())
                await asyncio.sleep(0.05)

        async def main() -> list[bytes]:
            sampler = asyncio.ensure_future(sample())
            out = await asyncio.gather(*(one(i) for i in range(n)))
            sampler.cancel()
            return out

        results = asyncio.run(main())
        for data in results:
            assert data.startswith(b"HTTP/1.1 200")
            events = [e for e in data.split(b"\n\n") if b"data: " in e]
            assert b"".join(events).count(b"Tok") == tokens and events[-1].endswith(b"data: [DONE]")
        per_stream_kib = (peak[0] - rss0) / n
        assert per_stream_kib < 64, per_stream_kib
        st = json.loads(get(jano.url + "/status")[2])
        assert st["requestsServedTotal"] >= n and st["inFlight"] == 0
    finally:
        jano.stop()
        backend.stop()


def test_backend_dying_mid_stream_cuts_the_client_connection_and_is_recorded(tmp_path: Path) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True))
    try:
        sock = _open_stream(jano.url, {"model": "m", "stream": True, "max_tokens": 50, "messages": []},
                            {"X-Fake-Fail-After": "4"})
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass  # Jano aborts the connection, as nginx does: the cut is visible to the client
        finally:
            sock.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
        assert body.count(b"Tok") == 4 and b"[DONE]" not in body
        assert not body.endswith(b"0\r\n\r\n")  # no clean end of the chunked body
        rec = _usage(jano.url)[0]
        assert rec["outcome"] == "upstream_error" and rec["completionTokens"] is None
        st = json.loads(get(jano.url + "/status")[2])
        assert st["inFlight"] == 0 and st["requestsServedTotal"] == 0
        assert post_json(jano.url + "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    finally:
        jano.stop()
        backend.stop()


def test_client_leaving_the_queue_causes_no_swap(tmp_path: Path) -> None:
    a = start_fake_backend(tmp_path, model="a")
    b = start_fake_backend(tmp_path, model="b")
    calls = tmp_path / "calls.txt"
    script = tmp_path / "swap.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> "{calls}"\n')
    script.chmod(0o755)
    jano = start_jano(tmp_path, jano_config([("a", a.url), ("b", b.url)], swap=[str(script), "{model}"],
                                            model_extra="max_concurrency = 1")
                      + '[scheduler]\ninitial_model = "a"\n')
    try:
        keeper = threading.Thread(target=post_json, args=(jano.url + "/v1/chat/completions", {
            "model": "a", "stream": True, "max_tokens": 10, "messages": []}),
            kwargs={"headers": {"X-Fake-Delay-Ms": "100"}})
        keeper.start()
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["inFlight"] == 1, 5, "a busy")
        sock = _open_stream(jano.url, {"model": "b", "messages": []}, {})
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["queueDepthByModel"]["b"] == 1,
                   5, "b queued")
        sock.close()  # gives up while queued
        wait_until(lambda: json.loads(get(jano.url + "/status")[2])["queueDepth"] == 0, 5, "left the queue")
        keeper.join(10)
        # A swap would be decided within a reactor turn of a's release; /status answers after it.
        status = json.loads(get(jano.url + "/status")[2])
        assert status["inFlight"] == 0
        assert all(g["swapInProgress"] is None for g in status["groups"].values())
        assert not calls.exists()  # nobody waits for b any more: no swap
        recs = _usage(jano.url, 2)
        assert {r["outcome"] for r in recs} == {"completed", "client_disconnected"}
        assert json.loads(get(jano.url + "/status")[2])["currentModel"] == "a"
    finally:
        jano.stop()
        a.stop()
        b.stop()
