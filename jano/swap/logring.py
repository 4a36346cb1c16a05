"""
The recent output of one managed model server, in memory only.

A :class:`LogRing` keeps the last lines a child process printed (and the few
Jano adds about it: started, exited), bounded by bytes rather than lines so a
server that prints a few huge lines cannot grow it.  It is never written to
disk: model servers may log prompts.  One ring lives as long as its model,
across restarts, so the last lines before a crash stay readable.

Followers (the ``/logs/<model>?follow=1`` streams) are called synchronously on
each append; a follower that raises is logged and dropped, never the append.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Literal, NamedTuple, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["Entry", "Stream", "LogRing", "ENTRY_OVERHEAD", "render"]

Stream = Literal["stdout", "stderr", "jano"]

#: Bytes charged per entry on top of its text: the time, the stream, the tuple.
ENTRY_OVERHEAD = 32

_STREAMS = frozenset({"stdout", "stderr", "jano"})
_ELLIPSIS = "…"


class Entry(NamedTuple):
    """One line: when it arrived (the clock's seconds), which stream, the text (no newline)."""

    at: float
    stream: str
    text: str


def render(entry: Entry) -> str:
    """
    One entry as ``/logs`` shows it: the server's lines as printed (stderr is
    not marked: llama-server writes its whole log there, so a mark would be on
    almost every line and tell nothing), Jano's own lines behind ``[jano]``
    so they cannot pass for the server's.
    """
    return f"[jano] {entry.text}" if entry.stream == "jano" else entry.text


def _fit(text: str, room: int) -> str:
    """``text`` cut to at most ``room`` UTF-8 bytes (on a character boundary), marked as cut."""
    mark = len(_ELLIPSIS.encode())
    keep = max(0, room - mark)
    cut = text.encode()[:keep].decode("utf-8", "ignore")
    return cut + _ELLIPSIS if room >= mark else cut


class LogRing:
    """
    The last lines of one managed server, at most ``max_bytes`` in all.

    Each entry costs its UTF-8 length plus :data:`ENTRY_OVERHEAD`; the oldest
    entries go first, and one line that alone exceeds the bound is cut to fit.

    :param max_bytes: the bound; must leave room for one entry's overhead.
    :param clock: stamps each entry (``clock.seconds()``).
    """

    log = Logger()

    def __init__(self, max_bytes: int, clock: IReactorTime) -> None:
        if max_bytes <= ENTRY_OVERHEAD:
            raise ValueError(f"max_bytes must be more than {ENTRY_OVERHEAD}, not {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: deque[tuple[Entry, int]] = deque()
        self._followers: list[Callable[[Entry], None]] = []
        #: Bytes held now (as accounted): never more than :attr:`max_bytes`.
        self.bytes = 0
        #: Lines ever appended, and those evicted since to stay within the bound.
        self.total_lines = 0
        self.dropped_lines = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, line: str, stream: Stream = "stdout") -> None:
        """
        Keep one line (a trailing CR/LF is dropped), evict the oldest to make
        room, and hand it to every follower.
        """
        if stream not in _STREAMS:
            raise ValueError(f"stream must be one of {sorted(_STREAMS)}, not {stream!r}")
        text = line.rstrip("\r\n")
        size = len(text.encode()) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            text = _fit(text, self.max_bytes - ENTRY_OVERHEAD)
            size = len(text.encode()) + ENTRY_OVERHEAD
        entry = Entry(self._clock.seconds(), stream, text)
        self._entries.append((entry, size))
        self.bytes += size
        self.total_lines += 1
        while self.bytes > self.max_bytes:
            _, gone = self._entries.popleft()
            self.bytes -= gone
            self.dropped_lines += 1
        for callback in list(self._followers):
            try:
                callback(entry)
            except Exception:
                self.log.failure("a log follower failed; dropping it")
                self._unfollow(callback)

    def lines(self, tail: Optional[int] = None) -> list[Entry]:
        """The entries held, oldest first; only the last ``tail`` when given."""
        entries = [e for e, _ in self._entries]
        if tail is None:
            return entries
        return entries[-tail:] if tail > 0 else []

    def text(self, tail: Optional[int] = None) -> str:
        """The entries as :func:`render` shows them, one per line, each ending in ``\\n``."""
        return "".join(render(e) + "\n" for e in self.lines(tail))

    def last(self, n: int) -> list[str]:
        """The texts of the last ``n`` lines, unmarked (for a failure message)."""
        return [e.text for e in self.lines(n)]

    def follow(self, callback: Callable[[Entry], None]) -> Callable[[], None]:
        """
        Call ``callback`` with every entry appended from now on.

        :return: a function that stops it (calling it twice is harmless).
        """
        self._followers.append(callback)
        return lambda: self._unfollow(callback)

    @property
    def followers(self) -> int:
        """How many followers are subscribed."""
        return len(self._followers)

    def _unfollow(self, callback: Callable[[Entry], None]) -> None:
        try:
            self._followers.remove(callback)
        except ValueError:
            pass
