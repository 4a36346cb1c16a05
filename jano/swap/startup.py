"""
What is settled before the first swap: every managed model gets its port,
and every command is checked, so a mistake stops ``twistd jano`` at start-up
(or keeps the running config on ``SIGHUP``) with one line, not a 503 later.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Optional

from twisted.internet.defer import Deferred

from jano.config import Config, ConfigError
from jano.records import HealthState
from jano.swap.command import check_swap_command
from jano.swap.keeper import ServerKeeper
from jano.swap.managed import ManagedSwapper
from jano.swap.orphans import Runs
from jano.swap.ports import PortsExhausted, allocate_ports
from jano.swap.supervisor import Supervisor
from jano.swap.swapper import ScriptSwapper, SwapReactor

__all__ = ["with_ports", "check_commands", "managed_servers"]


_LISTEN_PORT = re.compile(r"^tcp6?:(?:port=)?(\d+)(?::|$)")


def with_ports(config: Config, keep: Mapping[str, int] = {}) -> Config:
    """
    ``config`` with a port for every managed model (``keep``: ports given
    before), never Jano's own listening port.
    """
    if not any(m.managed for m in config.models):
        return config
    own = _LISTEN_PORT.match(config.server.listen)
    reserved = {"": int(own.group(1))} if own else {}
    try:
        models = allocate_ports(config.models, config.processes.port_range,
                                keep={**reserved, **keep})
    except PortsExhausted as e:
        raise ConfigError(str(e)) from None
    return replace(config, models=tuple(models))


def check_commands(config: Config, old: Optional[Config] = None) -> None:
    """Fail now, not at the first swap, when a command cannot run (only new ones on reload)."""
    if config.swap.command and (old is None or config.swap.command != old.swap.command):
        check_swap_command(config.swap.command)
    before = {m.name: m.command for m in old.models} if old is not None else {}
    for spec in config.models:
        if spec.managed and before.get(spec.name) != spec.command:
            check_swap_command(spec.command, cwd=spec.cwd, what=f"models ({spec.name}).command")


def managed_servers(reactor: SwapReactor, config: Config, script: Optional[ScriptSwapper],
                    probe: Callable[[str], Deferred[int]], observed: Callable[[str, HealthState], None],
                    keeper: Optional[ServerKeeper] = None) -> ServerKeeper:
    """
    The keeper of ``config``'s managed servers, its swapper over ``script``
    (for the models without a command); on reload, ``keeper`` updated (its
    servers, logs and run record carry on).
    """
    proc = config.processes
    if keeper is None:
        runs = Runs(Path(proc.runs_dir)) if proc.runs_dir else None
        supervisor = Supervisor(reactor, log_bytes=proc.log_bytes, backoff=proc.restart_backoff,
                                backoff_max=proc.restart_backoff_max,
                                run_token=runs.token if runs is not None else None)
    else:
        supervisor = keeper.supervisor
        supervisor.backoff, supervisor.backoff_max = proc.restart_backoff, proc.restart_backoff_max
    managed = ManagedSwapper(reactor, supervisor, script, probe,
                             ready_timeout=config.scheduler.ready_timeout)
    if keeper is None:
        return ServerKeeper(reactor, managed, observed, runs)
    keeper.swapper = managed
    return keeper
