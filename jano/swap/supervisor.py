"""
The model servers Jano runs itself: start, stop, watch, and count crashes.

:class:`Supervisor` holds one :class:`Child` per managed model for the life
of the Jano process (its log ring and counters survive restarts of the
server).  It decides nothing about *when* to start or stop: the swapper
(:mod:`jano.swap.managed`) does, on the scheduler's word.  What it reports:
a server that exits while it was not being stopped is a crash, told to
``on_crash`` with the exit, its last log lines and the back-off before the
next start.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from jano.errors import SwapError
from jano.records import ModelSpec, iso
from jano.swap.child import ServerProtocol, server_argv
from jano.swap.logring import LogRing
from jano.swap.orphans import RUN_ENV
from jano.swap.ports import port_is_free
from jano.swap.swapper import SwapReactor

__all__ = ["Child", "ChildState", "Supervisor", "STABLE_AFTER"]

ChildState = Literal["stopped", "starting", "running", "stopping", "crashed"]

#: Seconds a server must have been ready before a crash no longer counts as
#: "in a row" with the ones before it.
STABLE_AFTER = 60.0


_PLACEHOLDER = re.compile(r"\{(model|port)\}")


def substitute_command(command: tuple[str, ...], model: str, port: Optional[int]) -> list[str]:
    """``{model}`` and ``{port}`` in each argument, in one pass (a value is never substituted again)."""
    values = {"model": model, "port": "" if port is None else str(port)}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


@dataclass(eq=False)
class Child:
    """One managed model's server: the live process, if any, and its history."""

    spec: ModelSpec
    ring: LogRing
    state: ChildState = "stopped"
    pid: Optional[int] = None
    protocol: Optional[ServerProtocol] = None
    started_at: Optional[float] = None
    ready_at: Optional[float] = None
    starts: int = 0
    crashes: int = 0
    crashes_in_a_row: int = 0
    retry_at: Optional[float] = None
    last_exit: Optional[str] = None
    last_failure: Optional[str] = None
    waiting_exit: list[Deferred[None]] = field(default_factory=list)
    kill_call: Optional[IDelayedCall] = None

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def status(self, now: float) -> dict[str, Any]:
        """What ``/status`` shows under ``processes`` (``retry_in``: seconds, 0 when due)."""
        retry_in = (round(max(0.0, self.retry_at - now), 3)
                    if self.retry_at is not None and self.state == "crashed" else None)
        return {"state": self.state, "pid": self.pid if self.alive else None,
                "port": self.spec.port,
                "started_at": iso(self.started_at) if self.alive else None,
                "restarts": max(0, self.starts - 1), "crashes": self.crashes,
                "crashes_in_a_row": self.crashes_in_a_row,
                "retry_at": iso(self.retry_at) if retry_in is not None else None,
                "retry_in": retry_in, "last_exit": self.last_exit,
                "last_failure": self.last_failure, "log_lines": self.ring.total_lines}


