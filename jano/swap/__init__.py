"""
Stage 4: maybe change the resident model of a GPU slot.

The contract with the script (argv, environment, exit status, timeouts) is
written out at the top of ``etc/swap-model.example.sh``; in short: Jano runs
``[swap] command`` with ``{model}``/``{previous}`` substituted, in a process
group of its own, logs every output line, and takes exit status 0 as "the
switch was made".  It then polls the target model's health URL until it
answers 200.  Anything else ends in one :class:`SwapError` whose ``cause`` is a
single line fit for a client's 503 answer.

Models with a ``command`` are *managed*: Jano runs their servers itself, and
a swap stops one process and starts the next (:mod:`jano.swap.managed`).

The package follows a swap from configuration to readiness:

* :mod:`jano.swap.command`, :mod:`jano.swap.startup`, :mod:`jano.swap.ports`:
  check the commands and allocate the managed servers' ports at start-up;
* :mod:`jano.swap.process`: the ``ProcessProtocol`` watching one script run;
* :mod:`jano.swap.swapper`: :class:`ScriptSwapper`, one attempt per swap;
* :mod:`jano.swap.child`, :mod:`jano.swap.logring`, :mod:`jano.swap.supervisor`:
  one managed server as a child process, its output, and the table of them;
* :mod:`jano.swap.managed`: :class:`~jano.swap.managed.ManagedSwapper`, a
  swap as stop / start / ready (the script for models without a command);
* :mod:`jano.swap.keeper`: what happens to managed servers outside a swap
  (``always_on``, crashes, reloads, shutdown);
* :mod:`jano.swap.ready`, :mod:`jano.swap.probe`: the readiness wait and its
  HTTP probe;
* :mod:`jano.swap.health`: :class:`~jano.swap.health.HealthMonitor`, the same
  probe run every few seconds for ``/status`` and ``/metrics``.

The reactor is injected: tests drive :class:`jano.testing.FakeProcessReactor`,
production passes the real one.
"""


from jano.errors import SwapCommandError, SwapError
from jano.swap.command import check_swap_command, session_argv, substitute
from jano.swap.probe import http_probe
from jano.swap.process import LineSplitter, SwapScriptProtocol
from jano.swap.swapper import ScriptSwapper, SwapReactor

__all__ = [
    "ScriptSwapper",
    "SwapReactor",
    "SwapScriptProtocol",
    "LineSplitter",
    "check_swap_command",
    "substitute",
    "session_argv",
    "http_probe",
    "SwapError",
    "SwapCommandError",
]
