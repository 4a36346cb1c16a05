"""
``twistd jano``: options and ``makeService``.  The only module that touches
the global reactor.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from jano.config import Config, ConfigError, find_config, load_config

log = Logger()

DEMO_MODELS = ("demo-chat", "demo-coder")


class Options(usage.Options):
    """Command line of ``twistd jano``."""

    synopsis = "[--config PATH] [--listen ENDPOINT] [--demo]"
    longdesc = ("Route OpenAI, Ollama and llama.cpp requests to local model servers, "
                "swapping models as rarely as possible.  Without --config, looks for "
                "./jano.toml, $XDG_CONFIG_HOME/jano/jano.toml and /etc/jano/jano.toml, "
                "and starts in demo mode when there is none.")
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file."],
        ["listen", "l", None,
         "Twisted endpoint to listen on (default from the config, else "
         "tcp:8000:interface=127.0.0.1)."],
    ]
    optFlags = [
        ["demo", None, "Serve two simulated models on loopback (no real backend needed)."],
    ]

    config: Optional[Config] = None

    def postOptions(self) -> None:
        path = self["config"]
        if self["demo"] and path:
            raise usage.UsageError("--demo and --config exclude each other")
        if not self["demo"]:
            found = Path(path) if path else find_config()
            if found is not None:
                try:
                    self.config = load_config(found)
                except ConfigError as e:
                    # One clear line, no traceback, non-zero exit.
                    raise SystemExit(f"jano: bad configuration: {e}") from None
        listen = self["listen"] or (self.config.server.listen if self.config else None)
        if listen:
            from twisted.internet import reactor
            from twisted.internet.endpoints import serverFromString

            try:  # builds the endpoint without listening: a bad string fails here, clearly
                serverFromString(reactor, listen)
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"jano: bad listen endpoint {listen!r}: {e}") from None


#: Seconds each demo server pretends to load its model (``/health`` answers 503 meanwhile).
DEMO_LOAD_SECONDS = 1.0


def demo_models() -> tuple[Any, ...]:
    """The demo's two models: fake llama-servers Jano runs itself, as a user's would be."""
    import sys

    from jano.config import MANAGED_UPSTREAM
    from jano.records import ModelSpec

    command = (sys.executable, "-m", "jano.testing", "--port", "{port}", "--model", "{model}",
               "--quiet", "--gen-tok-s", "40", "--delay-ms", "25",
               "--startup-delay", f"{DEMO_LOAD_SECONDS:g}")
    return tuple(ModelSpec(name=name, upstream=MANAGED_UPSTREAM, kind="llamacpp",
                           health="/health", max_concurrency=4, command=command,
                           stop_timeout=5.0)
                 for name in DEMO_MODELS)


def demo_service(reactor: Any, listen: str) -> IService:
    """Jano running two fake model servers (``python -m jano.testing``) as managed models."""
    import os
    import tempfile

    from jano.config import DEFAULT_LISTEN, SchedulerConfig, ServerConfig, TelemetryConfig
    from jano.service import JanoService

    # The demo's history lives in a temporary file: it works like the real one, and goes.
    database = os.path.join(tempfile.mkdtemp(prefix="jano-demo-"), "usage.sqlite3")
    config = Config(models=demo_models(), server=ServerConfig(listen=listen or DEFAULT_LISTEN),
                    scheduler=SchedulerConfig(max_wait=30.0, ready_timeout=60.0),
                    telemetry=TelemetryConfig(database=database), demo=True)
    service = JanoService(config, reactor)
    log.info("demo mode: Jano runs {models} as fake llama-servers on {upstreams}; each "
             "takes ~{load:g} s to load", models=", ".join(DEMO_MODELS),
             upstreams=", ".join(s.upstream for s in service.config.models),
             load=DEMO_LOAD_SECONDS)
    return service


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options.config
    if config is None:
        if not options["demo"]:
            log.warn("no configuration found (looked in {paths}); starting in demo mode",
                     paths="./jano.toml, $XDG_CONFIG_HOME/jano/jano.toml, /etc/jano/jano.toml")
        svc = demo_service(reactor, options["listen"])
    else:
        if options["listen"]:
            from dataclasses import replace

            config = replace(config, server=replace(config.server, listen=options["listen"]))
        from jano.service import JanoService

        try:
            svc = JanoService(config, reactor)
        except Exception as e:  # a bad command, no free port: one line, no traceback
            from jano.errors import SwapCommandError

            if isinstance(e, (SwapCommandError, ConfigError)):
                raise SystemExit(f"jano: bad configuration: {e}") from None
            raise
        source = config.source

        def reload(*_: object) -> None:
            # A signal handler may run at any point: hand the work to the reactor.
            reactor.callFromThread(svc.reload_from, source)  # type: ignore[attr-defined]

        if source is not None and hasattr(signal, "SIGHUP") and hasattr(svc, "reload_from"):
            signal.signal(signal.SIGHUP, reload)
    return svc
