"""
Managed model servers for real: ``twistd -n jano`` runs ``python -m
jano.testing`` as each model's command, swaps between them, follows their
logs, restarts a crashed one, and leaves no child behind on SIGTERM or after
its own SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from procs import (free_port, get, post_json, start_jano, stream_until_closed,
                   wait_until)

pytestmark = pytest.mark.integration


def fake(*extra: str) -> str:
    argv = [sys.executable, "-m", "jano.testing", "--port", "{port}", "--model", "{model}",
            "--quiet", *extra]
    # start_jano fills every "{port}" with Jano's own: spell this one as a TOML escape.
    return json.dumps(argv).replace("{port}", "\\u007Bport}")


def config(models: str, *, ready_timeout: float = 15.0, backoff: float = 0.5,
           extra: str = "") -> str:
    base = free_port()
    return f"""
[server]
listen = "tcp:{{port}}:interface=127.0.0.1"
[scheduler]
ready_timeout = {ready_timeout}
retry_backoff = 0.5
collate = 0
[processes]
port_range = [{base}, {base + 40}]
restart_backoff = {backoff}
restart_backoff_max = {backoff * 4}
{extra}
{models}
"""


def chat(url: str, model: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return post_json(url + "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "hi there"}],
                      "max_tokens": 4}, **kw)


def status(url: str) -> dict[str, Any]:
    return dict(json.loads(get(url + "/status")[2]))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def pid_of(url: str, model: str) -> Optional[int]:
    proc = status(url)["processes"].get(model, {})
    return proc.get("pid") if proc.get("state") == "running" else None


def test_a_swap_between_managed_models_then_sigterm_leaves_no_child(tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config(f"""
[[models]]
name = "alpha"
command = {fake("--startup-delay", "0.3")}
[[models]]
name = "beta"
command = {fake()}
"""))
    try:
        code, _, body = chat(jano.url, "alpha")
        assert code == 200, body
        alpha = pid_of(jano.url, "alpha")
        assert alpha is not None and alive(alpha)
        swap = status(jano.url)["lastSwap"]
        assert swap["result"] == "ok" and set(swap["phasesMs"]) == {"stop", "start", "ready"}
        assert swap["phasesMs"]["ready"] >= 250, "the 0.3 s load shows in the ready phase"

        code, _, body = chat(jano.url, "beta")
        assert code == 200, body
        beta = pid_of(jano.url, "beta")
        assert beta is not None and not alive(alpha), "alpha's server was stopped first"
        procs = status(jano.url)["processes"]
        assert procs["alpha"]["state"] == "stopped" and procs["alpha"]["last_exit"] == \
            "exited with status 0"

        code, headers, text = get(jano.url + "/logs/beta")
        assert code == 200 and headers["content-type"].startswith("text/plain")
        assert b"[jano] started" in text and b"server is listening" in text
        assert get(jano.url + "/logs/nobody")[0] == 404

        metrics = get(jano.url + "/metrics")[2].decode()
        assert 'jano_model_process_up{model="beta"} 1.0' in metrics
        assert 'jano_model_swap_phase_seconds_count{model="beta",phase="ready"} 1.0' in metrics
    finally:
        assert jano.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert not alive(beta), "SIGTERM of Jano stops the servers it runs"


def test_log_follow_streams_new_lines_and_ends_when_the_client_leaves(tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config(f"""
[[models]]
name = "alpha"
command = {fake("--log-requests")}
"""))
    try:
        assert chat(jano.url, "alpha")[0] == 200
        host, port = jano.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /logs/alpha?follow=1&tail=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += sock.recv(4096)
            assert b"200 OK" in seen and b"chunked" in seen.lower()
            assert chat(jano.url, "alpha")[0] == 200
            wait_until(lambda: (seen := sock.recv(4096)) and b"request POST" in seen, 10,
                       "the new request's log line")
        assert get(jano.url + "/health")[0] == 200
    finally:
        assert jano.stop(signal.SIGTERM) in (0, -signal.SIGTERM)


def test_a_crash_mid_stream_marks_the_model_down_and_the_next_request_restarts_it(
        tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config(f"""
[[models]]
name = "alpha"
command = {fake("--crash-after", "1", "--delay-ms", "50")}
""", backoff=1.0))
    try:
        assert chat(jano.url, "alpha")[0] == 200
        first = pid_of(jano.url, "alpha")
        raw = stream_until_closed(jano.url, {"model": "alpha", "stream": True, "max_tokens": 50,
                                             "messages": [{"role": "user", "content": "x"}]}, {})
        assert b"data: " in raw and b"[DONE]" not in raw, "the stream ends short"
        proc = wait_until(lambda: (p := status(jano.url)["processes"]["alpha"])
                          and p["state"] == "crashed" and p, 10, "the crash seen")
        assert "killed by signal 9" in proc["last_failure"]
        assert "simulated crash" in proc["last_failure"]
        code, _, body = chat(jano.url, "alpha")
        assert code == 503 and b"simulated crash" in body, body  # within the back-off
        time.sleep(1.1)
        code, _, body = chat(jano.url, "alpha")
        assert code == 200, body
        again = status(jano.url)["processes"]["alpha"]
        assert again["state"] == "running" and again["pid"] != first
        assert again["restarts"] == 1 and again["crashes"] == 1
        metrics = get(jano.url + "/metrics")[2].decode()
        assert 'jano_model_process_crashes_total{model="alpha"} 1.0' in metrics
    finally:
        jano.stop(signal.SIGTERM)


def test_after_jano_is_killed_with_sigkill_its_children_die_and_a_new_jano_starts_clean(
        tmp_path: Path) -> None:
    cfg = config(f"""
