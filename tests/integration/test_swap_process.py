"""
:mod:`jano.swap` with real processes on the real reactor, and the shipped
swap scripts against small in-process fakes of Ollama, llama-server's router
and systemctl.  Each test takes well under 3 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from jano.records import ModelSpec
from jano.swap import ScriptSwapper, SwapError, http_probe

_F = TypeVar("_F", bound=Callable[..., Any])


def ensure_deferred(f: _F) -> _F:
    """pytest-twisted's decorator, typed (the package ships no type hints)."""
    return cast(_F, pytest_twisted.ensureDeferred(f))

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "etc" / "swap-scripts"
TARGET = ModelSpec(name="llama-8b", upstream="http://127.0.0.1:9", group="gpu0")
PREVIOUS = ModelSpec(name="qwen-7b", upstream="http://127.0.0.1:9", group="gpu0")
LIMIT = 10.0  # no test may hang: every wait is bounded by this



def needs_curl() -> None:
    """Skip without curl, except under JANO_REQUIRE_ALL (CI), where that is a failure."""
    if shutil.which("curl") is not None:
        return
    if os.environ.get("JANO_REQUIRE_ALL"):
        pytest.fail("required for this test and missing: curl (the swap scripts use it)")
    pytest.skip("curl is not installed")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def always_ready(url: str) -> Deferred[int]:
    return succeed(200)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def swapper(command: list[str], **kwargs: Any) -> ScriptSwapper:
    options: dict[str, Any] = dict(swap_timeout=5.0, ready_timeout=5.0, probe=always_ready,
                                   kill_grace=1.0)
    options.update(kwargs)
    return ScriptSwapper(_reactor(), command, **options)


async def run(d: Deferred[Any]) -> Optional[Failure]:
    """Wait (bounded) for a swap; return its failure, or None on success."""
    d.addTimeout(LIMIT, _reactor())
    try:
        await d
    except Exception:
        return Failure()
    return None


def swap_error(failure: Optional[Failure]) -> SwapError:
    assert failure is not None, "the swap succeeded"
    assert isinstance(failure.value, SwapError), failure.getTraceback()
    return failure.value


async def sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(_reactor(), seconds, lambda: None)


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


async def wait_gone(pid: int, within: float = 2.0) -> bool:
    for _ in range(int(within / 0.05)):
        if gone(pid):
            return True
        await sleep(0.05)
    return gone(pid)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


# --- ScriptSwapper with real processes ----------------------------------------------


