"""
Watch one run of the swap script: the ``ProcessProtocol`` and its line splitter.

:class:`LineSplitter` is a parser fed bytes, with no I/O; :class:`SwapScriptProtocol`
only shuttles the child's output through it to the log, and turns the child's
end into one Deferred.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from jano.errors import SwapError

__all__ = ["LineSplitter", "SwapScriptProtocol"]


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
