"""
Run the swap script that moves a group's GPU slot from one model to another.

The contract with the script (argv, environment, exit status, timeouts) is
written out at the top of ``etc/swap-model.example.sh``; in short: Jano runs
``[swap] command`` with ``{model}``/``{previous}`` substituted, in a process
group of its own, logs every output line, and takes exit status 0 as "the
switch was made".  It then polls the target model's health URL until it
answers 200.  Anything else ends in one :class:`SwapError` whose ``cause`` is a
single line fit for a client's 503 answer.

The reactor is injected: tests drive :class:`jano.testing.FakeProcessReactor`,
production passes the real one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from typing import (
    Any,
    Callable,
    Literal,
    Mapping,
    Optional,
    Protocol as TypingProtocol,
    Sequence,
    cast,
)

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse

from jano.records import ModelSpec

__all__ = [
    "SwapError",
    "SwapCommandError",
    "SwapReactor",
    "ScriptSwapper",
    "SwapScriptProtocol",
    "LineSplitter",
    "check_swap_command",
    "substitute",
    "session_argv",
    "http_probe",
]

SwapFailure = Literal["failed", "timeout", "not_ready"]

#: Wrapper used when no ``setsid`` program is installed: start a new session
#: (so the child's pid is its process group id), then become the command.
_SETSID_PY = "import os, sys\nos.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"

_PLACEHOLDER = re.compile(r"\{(model|previous)\}")


class SwapError(Exception):
    """
    A swap attempt that did not end with a ready model.

    :ivar result: what went wrong, as recorded in ``SwapEvent.result``.
    :ivar cause: one human-readable line, shown to clients in the 503 answer.
    """

    def __init__(self, result: SwapFailure, cause: str) -> None:
        super().__init__(cause)
        self.result: SwapFailure = result
        self.cause: str = cause

    def __repr__(self) -> str:
        return f"SwapError({self.result!r}, {self.cause!r})"


class SwapCommandError(Exception):
    """The configured swap command cannot run; ``str()`` is the one-line reason."""


class SwapReactor(TypingProtocol):
    """What :class:`ScriptSwapper` needs from a reactor: processes and time."""

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        path: Optional[str] = None,
    ) -> Any:
        """:return: the process transport (an ``IProcessTransport``)."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> IDelayedCall:
        """Run ``callable`` after ``delay`` seconds."""

    def seconds(self) -> float:
        """The current time, in seconds."""


def _secs(value: float) -> str:
    """``300.0`` -> ``"300s"``, ``0.5`` -> ``"0.5s"``."""
    return f"{value:g}s"


def substitute(command: Sequence[str], model: str, previous: str) -> list[str]:
    """
    Replace ``{model}`` and ``{previous}`` in every element of ``command``.

    One pass, so a model name that itself contains ``{previous}`` is not
    substituted again; every other brace is left alone.
    """
    values = {"model": model, "previous": previous}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


def check_swap_command(command: Sequence[str], *, cwd: Optional[str] = None) -> None:
    """
    Fail at start-up, not at the first swap, when the swap command cannot run.

    ``argv[0]`` (placeholders replaced by ``x``) containing a ``/`` is resolved
    against ``cwd`` (default: the current directory), as the shell and
    ``execvp`` do; otherwise it is looked up on ``PATH``.

    :raises SwapCommandError: with a one-line reason.
    """
    if not command:
        raise SwapCommandError("swap.command is empty: give the script and its arguments, "
                               "e.g. [\"etc/swap-model.sh\", \"{model}\", \"{previous}\"]")
    argv0 = substitute(command[:1], "x", "x")[0]
    if not argv0:
        raise SwapCommandError("swap.command: the program name (first element) is empty")
    if "/" in argv0:
        path = os.path.join(cwd if cwd is not None else os.getcwd(), argv0)
        if not os.path.exists(path):
            raise SwapCommandError(f"swap.command: {argv0!r} not found (looked at {path})")
        if os.path.isdir(path):
            raise SwapCommandError(f"swap.command: {argv0!r} is a directory ({path})")
        if not os.access(path, os.X_OK):
            raise SwapCommandError(f"swap.command: {argv0!r} is not executable "
                                   f"(try: chmod +x {path})")
    elif shutil.which(argv0) is None:
        raise SwapCommandError(f"swap.command: {argv0!r} not found on PATH "
                               "(give a path containing '/' or install it)")


