"""
Jano: a small, fast Twisted router in front of local LLM model servers.

It forwards requests untouched, streams responses back unbuffered, orders its
queue so that one GPU swaps models as rarely as possible, and reports what only
a router can see.  Start with ``twistd jano``; embed with
:func:`jano.service.make_resource` or :func:`jano.service.make_service`.

A request's path through the packages, each importing only those after it:

1. :mod:`jano.web` -- in: the listener (twisted.web with Jano's limits) and the
   Klein app (Jano's own routes, a catch-all that forwards);
2. :mod:`jano.routing` -- which model, from the body bytes;
3. :mod:`jano.scheduler` -- wait: per-model queues, collation, the starvation guard;
4. :mod:`jano.swap` -- maybe change the resident model: the swap script, readiness
   and health probes;
5. :mod:`jano.forward` -- forward through an ``IAgent`` and stream back through a tee;
6. :mod:`jano.usage` -- token counts from the body's tail;
7. :mod:`jano.telemetry` -- the recorder, ``/status`` and ``/usage``, Prometheus.

Under them: :mod:`jano.records`, :mod:`jano.errors`, :mod:`jano.interfaces`,
:mod:`jano.config`.  :mod:`jano.service` wires everything; :mod:`jano.tap` is
``twistd jano``; :mod:`jano.demo` is demo mode's simulated model server.
"""

__version__ = "0.2.0"
__all__ = ["__version__"]
