"""
Query parameters of ``/usage`` and ``/usage/summary``, checked: each bad one
is a :class:`BadParameter` naming it, which the route answers with 400.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping, Optional, Sequence

__all__ = ["BadParameter", "one", "whole", "moment", "choice"]

OUTCOMES = ("completed", "client_disconnected", "upstream_error", "upstream_stalled", "rejected")
SUMMARY_BY = ("model", "caller", "hour", "day")


class BadParameter(ValueError):
    """``str()`` is the message; ``name`` is the parameter."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def one(args: Mapping[bytes, Sequence[bytes]], name: str) -> Optional[str]:
    """The single value of ``name``, or ``None`` when absent."""
    values = args.get(name.encode())
    if values is None:
        return None
    if len(values) != 1:
        raise BadParameter(name, "give it once")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter(name, "not UTF-8") from None


def whole(args: Mapping[bytes, Sequence[bytes]], name: str, low: int, high: int,
          default: Optional[int] = None) -> Optional[int]:
    raw = one(args, name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadParameter(name, f"expected a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise BadParameter(name, f"expected a whole number from {low} to {high}")
    return value


def moment(args: Mapping[bytes, Sequence[bytes]], name: str) -> Optional[float]:
    """Epoch seconds, given as a number or an RFC 3339 timestamp (a zone is required)."""
    raw = one(args, name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadParameter(name, "expected epoch seconds or an RFC 3339 time such as "
                                 "2026-11-30T12:00:00Z") from None
    if stamp.tzinfo is None:
        raise BadParameter(name, "an RFC 3339 time needs a zone (Z or +hh:mm)")
    return stamp.astimezone(timezone.utc).timestamp()


def choice(args: Mapping[bytes, Sequence[bytes]], name: str, allowed: Sequence[str],
           default: Optional[str] = None) -> Optional[str]:
    raw = one(args, name)
    if raw is None:
        return default
    if raw not in allowed:
        raise BadParameter(name, f"expected one of {', '.join(allowed)}")
    return raw
