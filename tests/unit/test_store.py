"""
Tests for :mod:`jano.telemetry.store`: the SQLite usage store.

The writer thread is replaced by ``maybeDeferred`` (every job runs at once,
in the test's thread) and time by a ``Clock``; one test drives the real
thread pool.  Nothing sleeps.
"""

from __future__ import annotations

import os
import queue
import sqlite3
from calendar import timegm
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer

from jano.records import Outcome, Usage, UsageRecord
from jano.telemetry import database as database_module
from jano.telemetry.store import MIGRATIONS, UsageStore, UsageStoreError
from jano.telemetry.views import usage_entry

T = TypeVar("T")

BACKEND = Usage("llamacpp-timings", prompt_tokens=12, cached_tokens=4, completion_tokens=100,
                prompt_ms=35.25, generation_ms=2000.0, gen_tok_s=50.0, prompt_tok_s=340.4255319,
                timed_by="backend", load_ms=0.1 + 0.2)
ROUTER = Usage("openai-usage", prompt_tokens=20, completion_tokens=50, generation_ms=1000.0,
               gen_tok_s=50.0, timed_by="router")
DAY = 86400.0
T0 = float(timegm((2024, 1, 1, 10, 15, 0)))  # 2024-01-01T10:15:00Z


def run_now(work: Callable[[], T]) -> Deferred[T]:
    """The writer thread, inline."""
    return maybeDeferred(work)


def result(d: Deferred[T]) -> T:
    """The result of a fired Deferred; raise its failure."""
    out: list[T | Failure] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    value = out[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def rec(id: int, *, model: Optional[str] = "big", at: float = T0, usage: Optional[Usage] = BACKEND,
        outcome: Outcome = "completed", caller: Optional[str] = None,
        queue_wait: Optional[float] = 0.1, ttfb: Optional[float] = 0.2,
        waited_for_swap: bool = False, path: str = "/v1/chat/completions") -> UsageRecord:
    return UsageRecord(id=id, model=model, method="POST", path=path, status=200, stream=True,
                       arrived_at=at, queue_wait=queue_wait, waited_for_swap=waited_for_swap,
                       ttfb=ttfb, duration=2.5, usage=usage, outcome=outcome, caller=caller)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(T0 + 3600)
    return clock


@pytest.fixture
def make(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., UsageStore]]:
    """Start a store on ``tmp_path/usage.db`` (or the given path); stopped after the test."""
    stores: list[UsageStore] = []

    def make(path: Optional[str] = None, **kwargs: Any) -> UsageStore:
        store = UsageStore(str(tmp_path / "usage.db") if path is None else path, clock,
                           run_in_thread=run_now, **kwargs)
        stores.append(store)
        result(store.start())
        return store

    yield make
    for store in stores:
        result(store.stop())


def page(store: UsageStore, **kwargs: Any) -> tuple[list[UsageRecord], Optional[int]]:
    return result(store.query(**{"limit": 100, **kwargs}))


def ids(store: UsageStore, **kwargs: Any) -> list[int]:
    return [r.id for r in page(store, **kwargs)[0]]


