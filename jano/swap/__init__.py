"""
Stage 4: maybe change the resident model of a GPU slot.

The contract with the script (argv, environment, exit status, timeouts) is
written out at the top of ``etc/swap-model.example.sh``; in short: Jano runs
``[swap] command`` with ``{model}``/``{previous}`` substituted, in a process
group of its own, logs every output line, and takes exit status 0 as "the
switch was made".  It then polls the target model's health URL until it
answers 200.  Anything else ends in one :class:`SwapError` whose ``cause`` is a
single line fit for a client's 503 answer.

The package follows a swap from configuration to readiness:

* :mod:`jano.swap.command`: check the command at start-up, build its argv;
* :mod:`jano.swap.process`: the ``ProcessProtocol`` watching one run;
* :mod:`jano.swap.swapper`: :class:`ScriptSwapper`, one attempt per swap;
* :mod:`jano.swap.probe`: the readiness probe over HTTP;
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
