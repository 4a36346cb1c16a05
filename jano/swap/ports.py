"""
The ports of managed servers: one per model, allocated once from
``[processes] port_range`` and kept for the life of the Jano process, and
checked free before each start so Jano never talks to a stranger's server.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Optional

from jano.records import ModelSpec

__all__ = ["port_is_free", "allocate_ports", "PortsExhausted"]


class PortsExhausted(Exception):
    """No free port is left in the range; ``str()`` is the one-line reason."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """
    Whether a server could bind ``host:port`` now: bind a socket (as a
    server would, with ``SO_REUSEADDR``) and close it at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def allocate_ports(models: Iterable[ModelSpec], port_range: tuple[int, int], *,
                   keep: Mapping[str, int] = {},
                   is_free: Callable[[int], bool] = port_is_free) -> list[ModelSpec]:
    """
    Give every managed model without a fixed ``port`` one from ``port_range``
    (in order, skipping ports taken by another model or by another program
    right now), and fill ``{port}`` in its upstream.

    :param keep: ports already given, by model name (a reload keeps them).
    :raises PortsExhausted: when the range has no port left.
    """
    models = list(models)
    taken = {m.port for m in models if m.port is not None} | set(keep.values())
    first, last = port_range
    candidates = iter(range(first, last + 1))
    out: list[ModelSpec] = []
    for spec in models:
        if not spec.managed:
            out.append(spec)
            continue
        port: Optional[int] = spec.port if spec.port is not None else keep.get(spec.name)
        if port is None:
            for candidate in candidates:
                if candidate not in taken and is_free(candidate):
                    port = candidate
                    break
            else:
                raise PortsExhausted(
                    f"processes.port_range {first}-{last} has no free port left for "
                    f"{spec.name!r}; widen it or give the model a port")
        taken.add(port)
        out.append(replace(spec, port=port, upstream=spec.upstream.replace("{port}", str(port))))
    return out
