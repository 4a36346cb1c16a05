"""
A strict, in-memory process reactor for tests of code that runs programs.

:class:`FakeProcessReactor` is a :class:`twisted.internet.task.Clock` that
also provides ``spawnProcess``.  Nothing is executed: each spawn is recorded
as a :class:`FakeProcess` that the test then drives, writing its output and
ending it with an exit status or a signal.  A ``killpg`` method records
process-group signals so it can be injected where ``os.killpg`` is expected.

It is strict in the way the real reactor and kernel are, so a test cannot
pass by accident:

- ``spawnProcess`` checks its argument types as the real reactor does;
- output cannot be written to a closed descriptor or after the end;
- a process ends once; signalling an ended process raises
  ``ProcessExitedAlready`` (transport) or ``ProcessLookupError`` (``killpg``);
- spawns announced with :meth:`FakeProcessReactor.expect_spawn` must come in
  that order with exactly that argv (and env / path when given);
- :meth:`FakeProcessReactor.assert_idle` fails while a process runs, a timer
  is pending or an expected spawn never happened.

Example::

    reactor = FakeProcessReactor()
    d = run_something(reactor)            # calls reactor.spawnProcess(...)
    proc = reactor.processes[-1]
    assert proc.args == ["/bin/echo", "hi"]
    proc.stdout(b"hi\\n")
    proc.exit(0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Optional

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IAddress, IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["ANY", "FakeProcess", "FakeProcessReactor"]


class _Any:
    """Matches anything in :meth:`FakeProcessReactor.expect_spawn`."""

    def __repr__(self) -> str:
        return "ANY"


#: Placeholder for "do not check this" in :meth:`FakeProcessReactor.expect_spawn`.
ANY: Any = _Any()


@implementer(IAddress)
class _ProcessAddress:
    """What ``getPeer``/``getHost`` give for a process, as the real one does."""

    def __repr__(self) -> str:
        return "_ProcessAddress()"


def _check_str(value: object, what: str) -> None:
    if not isinstance(value, (str, bytes)):
        raise TypeError(f"spawnProcess: {what} must be str or bytes, not {type(value).__name__}")


@implementer(IProcessTransport)
class FakeProcess:
    """
    One spawned process: what it was started with, and the handles to drive it.

    :ivar executable, args, env, path, uid, gid, usePTY, childFDs: as given to
        ``spawnProcess`` (``args`` and ``env`` copied into a list and a dict).
    :ivar protocol: the process protocol.
    :ivar pid: the fake pid, ``None`` once the process has exited (as in Twisted).
    :ivar original_pid: the pid it had, kept after the end.
    :ivar stdin: bytes the code wrote to the child's stdin.
    :ivar signals: signals sent through ``signalProcess``.
    :ivar closed: descriptors closed by the code under test (parent's side).
    :ivar reason: the failure given to ``processEnded``, once ended.
    """

    def __init__(self, reactor: FakeProcessReactor, protocol: IProcessProtocol,
                 executable: str | bytes, args: list[str | bytes],
                 env: Optional[dict[Any, Any]], path: Optional[str | bytes], uid: Optional[int],
                 gid: Optional[int], usePTY: bool, childFDs: Optional[Mapping[int, int | str]],
                 pid: int) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.uid = uid
        self.gid = gid
        self.usePTY = usePTY
        self.childFDs = childFDs
        self.pid: Optional[int] = pid
        self.original_pid = pid
        self.stdin = b""
        self.signals: list[str | int] = []
        fds = list(childFDs) if childFDs is not None else [0, 1, 2]
        self._open: set[int] = set(fds)
        self.closed: list[int] = []
        self._exit_reason: Optional[Failure] = None
        self.reason: Optional[Failure] = None

    def __repr__(self) -> str:
        state = "ended" if self.ended else "running"
        return f"<FakeProcess pid={self.original_pid} {state} args={self.args!r}>"

    @property
    def exited(self) -> bool:
        """The child itself has exited (``processExited`` was called)."""
        return self._exit_reason is not None

    @property
    def ended(self) -> bool:
        """``processEnded`` was called: exited and every pipe closed."""
        return self.reason is not None

    # --- IProcessTransport, used by the code under test ---------------------

    def write(self, data: bytes) -> None:
        self.writeToChild(0, data)

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        for data in seq:
            self.write(data)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"writeToChild: data must be bytes, not {type(data).__name__}")
        self._require_open(childFD, "write to")
        if childFD == 0:
            self.stdin += data

    def closeChildFD(self, descriptor: int) -> None:
        if descriptor in self._open:
            self.closed.append(descriptor)
            self._lose(descriptor)
            self._maybe_end()

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def loseConnection(self) -> None:
        for fd in sorted(self._open):
            self.closed.append(fd)
            self._lose(fd)
        self._maybe_end()

    def signalProcess(self, signalID: str | int) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def getPeer(self) -> IAddress:
        return _ProcessAddress()

    def getHost(self) -> IAddress:
        return _ProcessAddress()

    # --- driving the process, used by tests -----------------------------------

    def _require_open(self, fd: int, action: str) -> None:
        if self.ended:
            raise AssertionError(f"{self!r}: cannot {action} fd {fd}: the process has ended")
        if fd not in self._open:
            raise AssertionError(f"{self!r}: cannot {action} fd {fd}: it is closed")

    def output(self, fd: int, data: bytes) -> None:
        """The child writes ``data`` to descriptor ``fd`` (``childDataReceived``)."""
        if not isinstance(data, bytes):
            raise TypeError(f"output: data must be bytes, not {type(data).__name__}")
        self._require_open(fd, "read from")
        self.protocol.childDataReceived(fd, data)

    def stdout(self, data: bytes) -> None:
        """The child writes ``data`` to its standard output."""
        self.output(1, data)

    def stderr(self, data: bytes) -> None:
        """The child writes ``data`` to its standard error."""
        self.output(2, data)

    def exit(self, code: int = 0, *, close_pipes: bool = True) -> None:
        """
        The child exits with status ``code``.

        :param close_pipes: ``False`` models a descendant that still holds the
            child's stdout/stderr: ``processEnded`` then waits until the code
            under test closes them or the test calls :meth:`close_pipes`.
        """
        if not 0 <= code <= 255:
            raise ValueError(f"exit status must be 0..255, not {code}")
        if code == 0:
            self._exit(ProcessDone(0), close_pipes)
        else:
            self._exit(ProcessTerminated(exitCode=code, status=code << 8), close_pipes)

    def killed(self, signal: int, *, close_pipes: bool = True) -> None:
        """The child dies from ``signal`` (see :meth:`exit` for ``close_pipes``)."""
        self._exit(ProcessTerminated(signal=signal, status=signal), close_pipes)

    def close_pipes(self) -> None:
        """Whatever still held the child's descriptors lets go of them."""
        for fd in sorted(self._open):
            self._lose(fd)
        self._maybe_end()

    def _exit(self, reason: ProcessDone | ProcessTerminated, close_pipes: bool) -> None:
        if self.exited:
            raise AssertionError(f"{self!r} has already exited")
        self._exit_reason = Failure(reason)
        self.pid = None  # as Twisted does once the child is reaped
        self.protocol.processExited(self._exit_reason)
        if close_pipes:
            self.close_pipes()
        else:
            self._maybe_end()

    def _lose(self, fd: int) -> None:
        self._open.discard(fd)
        self.protocol.childConnectionLost(fd)

    def _maybe_end(self) -> None:
        if self._exit_reason is not None and not self._open and self.reason is None:
            self.reason = self._exit_reason
            self.protocol.processEnded(self.reason)


class _Expected:
    def __init__(self, args: Sequence[str | bytes], executable: Any, env: Any, path: Any) -> None:
        self.args = list(args)
        self.executable = executable
        self.env = env
        self.path = path

    def mismatch(self, proc: FakeProcess) -> Optional[str]:
        if proc.args != self.args:
            return f"args {proc.args!r} != expected {self.args!r}"
        if self.executable is not ANY and proc.executable != self.executable:
            return f"executable {proc.executable!r} != expected {self.executable!r}"
        if self.env is not ANY and proc.env != self.env:
            return f"env {proc.env!r} != expected {self.env!r}"
        if self.path is not ANY and proc.path != self.path:
            return f"path {proc.path!r} != expected {self.path!r}"
        return None


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """
    A :class:`~twisted.internet.task.Clock` that records spawned processes.

    :ivar processes: every :class:`FakeProcess` spawned, in order.
    :ivar killpg_calls: ``(pgid, signal)`` for every :meth:`killpg` call.
    :param first_pid: pid given to the first process; later ones count up.
    """

    def __init__(self, first_pid: int = 4242) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.killpg_calls: list[tuple[int, int]] = []
        self._next_pid = first_pid
        self._expected: list[_Expected] = []
        self._strict = False
        self.unexpected: list[str] = []

    # --- expectations -------------------------------------------------------

    def expect_spawn(self, args: Sequence[str | bytes], *, executable: Any = ANY,
                     env: Any = ANY, path: Any = ANY) -> None:
        """
        Announce the next spawn: its argv exactly, and ``executable``, ``env``
        (the whole mapping) and ``path`` unless left as :data:`ANY`.

        Once anything is announced, a spawn that does not match, or comes when
        nothing more is announced, raises :class:`AssertionError` from
        ``spawnProcess`` (and is kept in :attr:`unexpected` for
        :meth:`assert_idle`).
        """
        self._strict = True
        self._expected.append(_Expected(args, executable, env, path))

    # --- IReactorProcess ------------------------------------------------------

    def spawnProcess(self, processProtocol: IProcessProtocol, executable: str | bytes,
                     args: Sequence[str | bytes] = (), env: Optional[Mapping[Any, Any]] = None,
                     path: Optional[str | bytes] = None, uid: Optional[int] = None,
                     gid: Optional[int] = None, usePTY: bool = False,
                     childFDs: Optional[Mapping[int, int | str]] = None) -> FakeProcess:
        if not IProcessProtocol.providedBy(processProtocol):
            raise TypeError(f"spawnProcess: {processProtocol!r} does not provide IProcessProtocol")
        _check_str(executable, "executable")
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise TypeError("spawnProcess: args must be a list or tuple of str/bytes")
        for arg in args:
            _check_str(arg, "every element of args")
        if env is not None:
            if not isinstance(env, Mapping):
                raise TypeError("spawnProcess: env must be a mapping or None")
            for key, value in env.items():
                _check_str(key, "every env name")
                _check_str(value, f"env[{key!r}]")
        if path is not None:
            _check_str(path, "path")
        proc = FakeProcess(self, processProtocol, executable, list(args),
                           dict(env) if env is not None else None, path, uid, gid, usePTY,
                           childFDs, self._next_pid)
        self._next_pid += 1
        if self._strict:
            problem = (self._expected.pop(0).mismatch(proc) if self._expected
                       else f"unexpected spawn of {proc.args!r}")
            if problem is not None:
                self.unexpected.append(problem)
                raise AssertionError(f"spawnProcess: {problem}")
        self.processes.append(proc)
        processProtocol.makeConnection(proc)
        return proc

    # --- os.killpg stand-in ---------------------------------------------------

    def killpg(self, pgid: int, sig: int) -> None:
        """
        Record a process-group signal; like the kernel, raise
        :class:`ProcessLookupError` when no running process leads that group.
        A group lives until its leader has ended (exited, and its pipes,
        possibly held by other group members, closed).  The process does not
        die by itself: the test decides, with :meth:`FakeProcess.killed` or
        :meth:`FakeProcess.exit`.
        """
        self.killpg_calls.append((pgid, sig))
        if not any(p.original_pid == pgid and not p.ended for p in self.processes):
            raise ProcessLookupError(3, "No such process")

    # --- inspection -----------------------------------------------------------

    def running(self) -> list[FakeProcess]:
        """Processes spawned and not yet ended."""
        return [p for p in self.processes if not p.ended]

    def assert_idle(self) -> None:
        """Fail unless no process runs, no timer is pending and every expected spawn came."""
        problems = list(self.unexpected)
        problems += [f"still running: {p!r}" for p in self.running()]
        problems += [f"pending timer: {c!r}" for c in self.getDelayedCalls()]
        problems += [f"expected spawn never came: {e.args!r}" for e in self._expected]
        if problems:
            raise AssertionError("; ".join(problems))
