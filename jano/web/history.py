"""
The history routes' work: parse the query, ask the durable usage store,
shape the JSON.  Each function returns ``(status, body)`` or a Deferred of
it; a bad parameter is a 400 naming it, a store that cannot be read a 503.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from jano.records import UsageRecord
from jano.telemetry.store import UsageStore
from jano.telemetry.views import usage_entry
from jano.web import params

__all__ = ["HISTORY_PARAMS", "usage_page", "usage_summary", "usage_series", "bad"]

#: Parameters that make ``/usage`` read the durable store rather than the ring.
HISTORY_PARAMS = (b"model", b"outcome", b"caller", b"since", b"until", b"cursor")

Answer = tuple[int, dict[str, object]]
Args = Mapping[bytes, Sequence[bytes]]

log = Logger()


def bad(message: str, kind: str = "invalid_request_error", code: int = 400) -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "code": code}}


def _failed(failure: Any) -> Answer:
    log.failure("reading the usage store failed", failure)
    return 503, bad("the usage history cannot be read now", "unavailable_error", 503)


def usage_page(store: UsageStore, args: Args) -> Union[Answer, Deferred[Answer]]:
    """``/usage`` with filters or a cursor: one page, newest first, and the next cursor."""
    try:
        limit = params.whole(args, "limit", 1, 1000, 50)
        assert limit is not None
        query = store.query(
            limit=limit, model=params.one(args, "model"),
            outcome=params.choice(args, "outcome", params.OUTCOMES),
            caller=params.one(args, "caller"), since=params.moment(args, "since"),
            until=params.moment(args, "until"),
            before_id=params.whole(args, "cursor", 1, 2**62))
    except params.BadParameter as e:
        return 400, bad(str(e))

    def page(found: tuple[list[UsageRecord], Optional[int]]) -> Answer:
        records, cursor = found
        return 200, {"data": [usage_entry(r) for r in records], "limit": limit, "next": cursor}

    return query.addCallbacks(page, _failed)


def usage_summary(store: Optional[UsageStore], args: Args,
                  now: float) -> Union[Answer, Deferred[Answer]]:
    """``/usage/summary``: over the last day unless ``since`` says otherwise."""
    try:
        by = params.choice(args, "by", params.SUMMARY_BY, "model")
        since, until = params.moment(args, "since"), params.moment(args, "until")
    except params.BadParameter as e:
        return 400, bad(str(e))
    if store is None:
        return 503, bad("no usage store", "unavailable_error", 503)
    if since is None:  # a summary over all history is a long scan
        since = now - 86400.0
    d = store.summary(by=by, since=since, until=until)  # type: ignore[arg-type]
    return d.addCallbacks(lambda rows: (200, {"by": by, "data": rows}), _failed)


def usage_series(store: Optional[UsageStore], args: Args,
                 now: float) -> Union[Answer, Deferred[Answer]]:
    """``/usage/series``: the samples, the last hour unless ``since`` says otherwise."""
    try:
        since, until = params.moment(args, "since"), params.moment(args, "until")
    except params.BadParameter as e:
        return 400, bad(str(e))
    if store is None:
        return 503, bad("no usage store", "unavailable_error", 503)
    d = store.series(since if since is not None else now - 3600.0, until)
    return d.addCallbacks(lambda rows: (200, {"data": rows}), _failed)
