"""
One managed model server as a child process: the argv that starts it in a
process group of its own, tied to Jano's life, and the ``ProcessProtocol``
that copies its output into the model's log ring.

Orphans: the child is started through a few lines of Python that call
``setsid()`` (its pid is its process group id, so a stop signals the server
and anything it started) and ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux: the
kernel kills it the moment Jano dies, even by ``SIGKILL``), then ``exec`` the
command, so the wrapper costs one interpreter start-up and no process.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Literal, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from jano.swap.logring import LogRing
from jano.swap.process import LineSplitter

__all__ = ["server_argv", "ServerProtocol", "describe_exit"]

#: argv[1]: the pid the child must still have as its parent; argv[2:]: the command.
_WRAPPER = """\
import ctypes, os, sys
os.setsid()
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # Jano died before prctl: nobody to serve
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("cannot run %s: %s\\n" % (sys.argv[2], e.strerror))
    os._exit(127)
"""


def server_argv(command: Sequence[str], parent: Optional[int] = None) -> list[str]:
    """The argv that runs ``command`` in its own session, killed when Jano dies."""
    return [sys.executable, "-S", "-c", _WRAPPER,
            str(os.getpid() if parent is None else parent), *command]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def describe_exit(reason: Failure) -> str:
    """``exited with status 1``, ``killed by signal 9 (SIGKILL)``, ``exited with status 0``."""
    if reason.check(ProcessDone):
        return "exited with status 0"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal} ({_signal_name(value.signal)})"
        if value.exitCode is not None:
            return f"exited with status {value.exitCode}"
    return f"ended abnormally ({reason.getErrorMessage()})"


class ServerProtocol(ProcessProtocol):
    """
    Copy a server's stdout and stderr, line by line, into ``ring``; fire
    :attr:`exited` with :func:`describe_exit`'s phrase once the process has
    exited (its pipes may stay open a little longer; their last lines still
    reach the ring).
    """

    def __init__(self, ring: LogRing, max_line: int = 4096) -> None:
        self.ring = ring
        self.exited: Deferred[str] = Deferred()
        self.last_stderr: Optional[str] = None
        self._splitters = {1: LineSplitter(max_line), 2: LineSplitter(max_line)}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()  # a server reads no input: EOF, never a hang

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        splitter = self._splitters.get(childFD)
        if splitter is not None:
            self._lines(childFD, splitter.feed(data))

    def _lines(self, fd: int, lines: list[tuple[bytes, bool]]) -> None:
        stream: Literal["stdout", "stderr"] = "stdout" if fd == 1 else "stderr"
        for raw, _truncated in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if fd == 2 and line.strip():
                self.last_stderr = line.strip()
            self.ring.append(line, stream)

    def processExited(self, reason: Failure) -> None:
        if not self.exited.called:
            self.exited.callback(describe_exit(reason))

    def processEnded(self, reason: Failure) -> None:
        for fd, splitter in self._splitters.items():
            self._lines(fd, splitter.flush())
        self.processExited(reason)
