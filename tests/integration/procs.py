"""
Real processes on loopback for integration tests: the fake model server
(``python -m jano.testing``) and ``twistd -n jano``.  Synchronous on purpose:
the test process is just another client, with no reactor of its own.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_argv() -> list[str]:
    """twistd of the Python running the tests (the venv README's command made)."""
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def source_env(**extra: str) -> dict[str, str]:
    """Environment that runs the checkout's code (not a stale installed copy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def wait_until(check: Any, timeout: float, what: str, proc: Optional[Proc] = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: process exited {proc.popen.returncode}:\n{proc.log_text()[-3000:]}")
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout}s (last: {last!r})"
                       + (f"\n{proc.log_text()[-3000:]}" if proc else ""))


def start_fake_backend(tmp: Path, *, model: str = "fake-model", flavor: str = "llamacpp",
                       extra: tuple[str, ...] = ()) -> Proc:
    port_file = tmp / f"fake-{model}.port"
    log = tmp / f"fake-{model}.log"
    argv = [sys.executable, "-m", "jano.testing", "--port", "0", "--port-file", str(port_file),
            "--model", model, "--flavor", flavor, "--quiet", *extra]
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=source_env(),
                                 cwd=tmp)
    proc = Proc(popen, 0, log)
    proc.port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(),
                               15, f"fake backend {model}", proc))
    return proc


def start_jano(tmp: Path, config: str, *, port: Optional[int] = None, args: tuple[str, ...] = (),
               env: Optional[dict[str, str]] = None, ready: bool = True) -> Proc:
    """``twistd -n jano --config`` with ``config`` (``{port}`` is substituted)."""
    port = port or free_port()
    cfg = tmp / "jano.toml"
    cfg.write_text(config.replace("{port}", str(port)))
    log = tmp / "jano.log"
    argv = [*twistd_argv(), "-n", "--pidfile=", "-l", str(log), "jano", "--config", str(cfg), *args]
    # The usage history goes under the test's own state directory, never the user's.
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env or source_env(XDG_STATE_HOME=str(tmp / "state")), cwd=tmp)
    proc = Proc(popen, port, log)
    if ready:
        wait_until(lambda: get(proc.url + "/health")[0] == 200, 20, "jano", proc)
    return proc


def request(method: str, url: str, body: Optional[bytes] = None,
            headers: Optional[dict[str, str]] = None, timeout: float = 30.0
            ) -> tuple[int, dict[str, str], bytes]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body,
                     headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return request("GET", url, **kw)


def post_json(url: str, obj: object, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return request("POST", url, json.dumps(obj).encode(), headers=headers, **kw)


def jano_config(models: list[tuple[str, str]], *, swap: Optional[list[str]] = None,
                extra: str = "", model_extra: str = "", always_on: bool = False) -> str:
    """A small config: ``models`` as (name, upstream); ``{port}`` left for start_jano."""
    lines = ['[server]', 'listen = "tcp:{port}:interface=127.0.0.1"']
    lines.append(extra)
    if swap is not None:
        lines += ["[swap]", "command = " + json.dumps(swap)]
    for name, upstream in models:
        lines += ["[[models]]", f'name = "{name}"', f'upstream = "{upstream}"']
        if always_on:
            lines.append("always_on = true")
        if model_extra:
            lines.append(model_extra)
    return "\n".join(lines) + "\n"


def stream_until_closed(url: str, body: dict[str, object], headers: dict[str, str]) -> bytes:
    """POST ``body`` to ``/v1/chat/completions`` on a raw socket; read until Jano closes it."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    raw = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + data)
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass  # Jano may abort: the cut is what the caller checks
    return raw
