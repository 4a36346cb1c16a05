"""
A bounded tail of a streamed body: the only bytes :func:`~jano.usage.extract_usage` needs.

Every format Jano knows puts its numbers at the very end of the body, while
the body itself may be of any size, so the tee keeps only the last bytes.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TAIL_LIMIT", "TailBuffer"]

#: Enough for the final event of every captured format, with room to spare.
DEFAULT_TAIL_LIMIT = 65536


class TailBuffer:
    """Keeps only the last `limit` bytes of a body fed to it chunk by chunk."""

    __slots__ = ("_limit", "_buf", "_dropped")

    def __init__(self, limit: int = DEFAULT_TAIL_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"TailBuffer limit must be >= 0, not {limit!r}")
        self._limit = limit
        self._buf = bytearray()
        self._dropped = False

    @property
    def limit(self) -> int:
        return self._limit

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """
        Append one chunk.  Called for every streamed chunk, so the front is
        trimmed only once the buffer holds twice the limit: each byte is copied
        in once and dropped at most once.
        """
        buf = self._buf
        buf += data
        if len(buf) > 2 * self._limit:
            del buf[: len(buf) - self._limit]
            self._dropped = True

    def getvalue(self) -> bytes:
        """The last ``limit`` bytes fed (fewer if fewer were fed)."""
        buf = self._buf
        return bytes(buf[max(0, len(buf) - self._limit) :])

    @property
    def truncated(self) -> bool:
        """True if :meth:`getvalue` lacks bytes from the front of the body."""
        return self._dropped or len(self._buf) > self._limit
