"""
Run a :class:`~jano.testing.FakeModelServer` on a real socket.

    python -m jano.testing [--port N] [--interface 127.0.0.1] [--port-file FILE]
                           [--model NAME ...] [--flavor llamacpp|ollama|openai]
                           [--gen-tok-s 50] [--prompt-tok-s 500] [--delay-ms 0]
                           [--quiet] [--verbose]

``--port 0`` (the default) picks a free port; ``--port-file`` receives the
bound port (written atomically, once listening) so a test or script can wait
for it.  One line on stdout says where it listens, unless ``--quiet``.  No
per-request logging unless ``--verbose``: the fake is used for load tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from twisted.internet.error import CannotListenError
from twisted.web.http import Request
from twisted.web.server import Site

from jano.demo import MAX_DELAY, FakeModelServer


class _QuietSite(Site):
    """A ``Site`` that writes no access log line."""

    def log(self, request: Request) -> None:
        pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jano.testing",
        description="A fake LLM model server (llama-server, Ollama and OpenAI wire formats).")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: a free one; default 0)")
    p.add_argument("--interface", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="a model name to serve (repeatable; default fake-model)")
    p.add_argument("--flavor", choices=("llamacpp", "ollama", "openai"), default="llamacpp",
                   help="whose OpenAI-compatible shapes to imitate (default llamacpp)")
    p.add_argument("--gen-tok-s", type=float, default=50.0,
                   help="simulated generation speed reported in timings (default 50)")
    p.add_argument("--prompt-tok-s", type=float, default=500.0,
                   help="simulated prompt speed reported in timings (default 500)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="default gap between streamed chunks (X-Fake-Delay-Ms; default 0)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--verbose", action="store_true", help="log every request to stdout")
    return p


def _write_port(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None, reactor: Any = None) -> int:
    """Parse ``argv``, listen, run the reactor until it stops; the exit status."""
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        _parser().error("--port must be between 0 and 65535")
    if not 0 <= args.delay_ms <= MAX_DELAY * 1000:
        _parser().error(f"--delay-ms must be between 0 and {MAX_DELAY * 1000:g}")
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    try:
        fake = FakeModelServer(reactor, models=tuple(args.models or ("fake-model",)),
                               flavor=args.flavor, gen_tok_s=args.gen_tok_s,
                               prompt_tok_s=args.prompt_tok_s,
                               default_delay=args.delay_ms / 1000.0)
    except ValueError as e:
        _parser().error(str(e))
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    if args.verbose:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                         redirectStandardIO=False)
        site: Site = Site(fake.resource())
    else:  # warnings and errors only, on stderr
        quiet = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                     [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
        globalLogBeginner.beginLoggingTo([quiet], redirectStandardIO=False)
        site = _QuietSite(fake.resource())
    site.noisy = False
    try:
        port = reactor.listenTCP(args.port, site, interface=args.interface)
    except CannotListenError as e:
        print(f"python -m jano.testing: {e}", file=sys.stderr)
        return 1
    bound = port.getHost().port
    if args.port_file:
        _write_port(args.port_file, bound)
    if not args.quiet:
        host = f"[{args.interface}]" if ":" in args.interface else args.interface
        print(f"jano.testing: fake {args.flavor} server on http://{host}:{bound} "
              f"(models: {', '.join(fake.models)})", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
