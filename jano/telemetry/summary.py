"""
The aggregate SQL behind ``/usage/summary``: totals, honest tokens per second
and percentiles per model, caller, hour or day, computed by SQLite.

Runs only in the usage store's writer thread (see :mod:`jano.telemetry.store`),
on its one connection.  One range scan of the ``requests_arrived_at`` index
copies the requests in ``[since, until)``, reduced to the group key and the
columns summed, into a temporary table; one index on it per percentile
metric, ``(k, value)``, is a single sort, after which every group's totals
come from one ``GROUP BY`` and each percentile from one
``ORDER BY value LIMIT 1 OFFSET rank - 1`` walk of that group's slice of the
index.  Window functions (``ROW_NUMBER() OVER (PARTITION BY ...)``) gave the
same numbers about 2.5 times slower.

A percentile is the nearest-rank one: the smallest observed value with at
least p % of the group's values at or below it (rank ``ceil(p * n)``), never
an interpolation.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Literal, Optional

from jano.records import iso, ms

__all__ = ["ERROR_OUTCOMES", "SUMMARY_BY", "SummaryBy", "summarize"]

SummaryBy = Literal["model", "caller", "hour", "day"]
SUMMARY_BY: tuple[SummaryBy, ...] = ("model", "caller", "hour", "day")

#: Outcomes counted in ``errors``.
ERROR_OUTCOMES = ("upstream_error", "upstream_stalled", "rejected")

# The group key of each ``by``: a column, or the whole hours / days since the
# epoch as an integer (cheaper per row than formatting a string).
_KEYS: dict[str, str] = {
    "model": "model",
    "caller": "caller",
    "hour": "CAST(arrived_at AS INTEGER) / 3600",
    "day": "CAST(arrived_at AS INTEGER) / 86400",
}
_SPAN = {"hour": 3600, "day": 86400}

# "Backend-timed" exactly as the recorder counts it for recentGenTokS.
_TIMED = "timed_by = 'backend' AND generation_ms > 0 AND completion_tokens >= 0"

_CREATE = """CREATE TEMP TABLE summary_rows (k, qw REAL, tt REAL, completed INTEGER,
    error INTEGER, prompt INTEGER, completion INTEGER, timed_tokens INTEGER, timed_ms REAL,
    swap INTEGER)"""
_FILL = f"""
INSERT INTO summary_rows
SELECT {{key}}, queue_wait, ttfb, outcome = 'completed', outcome IN {ERROR_OUTCOMES!r},
       prompt_tokens, completion_tokens,
       CASE WHEN {_TIMED} THEN completion_tokens END,
       CASE WHEN {_TIMED} THEN generation_ms END,
       waited_for_swap
FROM requests {{where}}
"""
_TOTALS = """
SELECT k, COUNT(*), SUM(completed), SUM(error), SUM(prompt), SUM(completion),
       SUM(timed_tokens), SUM(timed_ms), SUM(swap), COUNT(qw), COUNT(tt)
FROM summary_rows GROUP BY k
"""
# (column, JSON name of p50, of p95); each column gets an index (k, column).
_PERCENTILES = (("qw", "queueWaitP50Ms", "queueWaitP95Ms"), ("tt", "ttfbP50Ms", "ttfbP95Ms"))


def summarize(
    conn: sqlite3.Connection,
    by: SummaryBy,
    since: Optional[float] = None,
    until: Optional[float] = None,
) -> list[dict[str, object]]:
    """
    One JSON-ready dict per group of the requests that arrived in
    ``[since, until)``.

    Groups by model or caller come most requests first (the key breaks ties;
    ``None`` is its own group: requests without a model or caller); groups
    by hour or day come oldest first, keyed by the ISO start of the hour or
    day in UTC.  Sums over nothing reported are ``None``, never 0.

    Per group: ``requests``; ``completed`` and ``errors`` (outcomes in
    :data:`ERROR_OUTCOMES`); ``promptTokens`` and ``completionTokens`` as
    reported, however timed; ``generationSeconds``, the backend-timed
    generation time, and ``tokS``, the completion tokens of those same
    requests over it (``None`` without any: Jano's own stream timing would
    flatter or slander the backend); the nearest-rank p50 and p95 of
    ``queueWaitMs`` and ``ttfbMs`` over the requests that have one; and
    ``swapsCaused``, the requests that waited for a swap (several requests
    can wait for one swap).

    :raises ValueError: for an unknown `by`.
    """
    key = _KEYS.get(by)
    if key is None:
        raise ValueError(f"by must be one of {SUMMARY_BY}, not {by!r}")
    conditions: list[str] = []
    args: list[float] = []
    if since is not None:
        conditions.append("arrived_at >= ?")
        args.append(since)
    if until is not None:
        conditions.append("arrived_at < ?")
        args.append(until)
    where = "WHERE " + " AND ".join(conditions) if conditions else ""

    conn.execute("DROP TABLE IF EXISTS temp.summary_rows")
    conn.execute(_CREATE)
    try:
        conn.execute(_FILL.format(key=key, where=where), args)
        for column, _, _ in _PERCENTILES:
            conn.execute(f"CREATE INDEX temp.summary_rows_{column} ON summary_rows (k, {column})")
        return _groups(conn, by)
    finally:
        conn.execute("DROP TABLE temp.summary_rows")


def _groups(conn: sqlite3.Connection, by: SummaryBy) -> list[dict[str, object]]:
    groups: dict[Any, dict[str, object]] = {}
    counts: dict[Any, int] = {}
    for row in conn.execute(_TOTALS).fetchall():
        k, requests, completed, errors, prompt, completion, timed, timed_ms, swaps = row[:9]
        seconds = timed_ms / 1000.0 if timed_ms is not None else None
        counts[k] = requests
        group = groups[k] = {
            "key": iso(k * _SPAN[by]) if by in _SPAN else k,
            "requests": requests,
            "completed": completed,
            "errors": errors,
            "promptTokens": prompt,
            "completionTokens": completion,
            "generationSeconds": _round(seconds),
            "tokS": _round(timed / seconds) if timed is not None and seconds else None,
        }
        for (column, p50, p95), n in zip(_PERCENTILES, row[9:]):
            group[p50] = ms(_nearest_rank(conn, column, k, n, 50))
            group[p95] = ms(_nearest_rank(conn, column, k, n, 95))
        group["swapsCaused"] = swaps

    if by in _SPAN:
        order = sorted(groups, key=int)
    else:
        order = sorted(groups, key=lambda k: (-counts[k], k is None, k or ""))
    return [groups[k] for k in order]


def _nearest_rank(conn: sqlite3.Connection, column: str, k: object, n: int,
                  percent: int) -> Optional[float]:
    """The `percent` percentile of the `n` values of `column` in group `k`."""
    if n == 0:
        return None
    rank = (n * percent + 99) // 100  # ceil(n * percent / 100), 1-based
    # Walk the index from whichever end is nearer.
    if rank <= n - rank:
        order, offset = "", rank - 1
    else:
        order, offset = " DESC", n - rank
    value: Optional[float] = conn.execute(
        f"SELECT {column} FROM summary_rows WHERE k IS ? AND {column} IS NOT NULL "
        f"ORDER BY {column}{order} LIMIT 1 OFFSET ?", (k, offset)).fetchone()[0]
    return value


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)
