"""
Token counts and timings read from the end of a model server's response.

Sans-IO: :class:`TailBuffer` keeps the last bytes of a body while the tee
streams it to the client, and :func:`extract_usage` turns those bytes into a
:class:`~jano.records.Usage` once the body has ended.  No Twisted here, so the
parser is tested with plain bytes.

Only a tail is kept because every format Jano knows puts its numbers at the
very end of the body (the final SSE event, the ``done`` NDJSON line, the last
members of a JSON object), while the body itself may be of any size.

The modules, in the order the bytes meet them:

:mod:`jano.usage.tail`
    :class:`TailBuffer`, the bounded end of a streamed body.
:mod:`jano.usage.formats`
    :func:`extract_usage` and the llama.cpp, OpenAI and Ollama readers, plus
    :func:`with_router_timing` for a rate the backend did not report.
:mod:`jano.usage.suffix`
    the backwards reader of a JSON object whose start was cut off.

A value that is absent, of the wrong JSON type (a string, a boolean, a float
where a count belongs), negative, non-finite or absurdly large is reported as
``None``; no number is ever invented.
"""

from __future__ import annotations

from jano.usage.formats import extract_usage, with_router_timing
from jano.usage.tail import DEFAULT_TAIL_LIMIT, TailBuffer

__all__ = ["DEFAULT_TAIL_LIMIT", "TailBuffer", "extract_usage", "with_router_timing"]
