"""
The core router as users run it: a real ``twistd -n jano`` process on
loopback in front of a real fake-backend process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import require
from procs import (ROOT, Proc, free_port, get, jano_config, post_json, source_env,
                   start_fake_backend, start_jano, twistd_argv, wait_until)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("stack")
    backend = start_fake_backend(tmp, model="fake-model")
    jano = start_jano(tmp, jano_config([("fake-model", backend.url)], always_on=True,
                                       model_extra="max_concurrency = 64"))
    yield backend, jano
    jano.stop()
    backend.stop()


def raw_stream(url: str, path: str, body: dict[str, object], headers: dict[str, str] | None = None,
               ) -> tuple[socket.socket, bytes]:
    """Send a POST by hand and return the socket after the response head."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n{extra}\r\n".encode() + data)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_streamed_and_plain_bytes_identical_to_direct(stack: tuple[Proc, Proc]) -> None:
    backend, jano = stack
    for path, body in [
        ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                  "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 20}),
        ("/completion", {"prompt": "hello", "n_predict": 12, "stream": True}),
        ("/api/chat", {"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                       "options": {"num_predict": 9}}),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 3}),
    ]:
        s1, h1, b1 = post_json(backend.url + path, body)
        s2, h2, b2 = post_json(jano.url + path, body)
        assert s1 == s2 == 200
        assert h1["content-type"] == h2["content-type"]

        def norm(b: bytes) -> bytes:  # the fake numbers its responses; nothing else may differ
            import re
            return re.sub(rb'"(id|created|created_at)":\s*("[^"]*"|\d+)', b"", b)

        assert norm(b1) == norm(b2), path
    recs = json.loads(get(jano.url + "/usage?limit=4")[2])["data"]
    assert [r["completionTokens"] for r in recs] == [3, 9, 12, 20]


def test_each_chunk_is_forwarded_before_the_next_exists(stack: tuple[Proc, Proc]) -> None:
    """Paced stream: chunk i must reach the client about i * gap after the first, not at the end."""
    _, jano = stack
    gap = 0.15
    sock, head = raw_stream(jano.url, "/v1/chat/completions",
                            {"model": "fake-model", "stream": True, "max_tokens": 8, "messages": []},
                            {"X-Fake-Delay-Ms": str(int(gap * 1000))})
    assert b" 200 " in head.split(b"\r\n")[0]
    arrivals: list[float] = []
    buf = b""
    t0 = time.monotonic()
    while b"[DONE]" not in buf:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
        for _ in range(data.count(b"Tok")):
            arrivals.append(time.monotonic() - t0)
    sock.close()
    assert len(arrivals) == 8
    # Unbuffered: the first token arrives well before the last is even generated.
    assert arrivals[0] < gap * 3
    assert arrivals[-1] - arrivals[0] > gap * 5


def test_slow_reader_of_200mb_keeps_jano_memory_bounded(stack: tuple[Proc, Proc]) -> None:
    backend, jano = stack
    rss_before = jano.rss_kib()
    chunk_bytes = 62_500
    n = 3200  # 200 MB
    sock, head = raw_stream(jano.url, "/v1/chat/completions",
                            {"model": "fake-model", "stream": True, "max_tokens": n, "messages": []},
                            {"X-Fake-Chunk-Bytes": str(chunk_bytes)})
    assert b" 200 " in head.split(b"\r\n")[0]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    peak = rss_before
    total = 0
    reads = 0
    done = False
    while not done:
        data = sock.recv(256 * 1024)
        if not data:
            break
        total += len(data)
        done = data.endswith(b"0\r\n\r\n")
        reads += 1
        if reads % 20 == 0:
            time.sleep(0.002)  # slower than the backend: backpressure must hold
            peak = max(peak, jano.rss_kib())
    sock.close()
    assert total > 200_000_000
    growth_mib = (peak - rss_before) / 1024
    assert growth_mib < 60, f"Jano RSS grew {growth_mib:.1f} MiB while streaming 200 MB"


def test_client_disconnect_aborts_the_upstream(stack: tuple[Proc, Proc]) -> None:
    backend, jano = stack
    before = json.loads(get(backend.url + "/fake/stats")[2])["disconnected"]
    sock, head = raw_stream(jano.url, "/v1/chat/completions",
                            {"model": "fake-model", "stream": True, "max_tokens": 1000, "messages": []},
                            {"X-Fake-Delay-Ms": "50"})
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"Tok" in sock.recv(4096) or b"Tok" in sock.recv(4096)
    sock.close()
    wait_until(lambda: json.loads(get(backend.url + "/fake/stats")[2])["disconnected"] == before + 1,
               5, "upstream connection aborted")
    wait_until(lambda: json.loads(get(jano.url + "/usage?limit=1")[2])["data"][0]["outcome"]
               == "client_disconnected", 5, "recorded as a disconnect")


def test_official_openai_and_ollama_clients_work_through_jano(stack: tuple[Proc, Proc]) -> None:
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    _, jano = stack
    client = openai.OpenAI(base_url=jano.url + "/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert models == ["fake-model"]
    text = "".join(
        (c.choices[0].delta.content or "") for c in client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
        if c.choices)
    assert text == "Tok0Tok1Tok2Tok3"
    done = client.completions.create(model="fake-model", prompt="x", max_tokens=2)
    assert done.usage is not None and done.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[])

    oc = ollama.Client(host=jano.url)
    assert [m.model for m in oc.list().models] == ["fake-model"]
    parts = list(oc.chat(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                         stream=True, options={"num_predict": 3}))
    assert "".join(p.message.content for p in parts) == "Tok0Tok1Tok2" and parts[-1].done
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(model="nope", prompt="x")
    assert e.value.status_code == 404 and "not found" in e.value.error


def test_oversized_body_is_413_before_reading_it(stack: tuple[Proc, Proc]) -> None:
    _, jano = stack
    host, port = jano.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 999999999\r\n\r\n" + b"{" * 1000)
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"invalid_request_error" in reply
    assert get(jano.url + "/health")[0] == 200


def test_demo_mode_serves_and_swaps(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    popen = subprocess.Popen([*twistd_argv(), "-n", "--pidfile=", "-l", str(log), "jano", "--demo",
                              "--listen", f"tcp:{port}:interface=127.0.0.1"],
                             env=source_env(), cwd=tmp_path, stderr=subprocess.PIPE)
    jano = Proc(popen, port, log)
    try:
        wait_until(lambda: get(jano.url + "/health")[0] == 200, 20, "demo", jano)
        models = [m["id"] for m in json.loads(get(jano.url + "/v1/models")[2])["data"]]
        assert models == ["demo-chat", "demo-coder"]
        for name in ("demo-chat", "demo-coder"):
            status, _, body = post_json(jano.url + "/v1/chat/completions",
                                        {"model": name, "messages": [], "max_tokens": 2})
            assert status == 200, body
        st = json.loads(get(jano.url + "/status")[2])
        assert st["currentModel"] == "demo-coder" and st["swapsLastHour"] == 2
        assert "demo mode" in log.read_text()
    finally:
        jano.stop()


def test_bad_config_stops_with_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[models]]\nname = "a"\nupstream = "http://127.0.0.1:1"\nmax_concurrency = "four"\n')
    res = subprocess.run([*twistd_argv(), "-n", "--pidfile=", "jano", "--config", str(cfg)],
                         env=source_env(), cwd=tmp_path, capture_output=True, timeout=60)
    err = res.stderr.decode()
    assert res.returncode != 0
    assert "models[0] (a).max_concurrency: expected an integer" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_plugin_is_found_after_a_real_install(tmp_path: Path) -> None:
    """Run outside the checkout with no PYTHONPATH: only an installed Jano can answer."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [sys.executable, "-c", "import jano, sys; sys.stdout.write(jano.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    installed = probe.returncode == 0 and not probe.stdout.startswith(str(ROOT / "jano"))
    require(installed, "Jano is not installed in this Python (pip install '.[test]' first)")
    res = subprocess.run(
        [sys.executable, "-c",
         "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
         "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "'jano'" in res.stdout, res.stderr
    help_ = subprocess.run([*twistd_argv(), "jano", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert "--listen" in help_.stdout and "--demo" in help_.stdout


def _read_responses(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """Read ``count`` responses (Content-Length or chunked) off a socket."""
    buf = b""

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            buf += chunk

    def line() -> bytes:
        nonlocal buf
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        got, _, buf = buf.partition(b"\r\n")
        return got

    out: list[tuple[bytes, bytes]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            need(len(buf) + 1)
        head, _, buf = buf.partition(b"\r\n\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (f.partition(b":") for f in head.split(b"\r\n")[1:])}
        if fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while size := int(line().split(b";")[0], 16):
                need(size + 2)
                body, buf = body + buf[:size], buf[size + 2:]
            assert line() == b""
        else:
            length = int(fields[b"content-length"])
            need(length)
            body, buf = buf[:length], buf[length:]
        out.append((head, body))
    return out


def test_pipelined_requests_own_routes_and_100_continue_on_one_connection(
        stack: tuple[Proc, Proc]) -> None:
    _, jano = stack
    host, port = jano.url.split("//")[1].split(":")
    body = json.dumps({"model": "fake-model", "messages": [], "max_tokens": 3}).encode()
    post = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # Three requests in one write: a completion, Jano's own /health, a completion.
        sock.sendall(post + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post)
        answers = _read_responses(sock, 3)
        assert [h.split(b"\r\n", 1)[0] for h, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert json.loads(answers[1][1])["status"] == "ok"
        assert [json.loads(b)["usage"]["completion_tokens"] for _, b in (answers[0], answers[2])] == [3, 3]
        # curl's way with a large body: the head first, the body after "100 Continue".
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        [(head, answer)] = _read_responses(sock, 1)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(answer)["usage"]["completion_tokens"] == 3
