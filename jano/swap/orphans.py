"""
What a Jano that died left running, cleaned up by the next one.

``PR_SET_PDEATHSIG`` (:mod:`jano.swap.child`) makes the kernel kill each
model server the moment Jano dies, but only the server process itself: a
helper it started (a worker pool, a ``sh -c`` wrapper's other commands)
lives on when Jano is killed with ``SIGKILL``, holding GPU memory.  So every
child Jano starts carries ``JANO_RUN=<token>`` in its environment, which
whatever it starts inherits, and each Jano that runs managed servers writes a
record ``<token>.run`` (its pid and start time) in a runs folder.  A Jano
starting up reads the records there: for one whose Jano is gone (no such
pid, another process under that pid, or another boot) it kills every process
of this user whose environment holds that token, then deletes the record.
A clean stop deletes its own record after its servers have exited.

Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path
from typing import Callable, Optional

__all__ = ["RUN_ENV", "Runs"]

#: The environment variable that marks a process (and what it starts) as one Jano run's.
RUN_ENV = "JANO_RUN"
_SUFFIX = ".run"


class Runs:
    """
    This Jano's run record in ``folder``, and the reaping of dead runs' processes.

    :param proc: the proc file system (tests hand a folder that looks like it).
    :param kill: ``os.kill`` (tests record it).
    """

    def __init__(self, folder: Path, *, token: Optional[str] = None, pid: Optional[int] = None,
                 proc: Path = Path("/proc"),
                 kill: Callable[[int, int], None] = os.kill) -> None:
        self.folder = folder
        self.token = token or secrets.token_hex(8)
        self.pid = os.getpid() if pid is None else pid
        self._proc = proc
        self._kill = kill
        self._claimed: Optional[Path] = None

    @property
    def supported(self) -> bool:
        return (self._proc / "self").exists() or (self._proc / str(self.pid)).exists()

    def claim(self) -> dict[str, list[int]]:
        """
        Kill what dead runs left, then record this run.

        :return: each dead run's token mapped to the pids killed for it.
        :raises OSError: the folder or the record cannot be written.
        """
        if not self.supported:
            return {}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        reaped = self.reap()
        record = {"pid": self.pid, "start": self._start_time(self.pid), "boot": self._boot()}
        path = self.folder / (self.token + _SUFFIX)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        self._claimed = path
        return reaped

    def release(self) -> None:
        """A clean stop: this run's servers are gone; forget it."""
        if self._claimed is not None:
            try:
                self._claimed.unlink()
            except FileNotFoundError:
                pass
            self._claimed = None

    def reap(self) -> dict[str, list[int]]:
        """Kill the processes of every run whose Jano is gone; delete their records."""
        reaped: dict[str, list[int]] = {}
        for path in sorted(self.folder.glob("*" + _SUFFIX)):
            token = path.name[:-len(_SUFFIX)]
            if token == self.token or not token.isalnum():
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            if isinstance(record, dict) and self._alive(record):
                continue
            if isinstance(record, dict) and record.get("boot") == self._boot():
                reaped[token] = self._kill_marked(token)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return reaped

    # --- /proc ----------------------------------------------------------------------------

    def _alive(self, record: dict[str, object]) -> bool:
        pid = record.get("pid")
        if not isinstance(pid, int) or record.get("boot") != self._boot():
            return False
        start = self._start_time(pid)
        return start is not None and start == record.get("start")

    def _boot(self) -> Optional[str]:
        try:
            return (self._proc / "sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None

    def _start_time(self, pid: int) -> Optional[int]:
        """Field 22 of ``/proc/<pid>/stat``: clock ticks from boot to the process's start."""
        try:
            stat = (self._proc / str(pid) / "stat").read_bytes()
        except OSError:
            return None
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            return int(fields[19])
        except (IndexError, ValueError):
            return None

    def _kill_marked(self, token: str) -> list[int]:
        needle = f"{RUN_ENV}={token}".encode()
        killed = []
        pids = sorted(int(e.name) for e in self._proc.iterdir() if e.name.isdigit())
        for pid in pids:
            if pid == self.pid:
                continue
            try:
                environ = (self._proc / str(pid) / "environ").read_bytes()
            except OSError:  # gone, or another user's
                continue
            if needle in environ.split(b"\0"):
                try:
                    self._kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    continue
                killed.append(pid)
        return killed
