"""
In-memory tests of :mod:`jano.swap`: a fake process reactor, a ``Clock``, and
a probe stub.  Nothing is executed and no test sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from jano.records import ModelSpec
from jano.swap import (
    LineSplitter,
    ScriptSwapper,
    SwapCommandError,
    SwapError,
    SwapScriptProtocol,
    check_swap_command,
    http_probe,
    session_argv,
    substitute,
)
from jano.testing._process import ANY, FakeProcess, FakeProcessReactor

PREVIOUS = ModelSpec(name="qwen-7b", upstream="http://127.0.0.1:8081", group="gpu0")
TARGET = ModelSpec(name="llama-8b", upstream="http://127.0.0.1:8082", group="gpu0")
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/jano", "JANO_MODEL": "stale"}
COMMAND = ["/opt/jano/swap.sh", "{model}", "--from={previous}"]
SETSID = shutil.which("setsid")


class ProbeStub:
    """A probe whose answers the test scripts: ints, failures, or pending Deferreds."""

    def __init__(self, *answers: int | Exception | Deferred[int]) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    def __call__(self, url: str) -> Deferred[int]:
        self.urls.append(url)
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def make(reactor: FakeProcessReactor, probe: Callable[[str], Deferred[int]],
         **kwargs: Any) -> ScriptSwapper:
    options: dict[str, Any] = dict(swap_timeout=300.0, ready_timeout=60.0, probe=probe,
                                   env=BASE_ENV, killpg=reactor.killpg)
    options.update(kwargs)
    return ScriptSwapper(reactor, COMMAND, **options)


def outcome(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred (a Failure for an error); fail if not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def succeeded(result: Any) -> bool:
    """A swap's success: the seconds of its phases, the script's first."""
    return isinstance(result, dict) and list(result)[:1] == ["script"]


def swap_error(d: Deferred[Any]) -> SwapError:
    result = outcome(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert isinstance(result.value, SwapError), result
    return result.value


def line_events(events: Sequence[LogEvent]) -> list[tuple[str, str, str]]:
    return [(e["model"], e["stream"], e["line"]) for e in events if "line" in e]


def started(reactor: FakeProcessReactor, previous: Optional[ModelSpec] = PREVIOUS,
            probe: Optional[ProbeStub] = None,
            **kwargs: Any) -> tuple[Deferred[dict[str, float]], FakeProcess, ProbeStub]:
    probe = probe if probe is not None else ProbeStub(200)
    d = make(reactor, probe, **kwargs).swap("gpu0", previous, TARGET)
    assert not d.called
    return d, reactor.processes[-1], probe


# --- argv and environment -------------------------------------------------------


def test_argv_and_env_exactly() -> None:
    reactor = FakeProcessReactor()
    argv = ["/opt/jano/swap.sh", "llama-8b", "--from=qwen-7b"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/jano", "JANO_MODEL": "llama-8b",
           "JANO_PREVIOUS_MODEL": "qwen-7b", "JANO_UPSTREAM": "http://127.0.0.1:8082",
           "JANO_GROUP": "gpu0", "JANO_ACTION": "swap"}
    reactor.expect_spawn(session_argv(argv, SETSID), env=env, path=None)
    d, proc, _ = started(reactor)
    assert proc.executable == proc.args[0]
    assert proc.args[-3:] == argv
    assert proc.closed == [0], "stdin is closed at once"
    proc.exit(0)
    assert succeeded(outcome(d))
    reactor.assert_idle()


def test_an_unload_runs_the_command_with_an_empty_model_and_polls_nothing() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(200)
    d = make(reactor, probe).unload("gpu0", PREVIOUS)
    proc = reactor.processes[-1]
    assert proc.args[-3:] == ["/opt/jano/swap.sh", "", "--from=qwen-7b"]
    assert proc.env is not None
    assert {k: proc.env[k] for k in ("JANO_MODEL", "JANO_PREVIOUS_MODEL", "JANO_UPSTREAM",
                                     "JANO_GROUP", "JANO_ACTION")} == {
        "JANO_MODEL": "", "JANO_PREVIOUS_MODEL": "qwen-7b",
        "JANO_UPSTREAM": "http://127.0.0.1:8081", "JANO_GROUP": "gpu0", "JANO_ACTION": "unload"}
    assert not d.called
    proc.exit(0)
    assert succeeded(outcome(d))
    assert probe.urls == []  # an unloaded model has no health to wait for
    reactor.assert_idle()


def test_an_unload_command_of_its_own_gets_the_model_and_a_failure_is_a_swap_error() -> None:
    reactor = FakeProcessReactor()
    d = make(reactor, ProbeStub(200), unload_command=["/opt/jano/unload.sh", "{model}"]).unload(
        "gpu0", PREVIOUS)
    proc = reactor.processes[-1]
    assert proc.args[-2:] == ["/opt/jano/unload.sh", "qwen-7b"]
    proc.exit(3)
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(SwapError)
    assert isinstance(failure.value, SwapError) and failure.value.result == "failed"


def test_unknown_previous_is_empty() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor, previous=None)
    assert proc.args[-3:] == ["/opt/jano/swap.sh", "llama-8b", "--from="]
    assert proc.env is not None and proc.env["JANO_PREVIOUS_MODEL"] == ""
    proc.exit(0)
    assert succeeded(outcome(d))


def test_default_env_is_jano_environment_at_swap_time(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = FakeProcessReactor()
    swapper = ScriptSwapper(reactor, COMMAND, swap_timeout=1, ready_timeout=1,
                            probe=ProbeStub(200), killpg=reactor.killpg)
    monkeypatch.setenv("JANO_TEST_MARKER", "here")
    swapper.swap("default", None, TARGET)
    env = reactor.processes[0].env
    assert env is not None
    assert env["JANO_TEST_MARKER"] == "here"
    assert env == {**os.environ, "JANO_MODEL": "llama-8b", "JANO_PREVIOUS_MODEL": "",
                   "JANO_UPSTREAM": "http://127.0.0.1:8082", "JANO_GROUP": "default", "JANO_ACTION": "swap"}
    reactor.processes[0].exit(0)


def test_python_wrapper_without_setsid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jano.swap.swapper.shutil.which", lambda name: None)
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor)
    assert proc.executable == sys.executable
    assert proc.args[:2] == [sys.executable, "-c"]
    assert "os.setsid()" in proc.args[2] and "os.execvp(" in proc.args[2]
    assert len(proc.args[2].splitlines()) == 2
    assert proc.args[3:] == ["/opt/jano/swap.sh", "llama-8b", "--from=qwen-7b"]
    proc.exit(0)


def test_setsid_prefix() -> None:
    assert session_argv(["a", "b"], "/usr/bin/setsid") == ["/usr/bin/setsid", "a", "b"]


def test_substitute_is_one_pass() -> None:
    assert substitute(["{model}{previous}", "x={model}", "{other}", "{{model}}"],
                      "m{previous}", "p") == ["m{previous}p", "x=m{previous}", "{other}", "{m{previous}}"]


# --- output lines ---------------------------------------------------------------


def test_lines_are_logged_with_model_and_stream() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        d, proc, _ = started(reactor)
        proc.stdout(b"stopping qwen")
        proc.stdout(b"-7b\nstarting llama-8b\r\n")
        proc.stderr(b"warn: slow disk\n\nno newline at end")
        proc.stdout(b"{braces} are fine\n")
        proc.exit(0)
    assert line_events(events) == [
        ("llama-8b", "stdout", "stopping qwen-7b"),
        ("llama-8b", "stdout", "starting llama-8b"),
        ("llama-8b", "stderr", "warn: slow disk"),
        ("llama-8b", "stderr", ""),
        ("llama-8b", "stdout", "{braces} are fine"),
        ("llama-8b", "stderr", "no newline at end"),
    ]
    assert all(e["group"] == "gpu0" for e in events if "line" in e)
    assert succeeded(outcome(d))


def test_megabytes_without_newline_stay_bounded() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        d, proc, _ = started(reactor, max_line=100)
        chunk = b"y" * (1024 * 1024)
        for _ in range(5):
            proc.stdout(chunk)
            proc.stderr(chunk)
            assert isinstance(proc.protocol, SwapScriptProtocol)
            assert proc.protocol.buffered() <= 200
        proc.stdout(b"\nafter\n")
        proc.stderr(b"\nlast words\n")
        proc.exit(4)
    logged = [(e["stream"], e["line"], e["truncated"]) for e in events if "line" in e]
    assert logged == [("stdout", "y" * 100, True), ("stderr", "y" * 100, True),
                      ("stdout", "after", False), ("stderr", "last words", False)]
    assert swap_error(d).cause == "swap script exited with status 4: last words"


def test_last_stderr_line_is_bounded() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor, max_line=50)
    proc.stderr(b"z" * 10_000 + b"\n")
    proc.exit(2)
    assert swap_error(d).cause == "swap script exited with status 2: " + "z" * 50


def test_invalid_utf8_is_replaced() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor)
    proc.stderr(b"bad \xff byte\n")
    proc.exit(1)
    assert swap_error(d).cause == "swap script exited with status 1: bad \ufffd byte"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")),
       cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
       max_line=st.integers(min_value=1, max_value=20))
def test_line_splitter_matches_reference(data: bytes, cuts: list[int], max_line: int) -> None:
    splitter = LineSplitter(max_line)
    got: list[tuple[bytes, bool]] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        got += splitter.feed(data[start:cut])
        assert splitter.buffered <= max_line
        start = cut
    got += splitter.flush()
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    expected = [(p[:max_line], len(p) > max_line) for p in pieces]
    # A truncated line that ended with the data still shows once, truncated.
    assert got == expected


# --- failures -------------------------------------------------------------------


def test_nonzero_exit_carries_status_and_last_stderr_line() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub()
    d, proc, _ = started(reactor, probe=probe)
    proc.stderr(b"looking for model\ncannot find model.gguf\n")
    proc.stdout(b"stdout is not the error\n")
    proc.exit(3)
    error = swap_error(d)
    assert error.result == "failed"
    assert error.cause == "swap script exited with status 3: cannot find model.gguf"
    assert str(error) == error.cause
    assert probe.urls == []
    assert reactor.killpg_calls == []
    reactor.assert_idle()


def test_nonzero_exit_without_stderr() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor)
    proc.exit(1)
    assert swap_error(d).cause == "swap script exited with status 1"


def test_killed_by_someone_else() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor)
    proc.killed(signal.SIGKILL)
    error = swap_error(d)
    assert (error.result, error.cause) == ("failed", "swap script killed by signal 9 (SIGKILL)")


class _RefusingReactor(FakeProcessReactor):
    def spawnProcess(self, *args: Any, **kwargs: Any) -> FakeProcess:
        raise OSError(24, "Too many open files")


def test_spawn_failure() -> None:
    reactor = _RefusingReactor()
    d = make(reactor, ProbeStub()).swap("gpu0", PREVIOUS, TARGET)
    error = swap_error(d)
    assert error.result == "failed"
    assert error.cause == "cannot start swap script: [Errno 24] Too many open files"
    reactor.assert_idle()


# --- timeout and kill -----------------------------------------------------------


def test_timeout_terms_then_kills_the_group() -> None:
    reactor = FakeProcessReactor()
    d, proc, probe = started(reactor, kill_grace=5.0)
    pid = proc.original_pid
    proc.stderr(b"waiting for systemd\n")
    reactor.advance(299.9)
    assert reactor.killpg_calls == []
    reactor.advance(0.1)
    assert reactor.killpg_calls == [(pid, signal.SIGTERM)]
    assert not d.called
    reactor.advance(4.9)
    assert reactor.killpg_calls == [(pid, signal.SIGTERM)]
    reactor.advance(0.1)
    assert reactor.killpg_calls == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert not d.called, "waits for the process to be reaped"
    proc.killed(signal.SIGKILL)
    error = swap_error(d)
    assert error.result == "timeout"
    assert error.cause == "swap script timed out after 300s (killed): waiting for systemd"
    assert probe.urls == []
    reactor.assert_idle()


def test_timeout_term_is_enough() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor, swap_timeout=0.5)
    reactor.advance(0.5)
    proc.killed(signal.SIGTERM)
    error = swap_error(d)
    assert (error.result, error.cause) == ("timeout", "swap script timed out after 0.5s (killed)")
    reactor.advance(60)
    assert reactor.killpg_calls == [(proc.original_pid, signal.SIGTERM)]
    reactor.assert_idle()


def test_timeout_wins_over_a_late_exit_zero() -> None:
    reactor = FakeProcessReactor()
    d, proc, probe = started(reactor, swap_timeout=10)
    reactor.advance(10)
    proc.exit(0)  # the script traps TERM and exits 0: still a timeout
    assert swap_error(d).result == "timeout"
    assert probe.urls == []


def test_group_already_gone() -> None:
    reactor = FakeProcessReactor()
    calls: list[tuple[int, int]] = []

    def killpg(pgid: int, sig: int) -> None:
        calls.append((pgid, sig))
        raise ProcessLookupError(3, "No such process")

    d, proc, _ = started(reactor, swap_timeout=1, kill_grace=1, killpg=killpg)
    reactor.advance(1)
    reactor.advance(1)
    assert calls == [(proc.original_pid, signal.SIGTERM), (proc.original_pid, signal.SIGKILL)]
    proc.exit(0)
    assert swap_error(d).result == "timeout"
    reactor.assert_idle()


def test_cancel_while_the_script_runs() -> None:
    reactor = FakeProcessReactor()
    d, proc, probe = started(reactor, kill_grace=2)
    d.cancel()
    assert outcome(d).check(CancelledError)
    assert reactor.killpg_calls == [(proc.original_pid, signal.SIGTERM)]
    reactor.advance(2)
    assert reactor.killpg_calls[-1] == (proc.original_pid, signal.SIGKILL)
    proc.killed(signal.SIGKILL)
    reactor.advance(1000)
    assert probe.urls == []
    assert len(reactor.killpg_calls) == 2
    reactor.assert_idle()


# --- a script that leaves a process holding its pipes ----------------------------


def test_exit_zero_with_pipes_held_by_a_child() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        d, proc, probe = started(reactor)
        proc.exit(0, close_pipes=False)
        proc.stderr(b"server started\n")  # still read while lingering
        reactor.advance(0.9)
        assert not d.called and proc.closed == [0]
        reactor.advance(0.1)
    assert sorted(proc.closed) == [0, 1, 2]
    assert succeeded(outcome(d))
    assert probe.urls == ["http://127.0.0.1:8082/health"]
    assert reactor.killpg_calls == [], "never kill what a successful script started"
    assert ("llama-8b", "stderr", "server started") in line_events(events)
    assert any("still holds" in e["log_format"] for e in events)
    reactor.assert_idle()


def test_lingering_pipes_are_not_a_timeout() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor, swap_timeout=10)
    reactor.advance(9.5)
    proc.exit(0, close_pipes=False)
    reactor.advance(0.5)  # the swap timeout passes while the pipes linger
    assert reactor.killpg_calls == []
    reactor.advance(0.5)
    assert succeeded(outcome(d))
    reactor.assert_idle()


def test_cancel_after_exit_does_not_kill() -> None:
    reactor = FakeProcessReactor()
    d, proc, probe = started(reactor)
    proc.exit(0, close_pipes=False)
    d.cancel()
    assert outcome(d).check(CancelledError)
    reactor.advance(1)
    assert proc.ended
    assert reactor.killpg_calls == []
    assert probe.urls == []
    reactor.assert_idle()


# --- readiness ------------------------------------------------------------------


def test_polls_until_200() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(503, 503, 200)
    d, proc, _ = started(reactor, probe=probe, poll_interval=0.5)
    proc.exit(0)
    assert probe.urls == ["http://127.0.0.1:8082/health"]
    assert not d.called
    reactor.advance(0.5)
    assert len(probe.urls) == 2 and not d.called
    reactor.advance(0.5)
    assert len(probe.urls) == 3
    assert succeeded(outcome(d))
    reactor.advance(10)
    assert len(probe.urls) == 3
    reactor.assert_idle()


def test_probe_errors_mean_not_yet() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(ConnectionRefusedError(), 503, 200)
    d, proc, _ = started(reactor, probe=probe, poll_interval=1)
    proc.exit(0)
    reactor.advance(1)
    reactor.advance(1)
    assert succeeded(outcome(d))
    reactor.assert_idle()


def test_not_ready_after_ready_timeout() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(*([503] * 200))
    d, proc, _ = started(reactor, probe=probe, ready_timeout=60, poll_interval=0.5)
    proc.exit(0)
    reactor.pump([0.5] * 119)
    assert not d.called
    reactor.advance(0.5)
    error = swap_error(d)
    assert error.result == "not_ready"
    assert error.cause == "backend not ready after 60s (last health: 503)"
    count = len(probe.urls)
    reactor.advance(30)
    assert len(probe.urls) == count
    reactor.assert_idle()


def test_not_ready_names_the_last_probe_error() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(*([ConnectionRefusedError("Connection refused")] * 10))
    d, proc, _ = started(reactor, probe=probe, ready_timeout=2, poll_interval=0.5)
    proc.exit(0)
    reactor.pump([0.5] * 4)
    error = swap_error(d)
    assert error.result == "not_ready"
    assert error.cause.startswith("backend not ready after 2s (last health: ConnectionRefusedError")
    assert "Connection refused" in error.cause


def test_not_ready_while_a_probe_hangs() -> None:
    reactor = FakeProcessReactor()
    cancelled: list[bool] = []
    hanging: Deferred[int] = Deferred(lambda d: cancelled.append(True))
    d, proc, _ = started(reactor, probe=ProbeStub(hanging), ready_timeout=5)
    proc.exit(0)
    reactor.advance(5)
    error = swap_error(d)
    assert error.cause == "backend not ready after 5s (last health: no answer yet)"
    assert cancelled == [True]
    reactor.assert_idle()


def test_probe_raising_synchronously_is_not_yet() -> None:
    reactor = FakeProcessReactor()
    answers = iter([None, 200])

    def probe(url: str) -> Deferred[int]:
        answer = next(answers)
        if answer is None:
            raise RuntimeError("boom")
        return succeed(answer)

    d, proc, _ = started(reactor, probe=probe, poll_interval=1)  # type: ignore[arg-type]
    proc.exit(0)
    reactor.advance(1)
    assert succeeded(outcome(d))


def test_cancel_while_polling() -> None:
    reactor = FakeProcessReactor()
    cancelled: list[bool] = []
    hanging: Deferred[int] = Deferred(lambda d: cancelled.append(True))
    probe = ProbeStub(503, hanging)
    d, proc, _ = started(reactor, probe=probe, poll_interval=1)
    proc.exit(0)
    reactor.advance(1)
    d.cancel()
    assert outcome(d).check(CancelledError)
    assert cancelled == [True]
    reactor.advance(100)
    assert len(probe.urls) == 2
    assert reactor.killpg_calls == []
    reactor.assert_idle()


def test_two_groups_swap_independently() -> None:
    reactor = FakeProcessReactor()
    swapper = make(reactor, ProbeStub(200, 200))
    other = ModelSpec(name="embed", upstream="http://127.0.0.1:9000", group="gpu1")
    d1 = swapper.swap("gpu0", PREVIOUS, TARGET)
    d2 = swapper.swap("gpu1", None, other)
    p1, p2 = reactor.processes
    assert p1.original_pid != p2.original_pid
    p2.stderr(b"no such model\n")
    p2.exit(7)
    assert swap_error(d2).cause == "swap script exited with status 7: no such model"
    assert not d1.called
    p1.exit(0)
    assert succeeded(outcome(d1))


# --- the fake itself --------------------------------------------------------------


@pytest.mark.logs_errors  # a spawnProcess that raises is logged with its traceback
def test_fake_reactor_is_strict() -> None:
    reactor = FakeProcessReactor()
    reactor.expect_spawn(["/bin/true"], env=ANY)
    swapper = make(reactor, ProbeStub())
    d = swapper.swap("gpu0", PREVIOUS, TARGET)
    error = swap_error(d)  # the mismatch surfaces as a failed start
    assert "spawnProcess: args" in error.cause
    with pytest.raises(AssertionError, match="expected spawn never came|args"):
        reactor.assert_idle()


def test_fake_process_rules() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor)
    with pytest.raises(AssertionError, match="closed"):
        proc.output(0, b"x")
    with pytest.raises(TypeError):
        proc.stdout("text")  # type: ignore[arg-type]
    proc.exit(0)
    assert proc.pid is None
    with pytest.raises(AssertionError, match="ended"):
        proc.stdout(b"late")
    with pytest.raises(AssertionError, match="already exited"):
        proc.exit(0)
    with pytest.raises(ProcessLookupError):
        reactor.killpg(proc.original_pid, signal.SIGTERM)
    with pytest.raises(TypeError):
        reactor.spawnProcess(proc.protocol, "/bin/x", ["/bin/x", 3])  # type: ignore[list-item]


# --- check_swap_command ---------------------------------------------------------


def _script(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def test_check_swap_command_accepts(tmp_path: Path) -> None:
    _script(tmp_path / "swap-x.sh")
    check_swap_command([str(tmp_path / "swap-{model}.sh"), "{model}"])
    check_swap_command(["./swap-x.sh", "{previous}"], cwd=str(tmp_path))
    check_swap_command(["sh", "-c", "exit 0"])


@pytest.mark.parametrize("command, message", [
    ([], "swap.command is empty"),
    ([""], "program name (first element) is empty"),
    (["./missing.sh"], "'./missing.sh' not found (looked at"),
    (["./plain.sh"], "'./plain.sh' is not executable (try: chmod +x"),
    (["./"], "is a directory"),
    (["no-such-program-for-jano"], "'no-such-program-for-jano' not found on PATH"),
])
def test_check_swap_command_rejects(tmp_path: Path, command: list[str], message: str) -> None:
    _script(tmp_path / "plain.sh", mode=0o644)
    with pytest.raises(SwapCommandError) as info:
        check_swap_command(command, cwd=str(tmp_path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_check_swap_command_uses_cwd_default(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _script(tmp_path / "s.sh")
    monkeypatch.chdir(tmp_path)
    check_swap_command(["./s.sh"])
    (tmp_path / "s.sh").chmod(stat.S_IRUSR)
    if os.geteuid() != 0:  # root may execute anything with an x bit only
        with pytest.raises(SwapCommandError):
            check_swap_command(["./s.sh"])


def test_swapper_without_command_fails_each_swap() -> None:
    reactor = FakeProcessReactor()
    swapper = ScriptSwapper(reactor, [], swap_timeout=1, ready_timeout=1, probe=ProbeStub())
    error = swap_error(swapper.swap("gpu0", None, TARGET))
    assert (error.result, error.cause) == ("failed",
                                           "no swap command is configured ([swap] command)")
    assert reactor.processes == []


# --- http_probe -----------------------------------------------------------------


class _Health(Resource):
    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.codes.pop(0))
        return b'{"status":"ok"}' * 10_000  # long enough to be cut off


def test_http_probe_reports_status_codes() -> None:
    from treq.testing import RequestTraversalAgent

    agent = RequestTraversalAgent(_Health([503, 200]))
    clock = Clock()
    probe = http_probe(agent, timeout=5, clock=clock)
    first = probe("http://127.0.0.1:8082/health")
    agent.flush()
    assert outcome(first) == 503
    second = probe("http://127.0.0.1:8082/health")
    agent.flush()
    assert outcome(second) == 200
    assert clock.getDelayedCalls() == []


class _Agent:
    """An IAgent whose requests end as the test says."""

    def __init__(self, result: Callable[[], Deferred[Any]]) -> None:
        self.result = result

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        return self.result()


def _agent(result: Callable[[], Deferred[Any]]) -> Any:
    from twisted.web.iweb import IAgent
    from zope.interface import directlyProvides

    agent = _Agent(result)
    directlyProvides(agent, IAgent)
    return agent


def test_http_probe_connection_error() -> None:
    probe = http_probe(_agent(lambda: fail(ConnectionRefusedError())), clock=Clock())
    result = outcome(probe("http://127.0.0.1:1/health"))
    assert isinstance(result, Failure) and result.check(ConnectionRefusedError)


def test_http_probe_timeout() -> None:
    clock = Clock()
    probe = http_probe(_agent(lambda: Deferred()), timeout=2, clock=clock)
    d = probe("http://127.0.0.1:1/health")
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    result = outcome(d)
    assert isinstance(result, Failure) and result.check(TimeoutError)
    assert result.getErrorMessage() == "no answer within 2s"


def test_http_probe_rejects_other_things() -> None:
    with pytest.raises(TypeError, match="treq HTTPClient"):
        http_probe(object())


def test_a_swap_reports_its_script_and_ready_phases_and_the_models_it_evicts() -> None:
    reactor = FakeProcessReactor()
    probe = ProbeStub(503, 200)
    other = ModelSpec("embed", "http://127.0.0.1:8090", group="gpu0")
    d = make(reactor, probe, poll_interval=0.5).swap("gpu0", PREVIOUS, TARGET,
                                                      evict=(PREVIOUS, other))
    proc = reactor.processes[-1]
    assert proc.env is not None and proc.env["JANO_EVICT"] == "qwen-7b,embed"
    reactor.advance(2.0)
    proc.exit(0)
    reactor.advance(0.5)
    assert outcome(d) == {"script": 2.0, "ready": 0.5}
    reactor.assert_idle()


def test_a_failed_readiness_keeps_the_phases_it_ran() -> None:
    reactor = FakeProcessReactor()
    d, proc, _ = started(reactor, probe=ProbeStub(*([503] * 200)), ready_timeout=3.0)
    reactor.advance(1.0)
    proc.exit(0)
    for _ in range(10):
        reactor.advance(0.5)
    err = swap_error(d)
    assert err.result == "not_ready"
    assert err.phases == (("script", 1.0), ("ready", 3.0))
