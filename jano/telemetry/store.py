"""
The durable store of finished requests' usage records: one SQLite file.

Exactly the fields ``/usage`` shows are stored (the path without its query
string); never prompt or completion text, query strings or headers.

Writes never block the reactor: :meth:`UsageStore.add` appends to an
in-memory batch (bounded: beyond ``max_pending`` a record is dropped and
counted), and the batch goes to the database every ``batch_interval``
seconds, or at once when ``batch_max`` records wait.  Every SQLite call, the
queries included, runs in one writer thread on one connection: a
``ThreadPool(1, 1)``, whose FIFO order also makes a query see every record
added before it.  A failed write (disk full, file locked, any
``sqlite3.Error``) loses that batch: Jano goes on serving, ``dropped`` counts
the loss and the store logs it at most once a minute.

The schema carries its version; :data:`MIGRATIONS` brings any older file up
to date, one function per version.  A file that is not a database, or fails
``PRAGMA quick_check``, is moved aside at start-up and a fresh one started.
"""

from __future__ import annotations

from functools import partial
from threading import Thread
from typing import Callable, Mapping, Optional, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from jano.records import UsageRecord
from jano.telemetry.database import (MIGRATIONS, SAMPLE_FIELDS, UsageStoreError, Database,
                                     Opened, Prune)
from jano.telemetry.summary import SUMMARY_BY, SummaryBy, summarize

__all__ = ["MIGRATIONS", "SAMPLE_FIELDS", "ThreadRunner", "UsageStore", "UsageStoreError"]

_T = TypeVar("_T")

#: Seconds between two retention passes, and between two log lines about lost records.
PRUNE_EVERY = 60.0
LOG_EVERY = 60.0


class ThreadRunner(Protocol):
    """Runs `work` in the writer thread; the Deferred fires in the reactor thread."""

    def __call__(self, work: Callable[[], _T], /) -> Deferred[_T]: ...


