"""
How long ``twistd jano --demo`` takes to answer, and how long its first
request takes (the demo's servers are managed children: the first request
starts one).

Run from the checkout::

    python3 benchmarks/demo_start.py [--runs 3]

Prints, per run: seconds from spawning ``twistd`` to ``/health`` answering
200, seconds for the first chat completion (which starts ``demo-chat``'s
server and waits for its simulated 1 s load), and that swap's phases.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run() -> tuple[float, float, dict[str, float]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    twistd = Path(sys.executable).with_name("twistd")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "-l", os.path.join(tmp, "log"),
                                 "jano", "--demo", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                                env=env, cwd=tmp)
        try:
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() - t0 > 30:
                        raise SystemExit("jano did not start")
                    time.sleep(0.005)
            ready = time.monotonic() - t0
            body = json.dumps({"model": "demo-chat", "messages": [], "max_tokens": 2}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
            t1 = time.monotonic()
            urllib.request.urlopen(req, timeout=60).read()
            first = time.monotonic() - t1
            status = json.load(urllib.request.urlopen(base + "/status", timeout=5))
            return ready, first, status["lastSwap"]["phasesMs"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("| run | jano ready (s) | first answer (s) | stop / start / ready (ms) |")
    print("|---|---|---|---|")
    for i in range(args.runs):
        ready, first, phases = one_run()
        print(f"| {i + 1} | {ready:.2f} | {first:.2f} | {phases.get('stop', 0):.0f} / "
              f"{phases.get('start', 0):.0f} / {phases.get('ready', 0):.0f} |")


if __name__ == "__main__":
    main()
