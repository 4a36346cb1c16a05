"""
``python -m jano.testing`` on a real socket: it starts, reports its port, streams,
notices a client hanging up, and drops a connection when told to.  As the
managed child of a supervisor it loads slowly, crashes, fails to start, and
stops (or refuses to) on SIGTERM, saying why on stderr.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from procs import (Proc, get, post_json, source_env, start_fake_backend, stream_until_closed,
                   wait_until)
from wire import load_capture

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_port(tmp_path: Path) -> Iterator[int]:
    port_file = tmp_path / "port"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jano.testing", "--port", "0", "--port-file", str(port_file),
         "--flavor", "llamacpp", "--model", "tiny"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the fake exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError("no port file after 20 s")
            time.sleep(0.05)
        port = int(port_file.read_text())
        line = proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}" in line
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def post(port: int, path: str, body: Any, headers: dict[str, str] | None = None
         ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def stats(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/fake/stats")
    result: dict[str, int] = json.loads(conn.getresponse().read())
    conn.close()
    return result


def test_streams_over_a_real_socket(fake_port: int) -> None:
    conn, response = post(fake_port, "/v1/chat/completions",
                          {"model": "tiny", "max_tokens": 300, "stream": True,
                           "stream_options": {"include_usage": True}},
                          {"X-Fake-Chunk-Bytes": "1000"})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    body = response.read()
    conn.close()
    events = [e[len(b"data: "):] for e in body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    usage = json.loads(events[-2])
    assert usage["usage"]["completion_tokens"] == 300
    assert usage["timings"]["predicted_ms"] == 300 / 50.0 * 1000
    assert body.count(b"Tok") == 300
    assert stats(fake_port)["completed"] == 1


def test_hang_up_and_fail_after_over_a_real_socket(fake_port: int) -> None:
    conn, response = post(fake_port, "/v1/chat/completions",
                          {"max_tokens": 1000, "stream": True}, {"X-Fake-Delay-Ms": "20"})
    assert response.read1(65536).count(b"data: ") >= 1
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 10
    while stats(fake_port)["disconnected"] != 1:
        assert time.monotonic() < deadline, stats(fake_port)
        time.sleep(0.05)

    conn, response = post(fake_port, "/completion", {"n_predict": 50, "stream": True},
                          {"X-Fake-Fail-After": "7"})
    with pytest.raises(http.client.IncompleteRead) as failed:
        response.read()
    conn.close()
    assert failed.value.partial.count(b'"stop":false') == 7
    assert stats(fake_port) == {"requests": 2, "completed": 0, "disconnected": 1,
                                "in_progress": 0, "aborted": 1}


# --- as a managed child process ---------------------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    """Processes a test started: killed at the end whatever happened."""
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.stop(signal.SIGKILL)


def run_fake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the fake to its end (for those that exit on their own)."""
    return subprocess.run([sys.executable, "-m", "jano.testing", *args], env=source_env(),
                          cwd=tmp_path, capture_output=True, timeout=20, check=False)


def test_startup_delay_answers_loading_then_serves(tmp_path: Path, started: list[Proc]) -> None:
    _, _, loading = load_capture("llamacpp-health-loading.json")
    proc = start_fake_backend(tmp_path, model="slow",
                              extra=("--startup-delay", "1.0", "--log-requests"))
    started.append(proc)
    status, headers, body = get(proc.url + "/health")
    assert (status, body, headers["connection"]) == (503, loading, "close")
    assert post_json(proc.url + "/v1/chat/completions", {"max_tokens": 1})[:3:2] == (503, loading)
    wait_until(lambda: get(proc.url + "/health")[0] == 200, 5, "loaded", proc)
    assert post_json(proc.url + "/v1/chat/completions", {"max_tokens": 1})[0] == 200
    lines = proc.log_text().splitlines()
    assert lines[:4] == ["fake: loading model slow (startup delay 1s)",
                         f"fake: server is listening on http://127.0.0.1:{proc.port}",
                         "fake: request GET /health", "fake: request POST /v1/chat/completions"]
    last_post = len(lines) - 1 - lines[::-1].index("fake: request POST /v1/chat/completions")
    assert 4 <= lines.index("fake: model loaded") < last_post


def test_crash_after_kills_the_next_stream_after_its_first_chunk(
        tmp_path: Path, started: list[Proc]) -> None:
    proc = start_fake_backend(tmp_path, extra=("--crash-after", "1"))
    started.append(proc)
    assert post_json(proc.url + "/v1/chat/completions", {"max_tokens": 2})[0] == 200
    assert get(proc.url + "/health")[0] == 200  # health checks do not count
    raw = stream_until_closed(proc.url, {"stream": True, "max_tokens": 5}, {})
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert b'"content":"Tok0"' in raw and b"Tok1" not in raw  # one content chunk, then the cut
    assert not raw.endswith(b"\r\n0\r\n\r\n")
    assert proc.popen.wait(5) == -signal.SIGKILL
    assert proc.log_text().splitlines()[-1] == "fake: simulated crash after 1 requests"


@pytest.mark.parametrize("how, status", [(("--crash-exit", "7"), 7),
                                         (("--crash-signal", "ABRT"), -signal.SIGABRT)])
def test_crash_after_zero_kills_a_nonstreamed_request_before_answering(
        tmp_path: Path, started: list[Proc], how: tuple[str, str], status: int) -> None:
    proc = start_fake_backend(tmp_path, extra=("--crash-after", "0", *how))
    started.append(proc)
    with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected: nothing came back
        post_json(proc.url + "/completion", {"n_predict": 3})
    assert proc.popen.wait(5) == status
    assert "fake: simulated crash after 0 requests" in proc.log_text().splitlines()
    assert not list(tmp_path.glob("core*"))


def test_exit_at_start_says_why_and_never_listens(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    done = run_fake(tmp_path, "--exit-at-start", "3", "--port-file", str(port_file), "--quiet")
    assert done.returncode == 3
    assert b"fake: cannot load model: file not found" in done.stderr.splitlines()
    assert not port_file.exists()


def test_sigterm_mid_stream_stops_cleanly(tmp_path: Path, started: list[Proc]) -> None:
    proc = start_fake_backend(tmp_path)
    started.append(proc)
    conn, response = post(proc.port, "/v1/chat/completions",
                          {"max_tokens": 1000, "stream": True}, {"X-Fake-Delay-Ms": "50"})
    assert response.read1(65536).count(b"data: ") >= 1
    try:
        assert proc.stop(signal.SIGTERM, timeout=5) == 0
    finally:
        conn.close()
    assert proc.log_text().splitlines()[-1] == "fake: SIGTERM, shutting down"


def test_ignore_sigterm_needs_sigkill(tmp_path: Path, started: list[Proc]) -> None:
    proc = start_fake_backend(tmp_path, extra=("--ignore-sigterm",))
    started.append(proc)
    proc.popen.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.popen.wait(0.5)
    assert get(proc.url + "/health")[0] == 200
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL


def test_busy_port_exits_1_saying_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_fake(tmp_path, "--port", str(port))
    assert done.returncode == 1
    assert (f"fake: cannot listen on 127.0.0.1:{port}: address already in use"
            in done.stderr.decode().splitlines())
    assert done.stdout == b""
