#!/usr/bin/env python3
"""
What Jano costs: Jano in front of a fast fake backend against the backend direct.

    python3 benchmarks/run.py            # full run: 3 rounds, ~2.5-4 min on 2 cores
    python3 benchmarks/run.py --quick    # smoke run: 1 round, tiny sizes, < 60 s

One command starts, as separate processes, the fake backend (``fake_backend.js``),
Jano (``twistd -n jano``, restarted fresh each round) and, per scenario, a load
generator (``wrk`` with ``wrk_chat.lua`` for non-streamed requests,
``load_driver.js`` for streams).  Each scenario runs against "direct" (the
backend itself) and "jano" (Jano in front of it) back to back, the order
alternating between rounds, and the table gives medians over the rounds with
min-max.  Every response is verified (status, chunk count and order, usage,
``[DONE]``); errors are counted and shown.

CPU times come from ``/proc/PID/task/*/schedstat`` (nanoseconds, all threads) for
Jano and the backend, and from the load generator itself (``process.cpuUsage()``
for Node, ``wait4`` rusage for wrk).  Jano's peak RSS is VmHWM after writing 5 to
``/proc/PID/clear_refs``.  See ``benchmarks/README.md`` for what each figure means.

Linux only (``/proc``).  Needs python3, node (>= 18) and wrk (LuaJIT build, as
Debian's).  Listens and connects on 127.0.0.1 only.  Every scenario is bounded
in request count and in time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1024 * 1024

# --- scenario sizes ------------------------------------------------------------------------

FULL = {
    "rounds": 3,
    "warmup": {"plain": 300, "stream": 60},
    "nonstream_c1": {"n": 3000, "cap": 15},
    "nonstream_c32": {"n": 12000, "cap": 15},
    "stream_c16": {"n": 800, "tokens": 256, "cap": 20},
    "paced_c8": {"n": 32, "tokens": 64, "delay": 20, "cap": 20},
    "open200": {"n": 200, "tokens": 20, "delay": 100, "ramp": 200, "cap": 20},
    "big200mb": {"tokens": 3200, "pad": 62500, "cap": 60},
    "open1000": {"n": 1000, "tokens": 20, "delay": 200, "ramp": 1000, "cap": 30},
}
QUICK = {
    "rounds": 1,
    "warmup": {"plain": 50, "stream": 10},
    "nonstream_c1": {"n": 300, "cap": 5},
    "nonstream_c32": {"n": 2000, "cap": 5},
    "stream_c16": {"n": 32, "tokens": 128, "cap": 5},
    "paced_c8": {"n": 8, "tokens": 16, "delay": 20, "cap": 5},
    "open200": {"n": 200, "tokens": 5, "delay": 100, "ramp": 200, "cap": 10},
    "big200mb": {"tokens": 320, "pad": 62500, "cap": 10},
    "open1000": None,  # full run only
}
SCENARIOS = ("nonstream_c1", "nonstream_c32", "stream_c16", "paced_c8", "open200", "big200mb",
             "open1000")

#: Jano's model limit: enough for the 1,000 concurrent streams.
MAX_CONCURRENCY = 1100

# --- /proc ------------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time of all live threads of ``pid`` (schedstat: nanoseconds on CPU)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (needs write access to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes ---------------------------------------------------------------------------------


def stop_process(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


class Backend:
    def __init__(self, tmp: Path) -> None:
        port_file = tmp / "backend.port"
        self.log = open(tmp / "backend.log", "wb")
        self.p = subprocess.Popen(
            ["node", str(HERE / "fake_backend.js"), "--port", "0", "--port-file", str(port_file),
             "--quiet"], stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"run.py: the fake backend did not start (see {tmp}/backend.log)")
            time.sleep(0.01)
        self.port = int(port_file.read_text())
        self.pid = self.p.pid

    def stop(self) -> None:
        stop_process(self.p)
        self.log.close()


def twistd_argv() -> list[str]:
    override = os.environ.get("JANO_TWISTD")
    if override:
        return [override]
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def chat_once(port: int, timeout: float = 2.0) -> bool:
    """One non-streamed chat completion; True when it comes back complete."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=b'{"model":"fake-model","messages":[{"role":"user","content":"hi"}],'
                          b'"max_tokens":4}',
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        return r.status == 200 and b'"completion_tokens":4' in body
    except OSError:
        return False
    finally:
        conn.close()