def session_argv(argv: Sequence[str], setsid: Optional[str] = None) -> list[str]:
    """
    The argv that runs ``argv`` as the leader of a new session and process group.

    With util-linux ``setsid`` (which execs without forking when its caller is
    not a group leader, as a freshly spawned child never is) the child's pid
    is its process group id.  Without it, a two-line Python wrapper does the
    same.

    :param setsid: path of the ``setsid`` program, ``None`` to use the wrapper.
    """
    if setsid:
        return [setsid, *argv]
    return [sys.executable, "-c", _SETSID_PY, *argv]


class LineSplitter:
    """
    Split a byte stream into lines without ever holding more than ``max_line``
    bytes.

    A line longer than ``max_line`` is returned truncated as soon as it
    overflows; the rest of it, up to the next newline, is dropped.
    """

    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._max = max_line
        self._buf = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes of the current partial line that are held (never above ``max_line``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """
        :return: the lines completed by ``data`` (without ``\\n``), each with a
            flag telling whether it was truncated.
        """
        out: list[tuple[bytes, bool]] = []
        start, end_of_data = 0, len(data)
        while start < end_of_data:
            newline = data.find(b"\n", start)
            stop = end_of_data if newline < 0 else newline
            if not self._skipping:
                room = self._max - len(self._buf)
                if stop - start <= room:
                    self._buf += data[start:stop]
                else:
                    self._buf += data[start:start + room]
                    out.append((bytes(self._buf), True))
                    self._buf.clear()
                    self._skipping = True
            if newline < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                out.append((bytes(self._buf), False))
                self._buf.clear()
            start = newline + 1
        return out

    def flush(self) -> list[tuple[bytes, bool]]:
        """Return the unterminated last line, if any, and reset."""
        out = [(bytes(self._buf), False)] if self._buf else []
        self._buf.clear()
        self._skipping = False
        return out


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class SwapScriptProtocol(ProcessProtocol):
    """
    Watch one run of the swap script: log its lines, keep its last stderr
    line, and fire :attr:`ended` exactly once, from :meth:`processEnded`.

    :ivar ended: fires ``None`` on exit status 0, fails with
        :class:`SwapError` (``result="failed"``) on any other end.
    """

    log = Logger()

    def __init__(self, model: str, group: str, max_line: int = 4096) -> None:
        self.model = model
        self.group = group
        self.ended: Deferred[None] = Deferred()
        self.last_stderr: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.signal: Optional[int] = None
        #: Called once the script itself has exited, possibly before
        #: :meth:`processEnded` (a process it left behind may hold its pipes).
        self.on_exit: Optional[Callable[[], None]] = None
        self._splitters = {1: LineSplitter(max_line), 2: LineSplitter(max_line)}

    def buffered(self) -> int:
        """Bytes of unterminated lines held right now (at most ``2 * max_line``)."""
        return sum(s.buffered for s in self._splitters.values())

    def connectionMade(self) -> None:
        # The script gets no input: reading stdin must see EOF, not hang.
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        splitter = self._splitters.get(childFD)
        if splitter is not None:
            self._emit(childFD, splitter.feed(data))

    def _emit(self, fd: int, lines: list[tuple[bytes, bool]]) -> None:
        stream = "stdout" if fd == 1 else "stderr"
        for raw, truncated in lines:
            line = _decode(raw)
            if fd == 2 and line.strip():
                self.last_stderr = line.strip()
            self.log.info("swap to {model} ({group}) {stream}: {line}", model=self.model,
                          group=self.group, stream=stream, line=line, truncated=truncated)

    def processExited(self, reason: Failure) -> None:
        if self.on_exit is not None:
            self.on_exit()

    def processEnded(self, reason: Failure) -> None:
        for fd, splitter in self._splitters.items():
            self._emit(fd, splitter.flush())
        if reason.check(ProcessDone):
            self.exit_code = 0
            self.ended.callback(None)
            return
        value = reason.value
        if isinstance(value, ProcessTerminated):
            self.exit_code, self.signal = value.exitCode, value.signal
        if self.signal is not None:
            what = f"swap script killed by signal {self.signal} ({_signal_name(self.signal)})"
        elif self.exit_code is not None:
            what = f"swap script exited with status {self.exit_code}"
        else:
            what = f"swap script ended abnormally ({reason.getErrorMessage()})"
        if self.last_stderr:
            what += f": {self.last_stderr}"
        self.ended.errback(SwapError("failed", what))


def _describe(failure: Failure) -> str:
    """A short phrase for a probe failure, for the ``not_ready`` message."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived and friends
    if reasons and isinstance(reasons[0], Failure):
        return _describe(reasons[0])
    message = failure.getErrorMessage().strip()
    name = type(value).__name__
    text = f"{name}: {message}" if message and message != name else name
    return text if len(text) <= 200 else text[:197] + "..."


class _Attempt:
    """One swap: the script phase, then the readiness phase; one result."""

    log = Logger()

    def __init__(self, swapper: ScriptSwapper, group: str, previous: Optional[ModelSpec],
                 target: ModelSpec) -> None:
        self._s = swapper
        self._reactor = swapper._reactor
        self.group = group
        self.previous = previous
        self.target = target
        self.result: Deferred[None] = Deferred(self._cancel)
        self._done = False
        self._phase: Literal["script", "ready"] = "script"
        self._pid: Optional[int] = None
        self._transport: Optional[IProcessTransport] = None
        self._protocol: Optional[SwapScriptProtocol] = None
        self._script_running = False
        self._exited = False
        self._timed_out = False
        self._deadline_call: Optional[IDelayedCall] = None
        self._kill_call: Optional[IDelayedCall] = None
        self._linger_call: Optional[IDelayedCall] = None
        self._poll_call: Optional[IDelayedCall] = None
        self._probe_d: Optional[Deferred[int]] = None
        self._last_health: Optional[str] = None
        self._started_at = self._reactor.seconds()

    # --- script phase ---------------------------------------------------------

    def start(self) -> None:
        s = self._s
        previous = self.previous.name if self.previous is not None else ""
        argv = substitute(s.command, self.target.name, previous)
        env = dict(os.environ if s._env is None else s._env)
        env.update(JANO_MODEL=self.target.name, JANO_PREVIOUS_MODEL=previous,
                   JANO_UPSTREAM=self.target.upstream, JANO_GROUP=self.group)
        args = session_argv(argv, s._setsid)
        self._protocol = SwapScriptProtocol(self.target.name, self.group, s._max_line)
        try:
            self._transport = self._reactor.spawnProcess(self._protocol, args[0], args, env=env)
        except Exception as e:
            if not isinstance(e, OSError):
                self.log.failure("swap to {model}: spawnProcess failed", model=self.target.name)
            self._finish(Failure(SwapError("failed", f"cannot start swap script: {e}")))
            return
        self._pid = self._transport.pid
        self._script_running = True
        self._protocol.on_exit = self._script_exited
        self.log.info("swap {group}: {previous} -> {model}: running {argv} (pid {pid})",
                      group=self.group, previous=previous or "(unknown)",
                      model=self.target.name, argv=argv, pid=self._pid)
        self._deadline_call = self._reactor.callLater(s.swap_timeout, self._script_timed_out)
        self._protocol.ended.addBoth(self._script_ended)

    def _script_timed_out(self) -> None:
        self._deadline_call = None
        if self._exited:
            return  # it did finish; only its pipes linger, and that ends soon
        self._timed_out = True
        self.log.warn("swap to {model}: script still running after {timeout}, "
                      "terminating its process group {pid}", model=self.target.name,
                      timeout=_secs(self._s.swap_timeout), pid=self._pid)
        self._terminate()

    def _terminate(self) -> None:
        """SIGTERM the script's group now, SIGKILL it after the grace period."""
        self._killpg(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._reactor.callLater(self._s.kill_grace, self._kill_hard)

    def _kill_hard(self) -> None:
        self._kill_call = None
        if not self._script_running:
            return
        self.log.warn("swap to {model}: script ignored SIGTERM for {grace}, killing group {pid}",
                      model=self.target.name, grace=_secs(self._s.kill_grace), pid=self._pid)
        self._killpg(signal.SIGKILL)

    def _killpg(self, sig: int) -> None:
        if self._pid is None:
            return
        try:
            self._s._killpg(self._pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
        except OSError:
            self.log.failure("swap to {model}: cannot signal process group {pid}",
                             model=self.target.name, pid=self._pid)

    def _script_exited(self) -> None:
        # processEnded waits for the script's pipes to close too.  A server
        # the script started without redirecting its output would keep them
        # open for ever: read what is already buffered, then let go.
        self._exited = True
        if self._script_running and self._linger_call is None:
            self._linger_call = self._reactor.callLater(self._s.pipe_linger, self._drop_pipes)

    def _drop_pipes(self) -> None:
        self._linger_call = None
        if self._transport is None:
            return
        self.log.warn("swap to {model}: the script exited but a process it started still holds "
                      "its stdout/stderr; no longer reading them (redirect that process's output)",
                      model=self.target.name)
        self._transport.loseConnection()

    def _script_ended(self, outcome: Optional[Failure]) -> None:
        self._script_running = False
        for call in (self._deadline_call, self._kill_call, self._linger_call):
            if call is not None and call.active():
                call.cancel()
        self._deadline_call = self._kill_call = self._linger_call = None
        self._transport = None
        if self._done:
            if isinstance(outcome, Failure):
                self.log.info("swap to {model}: cancelled script ended: {cause}",
                              model=self.target.name, cause=_cause(outcome))
            return
        if self._timed_out:
            cause = f"swap script timed out after {_secs(self._s.swap_timeout)} (killed)"
            last = self._protocol.last_stderr if self._protocol is not None else None
            if last:
                cause += f": {last}"
            self._finish(Failure(SwapError("timeout", cause)))
        elif isinstance(outcome, Failure):
            self._finish(outcome)
        else:
            self.log.info("swap to {model}: script done after {elapsed}, waiting for {url}",
                          model=self.target.name, url=self.target.health_url,
                          elapsed=_secs(round(self._reactor.seconds() - self._started_at, 3)))
            self._phase = "ready"
            self._deadline_call = self._reactor.callLater(self._s.ready_timeout, self._not_ready)
            self._poll()

    # --- readiness phase ------------------------------------------------------

    def _poll(self) -> None:
        self._poll_call = None
        try:
            d = self._s._probe(self.target.health_url)
        except Exception:
            d = fail()
        self._probe_d = d
        d.addCallbacks(self._probed, self._probe_failed)

    def _probed(self, status: int) -> None:
        self._probe_d = None
        if self._done:
            return
        if status == 200:
            self._finish(None)
            return
        self._last_health = str(status)
        self._next_poll()

    def _probe_failed(self, failure: Failure) -> None:
        self._probe_d = None
        if self._done:
            return
        self._last_health = _describe(failure)
        self._next_poll()

    def _next_poll(self) -> None:
        self._poll_call = self._reactor.callLater(self._s.poll_interval, self._poll)

    def _not_ready(self) -> None:
        self._deadline_call = None
        last = self._last_health or "no answer yet"
        self._finish(Failure(SwapError(
            "not_ready",
            f"backend not ready after {_secs(self._s.ready_timeout)} (last health: {last})")))

    # --- the end --------------------------------------------------------------

    def _stop_polling(self) -> None:
        for call in (self._poll_call, self._deadline_call if self._phase == "ready" else None):
            if call is not None and call.active():
                call.cancel()
        self._poll_call = None
        if self._phase == "ready":
            self._deadline_call = None
        probe, self._probe_d = self._probe_d, None
        if probe is not None:
            probe.addErrback(lambda f: None)
            probe.cancel()

    def _finish(self, outcome: Optional[Failure]) -> None:
        if self._done:
            return
        self._done = True
        self._stop_polling()
        elapsed = _secs(round(self._reactor.seconds() - self._started_at, 3))
        if outcome is None:
            self.log.info("swap to {model}: ready after {elapsed}", model=self.target.name,
                          elapsed=elapsed)
            self.result.callback(None)
        else:
            self.log.error("swap to {model} failed after {elapsed}: {cause}",
                           model=self.target.name, elapsed=elapsed, cause=_cause(outcome))
            self.result.errback(outcome)

    def _cancel(self, result: Deferred[None]) -> None:
        if self._done:
            return
        self._done = True
        self.log.info("swap to {model}: cancelled", model=self.target.name)
        self._stop_polling()
        if self._script_running:
            if self._deadline_call is not None and self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None
            if not self._exited:
                self._terminate()
        # Deferred errbacks ``result`` with CancelledError after we return.


def _cause(failure: Failure) -> str:
    if isinstance(failure.value, SwapError):
        return failure.value.cause
    return failure.getErrorMessage()


class ScriptSwapper:
    """
    Swap models by running an external script, then wait until the target
    answers its health URL with 200.

    :param reactor: provides ``spawnProcess``, ``callLater`` and ``seconds``.
    :param command: the ``[swap] command`` argv, with ``{model}``/``{previous}``.
        May be empty (a configuration that never needs a swap); every swap
        then fails.
    :param swap_timeout: seconds the script may run before its group is killed.
    :param ready_timeout: seconds, after the script's success, for health to
        answer 200.
    :param probe: ``probe(url)`` fires with an HTTP status (see :func:`http_probe`).
    :param poll_interval: seconds between the end of one probe and the next.
    :param kill_grace: seconds between SIGTERM and SIGKILL.
    :param env: the base environment (default: Jano's own, read at each swap).
    :param killpg: signals a process group; injected so tests can record it.
    :param max_line: longest output line logged; longer ones are truncated.

    :ivar pipe_linger: seconds to keep reading the script's output after it
        exited, when something it started still holds its stdout/stderr.
    """

    pipe_linger: float = 1.0

    def __init__(self, reactor: SwapReactor, command: Sequence[str], *, swap_timeout: float,
                 ready_timeout: float, probe: Callable[[str], Deferred[int]],
                 poll_interval: float = 0.5, kill_grace: float = 5.0,
                 env: Optional[Mapping[str, str]] = None,
                 killpg: Callable[[int, int], None] = os.killpg,
                 max_line: int = 4096) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._reactor = reactor
        self.command: tuple[str, ...] = tuple(command)
        self.swap_timeout = swap_timeout
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self._probe = probe
        self._env = env
        self._killpg = killpg
        self._max_line = max_line
        self._setsid: Optional[str] = shutil.which("setsid")

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec) -> Deferred[None]:
        """
        Move ``group``'s slot from ``previous`` (``None``: unknown) to ``target``.

        :return: fires ``None`` once the script exited 0 and ``target.health_url``
            answered 200; fails with :class:`SwapError` otherwise.  Cancelling it
            terminates the script's process group (SIGTERM, then SIGKILL after
            ``kill_grace``) or stops polling.
        """
        if not self.command:
            return fail(SwapError("failed", "no swap command is configured ([swap] command)"))
        attempt = _Attempt(self, group, previous, target)
        try:
            attempt.start()
        except Exception:
            return fail()
        return attempt.result


# --- readiness over HTTP --------------------------------------------------------


class _Discard(Protocol):
    """Read a response body into nowhere; give up on it past ``limit`` bytes."""

    def __init__(self, done: Deferred[None], limit: int = 64 * 1024) -> None:
        self._done = done
        self._left = limit

    def dataReceived(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0 and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._done.called:
            self._done.callback(None)


def _status_after_body(response: IResponse) -> Deferred[int]:
    protocol: _Discard

    def stop(d: Deferred[None]) -> None:
        if protocol.transport is not None:
            cast(IPushProducer, protocol.transport).stopProducing()

    done: Deferred[None] = Deferred(stop)
    protocol = _Discard(done)
    response.deliverBody(protocol)
    return done.addCallback(lambda _: response.code)


def http_probe(agent_or_treq_client: Any, *, timeout: float = 5.0,
               clock: Optional[Any] = None) -> Callable[[str], Deferred[int]]:
    """
    Build the readiness probe :class:`ScriptSwapper` calls with a health URL.

    ``probe(url)`` sends ``GET url`` (no redirects followed) and fires with the
    response's status code once the body has been read and discarded (bodies
    over 64 KiB are cut off by closing the connection; errors while reading a
    body do not matter, the status is known).  It fails on connection errors
    and with :class:`TimeoutError` when no complete answer came in ``timeout``
    seconds.

    :param agent_or_treq_client: a ``treq.client.HTTPClient`` (or anything
        with its ``get(url, **kwargs)``, such as the ``treq`` module), or an
        ``IAgent``, which is wrapped in an ``HTTPClient``.
    :param clock: ``callLater`` provider for the timeout; default: the global
        reactor, imported only when a probe runs.
    """
    if IAgent.providedBy(agent_or_treq_client):
        from treq.client import HTTPClient

        client: Any = HTTPClient(agent_or_treq_client)
    elif callable(getattr(agent_or_treq_client, "get", None)):
        client = agent_or_treq_client
    else:
        raise TypeError("http_probe needs a treq HTTPClient (or the treq module) or an IAgent, "
                        f"not {type(agent_or_treq_client).__name__}")

    def probe(url: str) -> Deferred[int]:
        time: Any = clock
        if time is None:
            from twisted.internet import reactor

            time = reactor
        d: Deferred[Any] = client.get(url, allow_redirects=False, unbuffered=True)
        d.addCallback(_status_after_body)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = time.callLater(timeout, expire)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure) and result.check(CancelledError):
                return Failure(TimeoutError(f"no answer within {_secs(timeout)}"))
            return result

        return d.addBoth(settle)

    return probe
