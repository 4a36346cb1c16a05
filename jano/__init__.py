"""
Jano: a small, fast Twisted router in front of local LLM model servers.

It forwards requests untouched, streams responses back unbuffered, orders its
queue so that one GPU swaps models as rarely as possible, and reports what only
a router can see.  Start with ``twistd jano``; embed with
:func:`jano.service.make_resource` or :func:`jano.service.make_service`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