class Supervisor:
    """
    Start and stop managed servers; notice the ones that die.

    :param reactor: ``spawnProcess``, ``callLater``, ``seconds``.
    :param log_bytes: each model's log ring size.
    :param backoff: seconds before the first restart after a crash; doubled
        for each crash in a row, up to ``backoff_max``.
    :param on_crash: ``on_crash(spec, cause, backoff)`` for a server that
        exited on its own after it was ready.
    :param killpg: signals a process group (tests record it).
    :param is_free: whether a port is free (tests fake it).
    :param env: the base environment (default: Jano's own, read at each start).
    :param run_token: set as ``JANO_RUN`` in each server's environment, so what
        the server starts carries it too (:mod:`jano.swap.orphans`).
    """

    log = Logger()

    def __init__(self, reactor: SwapReactor, *, log_bytes: int = 256 * 1024,
                 backoff: float = 2.0, backoff_max: float = 300.0,
                 on_crash: Optional[Callable[[ModelSpec, str, float], None]] = None,
                 killpg: Callable[[int, int], None] = os.killpg,
                 is_free: Callable[[int], bool] = port_is_free,
                 env: Optional[Mapping[str, str]] = None,
                 run_token: Optional[str] = None) -> None:
        self._reactor = reactor
        self.log_bytes = log_bytes
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.on_crash = on_crash
        self._killpg = killpg
        self._is_free = is_free
        self._env = env
        self.run_token = run_token
        self.children: dict[str, Child] = {}

    # --- the table -------------------------------------------------------------------

    def child(self, spec: ModelSpec) -> Child:
        """``spec``'s child record (created on first use; a changed spec replaces the old one's)."""
        child = self.children.get(spec.name)
        if child is None:
            child = Child(spec, LogRing(self.log_bytes, self._reactor))  # type: ignore[arg-type]
            self.children[spec.name] = child
        elif not child.alive:
            child.spec = spec
        return child

    def ring(self, model: str) -> Optional[LogRing]:
        child = self.children.get(model)
        return child.ring if child is not None else None

    def statuses(self) -> dict[str, dict[str, Any]]:
        now = self._reactor.seconds()
        return {name: child.status(now) for name, child in self.children.items()}

    # --- start -----------------------------------------------------------------------

    def start(self, spec: ModelSpec) -> ServerProtocol:
        """
        Spawn ``spec``'s server now.

        :raises SwapError: its port is taken, or it cannot be spawned.
        :return: its protocol; ``protocol.exited`` fires when it exits.
        """
        child = self.child(spec)
        if child.alive:
            raise SwapError("failed", f"{spec.name}: its server is still running (pid {child.pid})")
        if spec.port is not None and not self._is_free(spec.port):
            cause = (f"port {spec.port} for {spec.name} is in use by another program; "
                     "free it, or set models[].port or processes.port_range")
            self._failed(child, cause)
            raise SwapError("failed", cause, retry_after=self._backoff(child))
        argv = substitute_command(spec.command, spec.name, spec.port)
        env = dict(os.environ if self._env is None else self._env)
        env.update(spec.env)
        env["JANO_MODEL"] = spec.name
        if self.run_token is not None:
            env[RUN_ENV] = self.run_token
        if spec.port is not None:
            env["JANO_PORT"] = str(spec.port)
        protocol = ServerProtocol(child.ring)
        args = server_argv(argv)
        try:
            transport = self._reactor.spawnProcess(protocol, args[0], args, env=env,
                                                   path=spec.cwd)
        except Exception as e:
            cause = f"cannot start {spec.name}'s server {argv[0]!r}: {e}"
            self._failed(child, cause)
            raise SwapError("failed", cause, retry_after=self._backoff(child)) from None
        child.protocol = protocol
        child.pid = transport.pid
        child.state = "starting"
        child.started_at = self._reactor.seconds()
        child.ready_at = None
        child.starts += 1
        child.ring.append(f"started {argv[0]} (pid {child.pid}, port {spec.port})", "jano")
        self.log.info("{model}: started {argv} as pid {pid}", model=spec.name, argv=argv,
                      pid=child.pid)
        protocol.exited.addCallback(self._exited, child, protocol)
        return protocol

    def ready(self, model: str) -> None:
        """The server answered its health check: a later exit is a crash."""
        child = self.children.get(model)
        if child is not None and child.state == "starting":
            child.state = "running"
            child.ready_at = self._reactor.seconds()
            child.retry_at = None

    # --- stop ------------------------------------------------------------------------

    def stop(self, model: str) -> Deferred[None]:
        """
        Stop ``model``'s server: SIGTERM its process group, SIGKILL it after
        the model's ``stop_timeout``.

        :return: fires once it has exited (at once when it is not running);
            never fails.
        """
        child = self.children.get(model)
        if child is None or not child.alive:
            return succeed(None)
        done: Deferred[None] = Deferred()
        child.waiting_exit.append(done)
        if child.state != "stopping":
            child.state = "stopping"
            child.ring.append(f"stopping (SIGTERM to process group {child.pid})", "jano")
            self._signal(child, signal.SIGTERM)
            child.kill_call = self._reactor.callLater(child.spec.stop_timeout, self._kill, child)
        return done

    def stop_all(self) -> Deferred[Any]:
        """Stop every running server (Jano is shutting down)."""
        return DeferredList([self.stop(name) for name in list(self.children)])

    def _kill(self, child: Child) -> None:
        child.kill_call = None
        if child.state == "stopping":
            self.log.warn("{model}: still running {timeout}s after SIGTERM; SIGKILL to its "
                          "process group", model=child.spec.name, timeout=child.spec.stop_timeout)
            child.ring.append("SIGKILL (it ignored SIGTERM)", "jano")
            self._signal(child, signal.SIGKILL)

    def _signal(self, child: Child, sig: int) -> None:
        if child.pid is None:
            return
        try:
            self._killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        except OSError:
            self.log.failure("{model}: cannot signal process group {pid}",
                             model=child.spec.name, pid=child.pid)

    # --- exits -----------------------------------------------------------------------

    def _exited(self, description: str, child: Child, protocol: ServerProtocol) -> None:
        if child.protocol is not protocol:
            return
        was = child.state
        child.protocol = None
        child.last_exit = description
        child.ring.append(description, "jano")
        if child.kill_call is not None and child.kill_call.active():
            child.kill_call.cancel()
        child.kill_call = None
        if was == "stopping":
            child.state = "stopped"
            self.log.info("{model}: stopped ({exit})", model=child.spec.name, exit=description)
            if child.pid is not None:  # anything it left in its group goes too
                self._signal(child, signal.SIGKILL)
        else:
            now = self._reactor.seconds()
            if was == "running" and child.ready_at is not None and now - child.ready_at >= STABLE_AFTER:
                child.crashes_in_a_row = 0
            lines = [e.text.strip() for e in child.ring.lines(8) if e.stream != "jano"]
            lines = [line for line in lines if line][-3:]
            cause = f"{child.spec.name} {description}"
            if lines:
                cause += ": " + " | ".join(lines)
            self._failed(child, cause)
            if child.pid is not None:
                self._signal(child, signal.SIGKILL)
            if was == "running":
                self.log.error("{model} crashed: {cause}; restart on the next request, in "
                               "{backoff}s at the earliest", model=child.spec.name, cause=cause,
                               backoff=self._backoff(child))
                if self.on_crash is not None:
                    self.on_crash(child.spec, cause, self._backoff(child))
        waiting, child.waiting_exit = child.waiting_exit, []
        for d in waiting:
            d.callback(None)

    def gave_up(self, model: str, cause: str) -> None:
        """A start that never got ready (and was stopped) counts as a crash in a row."""
        child = self.children.get(model)
        if child is not None and not child.alive:
            self._failed(child, cause)

    def backoff_after(self, model: str) -> Optional[float]:
        """Seconds ``model`` waits before its next start, after its last failure."""
        child = self.children.get(model)
        return self._backoff(child) if child is not None and child.crashes_in_a_row else None

    def _failed(self, child: Child, cause: str) -> None:
        child.state = "crashed"
        child.crashes += 1
        child.crashes_in_a_row += 1
        child.last_failure = cause
        child.retry_at = self._reactor.seconds() + self._backoff(child)

    def _backoff(self, child: Child) -> float:
        """Seconds before the next start: doubled per crash in a row, capped."""
        n = max(1, child.crashes_in_a_row)
        return float(min(self.backoff * 2 ** (n - 1), self.backoff_max))
