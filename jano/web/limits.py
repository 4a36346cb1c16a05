"""
Per-caller limits (``server.api_keys[].max_queued`` and
``requests_per_minute``): a caller over its limit gets 429 with
``Retry-After`` before its request reaches the scheduler, so the other
callers, and the starvation bound among what is queued, are unaffected.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping, Optional, Sequence

from jano.config import CallerKey
from jano.errors import Refusal

__all__ = ["CallerLimits"]

#: Retry-After for a caller over its queue limit: a guess would be invented,
#: so it is the shortest sensible wait, not an estimate.
QUEUED_RETRY_AFTER = 1.0


class CallerLimits:
    """
    :param limits: caller name to ``(max_queued, requests_per_minute)``, either
        ``None`` for no limit.
    :param queued: how many requests of a caller wait in the queues now.
    """

    def __init__(self, limits: Mapping[str, tuple[Optional[int], Optional[int]]],
                 queued: Callable[[str], int]) -> None:
        self.limits = dict(limits)
        self._queued = queued
        self._recent: dict[str, deque[float]] = {}

    @classmethod
    def from_keys(cls, keys: Sequence[CallerKey], queued: Callable[[str], int]) -> "CallerLimits":
        return cls({k.name: (k.max_queued, k.requests_per_minute) for k in keys
                    if (k.max_queued, k.requests_per_minute) != (None, None)}, queued)

    def check(self, caller: Optional[str], now: float) -> Optional[tuple[Refusal, float]]:
        """``None`` if ``caller`` may go on (its request is counted), else the refusal."""
        if caller is None:
            return None
        limit = self.limits.get(caller)
        if limit is None:
            return None
        max_queued, per_minute = limit
        if max_queued is not None and self._queued(caller) >= max_queued:
            return (Refusal(429, f"caller {caller!r} already has {max_queued} requests waiting",
                            "rate_limit_error", "caller_queue_full"), QUEUED_RETRY_AFTER)
        if per_minute is not None:
            recent = self._recent.setdefault(caller, deque(maxlen=per_minute))
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            if len(recent) >= per_minute:
                return (Refusal(429, f"caller {caller!r} is over {per_minute} requests per minute",
                                "rate_limit_error", "caller_rate_limited"),
                        recent[0] + 60.0 - now)
            recent.append(now)
        return None