class Jano:
    """``twistd -n jano`` with one always-on model in front of the backend."""

    def __init__(self, tmp: Path, backend_port: int, round_no: int, code: Path = ROOT) -> None:
        self.dir = tmp / f"jano-r{round_no}"
        self.dir.mkdir()
        self.port = free_port()
        cfg = self.dir / "jano.toml"
        cfg.write_text(
            "[server]\n"
            f'listen = "tcp:{self.port}:interface=127.0.0.1"\n'
            "shutdown_grace = 2\n"
            "[scheduler]\n"
            "max_queue = 4096\n"
            "[[models]]\n"
            'name = "fake-model"\n'
            f'upstream = "http://127.0.0.1:{backend_port}"\n'
            "always_on = true\n"
            f"max_concurrency = {MAX_CONCURRENCY}\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env["XDG_STATE_HOME"] = str(self.dir / "state")  # the usage history, as in production
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(
            [*twistd_argv(), "-n", "--pidfile=", "-l", str(self.dir / "jano.log"), "jano",
             "--config", str(cfg)],
            cwd=self.dir, env=env, stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "wb"))
        self.pid = self.p.pid
        deadline = self.t0 + 30
        while True:
            if self.p.poll() is not None:
                raise SystemExit(f"run.py: Jano exited at start-up (see {self.dir})")
            if chat_once(self.port, timeout=1.0):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"run.py: Jano not ready after 30 s (see {self.dir})")
            time.sleep(0.005)
        self.ready_s = time.monotonic() - self.t0
        self.idle_rss_kb = status_kb(self.pid, "VmRSS")

    def stop(self) -> None:
        stop_process(self.p, grace=10)


# --- load generators -------------------------------------------------------------------------


