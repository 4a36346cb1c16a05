"""
The swapper: one attempt per swap, a script phase then a readiness phase.

:class:`ScriptSwapper` runs the ``[swap] command`` through
:class:`~jano.swap.process.SwapScriptProtocol`, kills its process group on
timeout or cancellation, then polls the target's health URL with the injected
probe until it answers 200.  Every attempt ends in one result.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import (
    Any,
    Callable,
    Literal,
    Mapping,
    Optional,
    Protocol as TypingProtocol,
    Sequence,
)

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.errors import SwapError
from jano.records import ModelSpec
from jano.swap.command import session_argv, substitute
from jano.swap.process import SwapScriptProtocol
from jano.swap.ready import Readiness, secs

__all__ = ["SwapReactor", "ScriptSwapper"]


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


class _Attempt:
    """One swap: the script phase, then the readiness phase; one result."""

    log = Logger()

    def __init__(self, swapper: ScriptSwapper, group: str, previous: Optional[ModelSpec],
                 target: ModelSpec, *, unload: bool = False,
                 evict: Sequence[ModelSpec] = ()) -> None:
        self._s = swapper
        self._reactor = swapper._reactor
        self.group = group
        self.previous = previous
        #: For an unload, the model being unloaded.
        self.target = target
        self.unloading = unload
        self.evict = tuple(evict)
        self.result: Deferred[dict[str, float]] = Deferred(self._cancel)
        self._script_done_at: Optional[float] = None
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
        self._readiness: Optional[Readiness] = None
        self._started_at = self._reactor.seconds()

    # --- script phase ---------------------------------------------------------

    def start(self) -> None:
        s = self._s
        if self.unloading:
            name = self.target.name
            argv = (substitute(s.unload_command, name, name) if s.unload_command
                    else substitute(s.command, "", name))
            model, previous, action = "", name, "unload"
        else:
            previous = self.previous.name if self.previous is not None else ""
            argv = substitute(s.command, self.target.name, previous)
            model, action = self.target.name, "swap"
        env = dict(os.environ if s._env is None else s._env)
        env.update(JANO_MODEL=model, JANO_PREVIOUS_MODEL=previous,
                   JANO_UPSTREAM=self.target.upstream, JANO_GROUP=self.group,
                   JANO_ACTION=action)
        if self.evict:
            env["JANO_EVICT"] = ",".join(m.name for m in self.evict)
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
        self.log.info("{action} {group}: {previous} -> {model}: running {argv} (pid {pid})",
                      action=action, group=self.group, previous=previous or "(unknown)",
                      model=model or "(nothing)", argv=argv, pid=self._pid)
        self._deadline_call = self._reactor.callLater(s.swap_timeout, self._script_timed_out)
        self._protocol.ended.addBoth(self._script_ended)

    def _script_timed_out(self) -> None:
        self._deadline_call = None
        if self._exited:
            return  # it did finish; only its pipes linger, and that ends soon
        self._timed_out = True
        self.log.warn("swap to {model}: script still running after {timeout}, "
                      "terminating its process group {pid}", model=self.target.name,
                      timeout=secs(self._s.swap_timeout), pid=self._pid)
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
                      model=self.target.name, grace=secs(self._s.kill_grace), pid=self._pid)
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
        self._script_done_at = self._reactor.seconds()
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
            cause = f"swap script timed out after {secs(self._s.swap_timeout)} (killed)"
            last = self._protocol.last_stderr if self._protocol is not None else None
            if last:
                cause += f": {last}"
            self._finish(Failure(SwapError("timeout", cause)))
        elif isinstance(outcome, Failure):
            self._finish(outcome)
        elif self.unloading:  # nothing to wait for: the model is gone
            self.log.info("unload of {model}: script done after {elapsed}", model=self.target.name,
                          elapsed=secs(round(self._reactor.seconds() - self._started_at, 3)))
            self._finish(None)
        else:
            self.log.info("swap to {model}: script done after {elapsed}, waiting for {url}",
                          model=self.target.name, url=self.target.health_url,
                          elapsed=secs(round(self._reactor.seconds() - self._started_at, 3)))
            self._phase = "ready"
            self._readiness = Readiness(self._reactor, self._s._probe,  # type: ignore[arg-type]
                                        self.target.health_url, timeout=self._s.ready_timeout,
                                        interval=self._s.poll_interval)
            self._readiness.start().addCallbacks(lambda _: self._finish(None), self._finish)

    # --- the end --------------------------------------------------------------

    def _stop_polling(self) -> None:
        readiness, self._readiness = self._readiness, None
        if readiness is not None:
            readiness.result.cancel()

    def _finish(self, outcome: Optional[Failure]) -> None:
        if self._done:
            return
        self._done = True
        self._stop_polling()
        now = self._reactor.seconds()
        elapsed = secs(round(now - self._started_at, 3))
        script_end = self._script_done_at if self._script_done_at is not None else now
        phases = {"script": script_end - self._started_at}
        if self._phase == "ready":
            phases["ready"] = now - script_end
        if outcome is None:
            self.log.info("swap to {model}: ready after {elapsed}", model=self.target.name,
                          elapsed=elapsed)
            self.result.callback(phases)
        else:
            if isinstance(outcome.value, SwapError) and not outcome.value.phases:
                outcome.value.phases = tuple(phases.items())
            self.log.error("swap to {model} failed after {elapsed}: {cause}",
                           model=self.target.name, elapsed=elapsed, cause=_cause(outcome))
            self.result.errback(outcome)

    def _cancel(self, result: Deferred[dict[str, float]]) -> None:
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
                 max_line: int = 4096, unload_command: Sequence[str] = ()) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._reactor = reactor
        self.command: tuple[str, ...] = tuple(command)
        #: ``[swap] unload``; empty: unload with ``command`` and an empty ``{model}``.
        self.unload_command: tuple[str, ...] = tuple(unload_command)
        self.swap_timeout = swap_timeout
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self._probe = probe
        self._env = env
        self._killpg = killpg
        self._max_line = max_line
        self._setsid: Optional[str] = shutil.which("setsid")

    def swap(self, group: str, previous: Optional[ModelSpec], target: ModelSpec,
             evict: Sequence[ModelSpec] = ()) -> Deferred[dict[str, float]]:
        """
        Move ``group``'s slot from ``previous`` (``None``: unknown) to ``target``.
        ``evict``: every model to unload (a group with a memory budget); the
        script gets their names, comma-separated, in ``JANO_EVICT``.

        :return: fires with the seconds of the ``script`` and ``ready`` phases
            once the script exited 0 and ``target.health_url`` answered 200; fails with :class:`SwapError` otherwise.  Cancelling it
            terminates the script's process group (SIGTERM, then SIGKILL after
            ``kill_grace``) or stops polling.
        """
        if not self.command:
            return fail(SwapError("failed", "no swap command is configured ([swap] command)"))
        return self._run(_Attempt(self, group, previous, target, evict=evict))

    def unload(self, group: str, model: ModelSpec) -> Deferred[dict[str, float]]:
        """
        Unload ``model``, ``group``'s resident, leaving the slot empty: run
        ``unload_command`` with ``{model}`` = ``model``, or else ``command``
        with an empty ``{model}`` and ``{previous}`` = ``model``, with
        ``JANO_ACTION=unload``.  No health is polled afterwards.

        :return: fires ``None`` once the script exited 0; fails with
            :class:`SwapError` otherwise (cancelling it kills the script).
        """
        if not self.command and not self.unload_command:
            return fail(SwapError("failed", "no swap command is configured ([swap] command)"))
        return self._run(_Attempt(self, group, model, model, unload=True))

    @staticmethod
    def _run(attempt: _Attempt) -> Deferred[dict[str, float]]:
        try:
            attempt.start()
        except Exception:
            return fail()
        return attempt.result