def count(path: Path, table: str = "requests") -> int:
    """Rows in `table`, read by a connection of the test's own."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


# -- schema ------------------------------------------------------------------------------


def test_new_file_is_wal_at_the_current_version(make: Callable[..., UsageStore],
                                                tmp_path: Path) -> None:
    make()
    conn = sqlite3.connect(tmp_path / "usage.db")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (len(MIGRATIONS),)
    conn.close()


# Version 1 as shipped, by hand: what old files hold.  Never edit it; a schema change is a
# new function appended to MIGRATIONS, and this test shows it runs on such a file.
V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL);
INSERT INTO schema_version VALUES (1, 1700000000.0);
CREATE TABLE requests (
    seq INTEGER PRIMARY KEY, request_id INTEGER NOT NULL, model TEXT, method TEXT NOT NULL,
    path TEXT NOT NULL, status INTEGER, stream INTEGER NOT NULL, arrived_at REAL NOT NULL,
    queue_wait REAL, waited_for_swap INTEGER NOT NULL, ttfb REAL, duration REAL,
    outcome TEXT NOT NULL, caller TEXT, source TEXT, prompt_tokens INTEGER, cached_tokens INTEGER,
    completion_tokens INTEGER, prompt_ms REAL, generation_ms REAL, gen_tok_s REAL,
    prompt_tok_s REAL, timed_by TEXT, load_ms REAL);
CREATE INDEX requests_arrived_at ON requests (arrived_at);
CREATE TABLE samples (seq INTEGER PRIMARY KEY, at REAL NOT NULL, tok_s REAL, requests REAL,
    queue_depth REAL, in_flight REAL, swaps REAL);
CREATE INDEX samples_at ON samples (at);
INSERT INTO requests VALUES (7, 41, 'big', 'POST', '/v1/chat/completions', 200, 0, 1704104100.0,
    0.5, 1, 1.0, 3.0, 'completed', 'alice', 'ollama', 3, NULL, 9, 1.5, 90.0, 100.0, 2000.0,
    'backend', 1200.0);
"""


