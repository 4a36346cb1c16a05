"""
Jano's configuration: TOML in, frozen records out.  Pure: no Twisted.

Every error is a :class:`ConfigError` whose message is one line naming the
key path and what was expected, so ``twistd jano`` can print it and stop
without a traceback.  :mod:`jano.config.records` holds the records,
:mod:`jano.config.checks` the checks of single values, and
:mod:`jano.config.parse` the parser and the default paths.
"""

from jano.config.parse import (default_config_paths, default_database, find_config, load_config,
                               parse_config)
from jano.config.models import MANAGED_UPSTREAM, parse_memory
from jano.config.records import (DEFAULT_LISTEN, CallerKey, Config, ConfigError, GroupConfig,
                                 ProcessesConfig, SchedulerConfig, ServerConfig, SwapConfig,
                                 TelemetryConfig)

__all__ = ["DEFAULT_LISTEN", "MANAGED_UPSTREAM", "CallerKey", "Config", "ConfigError",
           "GroupConfig", "ProcessesConfig", "SchedulerConfig", "parse_memory",
           "ServerConfig", "SwapConfig", "TelemetryConfig", "default_config_paths",
           "default_database", "find_config", "load_config", "parse_config"]
