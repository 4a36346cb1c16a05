"""
Write-through for TCP transports.

``ITransport.write`` buffers and asks the reactor to call ``doWrite`` when the
socket is writable: for a small write on an idle connection that is two
``epoll_ctl`` calls and one more reactor turn before the bytes leave.  A
streamed token chunk is exactly that case, once per token.  :func:`send_now`
sends at once when nothing is queued on the transport, and leaves everything
else (a partial send, a full socket, an error, a transport that is not a
plain TCP or UNIX connection) to the transport's own buffered ``write``, so
ordering, flow control (``pauseProducing`` when the buffer fills) and error
handling stay Twisted's.

It reads ``FileDescriptor``'s buffer bookkeeping (``dataBuffer``,
``offset``, ``_tempDataLen``) and calls ``writeSomeData``, which is the
method ``doWrite`` itself uses.  If a Twisted release renames any of these,
Jano falls back to plain ``write`` (and the unit test of this module fails,
so nobody is surprised).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent in this reactor turn when the transport has nothing queued."""
    if isinstance(transport, tcp.Connection):
        try:
            idle = (not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
                    and transport.connected and not transport.disconnecting
                    and not transport._writeDisconnected)
        except AttributeError:  # pragma: no cover - a Twisted release that renamed them
            idle = False
        if idle:
            sent = transport.writeSomeData(data)
            if isinstance(sent, int) and sent >= 0:
                if sent == len(data):
                    return
                data = data[sent:]
    transport.write(data)
