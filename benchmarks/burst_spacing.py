#!/usr/bin/env python3
"""
Swaps a jittered burst costs, on real processes.

``python3 benchmarks/burst_spacing.py`` starts two fake model servers
(``python -m jano.testing``), and ``twistd -n jano`` in front of them with a
real shell swap script that takes 0.5 s, once per ``collate`` value given
(default: 0 and 0.25).  For each spacing (0, 1, 5, 10, 20, 50 ms) it fires 8
requests on 8 connections, the first for the model that is *not* loaded and
then alternating, while the loaded model is idle -- what a thread pool or
``asyncio.gather`` sending "at once" produces -- and counts the swap
script's runs.  The optimum is one swap per burst.  It prints a Markdown
table: swaps per burst, by spacing and ``collate``, with the burst's
makespan.  Loopback only; about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACINGS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05)
SCRIPT = '#!/bin/sh\necho "$1 $2" >> "{calls}"\nsleep 0.5\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"burst_spacing.py: {url} never answered")
            time.sleep(0.05)


def post(url: str, model: str) -> int:
    body = json.dumps({"model": model, "messages": [], "max_tokens": 2}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return int(r.status)


def twistd() -> list[str]:
    beside = Path(sys.executable).with_name("twistd")
    return [str(beside)] if beside.exists() else [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run(tmp: Path, collate: float, backends: dict[str, int]) -> list[tuple[float, int, float]]:
    calls = tmp / f"calls-{collate}.txt"
    script = tmp / "swap.sh"
    script.write_text(SCRIPT.format(calls=calls))
    script.chmod(0o755)
    port = free_port()
    cfg = tmp / f"jano-{collate}.toml"
    cfg.write_text(f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
[scheduler]
initial_model = "alpha"
collate = {collate}
max_wait = 60.0
[swap]
command = ["{script}", "{{model}}", "{{previous}}"]
[[models]]
name = "alpha"
upstream = "http://127.0.0.1:{backends['alpha']}"
[[models]]
name = "beta"
upstream = "http://127.0.0.1:{backends['beta']}"
""")
    jano = subprocess.Popen([*twistd(), "-n", "--pidfile=", "-l", str(tmp / f"jano-{collate}.log"),
                             "jano", "--config", str(cfg)], env=env(), cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_http(url + "/health")
        resident, other = "alpha", "beta"
        for spacing in SPACINGS:
            before = len(calls.read_text().splitlines()) if calls.exists() else 0
            order = [other, resident] * 4
            statuses: list[int] = []
            t0 = time.monotonic() + 0.2

            def fire(i: int, model: str) -> None:
                time.sleep(max(0.0, t0 + i * spacing - time.monotonic()))
                statuses.append(post(url + "/v1/chat/completions", model))

            threads = [threading.Thread(target=fire, args=(i, m)) for i, m in enumerate(order)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            makespan = time.monotonic() - t0
            lines = calls.read_text().splitlines() if calls.exists() else []
            swaps = len(lines) - before
            if statuses != [200] * 8:
                raise SystemExit(f"burst_spacing.py: answers {statuses}")
            rows.append((spacing, swaps, makespan))
            if lines and swaps:
                resident = lines[-1].split()[0]
                other = "alpha" if resident == "beta" else "beta"
            time.sleep(0.5)  # the resident is idle again before the next burst
    finally:
        jano.terminate()
        jano.wait(30)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--collate", type=float, nargs="+", default=[0.0, 0.25],
                    help="collate values to compare (default: 0 0.25)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jano-burst-"))
    backends: dict[str, int] = {}
    procs = []
    try:
        for model in ("alpha", "beta"):
            port_file = tmp / f"{model}.port"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jano.testing", "--port", "0", "--port-file", str(port_file),
                 "--model", model, "--quiet"], env=env(), cwd=tmp,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 20
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline:
                    raise SystemExit("burst_spacing.py: a fake model server did not start")
                time.sleep(0.05)
            backends[model] = int(port_file.read_text())
        results = {c: run(tmp, c, backends) for c in args.collate}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print("8 requests per burst (non-resident first, then alternating) at an idle resident; "
          "swap script 0.5 s; optimum: 1 swap")
    print()
    head = " | ".join(f"collate {c:g} s: swaps (makespan s)" for c in args.collate)
    print(f"| spacing | {head} |")
    print("|---:|" + "---:|" * len(args.collate))
    for i, spacing in enumerate(SPACINGS):
        cells = " | ".join(f"{results[c][i][1]} ({results[c][i][2]:.2f})" for c in args.collate)
        print(f"| {spacing * 1000:g} ms | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