@ensure_deferred
async def test_exit_zero_with_argv_and_env(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", f"""\
        printf '%s\\n' "$0" "$@" > {tmp_path}/argv
        env | grep -E '^(JANO_|EXTRA_)' | sort > {tmp_path}/env
        echo "$$ $(cut -d' ' -f5 /proc/$$/stat)" > {tmp_path}/ids
        read line || echo "stdin is closed" >&2
        echo "switched to $1"
        """)
    # Jano's own environment, minus any JANO_* the test run itself carries (CI sets one).
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANO_")}
    env["EXTRA_SETTING"] = "kept"
    with capturedLogs() as events:
        failure = await run(swapper([str(script), "{model}", "--from={previous}", "x{model}y"],
                                    env=env).swap("gpu0", PREVIOUS, TARGET))
    assert failure is None
    assert (tmp_path / "argv").read_text().splitlines() == [
        str(script), "llama-8b", "--from=qwen-7b", "xllama-8by"]
    assert (tmp_path / "env").read_text().splitlines() == [
        "EXTRA_SETTING=kept", "JANO_ACTION=swap", "JANO_GROUP=gpu0", "JANO_MODEL=llama-8b",
        "JANO_PREVIOUS_MODEL=qwen-7b", "JANO_UPSTREAM=http://127.0.0.1:9"]
    pid, pgid = (tmp_path / "ids").read_text().split()
    assert pid == pgid, "the script leads its own process group"
    lines = [(e["stream"], e["line"]) for e in events if "line" in e]
    assert lines == [("stderr", "stdin is closed"), ("stdout", "switched to llama-8b")]


@ensure_deferred
async def test_python_wrapper_gives_a_group_too(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jano.swap.swapper.shutil.which", lambda name: None)
    script = write_script(tmp_path / "swap.sh", f"""\
        echo "$$ $(cut -d' ' -f5 /proc/$$/stat) $1" > {tmp_path}/ids
        """)
    failure = await run(swapper([str(script), "{model}"]).swap("gpu0", None, TARGET))
    assert failure is None
    pid, pgid, model = (tmp_path / "ids").read_text().split()
    assert (pid == pgid, model) == (True, "llama-8b")


@ensure_deferred
async def test_exit_three_reports_last_stderr_line(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", """\
        echo "looking in /models" >&2
        echo "cannot find model.gguf" >&2
        echo "this went to stdout"
        exit 3
        """)
    probed: list[str] = []

    def probe(url: str) -> Deferred[int]:
        probed.append(url)
        return succeed(200)

    error = swap_error(await run(swapper([str(script)], probe=probe).swap("gpu0", None, TARGET)))
    assert error.result == "failed"
    assert error.cause == "swap script exited with status 3: cannot find model.gguf"
    assert probed == []


@ensure_deferred
async def test_missing_program_fails_cleanly(tmp_path: Path) -> None:
    error = swap_error(await run(swapper([str(tmp_path / "nope.sh")]).swap("gpu0", None, TARGET)))
    assert error.result == "failed"
    assert error.cause.startswith("swap script exited with status ")
    assert "nope.sh" in error.cause


@ensure_deferred
async def test_timeout_kills_script_and_child(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", f"""\
        echo $$ > {tmp_path}/script.pid
        sleep 600 &
        echo $! > {tmp_path}/child.pid
        echo "waiting for the GPU" >&2
        wait
        """)
    error = swap_error(await run(swapper([str(script)], swap_timeout=0.5)
                                 .swap("gpu0", None, TARGET)))
    assert error.result == "timeout"
    assert error.cause == "swap script timed out after 0.5s (killed): waiting for the GPU"
    assert await wait_gone(read_pid(tmp_path / "script.pid"))
    assert await wait_gone(read_pid(tmp_path / "child.pid"))


@ensure_deferred
async def test_timeout_sigkill_when_term_is_ignored(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", f"""\
        trap '' TERM
        echo $$ > {tmp_path}/script.pid
        sleep 600 &
        echo $! > {tmp_path}/child.pid
        while :; do wait; done
        """)
    calls: list[tuple[int, int]] = []

    def killpg(pgid: int, sig: int) -> None:
        calls.append((pgid, sig))
        os.killpg(pgid, sig)

    with capturedLogs() as events:
        error = swap_error(await run(swapper([str(script)], swap_timeout=0.4, kill_grace=0.3,
                                             killpg=killpg).swap("gpu0", None, TARGET)))
    assert error.result == "timeout"
    pid = read_pid(tmp_path / "script.pid")
    assert calls == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert any("ignored SIGTERM" in e.get("log_format", "") for e in events)
    assert await wait_gone(pid)
    assert await wait_gone(read_pid(tmp_path / "child.pid"))


@ensure_deferred
async def test_five_megabytes_of_output(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", """\
        head -c 5000000 /dev/zero | tr '\\000' x
        printf '\\ndone\\n'
        head -c 5000000 /dev/zero | tr '\\000' y >&2
        """)
    with capturedLogs() as events:
        failure = await run(swapper([str(script)], max_line=4096).swap("gpu0", None, TARGET))
    assert failure is None
    lines = [(e["stream"], e["line"], e["truncated"]) for e in events if "line" in e]
    assert lines == [("stdout", "x" * 4096, True), ("stdout", "done", False),
                     ("stderr", "y" * 4096, True)]


@ensure_deferred
async def test_daemon_holding_the_pipes_is_left_alone(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", f"""\
        sleep 600 &
        echo $! > {tmp_path}/daemon.pid
        echo "started a server that keeps our stdout"
        exit 0
        """)
    s = swapper([str(script)])
    s.pipe_linger = 0.2
    with capturedLogs() as events:
        failure = await run(s.swap("gpu0", None, TARGET))
    daemon = read_pid(tmp_path / "daemon.pid")
    try:
        assert failure is None
        assert not gone(daemon), "a successful script's server must survive"
        assert any("still holds" in e.get("log_format", "") for e in events)
    finally:
        os.kill(daemon, signal.SIGKILL)


class _Health(Resource):
    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes
        self.seen = 0

    def render_GET(self, request: Request) -> bytes:
        self.seen += 1
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if code == 503:
            return b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
        return b'{"status":"ok"}'


def _listen(resource: Resource) -> tuple[Any, str]:
    port = _reactor().listenTCP(0, Site(resource), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


def _http_client() -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    reactor = _reactor()
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@ensure_deferred
async def test_ready_through_http_probe(tmp_path: Path) -> None:
    health = _Health([503, 503, 200])
    port, url = _listen(health)
    try:
        script = write_script(tmp_path / "swap.sh", "exit 0\n")
        target = ModelSpec(name="m", upstream=url)
        s = swapper([str(script)], probe=http_probe(_http_client(), timeout=2,
                                                    clock=_reactor()), poll_interval=0.05)
        assert await run(s.swap("default", None, target)) is None
        assert health.seen == 3
    finally:
        await port.stopListening()


@ensure_deferred
async def test_not_ready_through_http_probe(tmp_path: Path) -> None:
    health = _Health([503] * 1000)
    port, url = _listen(health)
    try:
        script = write_script(tmp_path / "swap.sh", "exit 0\n")
        target = ModelSpec(name="m", upstream=url)
        s = swapper([str(script)], probe=http_probe(_http_client(), timeout=2, clock=_reactor()),
                    ready_timeout=0.4, poll_interval=0.05)
        error = swap_error(await run(s.swap("default", None, target)))
        assert (error.result, error.cause) == ("not_ready",
                                               "backend not ready after 0.4s (last health: 503)")
    finally:
        await port.stopListening()


@ensure_deferred
async def test_http_probe_connection_refused() -> None:
    port, url = _listen(_Health([]))
    await port.stopListening()  # nothing listens there now
    probe = http_probe(_http_client(), timeout=2, clock=_reactor())
    d = probe(url + "/health")
    d.addTimeout(LIMIT, _reactor())
    with pytest.raises(Exception) as info:
        await d
    assert "refused" in str(info.value).lower() or "ConnectError" in type(info.value).__name__


@ensure_deferred
async def test_cancel_kills_the_running_script(tmp_path: Path) -> None:
    script = write_script(tmp_path / "swap.sh", f"""\
        echo $$ > {tmp_path}/script.pid
        exec sleep 600
        """)
    d = swapper([str(script)]).swap("gpu0", None, TARGET)
    for _ in range(100):
        if (tmp_path / "script.pid").exists():
            break
        await sleep(0.02)
    d.cancel()
    failure = await run(d)
    assert failure is not None and failure.check(Exception)
    assert await wait_gone(read_pid(tmp_path / "script.pid"))


# --- the shipped scripts ------------------------------------------------------------


def test_shipped_scripts_are_executable_posix_sh() -> None:
    import subprocess

    scripts = sorted(SCRIPTS.glob("*.sh")) + [REPO / "etc" / "swap-model.example.sh"]
    assert {p.name for p in scripts} >= {"llama-server-systemd.sh", "llama-server-pidfile.sh",
                                         "ollama.sh", "llama-router.sh",
                                         "swap-model.example.sh"}
    for path in scripts:
        assert os.access(path, os.X_OK), f"{path} is not executable"
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n") and "set -eu" in text, path
        subprocess.run(["sh", "-n", str(path)], check=True)


class _Recorder(Resource):
    """A fake JSON API: ``handler(method, path, body)`` -> (status, JSON bytes)."""

    isLeaf = True

    def __init__(self, handler: Callable[[str, str, Any], tuple[int, bytes]]) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[tuple[str, str, Any]] = []

    def render(self, request: Request) -> bytes:
        assert request.method is not None and request.path is not None
        method, path = request.method.decode(), request.path.decode()
        raw = request.content.read() if request.content is not None else b""
        body = json.loads(raw) if raw else None
        self.requests.append((method, path, body))
        status, answer = self.handler(method, path, body)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return answer


def _ollama(loaded: set[str], known: set[str],
            unload_delay: float = 0.0) -> Callable[[str, str, Any], tuple[int, bytes]]:
    """Answers as captured from Ollama v0.33 (ollama-unload.json, ollama-generate-load.json).

    With ``unload_delay``, an unloaded model stays listed by /api/ps that long
    after the keep_alive 0 answer (Ollama frees the memory after answering).
    """

    def handle(method: str, path: str, body: Any) -> tuple[int, bytes]:
        if (method, path) == ("GET", "/api/ps"):
            return 200, json.dumps({"models": [{"name": n, "model": n} for n in sorted(loaded)]}).encode()
        assert (method, path) == ("POST", "/api/generate")
        name = body["model"]
        if name not in known:
            return 404, json.dumps({"error": f"model '{name}' not found"},
                                   separators=(",", ":")).encode()
        stamp = '"created_at":"2026-11-26T20:03:46.26531491Z","response":"","done":true'
        if body.get("keep_alive") == 0:
            if unload_delay:
                _reactor().callLater(unload_delay, loaded.discard, name)
            else:
                loaded.discard(name)
            return 200, ('{"model":"%s",%s,"done_reason":"unload"}' % (name, stamp)).encode()
        loaded.add(name)
        return 200, ('{"model":"%s",%s,"done_reason":"load"}' % (name, stamp)).encode()

    return handle


async def _run_script(name: str, upstream: str, previous: Optional[str], model: str,
                      **env: str) -> Optional[Failure]:
    if name in ("ollama.sh", "llama-router.sh"):
        needs_curl()
    s = swapper([str(SCRIPTS / name), "{model}", "{previous}"], env=dict(os.environ, **env))
    target = ModelSpec(name=model, upstream=upstream, group="gpu0")
    prev = ModelSpec(name=previous, upstream=upstream, group="gpu0") if previous else None
    return await run(s.swap("gpu0", prev, target))


@ensure_deferred
async def test_ollama_script_unloads_then_preloads() -> None:
    loaded = {"gemma3-270m"}
    fake = _Recorder(_ollama(loaded, {"gemma3-270m", "gemma3-270m-q8"}))
    port, url = _listen(fake)
    try:
        assert await _run_script("ollama.sh", url, "gemma3-270m", "gemma3-270m-q8") is None
    finally:
        await port.stopListening()
    assert fake.requests == [
        ("POST", "/api/generate", {"model": "gemma3-270m", "keep_alive": 0}),
        ("POST", "/api/generate", {"model": "gemma3-270m-q8", "keep_alive": -1}),
    ]
    assert loaded == {"gemma3-270m-q8"}


@ensure_deferred
async def test_ollama_script_unknown_previous_and_unknown_model() -> None:
    loaded = {"a:latest"}
    fake = _Recorder(_ollama(loaded, {"a:latest"}))
    port, url = _listen(fake)
    try:
        error = swap_error(await _run_script("ollama.sh", url, None, "nope"))
    finally:
        await port.stopListening()
    if shutil.which("jq"):
        assert fake.requests[0] == ("GET", "/api/ps", None)
        assert fake.requests[1] == ("POST", "/api/generate", {"model": "a:latest", "keep_alive": 0})
    assert fake.requests[-1] == ("POST", "/api/generate", {"model": "nope", "keep_alive": -1})
    assert error.cause == ("swap script exited with status 1: "
                           "Ollama could not load nope (HTTP 404): model 'nope' not found")


@ensure_deferred
async def test_ollama_script_unreachable() -> None:
    port, url = _listen(_Recorder(lambda *a: (500, b"{}")))
    await port.stopListening()
    error = swap_error(await _run_script("ollama.sh", url, "a", "b"))
    assert error.cause == f"swap script exited with status 1: cannot reach Ollama at {url}"


def _router(status: dict[str, str],
            unload_delay: float = 0.0) -> Callable[[str, str, Any], tuple[int, bytes]]:
    """Answers as captured from llama-server's router mode (the llamarouter-* files).

    With ``unload_delay``, an unloaded model stays "loaded" that long after the
    unload answer (its child llama-server takes time to exit).
    """
    from twisted.internet import reactor

    def error(code: int, message: str, kind: str = "invalid_request_error") -> tuple[int, bytes]:
        return code, json.dumps({"error": {"code": code, "message": message, "type": kind}},
                                separators=(",", ":")).encode()

    def finish_loading(name: str) -> None:
        status[name] = "loaded"

    def handle(method: str, path: str, body: Any) -> tuple[int, bytes]:
        if (method, path) == ("GET", "/models"):
            data = [{"id": n, "object": "model", "status": {"value": v}} for n, v in status.items()]
            return 200, json.dumps({"data": data, "object": "list"}).encode()
        name = body["model"]
        if path == "/models/unload":
            if status.get(name) not in ("loaded", "loading"):
                return error(400, "model is not running")
            if unload_delay:
                reactor.callLater(unload_delay, status.__setitem__, name, "unloaded")
            else:
                status[name] = "unloaded"
            return 200, b'{"success":true}'
        assert path == "/models/load"
        if name not in status:
            return 404, b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}'
        if status[name] in ("loaded", "loading"):
            return error(400, "model is already running")
        status[name] = "loading"
        reactor.callLater(0.3, finish_loading, name)
        return 200, b'{"success":true}'

    return handle


@ensure_deferred
async def test_router_script_swaps_and_waits_for_loaded() -> None:
    status = {"gemma3-270m-q4": "loaded", "gemma3-270m-q8": "unloaded"}
    fake = _Recorder(_router(status))
    port, url = _listen(fake)
    try:
        assert await _run_script("llama-router.sh", url, "gemma3-270m-q4",
                                 "gemma3-270m-q8") is None
    finally:
        await port.stopListening()
    posts = [r for r in fake.requests if r[0] == "POST"]
    assert posts == [("POST", "/models/unload", {"model": "gemma3-270m-q4"}),
                     ("POST", "/models/load", {"model": "gemma3-270m-q8"})]
    if shutil.which("jq"):
        assert fake.requests[-1][:2] == ("GET", "/models")
        assert status == {"gemma3-270m-q4": "unloaded", "gemma3-270m-q8": "loaded"}


@ensure_deferred
async def test_router_script_ignores_not_running_and_already_running() -> None:
    status = {"q4": "unloaded", "q8": "loaded"}
    fake = _Recorder(_router(status))
    port, url = _listen(fake)
    try:
        with capturedLogs() as events:
            assert await _run_script("llama-router.sh", url, "q4", "q8") is None
    finally:
        await port.stopListening()
    lines = [e["line"] for e in events if "line" in e]
    assert "q4 was not running" in lines
    assert "q8 is already running" in lines


@ensure_deferred
async def test_router_script_unknown_model() -> None:
    port, url = _listen(_Recorder(_router({"q4": "loaded"})))
    try:
        error = swap_error(await _run_script("llama-router.sh", url, "q4", "q9"))
    finally:
        await port.stopListening()
    assert error.cause == ("swap script exited with status 1: "
                           "the router does not know model q9 (HTTP 404)")


@ensure_deferred
async def test_systemd_script_with_a_stub_systemctl(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    stub = write_script(tmp_path / "systemctl", f"""\
        echo "$*" >> {log}
        if [ "$1" = restart ] && [ "$2" = "llama-server@broken.service" ]; then
            echo "Job for $2 failed because the control process exited with error code." >&2
            exit 1
        fi
        """)
    env = {"SYSTEMCTL": str(stub)}
    assert await _run_script("llama-server-systemd.sh", "http://127.0.0.1:9", "qwen-7b",
                             "llama-8b", **env) is None
    assert await _run_script("llama-server-systemd.sh", "http://127.0.0.1:9", None,
                             "llama-8b", **env) is None
    error = swap_error(await _run_script("llama-server-systemd.sh", "http://127.0.0.1:9",
                                         "llama-8b", "broken", **env))
    bad_name = swap_error(await _run_script("llama-server-systemd.sh", "http://127.0.0.1:9",
                                            "broken", "org/model x", **env))
    assert bad_name.cause == ("swap script exited with status 2: model name 'org/model x' cannot "
                              "be a systemd instance name (use only A-Z a-z 0-9 : _ . -)")
    assert log.read_text().splitlines() == [
        "stop llama-server@qwen-7b.service", "restart llama-server@llama-8b.service",
        "stop llama-server@*.service", "restart llama-server@llama-8b.service",
        "stop llama-server@llama-8b.service", "restart llama-server@broken.service",
    ]
    assert error.cause == ("swap script exited with status 1: cannot start "
                           "llama-server@broken.service (see: journalctl -u "
                           "llama-server@broken.service)")


@ensure_deferred
async def test_pidfile_script_replaces_the_server(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b", "crash"):
        (models / f"{name}.gguf").write_bytes(b"GGUF")
    (models / "a.args").write_text("--host 127.0.0.1 --port 8080  # all on one port\n--ctx-size 64\n")
    # A stand-in llama-server: records its argv, runs until SIGTERM.
    server = write_script(tmp_path / "llama-server", f"""\
        echo "$$ $*" >> {tmp_path}/started
        case "$*" in *crash.gguf*) echo "error: failed to load model" >&2; exit 1 ;; esac
        trap 'kill $child 2>/dev/null; exit 0' TERM
        sleep 600 &
        child=$!
        wait
        """)
    env = {"LLAMA_SERVER": str(server), "LLAMA_MODELS_DIR": str(models),
           "LLAMA_PID_FILE": str(tmp_path / "server.pid"), "LLAMA_LOG_DIR": str(tmp_path / "logs"),
           "LLAMA_START_CHECK": "0.2"}
    pids: list[int] = []
    try:
        assert await _run_script("llama-server-pidfile.sh", "http://127.0.0.1:8080", None, "a",
                                 **env) is None
        first = read_pid(tmp_path / "server.pid")
        pids.append(first)
        assert not gone(first)
        assert (tmp_path / "started").read_text().split("\n")[0] == (
            f"{first} --model {models}/a.gguf --host 127.0.0.1 --port 8080 --ctx-size 64")

        assert await _run_script("llama-server-pidfile.sh", "http://127.0.0.1:8080", "a", "b",
                                 **env) is None
        second = read_pid(tmp_path / "server.pid")
        pids.append(second)
        assert second != first
        assert await wait_gone(first)
        assert not gone(second)

        error = swap_error(await _run_script("llama-server-pidfile.sh", "http://127.0.0.1:8080",
                                             "b", "missing", **env))
        assert error.cause == f"swap script exited with status 1: cannot find {models}/missing.gguf"
        assert not gone(second), "a bad model name must not stop the running server"

        error = swap_error(await _run_script("llama-server-pidfile.sh", "http://127.0.0.1:8080",
                                             "b", "crash", **env))
        assert error.cause == "swap script exited with status 1: error: failed to load model"
        assert await wait_gone(second)
        assert not (tmp_path / "server.pid").exists()
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- unload: the shipped scripts called with an empty {model} -----------------------


async def _unload(name: str, upstream: str, previous: str, *args: str,
                  **env: str) -> tuple[int, list[str], list[str]]:
    """Run a shipped script as Jano runs an unload through ``[swap] command =
    [script, "{model}", "{previous}"]``: ``{model}`` empty, ``{previous}`` the
    model to unload (``args``, when given, replace that argv).  Returns the exit
    status and the stdout and stderr lines."""
    from twisted.internet.utils import getProcessOutputAndValue

    if name in ("ollama.sh", "llama-router.sh"):
        needs_curl()
    script = REPO / "etc" / name if name == "swap-model.example.sh" else SCRIPTS / name
    full = {k: v for k, v in os.environ.items() if not k.startswith("JANO_")}
    full.update(JANO_ACTION="unload", JANO_MODEL="", JANO_PREVIOUS_MODEL=previous,
                JANO_UPSTREAM=upstream, JANO_GROUP="gpu0", **env)
    argv = list(args) if args else ["", previous]
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        str(script), argv, env=full, reactor=_reactor())
    d.addTimeout(LIMIT, _reactor())
    out, err, code = await d
    return code, out.decode().splitlines(), err.decode().splitlines()


def _stub_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    """A systemctl that logs its arguments; stopping llama-server@stuck fails."""
    log = tmp_path / "calls"
    stub = write_script(tmp_path / "systemctl", f"""\
        echo "$*" >> {log}
        if [ "$1" = stop ] && [ "$2" = "llama-server@stuck.service" ]; then
            echo "Job for $2 canceled." >&2
            exit 1
        fi
        """)
    return stub, log


@ensure_deferred
async def test_systemd_script_unload(tmp_path: Path) -> None:
    stub, log = _stub_systemctl(tmp_path)
    code, out, err = await _unload("llama-server-systemd.sh", "http://127.0.0.1:9", "qwen-7b",
                                   SYSTEMCTL=str(stub))
    assert (code, err) == (0, [])
    assert out[-1] == "qwen-7b unloaded (llama-server@qwen-7b.service stopped)"
    assert log.read_text().splitlines() == ["stop llama-server@qwen-7b.service"]

    # A "[swap] unload = [script, '{model}']" command: JANO_ACTION says it is an unload.
    log.unlink()
    code, out, err = await _unload("llama-server-systemd.sh", "http://127.0.0.1:9", "qwen-7b",
                                   "qwen-7b", SYSTEMCTL=str(stub))
    assert (code, err) == (0, [])
    assert log.read_text().splitlines() == ["stop llama-server@qwen-7b.service"]

    log.unlink()
    code, out, err = await _unload("llama-server-systemd.sh", "http://127.0.0.1:9", "stuck",
                                   SYSTEMCTL=str(stub))
    assert code == 1
    assert err[-1] == ("cannot stop llama-server@stuck.service "
                       "(see: journalctl -u llama-server@stuck.service)")
    assert log.read_text().splitlines() == ["stop llama-server@stuck.service"]


@ensure_deferred
async def test_pidfile_script_unload(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"GGUF")
    server = write_script(tmp_path / "llama-server", f"""\
        echo "$$ $*" >> {tmp_path}/started
        trap 'kill $child 2>/dev/null; exit 0' TERM
        sleep 600 &
        child=$!
        wait
        """)
    env = {"LLAMA_SERVER": str(server), "LLAMA_MODELS_DIR": str(models),
           "LLAMA_PID_FILE": str(tmp_path / "server.pid"), "LLAMA_LOG_DIR": str(tmp_path / "logs"),
           "LLAMA_START_CHECK": "0.2"}
    pid = 0
    try:
        assert await _run_script("llama-server-pidfile.sh", "http://127.0.0.1:8080", None, "a",
                                 **env) is None
        pid = read_pid(tmp_path / "server.pid")
        assert not gone(pid)

        code, out, err = await _unload("llama-server-pidfile.sh", "http://127.0.0.1:8080", "a",
                                       **env)
        assert (code, err) == (0, [])
        assert gone(pid), "exit 0 means the server has exited"
        assert out[-1] == f"a unloaded (llama-server pid {pid} stopped)"
        assert not (tmp_path / "server.pid").exists()
        assert len((tmp_path / "started").read_text().splitlines()) == 1, "nothing new started"

        # Unloading again: nothing runs, which is fine.
        code, out, err = await _unload("llama-server-pidfile.sh", "http://127.0.0.1:8080", "a",
                                       **env)
        assert (code, err) == (0, [])
        assert out[-1] == (f"no llama-server running (pid file: {tmp_path}/server.pid): "
                           "a is not loaded")
        assert len((tmp_path / "started").read_text().splitlines()) == 1
    finally:
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@ensure_deferred
async def test_ollama_script_unload_waits_until_gone() -> None:
    loaded = {"gemma3-270m"}
    fake = _Recorder(_ollama(loaded, {"gemma3-270m", "gemma3-270m-q8"}, unload_delay=0.4))
    port, url = _listen(fake)
    try:
        code, out, err = await _unload("ollama.sh", url, "gemma3-270m")
        assert (code, err) == (0, [])
        assert loaded == set(), "exit 0 came before Ollama had let the model go"
        assert out[-1] == "gemma3-270m unloaded"
        assert [r for r in fake.requests if r[0] == "POST"] == [
            ("POST", "/api/generate", {"model": "gemma3-270m", "keep_alive": 0})]
        polls = [r for r in fake.requests if r == ("GET", "/api/ps", None)]
        assert len(polls) >= 2, "it must poll /api/ps until the model is gone"

        # A model Ollama does not know is not loaded either.
        code, out, err = await _unload("ollama.sh", url, "nope")
        assert (code, err) == (0, [])
        assert out[-1] == "nope is not known to Ollama: nothing to unload"
    finally:
        await port.stopListening()
    assert all(r[2] is None or r[2].get("keep_alive") == 0 for r in fake.requests), \
        "an unload loads nothing"

    error_url = url  # nothing listens there now
    code, out, err = await _unload("ollama.sh", error_url, "gemma3-270m")
    assert code == 1
    assert err[-1] == f"cannot reach Ollama at {error_url}"


@ensure_deferred
async def test_router_script_unload_waits_until_unloaded() -> None:
    status = {"q4": "loaded", "q8": "unloaded"}
    fake = _Recorder(_router(status, unload_delay=0.4))
    port, url = _listen(fake)
    try:
        code, out, err = await _unload("llama-router.sh", url, "q4")
        assert (code, err) == (0, [])
        assert [r for r in fake.requests if r[0] == "POST"] == [
            ("POST", "/models/unload", {"model": "q4"})]
        if shutil.which("jq"):
            assert status == {"q4": "unloaded", "q8": "unloaded"}, \
                "exit 0 came before the router had unloaded the model"
            assert out[-1] == "q4 unloaded"
            assert len([r for r in fake.requests if r[:2] == ("GET", "/models")]) >= 2

        # Not running (any more): nothing to do.
        if not shutil.which("jq"):
            await sleep(0.5)  # it did not wait: let the fake finish unloading
        code, out, err = await _unload("llama-router.sh", url, "q4")
        assert (code, err) == (0, [])
        assert out[-1] == "q4 was not running: nothing to unload"
    finally:
        await port.stopListening()
    assert not [r for r in fake.requests if r[1] == "/models/load"], "an unload loads nothing"
    assert status["q8"] == "unloaded"


@pytest.mark.parametrize("name", ["llama-server-systemd.sh", "llama-server-pidfile.sh",
                                  "ollama.sh", "llama-router.sh", "swap-model.example.sh"])
@ensure_deferred
async def test_unload_of_nothing_exits_zero(name: str, tmp_path: Path) -> None:
    """Empty {model} and empty {previous}: exit 0, start nothing, never fail."""
    log = tmp_path / "calls"
    # Stopping every instance fails here: a best effort must still exit 0.
    failing = write_script(tmp_path / "systemctl-failing", f"""\
        echo "$*" >> {log}
        echo "Failed to stop llama-server@*.service: Access denied" >&2
        exit 1
        """)
    env = {"SYSTEMCTL": str(failing), "LLAMA_SERVER": str(tmp_path / "llama-server"),
           "LLAMA_MODELS_DIR": str(tmp_path), "LLAMA_PID_FILE": str(tmp_path / "server.pid"),
           "LLAMA_LOG_DIR": str(tmp_path / "logs")}
    loaded = {"a:latest"}
    ollama = _Recorder(_ollama(loaded, {"a:latest"}))
    status = {"q4": "loaded", "q8": "unloaded"}
    router = _Recorder(_router(status))
    fake = {"ollama.sh": ollama, "llama-router.sh": router}.get(name, _Recorder(_router({})))
    port, url = _listen(fake)
    try:
        code, out, err = await _unload(name, url, "", **env)
        assert code == 0, err
        assert out, "it says what it did"
    finally:
        await port.stopListening()
    if name == "llama-server-systemd.sh":
        assert log.read_text().splitlines() == ["stop llama-server@*.service"]
        assert err[-1] == "warning: cannot stop the running llama-server instances"
    assert not (tmp_path / "logs").exists(), "nothing started"
    assert all(r[2] is None or r[2].get("keep_alive") == 0 for r in ollama.requests)
    assert not [r for r in router.requests if r[1] == "/models/load"]
    if shutil.which("jq"):  # then it can see what is loaded, and unloads it
        assert loaded == (set() if name == "ollama.sh" else {"a:latest"})
        assert status["q4"] == ("unloaded" if name == "llama-router.sh" else "loaded")

    # The same with the backend unreachable (url: nothing listens there now).
    code, out, err = await _unload(name, url, "", **env)
    assert code == 0, err
