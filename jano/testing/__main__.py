"""
Run a :class:`~jano.testing.FakeModelServer` on a real socket, behaving
enough like a ``llama-server`` process for Jano to supervise it.

    python -m jano.testing [--port N] [--interface 127.0.0.1] [--port-file FILE]
                           [--model NAME ...] [--flavor llamacpp|ollama|openai]
                           [--gen-tok-s 50] [--prompt-tok-s 500] [--delay-ms 0]
                           [--startup-delay SECONDS] [--exit-at-start CODE]
                           [--crash-after N [--crash-signal KILL|SEGV|ABRT |
                                             --crash-exit CODE]]
                           [--ignore-sigterm] [--log-requests]
                           [--quiet] [--silent] [--verbose]

``--port 0`` (the default) picks a free port; ``--port-file`` receives the
bound port (written atomically, once listening) so a test or script can wait
for it.

Output.  stdout gets one banner line saying where it listens, unless
``--quiet`` (or ``--silent``).  stderr gets plain-text log lines, each flushed,
the way llama-server logs: ``fake: loading model NAMES (startup delay Xs)``,
``fake: server is listening on http://HOST:PORT``, ``fake: model loaded``,
``fake: SIGTERM, shutting down`` and, with ``--log-requests``, ``fake: request
METHOD PATH`` per request (never a body).  ``--quiet`` does not touch them: a
supervisor reads stderr, a human the banner.  ``--silent`` drops them too, but
never the lines that explain a death (``cannot listen``, ``cannot load model``,
``simulated crash``).  ``--verbose`` adds Twisted's access log on stdout; the
fake is used for load tests, so nothing logs per request by default.

Life cycle:

``--startup-delay SECONDS``
    listen at once but load for SECONDS (fractions allowed): until then every
    route but ``/fake/*`` answers llama-server's 503 ``Loading model``.
``--exit-at-start CODE``
    print ``fake: cannot load model: file not found`` and exit with CODE
    without listening (a bad model path).
``--crash-after N``
    once N inference requests (the five generation routes; health checks and
    listings do not count) were answered completely, the next one kills the
    process: a stream just after its first content chunk is on the wire, any
    other answer before it is sent.  The process dies by ``--crash-signal``
    (``KILL``, the default; ``SEGV`` and ``ABRT`` as llama.cpp really dies, with
    core dumps suppressed) or exits with ``--crash-exit CODE``, after the line
    ``fake: simulated crash after N requests``.
``--ignore-sigterm``
    ignore SIGTERM (a server that hangs on shutdown).  Otherwise SIGTERM and
    SIGINT stop the reactor and the process exits 0.

Exit status: 0 after SIGTERM/SIGINT, 1 when the port cannot be bound
(``fake: cannot listen on HOST:PORT: address already in use``), 2 for bad
arguments, the chosen code or signal for the simulated failures.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from types import FrameType
from typing import Any, Callable, Optional, Sequence, Union

from twisted.internet.error import CannotListenError
from twisted.web.http import Request
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from jano.demo import MAX_DELAY, FakeModelServer

#: Signals ``--crash-signal`` may name (without ``SIG``).
CRASH_SIGNALS = ("KILL", "SEGV", "ABRT")


class _QuietSite(Site):
    """A ``Site`` that writes no access log line."""

    def log(self, request: Request) -> None:
        pass


class _Say:
    """The stderr log: one flushed ``fake: ...`` line per call."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent

    def __call__(self, line: str) -> None:
        if not self.silent:
            self.fatal(line)

    @staticmethod
    def fatal(line: str) -> None:
        """A line explaining a death: printed even when silent."""
        print(f"fake: {line}", file=sys.stderr, flush=True)


def _printable(raw: bytes) -> str:
    text = raw.decode("latin-1")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class _LoggedResource(Resource):
    """Log ``request METHOD PATH`` as each request arrives, then let ``inner`` answer."""

    isLeaf = True

    def __init__(self, inner: IResource, say: Callable[[str], None]) -> None:
        super().__init__()
        self._inner = inner
        self._say = say

    def render(self, request: Request) -> Union[bytes, int]:
        self._say(f"request {_printable(request.method)} {_printable(request.path)}")
        result: Union[bytes, int] = self._inner.render(request)
        return result


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
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                   help="answer 503 'Loading model' for this long after start (default 0)")
    p.add_argument("--exit-at-start", type=int, metavar="CODE",
                   help="fail to load the model: exit with CODE without listening")
    p.add_argument("--crash-after", type=int, metavar="N",
                   help="crash on the inference request after N answered ones")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--crash-signal", choices=CRASH_SIGNALS,
                     help="crash by killing itself with this signal (default KILL)")
    how.add_argument("--crash-exit", type=int, metavar="CODE",
                     help="crash by exiting with CODE instead of a signal")
    p.add_argument("--ignore-sigterm", action="store_true",
                   help="ignore SIGTERM (default: SIGTERM shuts down, exit status 0)")
    p.add_argument("--log-requests", action="store_true",
                   help="log 'request METHOD PATH' to stderr for every request")
    p.add_argument("--quiet", action="store_true", help="no banner line on stdout")
    p.add_argument("--silent", action="store_true",
                   help="like --quiet, and no stderr log lines but the fatal ones")
    p.add_argument("--verbose", action="store_true", help="log every request to stdout")
    return p