def run_driver(opts: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``load_driver.js`` once; its JSON line, plus its rusage CPU."""
    p = subprocess.Popen(["node", str(HERE / "load_driver.js"), json.dumps(opts)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise RuntimeError(f"load_driver.js did not finish within {timeout:.0f} s")
    if p.returncode != 0 or not out.strip():
        raise RuntimeError(f"load_driver.js failed ({p.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def run_wrk(port: int, n: int, c: int, cap: float, tmp: Path, latencies: bool) -> dict[str, Any]:
    """wrk with one thread; stops after ``n`` responses (or ``cap`` seconds)."""
    done = tmp / "wrk.done"
    out = tmp / "wrk.json"
    lat = tmp / "wrk.lat"
    for f in (done, out, lat):
        f.unlink(missing_ok=True)
    env = dict(os.environ, BENCH_TOKENS="16", BENCH_REQUESTS=str(n), BENCH_OUT=str(out),
               BENCH_DONE_FILE=str(done))
    if latencies:
        env["BENCH_LAT_FILE"] = str(lat)
    p = subprocess.Popen(["wrk", "-t1", f"-c{c}", f"-d{int(cap)}s", "--timeout", "10s",
                          "-s", str(HERE / "wrk_chat.lua"), f"http://127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # wrk always runs for its -d; the script drops a file once it has n responses
    # and wrk stops at once (printing its summary) on SIGINT.
    deadline = time.monotonic() + cap + 5
    while p.poll() is None:
        if done.exists():
            p.send_signal(signal.SIGINT)
            break
        if time.monotonic() > deadline:
            p.kill()
            break
        time.sleep(0.005)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.stderr is not None
    if not out.exists():
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr.read().decode()[-2000:]}")
    p.stderr.close()
    r = json.loads(out.read_text())
    window = r["window_us"] / 1e6
    res: dict[str, Any] = {
        "ok": r["responses"] - r["bad"],
        "errors": r["bad"] + sum(r["errors"].values()),
        "error_kinds": {k: v for k, v in r["errors"].items() if v},
        "time_capped": r["responses"] < n,
        "duration_s": window,
        "rps": r["responses"] / window if window > 0 else 0.0,
        "driver_cpu_ms": (ru.ru_utime + ru.ru_stime) * 1000,
        "mean_latency_ms": c / (r["responses"] / window) * 1000 if window > 0 else None,
    }
    if r["bad"]:
        res["error_kinds"]["bad_response"] = r["bad"]
    if latencies and lat.exists():
        vals = sorted(float(x) / 1000 for x in lat.read_text().split())
        if vals:
            res["latency_ms"] = {"n": len(vals), "p50": pctl(vals, 0.5), "p99": pctl(vals, 0.99),
                                 "max": vals[-1]}
    return res


def pctl(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Ctx:
    tmp: Path
    backend: Backend
    jano: Optional[Jano]
    sizes: dict[str, Any]
    pyspy: Optional[Path] = None
    round_no: int = 0


def stream_opts(port: int, n: int, c: int, tokens: int, cap: float, **kw: Any) -> dict[str, Any]:
    return {"port": port, "stream": True, "n": n, "c": c, "tokens": tokens, "maxSeconds": cap,
            "timeoutMs": int(cap * 1000), **kw}


def scenario(ctx: Ctx, name: str, target: str) -> dict[str, Any]:
    """Run one scenario against one target; the driver's results plus CPU and memory figures."""
    s = ctx.sizes[name]
    via_jano = target == "jano"
    assert ctx.jano is not None
    port = ctx.jano.port if via_jano else ctx.backend.port
    jpid, bpid = ctx.jano.pid, ctx.backend.pid
    spy = None
    if via_jano and ctx.pyspy is not None:
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(jpid), "--rate", "250", "--nonblocking",
             "--format", "raw", "--output", str(ctx.pyspy / f"{name}-r{ctx.round_no}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    rss0 = status_kb(jpid, "VmRSS")
    hwm_ok = reset_hwm(jpid)
    j0, b0 = cpu_ns(jpid), cpu_ns(bpid)
    if name == "nonstream_c1":
        r = run_wrk(port, s["n"], 1, s["cap"], ctx.tmp, latencies=True)
    elif name == "nonstream_c32":
        r = run_wrk(port, s["n"], 32, s["cap"], ctx.tmp, latencies=False)
    elif name == "stream_c16":
        r = run_driver(stream_opts(port, s["n"], 16, s["tokens"], s["cap"]), s["cap"] + 15)
    elif name == "paced_c8":
        r = run_driver(stream_opts(port, s["n"], 8, s["tokens"], s["cap"], delayMs=s["delay"],
                                   stamp=True), s["cap"] + 15)
    elif name in ("open200", "open1000"):
        r = run_driver(stream_opts(port, s["n"], s["n"], s["tokens"], s["cap"],
                                   delayMs=s["delay"], stamp=True, rampMs=s["ramp"]),
                       s["cap"] + 15)
    elif name == "big200mb":
        r = run_driver(stream_opts(port, 1, 1, s["tokens"], s["cap"], chunkBytes=s["pad"]),
                       s["cap"] + 15)
    else:
        raise ValueError(name)
    j1, b1 = cpu_ns(jpid), cpu_ns(bpid)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    r["backend_cpu_ms"] = (b1 - b0) / 1e6
    if via_jano:
        r["jano_cpu_ms"] = (j1 - j0) / 1e6
        r["jano_rss_start_kb"] = rss0
        r["jano_rss_end_kb"] = status_kb(jpid, "VmRSS")
        if hwm_ok:
            r["jano_hwm_kb"] = status_kb(jpid, "VmHWM")
    return r


def warm_up(ctx: Ctx, port: int) -> None:
    w = ctx.sizes["warmup"]
    run_driver({"port": port, "n": w["plain"], "c": 4, "maxSeconds": 20}, 40)
    run_driver(stream_opts(port, w["stream"], 4, 32, 20), 40)


# --- the table -------------------------------------------------------------------------------

Num = Optional[float]


def med(vals: Sequence[Num]) -> tuple[Num, Num, Num]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None, None
    return statistics.median(v), min(v), max(v)


def fmt_num(x: Num, digits: int) -> str:
    if x is None:
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def cell(vals: Sequence[Num], digits: int) -> str:
    m, lo, hi = med(vals)
    if m is None:
        return "–"
    if len([x for x in vals if x is not None]) == 1 or lo == hi:
        return fmt_num(m, digits)
    return f"{fmt_num(m, digits)} ({fmt_num(lo, digits)}–{fmt_num(hi, digits)})"


@dataclass
class Target:
    """One target of the issue: a figure of Jano's and the bound it must meet."""

    label: str
    bound: float
    higher_is_better: bool = False
    value: Num = None

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        ok = self.value >= self.bound if self.higher_is_better else self.value <= self.bound
        return "meets" if ok else "MISSES"

    def bound_text(self) -> str:
        return ("≥ " if self.higher_is_better else "≤ ") + f"{self.bound:g}"


@dataclass
class Table:
    rows: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def row(self, scen: str, metric: str, direct: str, jano: str, diff: str = "",
            target: Optional[Target] = None) -> None:
        tgt = ""
        if target is not None:
            self.targets.append(target)
            tgt = f"{target.bound_text()}: {target.verdict()}"
        self.rows.append(f"| {scen} | {metric} | {direct} | {jano} | {diff} | {tgt} |")


def get(results: list[dict[str, Any]], *path: str) -> list[Num]:
    out: list[Num] = []
    for r in results:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        out.append(None if v is None else float(v))
    return out


def per(results: list[dict[str, Any]], num: str, den: Callable[[dict[str, Any]], float],
        scale: float) -> list[Num]:
    out: list[Num] = []
    for r in results:
        d = den(r)
        out.append(r[num] * scale / d if r.get(num) is not None and d else None)
    return out


def diffs(a: list[Num], b: list[Num]) -> list[Num]:
    return [None if x is None or y is None else y - x for x, y in zip(a, b)]


def ratios(a: list[Num], b: list[Num]) -> list[Num]:
    return [None if x is None or y is None or not x else y / x for x, y in zip(a, b)]


def pct_of_core(results: list[dict[str, Any]], key: str) -> list[Num]:
    return [r[key] / (r["duration_s"] * 1000) * 100 if r.get(key) is not None and r["duration_s"]
            else None for r in results]


def cpu_row(t: Table, scen: str, d: list[dict[str, Any]], j: list[dict[str, Any]]) -> None:
    def trio(rs: list[dict[str, Any]], with_jano: bool) -> str:
        parts = [cell(pct_of_core(rs, "jano_cpu_ms"), 0) if with_jano else "–",
                 cell(pct_of_core(rs, "backend_cpu_ms"), 0),
                 cell(pct_of_core(rs, "driver_cpu_ms"), 0)]
        return " / ".join(parts)

    t.row(scen, "CPU, % of one core: Jano / backend / load generator", trio(d, False),
          trio(j, True))


def build_table(res: dict[str, dict[str, list[dict[str, Any]]]], starts: list[dict[str, float]],
                sizes: dict[str, Any]) -> Table:
    t = Table()
    t.rows.append("| scenario | metric | direct | jano | jano − direct (or ×) | target |")
    t.rows.append("|---|---|---|---|---|---|")
    ready = [s["ready_s"] for s in starts]
    idle = [s["idle_rss_kb"] / 1024 for s in starts]
    warm = [s["warm_rss_kb"] / 1024 for s in starts]
    t.row("startup", "Jano start to ready (s): spawn → first proxied answer", "–", cell(ready, 2),
          target=Target("start to ready (s)", 1.5, value=med(ready)[0]))
    t.row("startup", "Jano idle RSS after start (MiB)", "–", cell(idle, 1),
          target=Target("idle RSS (MiB)", 60, value=med(idle)[0]))
    t.row("startup", "Jano RSS after warm-up (MiB)", "–", cell(warm, 1))

    def both(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return res.get(name, {}).get("direct", []), res.get(name, {}).get("jano", [])

    # non-streamed, c=1
    name = "nonstream_c1"
    d, j = both(name)
    label = f"{name} ({sizes[name]['n']} req)"
    for q, tgt in (("p50", Target("added latency p50 at c=1 (ms)", 0.5)), ("p99", None)):
        dv, jv = get(d, "latency_ms", q), get(j, "latency_ms", q)
        added = diffs(dv, jv)
        if tgt is not None:
            tgt.value = med(added)[0]
        t.row(label, f"latency {q} (ms); last column: added", cell(dv, 3), cell(jv, 3),
              cell(added, 3), target=tgt)
    t.row(label, "requests/s", cell(get(d, "rps"), 0), cell(get(j, "rps"), 0))
    cpu_req1 = per(j, "jano_cpu_ms", lambda r: r["ok"] + r["errors"], 1000)
    t.row(label, "Jano CPU per request (µs)", "–", cell(cpu_req1, 0),
          target=Target("Jano CPU per request, c=1 (µs)", 400, value=med(cpu_req1)[0]))
    cpu_row(t, label, d, j)

    name = "nonstream_c32"
    d, j = both(name)
    label = f"{name} ({sizes[name]['n']} req)"
    dv, jv = get(d, "rps"), get(j, "rps")
    t.row(label, "requests/s", cell(dv, 0), cell(jv, 0), cell(ratios(dv, jv), 2) + "×")
    t.row(label, "mean latency (ms, Little's law)", cell(get(d, "mean_latency_ms"), 2),
          cell(get(j, "mean_latency_ms"), 2))
    cpu_req = per(j, "jano_cpu_ms", lambda r: r["ok"] + r["errors"], 1000)
    t.row(label, "Jano CPU per request (µs)", "–", cell(cpu_req, 0),
          target=Target("Jano CPU per request, c=32 (µs)", 400, value=med(cpu_req)[0]))
    cpu_row(t, label, d, j)

    name = "stream_c16"
    d, j = both(name)
    label = f"{name} ({sizes[name]['n']}×{sizes[name]['tokens']} chunks, back to back)"
    dv, jv = get(d, "chunks_per_s"), get(j, "chunks_per_s")
    t.row(label, "chunks/s", cell(dv, 0), cell(jv, 0), cell(ratios(dv, jv), 2) + "×")
    t.row(label, "streams/s", cell(get(d, "rps"), 1), cell(get(j, "rps"), 1))
    t.row(label, "stream latency p50 (ms)", cell(get(d, "latency_ms", "p50"), 1),
          cell(get(j, "latency_ms", "p50"), 1))
    cpu_chunk = per(j, "jano_cpu_ms", lambda r: r["chunks"], 1000)
    t.row(label, "Jano CPU per chunk (µs)", "–", cell(cpu_chunk, 2))
    cpu_row(t, label, d, j)

    name = "paced_c8"
    d, j = both(name)
    s = sizes[name]
    label = f"{name} ({s['n']} streams×{s['tokens']} chunks, {1000 // s['delay']} tok/s)"
    for q, tgt in (("p50", None), ("p99", Target("paced chunk transit p99 (ms)", 5))):
        dv, jv = get(d, "transit_ms", q), get(j, "transit_ms", q)
        if tgt is not None:
            tgt.value = med(jv)[0]
        t.row(label, f"chunk transit {q} (ms); last column: added", cell(dv, 3), cell(jv, 3),
              cell(diffs(dv, jv), 3), target=tgt)
    t.row(label, "TTFB p50 (ms)", cell(get(d, "ttfb_ms", "p50"), 2),
          cell(get(j, "ttfb_ms", "p50"), 2))
    cpu_paced = per(j, "jano_cpu_ms", lambda r: r["chunks"], 1000)
    t.row(label, "Jano CPU per chunk (µs)", "–", cell(cpu_paced, 1),
          target=Target("Jano CPU per paced chunk (µs)", 60, value=med(cpu_paced)[0]))
    cpu_row(t, label, d, j)

    for name in ("open200", "open1000"):
        d, j = both(name)
        s = sizes.get(name)
        if s is None:
            label = f"{name} (full run only)"
            for metric in ("streams completed and verified", "chunk transit p99 (ms)",
                           "Jano RSS per open stream (KiB)", "Jano peak RSS, VmHWM (MiB)"):
                t.row(label, metric, "skipped (--quick)", "skipped (--quick)")
            continue
        label = (f"{name} ({s['n']} concurrent streams×{s['tokens']} chunks, "
                 f"{1000 // s['delay']} tok/s)")
        t.row(label, f"streams completed and verified (of {s['n']})", cell(get(d, "ok"), 0),
              cell(get(j, "ok"), 0))
        t.row(label, "stream latency p50 (ms)", cell(get(d, "latency_ms", "p50"), 0),
              cell(get(j, "latency_ms", "p50"), 0))
        t.row(label, "chunk transit p50 (ms)", cell(get(d, "transit_ms", "p50"), 3),
              cell(get(j, "transit_ms", "p50"), 3))
        t.row(label, "chunk transit p99 (ms)", cell(get(d, "transit_ms", "p99"), 3),
              cell(get(j, "transit_ms", "p99"), 3))
        per_stream = [(r["jano_hwm_kb"] - r["jano_rss_start_kb"]) / s["n"]
                      if r.get("jano_hwm_kb") is not None else None for r in j]
        t.row(label, "Jano RSS per open stream (KiB): (VmHWM − RSS before) / streams", "–",
              cell(per_stream, 1),
              target=Target("RSS per open stream, 200 open (KiB)", 64,
                            value=med(per_stream)[0]) if name == "open200" else None)
        t.row(label, "Jano peak RSS, VmHWM (MiB)", "–",
              cell([None if r.get("jano_hwm_kb") is None else r["jano_hwm_kb"] / 1024 for r in j], 1))
        t.row(label, "Jano CPU per chunk (µs)", "–",
              cell(per(j, "jano_cpu_ms", lambda r: r["chunks"], 1000), 1))
        cpu_row(t, label, d, j)

    name = "big200mb"
    d, j = both(name)
    s = sizes[name]
    label = f"{name} (1 stream, {s['tokens']}×{s['pad'] / 1000:g} kB ≈ {s['tokens'] * s['pad'] / 1e6:.0f} MB)"
    t.row(label, "stream completed and verified (of 1)", cell(get(d, "ok"), 0), cell(get(j, "ok"), 0))
    dv, jv = get(d, "mb_per_s"), get(j, "mb_per_s")
    t.row(label, "MB/s", cell(dv, 0), cell(jv, 0), cell(ratios(dv, jv), 2) + "×",
          target=Target("200 MB stream (MB/s)", 150, higher_is_better=True, value=med(jv)[0]))
    hwm = [None if r.get("jano_hwm_kb") is None else r["jano_hwm_kb"] / 1024 for r in j]
    t.row(label, "Jano peak RSS, VmHWM (MiB)", "–", cell(hwm, 1),
          target=Target("200 MB stream peak RSS (MiB)", 120, value=med(hwm)[0]))
    growth = [None if r.get("jano_hwm_kb") is None else (r["jano_hwm_kb"] - r["jano_rss_start_kb"]) / 1024
              for r in j]
    t.row(label, "Jano RSS growth during the stream, VmHWM − RSS before (MiB)", "–", cell(growth, 1))
    t.row(label, "Jano CPU per MB (ms)", "–",
          cell(per(j, "jano_cpu_ms", lambda r: r["bytes"] / 1e6, 1), 2))
    cpu_row(t, label, d, j)
    return t


def error_notes(res: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    notes = []
    for target in ("direct", "jano"):
        errs = 0
        kinds: dict[str, int] = {}
        capped = []
        for name, by in res.items():
            for r in by.get(target, []):
                errs += r["errors"]
                for k, v in r["error_kinds"].items():
                    kinds[f"{name}:{k}"] = kinds.get(f"{name}:{k}", 0) + v
                if r.get("time_capped"):
                    capped.append(name)
        notes.append(f"- {target}: errors {errs} {json.dumps(kinds) if kinds else ''}"
                     f"{'; time-capped: ' + ', '.join(sorted(set(capped))) if capped else ''}")
    return notes


# --- the run ---------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0].split(" Copyright")[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    import twisted

    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"node {version(['node', '--version'])}, {version(['wrk', '--version'])}")


def cpu_ticks() -> tuple[int, int]:
    """(all, steal) jiffies from /proc/stat: steal is time the hypervisor gave to others."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def speed_probe() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 3): a drifting host shows here."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        sum(range(5_000_000))
        best = min(best, time.perf_counter() - t)
    return best * 1000


def check_requirements() -> None:
    missing = [t for t in ("node", "wrk") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"run.py: missing {', '.join(missing)} (Debian: apt-get install "
                         f"{' '.join('nodejs' if t == 'node' else t for t in missing)})")
    if not Path("/proc/self/schedstat").exists():
        raise SystemExit("run.py: needs Linux /proc with schedstat")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 round, < 60 s)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick: 1)")
    ap.add_argument("--only", help="comma-separated scenarios to run (default: all)")
    ap.add_argument("--json", type=Path, help="also write every raw result to this file")
    ap.add_argument("--save", type=Path, help="also write the printed report to this file")
    ap.add_argument("--py-spy", type=Path, dest="pyspy",
                    help="record Jano with py-spy (raw collapsed stacks) into this folder, "
                         "one file per scenario and round (slows Jano down)")
    ap.add_argument("--jano-path", type=Path, default=ROOT,
                    help="run the Jano found in this folder (a checkout or a patched copy, "
                         "for A/B runs; default: this repository)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder and logs")
    args = ap.parse_args(argv)
    check_requirements()
    sizes: dict[str, Any] = dict(QUICK if args.quick else FULL)
    rounds: int = args.rounds or sizes["rounds"]
    only = [s for s in SCENARIOS if sizes.get(s) is not None]
    if args.only:
        wanted = args.only.split(",")
        bad = [w for w in wanted if w not in SCENARIOS]
        if bad:
            ap.error(f"unknown scenario(s) {bad}; known: {', '.join(SCENARIOS)}")
        only = [s for s in only if s in wanted]
    if args.pyspy is not None:
        args.pyspy.mkdir(parents=True, exist_ok=True)

    started = _dt.datetime.now(_dt.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="jano-bench-"))
    backend = Backend(tmp)
    res: dict[str, dict[str, list[dict[str, Any]]]] = {}
    starts: list[dict[str, float]] = []
    loads: list[float] = []
    jano: Optional[Jano] = None
    t_start = time.monotonic()
    probes = [speed_probe()]
    ticks0 = cpu_ticks()
    try:
        for rnd in range(1, rounds + 1):
            jano = Jano(tmp, backend.port, rnd, args.jano_path.resolve())
            start = {"ready_s": jano.ready_s, "idle_rss_kb": jano.idle_rss_kb}
            ctx = Ctx(tmp, backend, jano, sizes, args.pyspy, rnd)
            order = ["direct", "jano"] if rnd % 2 else ["jano", "direct"]
            for target in order:
                warm_up(ctx, jano.port if target == "jano" else backend.port)
            start["warm_rss_kb"] = status_kb(jano.pid, "VmRSS")
            starts.append(start)
            print(f"# round {rnd}/{rounds}: Jano ready in {jano.ready_s:.2f} s, "
                  f"idle RSS {jano.idle_rss_kb / 1024:.1f} MiB", file=sys.stderr, flush=True)
            for name in only:
                for target in order:
                    loads.append(os.getloadavg()[0])
                    r = scenario(ctx, name, target)
                    res.setdefault(name, {}).setdefault(target, []).append(r)
                    brief = {k: r.get(k) for k in ("ok", "errors", "duration_s")}
                    print(f"#   {name:14s} {target:6s} {json.dumps(brief)}", file=sys.stderr,
                          flush=True)
                    time.sleep(0.2)
            jano.stop()
            jano = None
    finally:
        if jano is not None:
            jano.stop()
        backend.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# scratch folder kept: {tmp}", file=sys.stderr)
    elapsed = time.monotonic() - t_start
    probes.append(speed_probe())
    ticks1 = cpu_ticks()
    steal = 100 * (ticks1[1] - ticks0[1]) / max(1, ticks1[0] - ticks0[0])

    table = build_table(res, starts, sizes)
    cmd = "python3 benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if argv is None and
                                          sys.argv[1:] else "")
    lines = [
        f"# Jano benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{cmd}` ({rounds} round(s), {elapsed:.0f} s)",
        f"- machine: {machine()}",
        f"- 1-min load average at scenario starts: min {min(loads, default=0):.2f}, "
        f"median {statistics.median(loads) if loads else 0:.2f}, max {max(loads, default=0):.2f}",
        f"- host: CPU steal {steal:.1f} % over the run; pure-Python speed probe "
        f"{probes[0]:.0f} ms before, {probes[1]:.0f} ms after (same work: a slower host shows here)",
        "- each cell: median over rounds (min–max); direct and jano alternate within each round",
        "",
        *table.rows,
        "",
        "Errors (every response is verified):",
        *error_notes(res),
        "",
        "Targets:",
        *[f"- {t.label}: {fmt_num(t.value, 3) if t.value is not None else '–'} "
          f"(target {t.bound_text()}): {t.verdict()}" for t in table.targets],
    ]
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "starts": starts, "results": res},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