[[models]]
name = "alpha"
command = {fake()}
port = {free_port()}
""")
    jano = start_jano(tmp_path, cfg)
    assert chat(jano.url, "alpha")[0] == 200
    child = pid_of(jano.url, "alpha")
    assert child is not None
    jano.stop(signal.SIGKILL)
    wait_until(lambda: not alive(child), 5, "the orphaned server to die with Jano")
    again = start_jano(tmp_path, cfg)
    try:
        code, _, body = chat(again.url, "alpha")
        assert code == 200, body
    finally:
        again.stop(signal.SIGTERM)


def test_what_a_killed_janos_server_started_is_killed_by_the_next_jano(tmp_path: Path) -> None:
    # The server starts a helper of its own: PR_SET_PDEATHSIG reaches only the
    # server, so after Jano's SIGKILL the helper lives on, until the next Jano
    # starts and finds the dead run's record.
    script = ("sleep 300 & echo \"helper pid $!\"; exec " + sys.executable
              + " -m jano.testing --port $JANO_PORT --model alpha --quiet")
    cfg = config(f"""
[[models]]
name = "alpha"
command = {json.dumps(["sh", "-c", script])}
""", extra=f"runs_dir = {json.dumps(str(tmp_path / 'runs'))}")
    jano = start_jano(tmp_path, cfg)
    assert chat(jano.url, "alpha")[0] == 200
    server = pid_of(jano.url, "alpha")
    lines = get(jano.url + "/logs/alpha")[2].decode().splitlines()
    helper = int(next(line for line in lines if "helper pid" in line).rsplit(" ", 1)[1])
    assert server is not None and alive(helper)
    assert [p.suffix for p in (tmp_path / "runs").iterdir()] == [".run"]
    jano.stop(signal.SIGKILL)
    try:
        wait_until(lambda: not alive(server), 5, "the server to die with Jano")
        time.sleep(0.5)
        assert alive(helper), "the helper outlives Jano's SIGKILL (what the records are for)"

        again = start_jano(tmp_path, cfg)
        try:
            wait_until(lambda: not alive(helper), 5, "the next Jano to kill the helper")
            assert "left running by a Jano that died" in again.log.read_text()
            assert len(list((tmp_path / "runs").iterdir())) == 1  # the new run's only
            assert chat(again.url, "alpha")[0] == 200
        finally:
            assert again.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        assert list((tmp_path / "runs").iterdir()) == [], "a clean stop forgets its run"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


def test_start_failures_are_503s_with_their_cause_and_nothing_is_left_running(
        tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    jano = start_jano(tmp_path, config(f"""
[[models]]
name = "broken"
command = {fake("--exit-at-start", "3")}
[[models]]
name = "slow"
command = {fake("--startup-delay", "60")}
[[models]]
name = "squatted"
command = {fake()}
port = {taken.getsockname()[1]}
""", ready_timeout=1.5))
    try:
        code, _, body = chat(jano.url, "broken")
        assert code == 503, body
        message = json.loads(body)["error"]["message"]
        assert "exited with status 3" in message and "cannot load model" in message
        code, _, body = chat(jano.url, "slow")
        assert code == 503 and b"not ready after 1.5s" in body, body
        assert status(jano.url)["processes"]["slow"]["state"] == "crashed"
        code, _, body = chat(jano.url, "squatted")
        assert code == 503 and b"in use by another program" in body, body
        assert b"127.0.0.1" not in body
        assert get(jano.url + "/health")[0] == 200, "nothing wedged"
    finally:
        assert jano.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        taken.close()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and b"--startup-delay\x0060" in _cmdline(p)]
    assert leftovers == []


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_command_that_cannot_run_stops_jano_at_start_up(tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config("""
[[models]]
name = "alpha"
command = ["/nonexistent/llama-server", "--port", "\\u007Bport}"]
"""), ready=False)
    assert jano.popen.wait(20) != 0
    assert jano.popen.stderr is not None
    err = jano.popen.stderr.read().decode()
    assert "models (alpha).command: '/nonexistent/llama-server' not found" in err, err


def test_an_always_on_managed_model_is_started_with_jano(tmp_path: Path) -> None:
    jano = start_jano(tmp_path, config(f"""
[[models]]
name = "embed"
always_on = true
command = {fake()}
"""))
    try:
        wait_until(lambda: pid_of(jano.url, "embed"), 10, "the always_on server")
        code, _, body = post_json(jano.url + "/v1/chat/completions",
                                  {"model": "embed", "messages": [{"role": "user", "content": "x"}]})
        assert code == 200, body
        child = pid_of(jano.url, "embed")
        assert child is not None
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: (p := pid_of(jano.url, "embed")) and p != child, 10,
                   "the always_on server restarted on its own")
    finally:
        jano.stop(signal.SIGTERM)




def test_a_reload_that_removes_a_model_stops_its_server(tmp_path: Path) -> None:
    text = config(f"""
[[models]]
name = "alpha"
command = {fake()}
[[models]]
name = "beta"
command = {fake()}
""")
    jano = start_jano(tmp_path, text)
    try:
        assert chat(jano.url, "alpha")[0] == 200
        alpha = pid_of(jano.url, "alpha")
        assert alpha is not None
        cfg = tmp_path / "jano.toml"
        cfg.write_text(cfg.read_text().split("[[models]]")[0]
                       + "[[models]]" + cfg.read_text().split("[[models]]")[2])
        jano.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: not alive(alpha), 10, "the removed model's server to stop")
        assert "alpha" not in [m["id"] for m in json.loads(get(jano.url + "/v1/models")[2])["data"]]
        assert chat(jano.url, "beta")[0] == 200
    finally:
        jano.stop(signal.SIGTERM)