class UsageStore:
    """
    Finished requests' usage records and the dashboard's time series, in SQLite.

    Everything here runs in the reactor thread except the jobs handed to
    `run_in_thread`, which touch nothing but the database.

    :param path: the database file; ``""`` or ``":memory:"``: in memory,
        gone at restart.
    :param clock: the reactor, or a ``Clock`` in tests; when `run_in_thread`
        is not given it must also provide ``IReactorFromThreads``.
    :param run_in_thread: runs a callable in the writer thread and returns
        its result as a Deferred.  Default: a private ``ThreadPool(1, 1)``;
        tests pass ``maybeDeferred`` to run everything synchronously.
    :param batch_interval: the most seconds a record waits before its write.
    :param batch_max: this many waiting records are written at once.
    :param max_pending: records (and samples) waiting or being written
        beyond which new ones are dropped and counted.
    :param retention_days: rows older than this are deleted (``None``: kept).
    :param max_rows: each table keeps at most this many newest rows
        (``None``: no cap).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        *,
        run_in_thread: Optional[ThreadRunner] = None,
        batch_interval: float = 0.25,
        batch_max: int = 500,
        max_pending: int = 10_000,
        retention_days: Optional[float] = None,
        max_rows: Optional[int] = None,
    ) -> None:
        if batch_interval <= 0:
            raise ValueError(f"batch_interval must be positive, not {batch_interval!r}")
        if batch_max < 1 or max_pending < 1:
            raise ValueError(f"batch_max and max_pending must be at least 1, "
                             f"not {batch_max!r} and {max_pending!r}")
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be positive, not {retention_days!r}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows!r}")
        self.path = path
        #: Records and samples lost (backlog full, stopped, or a failed write); only grows.
        self.dropped = 0
        self._clock = clock
        self._pool: Optional[ThreadPool] = None
        if run_in_thread is None:
            if not IReactorFromThreads.providedBy(clock):
                raise TypeError("without run_in_thread, clock must be a reactor "
                                "(IReactorFromThreads)")
            pool = self._pool = ThreadPool(1, 1, name="jano-usage-store")
            # A daemon: a store nobody stopped must not hang the process at exit (SQLite's
            # journal makes an interrupted write roll back).  stop() writes the last batch.
            pool.threadFactory = partial(Thread, daemon=True)  # type: ignore[assignment]
            reactor = clock

            def in_pool(work: Callable[[], _T], /) -> Deferred[_T]:
                return deferToThreadPool(reactor, pool, work)

            run_in_thread = in_pool
        self._run: ThreadRunner = run_in_thread
        self._db = Database(path)
        self._interval = batch_interval
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._retention = retention_days * 86400.0 if retention_days is not None else None
        self._max_rows = max_rows

        self._records: list[UsageRecord] = []
        self._samples: list[tuple[Optional[float], ...]] = []
        self._writing = 0  # records and samples handed to the thread, not yet written
        self._timer: Optional[IDelayedCall] = None
        self._started = False
        self._stopped = False
        self._pruned_at: Optional[float] = None
        self._logged_at: Optional[float] = None
        self._unlogged = 0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Open the database in the writer thread: create or migrate it, or move a
        corrupt file aside and start afresh.  Fails (and every later write is
        lost and counted) if the file cannot be opened or is newer than this Jano.
        """
        if self._started:
            raise RuntimeError("UsageStore.start() called twice")
        if self._pool is not None:
            self._pool.start()
        self._started = True
        now = self._clock.seconds()
        d = self._run(lambda: self._db.open(now))
        self._kick()
        return d.addCallback(self._opened)

    def _opened(self, opened: Opened) -> None:
        if opened.moved_to is not None:
            self.log.error(
                "Usage store {path} was corrupt ({reason}): moved it aside to {moved_to} and "
                "started a fresh database", path=self.path, reason=opened.reason,
                moved_to=opened.moved_to)
        if opened.from_version != opened.to_version:
            self.log.info("Usage store {path}: schema version {old} -> {new} (0: a new file)",
                          path=self.path, old=opened.from_version, new=opened.to_version)

    def stop(self) -> Deferred[None]:
        """Write what waits, close the database and stop the thread (if the store owns it)."""
        if self._stopped or not self._started:
            self._stopped = True
            return succeed(None)
        self._stopped = True
        self._kick()
        d = self._run(self._db.close)
        pool = self._pool
        if pool is not None:
            def stop_pool(result: object) -> object:
                pool.stop()
                return result

            d.addBoth(stop_pool)
        return d

    def flush(self) -> Deferred[None]:
        """Write what waits now; fires once it is written (or lost)."""
        if not self._started or self._stopped:
            return succeed(None)
        self._kick()
        return self._run(lambda: None)

    # -- writing -----------------------------------------------------------

    def add(self, record: UsageRecord) -> None:
        """Keep one finished request's record.  Never raises, never blocks."""
        if not self._refused():
            self._records.append(record)
            self._due()

    def add_sample(self, at: float, values: Mapping[str, Optional[float]]) -> None:
        """
        Keep one time-series sample, batched like records.

        :param values: by :data:`SAMPLE_FIELDS` name; a missing one is ``None``.
        :raises ValueError: for a key not in :data:`SAMPLE_FIELDS`.
        """
        unknown = set(values).difference(SAMPLE_FIELDS)
        if unknown:
            raise ValueError(f"unknown sample fields {sorted(unknown)}; known: {SAMPLE_FIELDS}")
        if not self._refused():
            self._samples.append((at, *(values.get(name) for name in SAMPLE_FIELDS)))
            self._due()

    def _refused(self) -> bool:
        """Count one more lost if the store is stopped or its backlog full."""
        if self._stopped:
            self._lose(1, "store stopped")
        elif len(self._records) + len(self._samples) + self._writing >= self._max_pending:
            self._lose(1, "backlog full")
        else:
            return False
        return True

    def _due(self) -> None:
        if len(self._records) + len(self._samples) >= self._batch_max:
            self._kick()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._kick)

    def _kick(self) -> None:
        """Hand everything waiting to the writer thread."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._started or not (self._records or self._samples):
            return
        records, samples = self._records, self._samples
        self._records, self._samples = [], []
        count = len(records) + len(samples)
        self._writing += count
        prune = self._prune_due()
        self._run(lambda: self._db.write(records, samples, prune)).addBoth(self._written, count)

    def _written(self, result: Optional[str] | Failure, count: int) -> None:
        self._writing -= count
        if isinstance(result, Failure):
            self._lose(count, result.getErrorMessage())
        elif result is not None:
            self._complain("Usage store {path}: retention failed ({why})", why=result)

    def _prune_due(self) -> Optional[Prune]:
        if self._retention is None and self._max_rows is None:
            return None
        now = self._clock.seconds()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return None
        self._pruned_at = now
        before = now - self._retention if self._retention is not None else None
        return Prune(before, self._max_rows)

    def _lose(self, count: int, why: str) -> None:
        self.dropped += count
        self._unlogged += count
        if self._complain("Usage store {path}: {count} record(s) lost ({why}); "
                          "{dropped} since start", count=self._unlogged, why=why,
                          dropped=self.dropped):
            self._unlogged = 0

    def _complain(self, fmt: str, **fields: object) -> bool:
        """Log an error unless one was logged less than a minute ago; say whether it was."""
        now = self._clock.seconds()
        if self._logged_at is not None and now - self._logged_at < LOG_EVERY:
            return False
        self._logged_at = now
        self.log.error(fmt, path=self.path, **fields)
        return True

    # -- reading -----------------------------------------------------------

    def _read(self, work: Callable[[], _T]) -> Deferred[_T]:
        """Run a query after every write handed over so far."""
        if not self._started or self._stopped:
            return fail(UsageStoreError(f"usage store {self.path!r} is not running"))
        self._kick()
        return self._run(work)

    def query(
        self,
        *,
        limit: int,
        model: Optional[str] = None,
        outcome: Optional[str] = None,
        caller: Optional[str] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        before_id: Optional[int] = None,
    ) -> Deferred[tuple[list[UsageRecord], Optional[int]]]:
        """
        One page of records, newest first, and the cursor of the next page
        (``None`` after the last).

        :param since: arrived at or after (epoch seconds).
        :param until: arrived before (epoch seconds).
        :param before_id: a cursor this method returned, not a request id:
            request ids restart at 1 with Jano.
        """
        if limit <= 0:
            return succeed(([], None))
        filters = {column: value for column, value in
                   (("model", model), ("outcome", outcome), ("caller", caller))
                   if value is not None}
        return self._read(lambda: self._db.query(limit, filters, since, until, before_id))

    def summary(
        self, *, by: SummaryBy, since: Optional[float] = None, until: Optional[float] = None,
    ) -> Deferred[list[dict[str, object]]]:
        """
        Totals per model, caller, hour or day (see :func:`jano.telemetry.summary.summarize`).

        ``swapsCaused`` counts the requests that waited for a swap, not swaps.
        """
        if by not in SUMMARY_BY:
            raise ValueError(f"by must be one of {SUMMARY_BY}, not {by!r}")
        return self._read(lambda: summarize(self._db.conn, by, since, until))

    def series(self, since: float, until: Optional[float] = None,
               ) -> Deferred[list[dict[str, object]]]:
        """Samples taken in ``[since, until)``, oldest first, JSON-ready."""
        return self._read(lambda: self._db.series(since, until))
