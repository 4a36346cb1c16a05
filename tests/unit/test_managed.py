"""
Managed model servers on the strict fake process reactor: the supervisor's
spawns, signals and crash counting, and the managed swapper's phases.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from jano.errors import SwapError
from jano.records import ModelSpec
from jano.swap.child import server_argv
from jano.swap.managed import ManagedSwapper
from jano.swap.supervisor import Supervisor
from jano.swap.swapper import ScriptSwapper
from jano.testing import FakeProcessReactor

BASE_ENV = {"PATH": "/usr/bin:/bin"}


def managed(name: str, port: int, **kw: Any) -> ModelSpec:
    return ModelSpec(name, f"http://127.0.0.1:{port}", group="gpu", port=port,
                     command=("llama-server", "-m", "/m/{model}.gguf", "--port", "{port}"), **kw)


A = managed("qwen", 10100, env=(("CUDA_VISIBLE_DEVICES", "0"),), cwd="/srv/models")
B = managed("coder", 10101, stop_timeout=3.0)
S = ModelSpec("old", "http://127.0.0.1:8080", group="gpu")


class Probe:
    """Answers from a list; ``None`` is a connection refused."""

    def __init__(self, *answers: Optional[int]) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    def __call__(self, url: str) -> Deferred[int]:
        self.urls.append(url)
        answer = self.answers.pop(0) if self.answers else 503
        if answer is None:
            return fail(ConnectionRefusedError("refused"))
        return succeed(answer)


class Rig:
    def __init__(self, *answers: Optional[int], busy: frozenset[int] = frozenset(),
                 script: bool = False, ready_timeout: float = 30.0) -> None:
        self.reactor = FakeProcessReactor()
        self.crashes: list[tuple[str, str, float]] = []
        self.supervisor = Supervisor(
            self.reactor, log_bytes=4096, backoff=2.0, backoff_max=10.0,
            on_crash=lambda spec, cause, backoff: self.crashes.append((spec.name, cause, backoff)),
            killpg=self.reactor.killpg, is_free=lambda port: port not in busy, env=BASE_ENV)
        self.probe = Probe(*answers)
        self.script = (ScriptSwapper(self.reactor, ["/opt/swap.sh", "{model}", "{previous}"],
                                     swap_timeout=60.0, ready_timeout=30.0, probe=self.probe,
                                     env=BASE_ENV, killpg=self.reactor.killpg)
                       if script else None)
        self.swapper = ManagedSwapper(self.reactor, self.supervisor, self.script, self.probe,
                                      ready_timeout=ready_timeout, poll_interval=0.5)

    def result(self, d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        assert out, "not fired"
        return out[0]

    def error(self, d: Deferred[Any]) -> SwapError:
        failure = self.result(d)
        assert isinstance(failure, Failure) and isinstance(failure.value, SwapError), failure
        return failure.value


def test_a_start_spawns_the_command_in_its_own_session_with_its_env_and_cwd() -> None:
    rig = Rig(None, 503, 200)
    argv = ["llama-server", "-m", "/m/qwen.gguf", "--port", "10100"]
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0", "JANO_MODEL": "qwen",
           "JANO_PORT": "10100"}
    rig.reactor.expect_spawn(server_argv(argv), executable=sys.executable, env=env,
                             path="/srv/models")
    d = rig.swapper.swap("gpu", None, A)
    proc = rig.reactor.processes[-1]
    assert proc.args[:2] == [sys.executable, "-S"] and "PR_SET_PDEATHSIG" in proc.args[3]
    assert proc.closed == [0], "stdin is closed at once"
    proc.stdout(b"main: loading model\nmain: HTTP server is listening")
    proc.stderr(b"load_tensors: offloaded 29/29 layers\n")
    # t=0 refused (not listening yet), t=0.5 503 (listening, loading), t=1 200
    rig.reactor.advance(0.5)
    rig.reactor.advance(0.5)
    assert rig.result(d) == {"stop": 0.0, "start": 0.5, "ready": 0.5}
    assert rig.probe.urls == ["http://127.0.0.1:10100/health"] * 3
    child = rig.supervisor.children["qwen"]
    assert child.state == "running" and child.pid == proc.original_pid
    assert rig.supervisor.ring("qwen") is not None
    assert [e.text for e in child.ring.lines()][-2:] == ["main: loading model",
                                                         "load_tensors: offloaded 29/29 layers"]
    status = rig.supervisor.statuses()["qwen"]
    assert (status["state"], status["port"], status["restarts"], status["last_failure"]) == (
        "running", 10100, 0, None)


def test_a_swap_stops_the_previous_server_and_waits_for_its_exit_before_starting() -> None:
    rig = Rig(200, 503, 200)
    rig.swapper.swap("gpu", None, A)
    a = rig.reactor.processes[-1]
    d = rig.swapper.swap("gpu", A, B)
    assert rig.reactor.killpg_calls == [(a.original_pid, signal.SIGTERM)]
    assert len(rig.reactor.processes) == 1, "nothing starts while the old server lives"
    rig.reactor.advance(1.5)
    a.exit(0)
    b = rig.reactor.processes[-1]
    assert b is not a and b.args[-1] == "10101"
    rig.reactor.advance(0.5)
    rig.reactor.advance(0.5)
    assert rig.result(d) == {"stop": 1.5, "start": 0.0, "ready": 0.5}
    assert rig.supervisor.children["qwen"].state == "stopped"


def test_a_server_that_ignores_sigterm_is_killed_after_its_stop_timeout() -> None:
    rig = Rig(200)
    rig.swapper.swap("gpu", None, B)
    b = rig.reactor.processes[-1]
    stopped = rig.supervisor.stop("coder")
    rig.reactor.advance(2.9)
    assert rig.reactor.killpg_calls == [(b.original_pid, signal.SIGTERM)]
    rig.reactor.advance(0.1)
    assert rig.reactor.killpg_calls[-1] == (b.original_pid, signal.SIGKILL)
    assert not stopped.called
    b.killed(signal.SIGKILL)
    assert rig.result(stopped) is None
    assert rig.supervisor.children["coder"].last_exit == "killed by signal 9 (SIGKILL)"
    rig.reactor.assert_idle()


def test_a_server_exiting_while_loading_fails_the_swap_with_its_last_lines_and_backs_off() -> None:
    rig = Rig(None, None, None)
    d = rig.swapper.swap("gpu", None, A)
    proc = rig.reactor.processes[-1]
    proc.stderr(b"llama_model_load: error loading model: tensor 'x' not found\n")
    proc.stderr(b"main: exiting due to model loading error\n")
    rig.reactor.advance(0.5)
    proc.exit(1)
    err = rig.error(d)
    assert err.result == "failed" and err.retry_after == 2.0
    assert err.cause == ("qwen exited with status 1: llama_model_load: error loading model: "
                         "tensor 'x' not found | main: exiting due to model loading error")
    assert dict(err.phases) == {"stop": 0.0, "start": 0.5}
    assert rig.crashes == [], "a failed start is the swap's failure, not a crash"
    d2 = rig.swapper.swap("gpu", None, A)
    rig.reactor.processes[-1].exit(1)
    assert rig.error(d2).retry_after == 4.0, "doubled for a second failure in a row"
    rig.reactor.assert_idle()


def test_a_server_that_never_gets_ready_is_stopped_and_the_swap_fails_not_ready() -> None:
    rig = Rig(*([503] * 100), ready_timeout=5.0)
    d = rig.swapper.swap("gpu", None, A)
    proc = rig.reactor.processes[-1]
    rig.reactor.advance(5.0)
    assert rig.reactor.killpg_calls == [(proc.original_pid, signal.SIGTERM)]
    assert not d.called, "it waits for the server to exit"
    proc.exit(0)
    err = rig.error(d)
    assert err.result == "not_ready" and "last health: 503" in err.cause
    assert err.retry_after == 2.0
    assert rig.supervisor.children["qwen"].last_failure == err.cause
    rig.reactor.assert_idle()


def test_a_busy_port_fails_clearly_without_spawning() -> None:
    rig = Rig(200, busy=frozenset({10100}))
    err = rig.error(rig.swapper.swap("gpu", None, A))
    assert err.cause == ("port 10100 for qwen is in use by another program; free it, or set "
                         "models[].port or processes.port_range")
    assert rig.reactor.processes == []


def test_a_spawn_that_raises_fails_the_swap() -> None:
    rig = Rig(200)

    def refuse(*a: Any, **kw: Any) -> Any:
        raise OSError(8, "Exec format error")

    rig.reactor.spawnProcess = refuse  # type: ignore[method-assign]
    err = rig.error(rig.swapper.swap("gpu", None, A))
    assert "cannot start qwen's server 'llama-server'" in err.cause and "Exec format" in err.cause


def test_a_crash_after_ready_is_reported_with_the_cause_and_a_growing_backoff() -> None:
    rig = Rig(200, 200)
    rig.swapper.swap("gpu", None, A)
    proc = rig.reactor.processes[-1]
    proc.stderr(b"CUDA error: out of memory\n")
    proc.killed(signal.SIGSEGV)
    assert rig.crashes == [("qwen", "qwen killed by signal 11 (SIGSEGV): CUDA error: out of "
                                    "memory", 2.0)]
    status = rig.supervisor.statuses()["qwen"]
    assert (status["state"], status["crashes"], status["pid"]) == ("crashed", 1, None)
    assert status["retry_at"] is not None
    rig.reactor.advance(2.0)
    rig.swapper.swap("gpu", None, A)
    rig.reactor.processes[-1].killed(signal.SIGKILL)
    assert rig.crashes[-1][2] == 4.0
    assert rig.supervisor.statuses()["qwen"]["restarts"] == 1


def test_a_crash_after_a_long_healthy_run_starts_the_backoff_again() -> None:
    rig = Rig(200, 200, 200)
    for _ in range(2):
        rig.swapper.swap("gpu", None, A)
        rig.reactor.processes[-1].exit(3)
    assert rig.crashes[-1][2] == 4.0
    rig.swapper.swap("gpu", None, A)
    rig.reactor.advance(120.0)
    rig.reactor.processes[-1].exit(3)
    assert rig.crashes[-1][2] == 2.0


def test_a_swap_between_a_managed_model_and_a_script_model_uses_each_tool() -> None:
    rig = Rig(200, 200, 200, script=True)
    rig.swapper.swap("gpu", None, A)
    a = rig.reactor.processes[-1]
    d = rig.swapper.swap("gpu", A, S)
    a.exit(0)
    script = rig.reactor.processes[-1]
    assert script.args[-3:] == ["/opt/swap.sh", "old", ""], "the script is told of no previous"
    script.exit(0)
    phases = rig.result(d)
    assert list(phases) == ["stop", "script", "ready"]
    d = rig.swapper.swap("gpu", S, A)
    unload = rig.reactor.processes[-1]
    assert unload.args[-3:] == ["/opt/swap.sh", "", "old"]
    assert unload.env is not None and unload.env["JANO_ACTION"] == "unload"
    unload.exit(0)
    assert rig.reactor.processes[-1].args[-1] == "10100"
    assert list(rig.result(d)) == ["stop", "start", "ready"]


def test_stop_all_stops_every_live_server() -> None:
    rig = Rig(200, 200)
    rig.swapper.swap("gpu", None, A)
    rig.swapper.start_and_wait(B)
    a, b = rig.reactor.processes
    done = rig.supervisor.stop_all()
    assert {pid for pid, sig in rig.reactor.killpg_calls} == {a.original_pid, b.original_pid}
    a.exit(0)
    assert not done.called
    b.exit(0)
    assert done.called
    rig.reactor.assert_idle()


def test_cancelling_a_start_stops_the_server() -> None:
    rig = Rig(*([503] * 10))
    d = rig.swapper.swap("gpu", None, A)
    proc = rig.reactor.processes[-1]
    d.addErrback(lambda f: None)
    d.cancel()
    assert rig.reactor.killpg_calls == [(proc.original_pid, signal.SIGTERM)]
    proc.exit(0)
    assert rig.supervisor.children["qwen"].state == "stopped"
    assert rig.supervisor.children["qwen"].crashes == 0, "a cancel is not a crash"
    rig.reactor.assert_idle()