def _write_port(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def _no_core_dump() -> None:
    """Keep a simulated SEGV/ABRT from writing a core file (1 also stops a piped core_pattern)."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0 if hard == 0 else 1, hard))
    except (ImportError, ValueError, OSError):
        pass


def _crasher(after: int, signal_name: Optional[str], exit_code: Optional[int]
             ) -> Callable[[], None]:
    """The process's death: one stderr line, then ``os._exit`` or a signal to itself."""

    def crash() -> None:
        _Say.fatal(f"simulated crash after {after} requests")
        if exit_code is not None:
            os._exit(exit_code)
        signum = signal.Signals[f"SIG{signal_name or 'KILL'}"]
        if signum != signal.SIGKILL:
            _no_core_dump()
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # not reached: a signal to oneself arrives before kill returns

    return crash


def _handle_signals(reactor: Any, say: Callable[[str], None], ignore_sigterm: bool) -> None:
    """SIGTERM and SIGINT stop the reactor; the line is printed by the reactor, not the handler."""
    stopping: list[str] = []

    def stop(name: str) -> None:
        if stopping:
            return
        stopping.append(name)
        say(f"{name}, shutting down")
        reactor.stop()

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else handler)
    signal.signal(signal.SIGINT, handler)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if not 0 <= args.delay_ms <= MAX_DELAY * 1000:
        parser.error(f"--delay-ms must be between 0 and {MAX_DELAY * 1000:g}")
    if not (args.startup_delay >= 0 and math.isfinite(args.startup_delay)):
        parser.error("--startup-delay must be a non-negative number of seconds")
    for flag, code in (("--exit-at-start", args.exit_at_start), ("--crash-exit", args.crash_exit)):
        if code is not None and not 0 <= code <= 255:
            parser.error(f"{flag} must be between 0 and 255")
    if args.crash_after is None:
        if args.crash_signal is not None or args.crash_exit is not None:
            parser.error("--crash-signal and --crash-exit need --crash-after")
    elif args.crash_after < 0:
        parser.error("--crash-after must be at least 0")


def main(argv: Optional[Sequence[str]] = None, reactor: Any = None) -> int:
    """Parse ``argv``, listen, run the reactor until it stops; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    say = _Say(args.silent)
    models = tuple(args.models or ("fake-model",))
    say(f"loading model {', '.join(models)} (startup delay {args.startup_delay:g}s)")
    if args.exit_at_start is not None:
        say.fatal("cannot load model: file not found")
        return int(args.exit_at_start)
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    crash = (_crasher(args.crash_after, args.crash_signal, args.crash_exit)
             if args.crash_after is not None else (lambda: None))
    try:
        fake = FakeModelServer(reactor, models=models,
                               flavor=args.flavor, gen_tok_s=args.gen_tok_s,
                               prompt_tok_s=args.prompt_tok_s,
                               default_delay=args.delay_ms / 1000.0,
                               crash_after=args.crash_after, crash=crash)
    except ValueError as e:
        parser.error(str(e))
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    root = fake.resource()
    if args.log_requests:
        root = _LoggedResource(root, say)
    if args.verbose:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                         redirectStandardIO=False)
        site: Site = Site(root)
    else:  # warnings and errors only, on stderr
        quiet = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                     [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
        globalLogBeginner.beginLoggingTo([quiet], redirectStandardIO=False)
        site = _QuietSite(root)
    site.noisy = False
    # Before the port file exists: whoever waits for it may signal at once.
    _handle_signals(reactor, say, args.ignore_sigterm)
    loaded = fake.simulate_load(args.startup_delay)  # the clock runs from before listening
    host = f"[{args.interface}]" if ":" in args.interface else args.interface
    try:
        port = reactor.listenTCP(args.port, site, interface=args.interface)
    except CannotListenError as e:
        error = e.socketError
        reason = (error.strerror.lower() if isinstance(error, OSError) and error.strerror
                  else str(error))
        say.fatal(f"cannot listen on {host}:{args.port}: {reason}")
        return 1
    bound = port.getHost().port
    say(f"server is listening on http://{host}:{bound}")
    loaded.addCallback(lambda _: say("model loaded"))
    if args.port_file:
        _write_port(args.port_file, bound)
    if not (args.quiet or args.silent):
        print(f"jano.testing: fake {args.flavor} server on http://{host}:{bound} "
              f"(models: {', '.join(fake.models)})", flush=True)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
