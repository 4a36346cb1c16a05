"""
The writer thread's side of the usage store: the SQLite file itself, its
schema and migrations, writes, retention, reads.  Everything here runs in
the store's one writer thread (:mod:`jano.telemetry.store` hands the work
over); nothing here touches the reactor.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from jano.records import Usage, UsageRecord, iso

SAMPLE_FIELDS = ("tok_s", "requests", "queue_depth", "in_flight", "swaps")
_SAMPLE_KEYS = ("tokS", "requests", "queueDepth", "inFlight", "swaps")
_MEMORY = ("", ":memory:")


class UsageStoreError(Exception):
    """The database cannot be used: not started, or written by a newer Jano."""


# --- schema ----------------------------------------------------------------------------


def _version_1(conn: sqlite3.Connection) -> None:
    # seq: the store's own key and /usage's paging cursor (request ids restart with Jano).
    # Usage columns are all NULL when the response carried no usage (source is never NULL
    # otherwise).
    conn.execute("""
        CREATE TABLE requests (
            seq INTEGER PRIMARY KEY,
            request_id INTEGER NOT NULL,
            model TEXT,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            status INTEGER,
            stream INTEGER NOT NULL,
            arrived_at REAL NOT NULL,
            queue_wait REAL,
            waited_for_swap INTEGER NOT NULL,
            ttfb REAL,
            duration REAL,
            outcome TEXT NOT NULL,
            caller TEXT,
            source TEXT,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            completion_tokens INTEGER,
            prompt_ms REAL,
            generation_ms REAL,
            gen_tok_s REAL,
            prompt_tok_s REAL,
            timed_by TEXT,
            load_ms REAL
        )""")
    conn.execute("CREATE INDEX requests_arrived_at ON requests (arrived_at)")
    conn.execute("""
        CREATE TABLE samples (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            tok_s REAL,
            requests REAL,
            queue_depth REAL,
            in_flight REAL,
            swaps REAL
        )""")
    conn.execute("CREATE INDEX samples_at ON samples (at)")


#: ``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1`` inside one
#: transaction; version 0 is an empty file.  To change the schema, append a function:
#: the current version is ``len(MIGRATIONS)``.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_version_1]

_REQUEST_COLUMNS = (
    "request_id", "model", "method", "path", "status", "stream", "arrived_at", "queue_wait",
    "waited_for_swap", "ttfb", "duration", "outcome", "caller",
    "source", "prompt_tokens", "cached_tokens", "completion_tokens", "prompt_ms",
    "generation_ms", "gen_tok_s", "prompt_tok_s", "timed_by", "load_ms",
)
_INSERT_REQUEST = (f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(_REQUEST_COLUMNS))})")
_SELECT_REQUESTS = f"SELECT seq, {', '.join(_REQUEST_COLUMNS)} FROM requests"
_INSERT_SAMPLE = (f"INSERT INTO samples (at, {', '.join(SAMPLE_FIELDS)}) "
                  f"VALUES (?, {', '.join('?' * len(SAMPLE_FIELDS))})")
_NO_USAGE = (None,) * 10


def _row(r: UsageRecord) -> tuple[object, ...]:
    head = (r.id, r.model, r.method, r.path.split("?", 1)[0].split("#", 1)[0], r.status,
            int(r.stream), r.arrived_at, r.queue_wait, int(r.waited_for_swap), r.ttfb,
            r.duration, r.outcome, r.caller)
    u = r.usage
    if u is None:
        return head + _NO_USAGE
    return head + (u.source, u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.prompt_ms,
                   u.generation_ms, u.gen_tok_s, u.prompt_tok_s, u.timed_by, u.load_ms)


def _record(row: Sequence[Any]) -> UsageRecord:
    """A ``_SELECT_REQUESTS`` row (``seq`` first) back as the record that was stored."""
    usage = None if row[14] is None else Usage(*row[14:24])
    return UsageRecord(
        id=row[1], model=row[2], method=row[3], path=row[4], status=row[5],
        stream=bool(row[6]), arrived_at=row[7], queue_wait=row[8],
        waited_for_swap=bool(row[9]), ttfb=row[10], duration=row[11], usage=usage,
        outcome=row[12], caller=row[13],
    )


def _connect(path: str) -> sqlite3.Connection:
    """The one connection (autocommit: transactions are explicit)."""
    return sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)


class _Corrupt(Exception):
    """The file is not a usable database."""


@dataclass(frozen=True)
class Opened:
    from_version: int
    to_version: int
    #: Where a corrupt file went, and why it was judged corrupt.
    moved_to: Optional[str] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class Prune:
    before: Optional[float]
    max_rows: Optional[int]


# --- the writer thread's side ----------------------------------------------------------


class Database:
    """The connection and every statement; used only in the writer thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: Optional[sqlite3.Connection] = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageStoreError(f"usage store {self.path!r} is not open")
        return self._conn

    def open(self, now: float) -> Opened:
        if self.path in _MEMORY:
            self._conn = _connect(":memory:")
            return self._migrate(self._conn)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, mode=0o700, exist_ok=True)  # ~/.local/state/jano on a new box
        conn = _connect(self.path)
        try:
            self._check(conn)
            opened = self._migrate(conn)
        except BaseException as e:
            conn.close()
            if not (isinstance(e, _Corrupt) or isinstance(e, sqlite3.DatabaseError)
                    and _is_corrupt(e)):
                raise
            moved_to = _move_aside(self.path, now)
            conn = _connect(self.path)
            self._check(conn)
            opened = self._migrate(conn)
            opened = Opened(opened.from_version, opened.to_version, moved_to, str(e))
        self._conn = conn
        return opened

    @staticmethod
    def _check(conn: sqlite3.Connection) -> None:
        result = conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise _Corrupt("; ".join(str(r[0]) for r in result[:3]))

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> Opened:
        current = 0
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
            (current,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        target = len(MIGRATIONS)
        if current > target:  # refused before anything is written
            raise UsageStoreError(f"schema version {current} is newer than this Jano's ({target})")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL with synchronous=NORMAL cannot corrupt; a power loss may cost the last batch.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                     "(version INTEGER NOT NULL, applied_at REAL NOT NULL)")
        for version in range(current, target):
            conn.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[version](conn)
                conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version + 1, time.time()))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return Opened(current, target)

    def write(self, records: list[UsageRecord], samples: list[tuple[Optional[float], ...]],
              prune: Optional[Prune]) -> Optional[str]:
        """Insert both batches in one transaction; then prune (its error is returned)."""
        conn = self.conn
        rows = [_row(r) for r in records]
        conn.execute("BEGIN")
        try:
            if rows:
                conn.executemany(_INSERT_REQUEST, rows)
            if samples:
                conn.executemany(_INSERT_SAMPLE, samples)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if prune is None:
            return None
        try:
            self._prune(conn, prune)
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return str(e)
        return None

    @staticmethod
    def _prune(conn: sqlite3.Connection, prune: Prune) -> None:
        conn.execute("BEGIN")
        for table, column in (("requests", "arrived_at"), ("samples", "at")):
            if prune.before is not None:
                conn.execute(f"DELETE FROM {table} WHERE {column} < ?", (prune.before,))
            if prune.max_rows is not None:
                conn.execute(f"DELETE FROM {table} WHERE seq <= (SELECT seq FROM {table} "
                             "ORDER BY seq DESC LIMIT 1 OFFSET ?)", (prune.max_rows,))
        conn.execute("COMMIT")

    def query(self, limit: int, filters: Mapping[str, object], since: Optional[float],
              until: Optional[float], before: Optional[int],
              ) -> tuple[list[UsageRecord], Optional[int]]:
        conditions = [f"{column} = ?" for column in filters]
        args: list[object] = list(filters.values())
        if before is not None:
            conditions.append("seq < ?")
            args.append(before)
        times = [(c, v) for c, v in (("arrived_at >= ?", since), ("arrived_at < ?", until))
                 if v is not None]
        if times:
            # Walk the primary key newest first, as without a time filter, but only from the
            # lowest to the highest seq of the window (index-only scans of arrived_at):
            # sorting a wide window the index found costs seconds on a big file.
            window = " AND ".join(c for c, _ in times)
            values = [v for _, v in times]
            bound = f"(SELECT {{}}(seq) FROM requests INDEXED BY requests_arrived_at WHERE {window})"
            conditions.append("seq >= " + bound.format("MIN"))
            args += values
            if until is not None:
                conditions.append("seq <= " + bound.format("MAX"))
                args += values
            conditions.append(window)
            args += values
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        rows = self.conn.execute(f"{_SELECT_REQUESTS} NOT INDEXED{where} ORDER BY seq DESC "
                                 "LIMIT ?", [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_record(row) for row in rows], rows[-1][0] if more else None

    def series(self, since: float, until: Optional[float]) -> list[dict[str, object]]:
        sql = f"SELECT at, {', '.join(SAMPLE_FIELDS)} FROM samples WHERE at >= ?"
        args = [since]
        if until is not None:
            sql += " AND at < ?"
            args.append(until)
        return [{"at": iso(row[0]), **dict(zip(_SAMPLE_KEYS, row[1:]))}
                for row in self.conn.execute(sql + " ORDER BY at, seq", args)]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")
            finally:
                conn.close()


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return type(e) is sqlite3.DatabaseError
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _move_aside(path: str, now: float) -> str:
    """Rename `path` (and its -wal/-shm files, kept paired) to ``<path>.corrupt-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    aside = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(aside):
        aside = f"{path}.corrupt-{stamp}-{n}"
        n += 1
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


# --- the reactor's side ----------------------------------------------------------------
