"""
``python -m jano.testing`` on a real socket: it starts, reports its port, streams,
notices a client hanging up, and drops a connection when told to.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

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
