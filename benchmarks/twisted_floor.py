#!/usr/bin/env python3
"""
The floor: what the least any Twisted proxy can cost on this machine.

``python3 benchmarks/twisted_floor.py`` runs a bare Twisted TCP relay (no HTTP
parsing at all: each client connection gets one upstream connection and bytes
are copied both ways with transport.write and TCP_NODELAY, public API only) in front
of the same fast fake backend ``run.py`` uses, drives it with the same wrk
script and streaming driver, and prints its CPU per non-streamed request at
concurrency 1 and per paced streamed chunk, next to Jano's in the same run.

Jano does everything this relay does plus HTTP parsing, routing,
scheduling, the stream tee and telemetry, so no figure of Jano's can go below
this relay's.  ``--serve PORT UPSTREAM_PORT`` runs the relay alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent


def serve(port: int, upstream_port: int) -> None:
    from twisted.internet import protocol, reactor

    class Up(protocol.Protocol):
        def __init__(self, down: "Down") -> None:
            self.down = down

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            self.down.upstream_ready(self)

        def dataReceived(self, data: bytes) -> None:
            self.down.transport.write(data)

        def connectionLost(self, reason: object = None) -> None:
            if self.down.transport is not None:
                self.down.transport.loseConnection()

    class Down(protocol.Protocol):
        up: "Up | None" = None

        def connectionMade(self) -> None:
            self.held: list[bytes] = []
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            protocol.ClientCreator(reactor, Up, self).connectTCP("127.0.0.1", upstream_port)

        def upstream_ready(self, up: Up) -> None:
            self.up = up
            for data in self.held:
                up.transport.write(data)
            self.held = []

        def dataReceived(self, data: bytes) -> None:
            if self.up is None:
                self.held.append(data)
            else:
                self.up.transport.write(data)

        def connectionLost(self, reason: object = None) -> None:
            if self.up is not None and self.up.transport is not None:
                self.up.transport.loseConnection()

    factory = protocol.Factory.forProtocol(Down)
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--serve", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"))
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also measure the Jano in this checkout (e.g. a worktree of an older "
                         "commit), in the same rounds, in alternating order")
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0

    sys.path.insert(0, str(HERE))
    import run as R  # the orchestrator's process helpers, wrk and driver runners

    R.check_requirements()
    tmp = Path(tempfile.mkdtemp(prefix="jano-floor-"))
    backend = R.Backend(tmp)
    port = R.free_port()
    relay = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(backend.port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = ["relay", "jano"] + (["baseline"] if args.baseline else [])
    rows: dict[str, dict[str, list[float]]] = {n: {"req": [], "chunk": []} for n in names}
    jano = base = None
    try:
        deadline = time.monotonic() + 10
        while not R.chat_once(port, timeout=1.0):
            if relay.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("twisted_floor.py: the relay did not start")
            time.sleep(0.05)
        for rnd in range(1, args.rounds + 1):
            jano = R.Jano(tmp, backend.port, rnd)
            targets = [("relay", port, relay.pid), ("jano", jano.port, jano.pid)]
            if args.baseline:
                base = R.Jano(tmp, backend.port, 100 + rnd, args.baseline.resolve())
                targets.append(("baseline", base.port, base.pid))
                if rnd % 2 == 0:  # alternate which Jano goes first
                    targets[1], targets[2] = targets[2], targets[1]
            for name, p, pid in targets:
                for _ in range(100):
                    R.chat_once(p)
                c0 = R.cpu_ns(pid)
                R.run_wrk(p, args.requests, 1, 60, tmp, False)
                rows[name]["req"].append((R.cpu_ns(pid) - c0) / args.requests / 1000)
                c0 = R.cpu_ns(pid)
                out = R.run_driver(R.stream_opts(p, 32, 8, 64, 30, delayMs=20, stamp=True), 45)
                if out.get("errors"):
                    raise SystemExit(f"twisted_floor.py: {name} stream errors: {out['errors']}")
                rows[name]["chunk"].append((R.cpu_ns(pid) - c0) / (32 * 64) / 1000)
            jano.stop()
            jano = None
            if base is not None:
                base.stop()
                base = None
    finally:
        if jano is not None:
            jano.stop()
        if base is not None:
            base.stop()
        R.stop_process(relay)
        backend.stop()

    def cell(vals: list[float]) -> str:
        return f"{median(vals):.0f} ({min(vals):.0f}–{max(vals):.0f})"

    print(f"CPU time, µs; median (min–max) of {args.rounds} rounds; {args.requests} requests at "
          "concurrency 1 (wrk); 32 streams × 64 chunks, 8 at a time, 50 chunks/s each")
    print()
    print("| process | per non-streamed request, c=1 | per paced streamed chunk |")
    print("|---|---:|---:|")
    labels = {"relay": "bare Twisted TCP relay (the floor)", "jano": f"Jano ({HERE.parent})",
              "baseline": f"Jano ({args.baseline})"}
    for name in names:
        print(f"| {labels[name]} | {cell(rows[name]['req'])} | {cell(rows[name]['chunk'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
