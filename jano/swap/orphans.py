"""
What a Jano that died left running, cleaned up by the next one.

``PR_SET_PDEATHSIG`` (:mod:`jano.swap.child`) makes the kernel kill each
model server the moment Jano dies, but only the server process itself: a
helper it started (a worker pool, a ``sh -c`` wrapper's other commands)
lives on when Jano is killed with ``SIGKILL``, holding GPU memory.  So every
child Jano starts carries ``JANO_RUN=<token>`` in its environment, which
whatever it starts inherits, and each Jano that runs managed servers writes a
record ``<token>.run`` (its pid, start time, boot and pid namespace) in a
runs folder.  A Jano starting up reads the records there: for one whose Jano
is gone (no such pid, or another process under that pid) it kills every
process of its own user whose environment holds that token, then deletes the
record.  A clean stop deletes its own record after its servers have exited.

What it never does: read a record it cannot trust (a symlink, not a regular
file, over 4 KiB, in a folder others may write to), act on a record from
another boot or pid namespace (a container sharing the folder), or kill a
process of another user.  A kill goes through a pidfd opened before the
environment is read again, so a pid reused in between is not hit.

Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import signal
import stat
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["RUN_ENV", "Runs"]

#: The environment variable that marks a process (and what it starts) as one Jano run's.
RUN_ENV = "JANO_RUN"
_SUFFIX = ".run"
_TOKEN = re.compile(r"[0-9a-f]{16}")
#: A record is a few dozen bytes; anything larger is not one.
_MAX_RECORD = 4096
#: Seconds after which a half-written record (``<token>.tmp``) is left over from a crash.
STALE_TMP = 60.0


class Runs:
    """
    This Jano's run record in ``folder``, and the reaping of dead runs' processes.

    :param pid: this Jano's pid (default: read at :meth:`claim`, after twistd
        has daemonized).
    :param proc: the proc file system (tests hand a folder that looks like it).
    :param kill: ``kill(pid, signal)`` for a marked process (tests record it);
        by default a pidfd, after the mark is read again through it.
    """

    def __init__(self, folder: Path, *, token: Optional[str] = None, pid: Optional[int] = None,
                 proc: Path = Path("/proc"),
                 kill: Optional[Callable[[int, int], None]] = None) -> None:
        self.folder = folder
        self.token = token or secrets.token_hex(8)
        self._pid = pid
        self._proc = proc
        self._kill = kill
        self._claimed: Optional[Path] = None

    @property
    def pid(self) -> int:
        return os.getpid() if self._pid is None else self._pid

    @property
    def supported(self) -> bool:
        return (self._proc / str(self.pid)).is_dir()

    def claim(self) -> dict[str, list[int]]:
        """
        Kill what dead runs left, then record this run.

        :return: each dead run's token mapped to the pids killed for it.
        :raises OSError: the folder is not safe to use, or the record cannot
            be written (the kills done before that stand).
        """
        if not self.supported:
            return {}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(self.folder, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(f"{self.folder} is not a folder")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise PermissionError(f"{self.folder} must be owned by this user and writable by "
                                  "no one else")
        reaped = self.reap()
        start = self._start_time(self.pid)
        if start is None:
            raise OSError(f"cannot read this process's start time in {self._proc}")
        record = {"pid": self.pid, "start": start, "boot": self._boot(),
                  "pidns": self._pid_namespace()}
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
            except OSError:
                pass
            self._claimed = None

    def reap(self) -> dict[str, list[int]]:
        """Kill the processes of every run whose Jano is gone; delete their records."""
        reaped: dict[str, list[int]] = {}
        for path in sorted(self.folder.glob("*" + _SUFFIX)):
            token = path.name[:-len(_SUFFIX)]
            if token == self.token or not _TOKEN.fullmatch(token):
                continue
            record = self._read(path)
            if record is not None and (record.get("boot") != self._boot()
                                       or record.get("pidns") != self._pid_namespace()):
                if record.get("boot") != self._boot():
                    self._unlink(path)  # nothing of another boot is running
                continue  # another pid namespace's: not ours to judge
            if record is not None and self._alive(record):
                continue
            if record is not None:
                reaped[token] = self._kill_marked(token)
            self._unlink(path)
        now = time.time()
        for tmp in self.folder.glob("*.tmp"):  # a record half written when its Jano died
            try:
                stale = now - os.stat(tmp, follow_symlinks=False).st_mtime > STALE_TMP
            except OSError:
                continue
            if stale and _TOKEN.fullmatch(tmp.name[:-len(".tmp")]):
                self._unlink(tmp)
        return reaped

    # --- the records ------------------------------------------------------------------------

    def _read(self, path: Path) -> Optional[dict[str, object]]:
        """The record at ``path``; ``None`` for anything that is not one (never followed)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_RECORD:
                return None
            data = os.read(fd, _MAX_RECORD)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    # --- /proc ----------------------------------------------------------------------------

    def _alive(self, record: dict[str, object]) -> bool:
        pid = record.get("pid")
        if not isinstance(pid, int):
            return False
        start = self._start_time(pid)
        return start is not None and start == record.get("start")

    def _boot(self) -> Optional[str]:
        try:
            return (self._proc / "sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None

    def _pid_namespace(self) -> Optional[str]:
        try:
            return os.readlink(self._proc / str(self.pid) / "ns" / "pid")
        except OSError:
            return None

    def _start_time(self, pid: int) -> Optional[int]:
        """Field 22 of ``/proc/<pid>/stat``: clock ticks from boot to the process's start."""
        try:
            data = (self._proc / str(pid) / "stat").read_bytes()
        except OSError:
            return None
        fields = data[data.rfind(b")") + 2:].split()
        try:
            return int(fields[19])
        except (IndexError, ValueError):
            return None

    def _marked(self, pid: int, needle: bytes) -> bool:
        """``pid`` is this user's and carries ``needle`` in its environment."""
        where = self._proc / str(pid)
        try:
            if os.stat(where).st_uid != os.geteuid():
                return False
            environ = (where / "environ").read_bytes()
        except OSError:  # gone, or not readable
            return False
        return needle in environ.split(b"\0")

    def _kill_marked(self, token: str) -> list[int]:
        needle = f"{RUN_ENV}={token}".encode()
        killed = []
        pids = sorted(int(e.name) for e in self._proc.iterdir() if e.name.isdigit())
        for pid in pids:
            if pid == self.pid or not self._marked(pid, needle):
                continue
            try:
                if self._kill is not None:
                    self._kill(pid, signal.SIGKILL)
                elif not self._kill_through_pidfd(pid, needle):
                    continue
            except (ProcessLookupError, PermissionError):
                continue
            killed.append(pid)
        return killed

    def _kill_through_pidfd(self, pid: int, needle: bytes) -> bool:
        """SIGKILL ``pid`` if, held by a pidfd, it still carries ``needle``."""
        open_pidfd = getattr(os, "pidfd_open", None)
        send = getattr(signal, "pidfd_send_signal", None)
        if open_pidfd is None or send is None:
            os.kill(pid, signal.SIGKILL)
            return True
        try:
            fd = open_pidfd(pid)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise  # ESRCH: gone (ProcessLookupError, skipped by the caller)
            os.kill(pid, signal.SIGKILL)  # a kernel before 5.3, or a sandbox without pidfds
            return True
        try:
            if not self._marked(pid, needle):  # pid reused between the scan and the open
                return False
            send(fd, signal.SIGKILL)
            return True
        finally:
            os.close(fd)
