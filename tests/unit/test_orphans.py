"""
Run records: what a Jano killed with SIGKILL left running (processes its
servers started, which ``PR_SET_PDEATHSIG`` does not reach) is killed by the
next Jano, found by the ``JANO_RUN`` mark in their environment.  On a folder
laid out like ``/proc``, with the kills recorded; the real thing is in
``tests/integration/test_managed_process.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.logger import capturedLogs

from jano.config import parse_config
from jano.config.parse import default_runs_dir
from jano.swap.keeper import ServerKeeper
from jano.swap.managed import ManagedSwapper
from jano.swap.orphans import RUN_ENV, Runs
from jano.swap.supervisor import Supervisor
from jano.testing import FakeProcessReactor
from test_keeper import CHAT

ME = 500


class FakeProc:
    """A ``/proc`` with a boot id and the processes put in it."""

    def __init__(self, root: Path, boot: str = "boot-1") -> None:
        self.root = root
        (root / "sys/kernel/random").mkdir(parents=True)
        (root / "sys/kernel/random/boot_id").write_text(boot + "\n")
        self.killed: list[tuple[int, int]] = []
        self.add(ME, start=9000)
        (root / str(ME) / "ns").mkdir()
        os.symlink("pid:[4026531836]", root / str(ME) / "ns" / "pid")

    def add(self, pid: int, start: int, env: dict[str, str] | None = None,
            readable: bool = True) -> None:
        d = self.root / str(pid)
        d.mkdir()
        # Field 22 is the start time; the command name may hold spaces and parentheses.
        (d / "stat").write_text(f"{pid} (llama server (x)) S " + "0 " * 18 + f"{start} 0 0\n")
        if readable:
            (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0"
                                                 for k, v in (env or {}).items()))

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def runs(self, folder: Path, token: str = "c0ffee0000000000") -> Runs:
        return Runs(folder, token=token, pid=ME, proc=self.root, kill=self.kill)


def record(folder: Path, token: str, pid: int, start: int, boot: str = "boot-1",
           pidns: str = "pid:[4026531836]") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{token}.run"
    path.write_text(json.dumps({"pid": pid, "start": start, "boot": boot, "pidns": pidns}))
    return path


def test_what_a_dead_jano_left_is_killed_and_this_run_is_recorded(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    runs_dir = tmp_path / "runs"
    old = record(runs_dir, "deadbeef00000000", pid=100, start=1234)  # pid 100 is gone
    proc.add(200, 2000, {"PATH": "/bin", RUN_ENV: "deadbeef00000000"})  # its server's helper
    proc.add(201, 2001, {RUN_ENV: "deadbeef00000000", "CUDA_VISIBLE_DEVICES": "0"})
    proc.add(202, 2002, {RUN_ENV: "deadbeef00000001"})  # another run's: the whole value must match
    proc.add(203, 2003, {"X": f"{RUN_ENV}=deadbeef00000000"})  # only mentions it
    proc.add(204, 2004, readable=False)  # another user's
    runs = proc.runs(runs_dir)

    assert runs.claim() == {"deadbeef00000000": [200, 201]}
    assert sorted(proc.killed) == [(200, signal.SIGKILL), (201, signal.SIGKILL)]
    assert not old.exists()
    mine = json.loads((runs_dir / "c0ffee0000000000.run").read_text())
    assert mine == {"pid": ME, "start": 9000, "boot": "boot-1", "pidns": "pid:[4026531836]"}

    runs.release()
    assert list(runs_dir.iterdir()) == []


def test_a_new_runs_folder_is_private(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    assert proc.runs(tmp_path / "state" / "runs").claim() == {}
    assert oct((tmp_path / "state" / "runs").stat().st_mode & 0o777) == oct(0o700)


def test_a_run_whose_jano_is_alive_is_left_alone(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(100, 1234)  # another Jano, running (same pid, same start time)
    proc.add(200, 2000, {RUN_ENV: "aaaa111100000000"})
    kept = record(tmp_path / "runs", "aaaa111100000000", pid=100, start=1234)
    assert proc.runs(tmp_path / "runs").claim() == {}
    assert proc.killed == [] and kept.exists()


def test_a_reused_pid_or_a_garbled_record_counts_as_dead(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(100, 5555)  # pid 100 now belongs to a process started later
    proc.add(200, 6000, {RUN_ENV: "aaaa111100000000"})
    proc.add(201, 6001, {RUN_ENV: "bbbb222200000000"})
    record(tmp_path / "runs", "aaaa111100000000", pid=100, start=1234)
    (tmp_path / "runs" / "bbbb222200000000.run").write_text("{not json")
    assert proc.runs(tmp_path / "runs").claim() == {"aaaa111100000000": [200]}
    # A garbled record tells no boot: nothing is killed for it, and it is gone.
    assert proc.killed == [(200, signal.SIGKILL)]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c0ffee0000000000.run"]


def test_a_record_from_another_boot_is_deleted_without_killing(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(200, 2000, {RUN_ENV: "aaaa111100000000"})  # a new process that happens to carry it
    record(tmp_path / "runs", "aaaa111100000000", pid=100, start=1234, boot="boot-0")
    assert proc.runs(tmp_path / "runs").claim() == {}
    assert proc.killed == [] and not (tmp_path / "runs" / "aaaa111100000000.run").exists()


def test_a_record_of_another_pid_namespace_is_left_alone(tmp_path: Path) -> None:
    # A Jano in a container sharing the folder: its pids are not ours to look up.
    proc = FakeProc(tmp_path / "proc")
    proc.add(200, 2000, {RUN_ENV: "aaaa111100000000"})
    kept = record(tmp_path / "runs", "aaaa111100000000", pid=7, start=1, pidns="pid:[4026532999]")
    assert proc.runs(tmp_path / "runs").claim() == {}
    assert proc.killed == [] and kept.exists()


def test_what_is_not_a_record_is_skipped_and_the_next_dead_run_still_reaped(
        tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "0000000000000001.run").mkdir()  # a folder
    os.symlink("/dev/zero", runs_dir / "0000000000000002.run")  # never followed
    os.mkfifo(runs_dir / "0000000000000003.run")  # never blocks
    (runs_dir / "0000000000000004.run").write_text("x" * 5000)  # too large to be one
    (runs_dir / "not-a-token.run").write_text("{}")  # not ours: left as it is
    record(runs_dir, "deadbeef00000000", pid=100, start=1)
    proc.add(200, 2000, {RUN_ENV: "deadbeef00000000"})
    assert proc.runs(runs_dir).claim() == {"deadbeef00000000": [200]}
    left = sorted(p.name for p in runs_dir.iterdir())
    assert left == ["0000000000000001.run", "c0ffee0000000000.run", "not-a-token.run"]


def test_a_half_written_record_left_by_a_crash_is_removed_once_stale(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    old, fresh = runs_dir / "deadbeef00000000.tmp", runs_dir / "aaaa111100000000.tmp"
    old.write_text("{")
    fresh.write_text("{")  # another Jano writing its record right now
    os.utime(old, (time.time() - 120, time.time() - 120))
    proc.runs(runs_dir).claim()
    assert sorted(p.name for p in runs_dir.iterdir()) == [
        "aaaa111100000000.tmp", "c0ffee0000000000.run"]


def test_a_folder_others_may_write_to_is_refused(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    record(shared, "deadbeef00000000", pid=100, start=1)
    proc.add(200, 2000, {RUN_ENV: "deadbeef00000000"})
    with pytest.raises(PermissionError):
        proc.runs(shared).claim()
    assert proc.killed == [], "a record anyone could have planted kills nothing"


def test_without_proc_nothing_is_recorded(tmp_path: Path) -> None:
    runs = Runs(tmp_path / "runs", pid=ME, proc=tmp_path / "no-proc")
    assert runs.claim() == {}
    assert not (tmp_path / "runs").exists()


def test_the_default_folder_follows_systemd_then_xdg_then_home() -> None:
    assert default_runs_dir({"RUNTIME_DIRECTORY": "/run/jano", "XDG_RUNTIME_DIR": "/run/user/1"}
                            ) == Path("/run/jano")
    assert default_runs_dir({"XDG_RUNTIME_DIR": "/run/user/1"}) == Path("/run/user/1/jano")
    assert default_runs_dir({"HOME": "/home/me"}) == Path("/home/me/.local/state/jano/runs")
    model = {"name": "qwen", "command": ["llama-server", "--port", "{port}"]}
    assert parse_config({"processes": {"runs_dir": ""}, "models": [model]}
                        ).processes.runs_dir == ""
    assert parse_config({"processes": {"runs_dir": "runs"}, "models": [model]},
                        base=Path("/etc/jano")).processes.runs_dir == "/etc/jano/runs"
    assert parse_config({"models": [model]}).processes.runs_dir == str(
        default_runs_dir(os.environ))


def keeper_with(runs: Runs) -> tuple[FakeProcessReactor, ManagedSwapper, ServerKeeper]:
    """A keeper over a fake process reactor, recording its run in ``runs``."""
    reactor = FakeProcessReactor()
    supervisor = Supervisor(reactor, killpg=reactor.killpg, is_free=lambda port: True,
                            env={"PATH": "/bin"}, run_token=runs.token)
    swapper = ManagedSwapper(reactor, supervisor, None, lambda url: succeed(200),
                             ready_timeout=10.0)
    return reactor, swapper, ServerKeeper(reactor, swapper, lambda m, s: None, runs)


def test_the_keeper_claims_at_start_marks_each_server_and_releases_at_a_clean_stop(
        tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    record(tmp_path / "runs", "deadbeef00000000", pid=100, start=1)
    proc.add(200, 2000, {RUN_ENV: "deadbeef00000000"})
    runs = proc.runs(tmp_path / "runs")
    reactor, swapper, keeper = keeper_with(runs)

    keeper.start([CHAT])
    assert proc.killed == [(200, signal.SIGKILL)]
    assert (tmp_path / "runs" / "c0ffee0000000000.run").exists()
    swapper.swap("default", None, CHAT)
    env: Any = reactor.processes[-1].env
    assert env[RUN_ENV] == "c0ffee0000000000" and env["JANO_MODEL"] == CHAT.name

    done = keeper.stop()
    assert (tmp_path / "runs" / "c0ffee0000000000.run").exists(), "kept until the servers are gone"
    reactor.processes[-1].exit(0)
    assert done.called
    assert not (tmp_path / "runs" / "c0ffee0000000000.run").exists()


def test_a_runs_folder_that_cannot_be_written_only_costs_a_warning(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    (tmp_path / "not-a-folder").write_text("")
    runs = proc.runs(tmp_path / "not-a-folder" / "runs")
    reactor, swapper, keeper = keeper_with(runs)
    with capturedLogs() as events:
        keeper.start([replace(CHAT, always_on=True)])
    assert any("cannot record this run" in str(e.get("log_format")) for e in events)
    assert reactor.processes, "the always_on server is started all the same"
    done = keeper.stop()
    reactor.processes[-1].exit(0)
    assert done.called


def test_without_pidfds_the_kill_falls_back_to_kill(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    proc = FakeProc(tmp_path / "proc")
    record(tmp_path / "runs", "deadbeef00000000", pid=100, start=1)
    proc.add(200, 2000, {RUN_ENV: "deadbeef00000000"})
    killed: list[tuple[int, int]] = []

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    runs = Runs(tmp_path / "runs", token="c0ffee0000000000", pid=ME, proc=proc.root)
    assert runs.claim() == {"deadbeef00000000": [200]}
    assert killed == [(200, signal.SIGKILL)]