def test_a_version_1_file_opens_and_migrates(make: Callable[..., UsageStore], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.close()
    expected = UsageRecord(41, "big", "POST", "/v1/chat/completions", 200, False, 1704104100.0,
                           0.5, True, 1.0, 3.0, Usage("ollama", 3, None, 9, 1.5, 90.0, 100.0,
                                                      2000.0, "backend", 1200.0),
                           "completed", "alice")
    store = make(str(path))
    assert page(store) == ([expected], None)
    result(store.stop())

    # The next schema change: one function appended to MIGRATIONS.
    runs: list[int] = []

    def version_2(conn: sqlite3.Connection) -> None:
        runs.append(2)
        conn.execute("ALTER TABLE requests ADD COLUMN region TEXT")

    monkeypatch.setattr(database_module, "MIGRATIONS", [*MIGRATIONS, version_2])
    store = make(str(path))
    store.add(rec(42))
    assert ids(store) == [42, 41]
    result(store.stop())
    result(make(str(path)).stop())  # already at version 2: nothing runs
    assert runs == [2]
    conn = sqlite3.connect(path)
    assert [v for v, in conn.execute("SELECT version FROM schema_version ORDER BY version")] \
        == [1, 2]
    assert "region" in [row[1] for row in conn.execute("PRAGMA table_info(requests)")]
    conn.close()


def test_a_newer_file_is_refused_and_left_alone(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1 + "INSERT INTO schema_version VALUES (99, 0);")
    conn.close()
    before = path.read_bytes()
    store = UsageStore(str(path), clock, run_in_thread=run_now)
    with pytest.raises(UsageStoreError, match="99"):
        result(store.start())
    store.add(rec(1))
    result(store.flush())
    assert store.dropped == 1  # lost, counted, no exception
    result(store.stop())
    assert path.read_bytes() == before


def test_a_corrupt_file_is_moved_aside(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    store = UsageStore(str(path), clock, run_in_thread=run_now)
    with capturedLogs() as events:
        result(store.start())
    aside = tmp_path / "usage.db.corrupt-20240101T111500Z"
    assert aside.read_bytes() == garbage
    assert [e["moved_to"] for e in events if "moved_to" in e] == [str(aside)]
    store.add(rec(1))
    assert ids(store) == [1]
    result(store.stop())


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_memory(make: Callable[..., UsageStore], path: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = make(path)
    store.add(rec(1))
    assert ids(store) == [1]
    assert os.listdir(tmp_path) == []


# -- writing -----------------------------------------------------------------------------


def test_records_wait_for_the_interval_or_a_full_batch(make: Callable[..., UsageStore],
                                                       clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    store = make(batch_interval=0.25, batch_max=3)
    store.add(rec(1))
    store.add(rec(2))
    clock.advance(0.24)
    assert count(path) == 0
    clock.advance(0.01)
    assert count(path) == 2
    for i in (3, 4, 5):
        store.add(rec(i))
    assert count(path) == 5  # batch_max reached: written without waiting
    assert not clock.getDelayedCalls()


def test_records_round_trip(make: Callable[..., UsageStore], tmp_path: Path) -> None:
    store = make()
    with_usage = rec(1, caller="alice", waited_for_swap=True)
    without = UsageRecord(2, None, "GET", "/api/tags?q=secret#frag", None, False, T0 + 0.125,
                          None, False, None, None, None, "rejected")
    store.add(with_usage)
    store.add(without)
    records, cursor = page(store)
    assert records == [without._replace(path="/api/tags"), with_usage]
    assert cursor is None
    assert [usage_entry(r) for r in records] == [usage_entry(without), usage_entry(with_usage)]
    result(store.stop())
    assert all(b"secret" not in p.read_bytes() for p in tmp_path.iterdir())


def test_a_backlog_beyond_max_pending_is_dropped(clock: Clock, tmp_path: Path) -> None:
    jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def held(work: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        jobs.append((work, d))
        return d

    store = UsageStore(str(tmp_path / "usage.db"), clock, run_in_thread=held, batch_max=2,
                       max_pending=4)
    store.start()
    for i in range(1, 6):
        store.add(rec(i))  # two batches handed over, still being written: the fifth is lost
    assert (len(jobs), store.dropped) == (3, 1)
    store.add_sample(T0, {"requests": 1.0})
    assert store.dropped == 2
    store.stop()
    while jobs:
        work, d = jobs.pop(0)
        maybeDeferred(work).chainDeferred(d)
    assert count(tmp_path / "usage.db") == 4


def test_a_full_disk_loses_records_and_logs_once_a_minute(
        make: Callable[..., UsageStore], clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    class FullDisk(sqlite3.Connection):
        full = False

        def executemany(self, sql: str, rows: Any, /) -> sqlite3.Cursor:
            if FullDisk.full:
                raise sqlite3.OperationalError("database or disk is full")
            return super().executemany(sql, rows)

    def connect(path: str) -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               factory=FullDisk)

    monkeypatch.setattr(database_module, "_connect", connect)
    store = make()
    store.add(rec(1))
    result(store.flush())

    FullDisk.full = True
    with capturedLogs() as events:
        for i in (2, 3, 4):
            store.add(rec(i))
        result(store.flush())
        store.add(rec(5))
        store.add(rec(6))
        clock.advance(59)
        assert (store.dropped, [e["count"] for e in events]) == (5, [3])
        clock.advance(1)
        store.add(rec(7))
        result(store.flush())
    assert (store.dropped, [e["count"] for e in events]) == (6, [3, 3])
    assert "database or disk is full" in events[0]["why"]

    FullDisk.full = False  # and Jano goes on
    store.add(rec(8))
    assert ids(store) == [8, 1]
    assert store.dropped == 6


def test_the_real_thread_pool(tmp_path: Path) -> None:
    @implementer(IReactorFromThreads)
    class ThreadedClock(Clock):
        """A Clock that runs ``callFromThread`` calls when the test waits."""

        def __init__(self) -> None:
            super().__init__()
            self.from_threads: queue.Queue[Callable[[], object]] = queue.Queue()

        def callFromThread(self, callable: Callable[..., Any], *args: object,
                           **kwargs: object) -> None:
            self.from_threads.put(lambda: callable(*args, **kwargs))

        def wait(self, d: Deferred[T]) -> T:
            while not d.called:
                self.from_threads.get(timeout=10)()
            return result(d)

    reactor = ThreadedClock()
    store = UsageStore(str(tmp_path / "usage.db"), reactor)
    reactor.wait(store.start())
    try:
        store.add(rec(1))
        assert [r.id for r in reactor.wait(store.query(limit=5))[0]] == [1]
    finally:
        reactor.wait(store.stop())
    assert count(tmp_path / "usage.db") == 1


# -- reading -----------------------------------------------------------------------------


def test_filters_and_paging_by_the_stores_own_key(make: Callable[..., UsageStore]) -> None:
    store = make()
    # Request ids restart with Jano: 1..15, then 1..10 again.
    records = [rec(i, at=T0 + n, model=("big", "small")[n % 2],
                   outcome=("completed", "rejected")[n % 3 == 0],
                   caller=("alice", None)[n % 5 == 0])
               for n, i in enumerate([*range(1, 16), *range(1, 11)])]
    for r in records:
        store.add(r)
    seen: list[UsageRecord] = []
    cursor: Optional[int] = None
    pages = 0
    while True:
        got, cursor = page(store, limit=10, before_id=cursor)
        seen += got
        pages += 1
        if cursor is None:
            break
    assert (pages, seen) == (3, records[::-1])

    assert ids(store, model="small") == [r.id for r in records[::-1] if r.model == "small"]
    assert ids(store, outcome="rejected", caller="alice") == [
        r.id for r in records[::-1] if r.outcome == "rejected" and r.caller == "alice"]
    assert ids(store, since=T0 + 20) == [10, 9, 8, 7, 6]
    assert ids(store, since=T0 + 2, until=T0 + 4) == [4, 3]
    _, cursor = page(store, limit=5, since=T0 + 20)
    assert cursor is None  # exactly one page: no empty page after it
    assert page(store, limit=0) == ([], None)


def test_summary_by_model_and_caller(make: Callable[..., UsageStore]) -> None:
    store = make()
    store.add(rec(1, usage=BACKEND, queue_wait=0.1, ttfb=0.5, waited_for_swap=True, caller="alice"))
    store.add(rec(2, usage=ROUTER, queue_wait=0.2, ttfb=0.6, caller="alice"))
    store.add(rec(3, usage=None, queue_wait=0.3, ttfb=None, outcome="upstream_error"))
    store.add(rec(4, usage=None, queue_wait=None, ttfb=None, outcome="rejected"))
    store.add(rec(5, model="small", usage=ROUTER, outcome="client_disconnected"))
    for n in range(1, 21):  # 20 known values: nearest-rank p50 is the 10th, p95 the 19th
        store.add(rec(100 + n, model="pct", usage=None, queue_wait=n / 1000, ttfb=n / 100,
                      caller="bob"))

    by_model = result(store.summary(by="model"))
    assert by_model == [
        {"key": "pct", "requests": 20, "completed": 20, "errors": 0, "promptTokens": None,
         "completionTokens": None, "generationSeconds": None, "tokS": None,
         "queueWaitP50Ms": 10.0, "queueWaitP95Ms": 19.0, "ttfbP50Ms": 100.0, "ttfbP95Ms": 190.0,
         "swapsCaused": 0},
        # tokS: backend-timed only, 100 tokens in 2 s; the router-timed 50 tokens are out.
        {"key": "big", "requests": 4, "completed": 2, "errors": 2, "promptTokens": 32,
         "completionTokens": 150, "generationSeconds": 2.0, "tokS": 50.0,
         "queueWaitP50Ms": 200.0, "queueWaitP95Ms": 300.0, "ttfbP50Ms": 500.0,
         "ttfbP95Ms": 600.0, "swapsCaused": 1},
        {"key": "small", "requests": 1, "completed": 0, "errors": 0, "promptTokens": 20,
         "completionTokens": 50, "generationSeconds": None, "tokS": None,
         "queueWaitP50Ms": 100.0, "queueWaitP95Ms": 100.0, "ttfbP50Ms": 200.0,
         "ttfbP95Ms": 200.0, "swapsCaused": 0},
    ]
    by_caller = result(store.summary(by="caller"))
    assert [(g["key"], g["requests"], g["tokS"]) for g in by_caller] == [
        ("bob", 20, None), (None, 3, None), ("alice", 2, 50.0)]
    with pytest.raises(ValueError):
        store.summary(by="week")  # type: ignore[arg-type]


def test_summary_by_hour_and_day(make: Callable[..., UsageStore]) -> None:
    store = make()
    for i, minutes in enumerate([0, 30, 50, 14 * 60 + 15], 1):  # 10:15, 10:45, 11:05, 00:30
        store.add(rec(i, at=T0 + minutes * 60))

    def keys(**kwargs: Any) -> list[tuple[object, object]]:
        return [(g["key"], g["requests"]) for g in result(store.summary(**kwargs))]

    assert keys(by="hour") == [("2024-01-01T10:00:00.000Z", 2), ("2024-01-01T11:00:00.000Z", 1),
                               ("2024-01-02T00:00:00.000Z", 1)]
    assert keys(by="day") == [("2024-01-01T00:00:00.000Z", 3), ("2024-01-02T00:00:00.000Z", 1)]
    assert keys(by="day", since=T0 + 45 * 60, until=T0 + DAY) == [
        ("2024-01-01T00:00:00.000Z", 1), ("2024-01-02T00:00:00.000Z", 1)]
    assert result(store.summary(by="model", since=T0 + DAY)) == []


def test_samples_round_trip(make: Callable[..., UsageStore]) -> None:
    store = make()
    store.add_sample(T0 + 10, {"tok_s": 41.5, "requests": 3.0, "queue_depth": 0.0,
                               "in_flight": 1.0, "swaps": 0.0})
    store.add_sample(T0, {"requests": 2.0})
    assert result(store.series(T0)) == [
        {"at": "2024-01-01T10:15:00.000Z", "tokS": None, "requests": 2.0, "queueDepth": None,
         "inFlight": None, "swaps": None},
        {"at": "2024-01-01T10:15:10.000Z", "tokS": 41.5, "requests": 3.0, "queueDepth": 0.0,
         "inFlight": 1.0, "swaps": 0.0},
    ]
    assert [s["at"] for s in result(store.series(T0 + 1, T0 + 20))] == ["2024-01-01T10:15:10.000Z"]
    with pytest.raises(ValueError):
        store.add_sample(T0, {"tokS": 1.0})


# -- retention ---------------------------------------------------------------------------


def test_retention_by_days(make: Callable[..., UsageStore], clock: Clock,
                           tmp_path: Path) -> None:
    now = clock.seconds()
    store = make(retention_days=7)
    store.add(rec(1, at=now - 8 * DAY))
    store.add(rec(2, at=now - 6 * DAY))
    store.add_sample(now - 8 * DAY, {"requests": 1.0})
    store.add_sample(now - 6 * DAY, {"requests": 2.0})
    assert ids(store) == [2]
    assert [s["requests"] for s in result(store.series(0))] == [2.0]
    store.add(rec(3, at=now - 9 * DAY))
    clock.advance(59)
    assert ids(store) == [3, 2]  # at most one pass a minute
    clock.advance(1)
    store.add(rec(4, at=now))
    assert ids(store) == [4, 2]


def test_retention_by_row_cap(make: Callable[..., UsageStore]) -> None:
    store = make(max_rows=5)
    for i in range(1, 9):
        store.add(rec(i))
        store.add_sample(T0 + i, {"requests": float(i)})
    assert ids(store) == [8, 7, 6, 5, 4]
    assert [s["requests"] for s in result(store.series(0))] == [4.0, 5.0, 6.0, 7.0, 8.0]


def test_the_folder_of_a_new_database_is_created_private(make: Callable[..., UsageStore],
                                                         tmp_path: Path) -> None:
    path = tmp_path / "state" / "jano" / "usage.sqlite3"
    make(str(path))
    assert path.exists()
    assert (path.parent.stat().st_mode & 0o777) == 0o700
