"""
What is settled before the first swap: every managed model gets its port,
and every command is checked, so a mistake stops ``twistd jano`` at start-up
(or keeps the running config on ``SIGHUP``) with one line, not a 503 later.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping, Optional

from jano.config import Config, ConfigError
from jano.swap.command import check_swap_command
from jano.swap.ports import PortsExhausted, allocate_ports

__all__ = ["with_ports", "check_commands"]


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
