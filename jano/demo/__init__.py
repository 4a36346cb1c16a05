"""
The simulated model server behind demo mode (``twistd jano --demo``) and
:mod:`jano.testing`: a fake that answers like llama-server, Ollama or an
OpenAI-style server, and a swapper whose swaps are timers.

It is a fake: nothing is generated.  Content chunk ``i`` of a response is the
text ``Tok{i % 10}`` plus optional padding, and the counts and timings it
reports are *simulated*, computed from the request and the server's configured
speeds, not measured.  That makes every number predictable, so a test can
assert exactly what a router should extract:

* prompt tokens: the number of whitespace-separated words in the prompt or
  messages (token-id lists count one per id), at least 1;
* completion tokens: the number of content chunks actually sent;
* ``predicted_ms == n / gen_tok_s * 1000`` and
  ``prompt_ms == prompt_n / prompt_tok_s * 1000`` (llama.cpp, milliseconds);
* ``eval_duration == round(n / gen_tok_s * 1e9)`` and
  ``prompt_eval_duration == round(prompt_n / prompt_tok_s * 1e9)`` (Ollama,
  nanoseconds); ``load_duration`` is :data:`OLLAMA_LOAD_NS` unless
  ``X-Fake-Load-Ms`` says otherwise.

The bytes follow the captures of real servers (``/work/shared/fixtures``): one
SSE ``data: {json}\\n\\n`` event or one NDJSON line per ``write`` (so per HTTP
chunk), the same keys in the same places, llama.cpp's ``timings`` where
llama-server puts them, no ``[DONE]`` on ``/completion``.

Per request, these headers change the answer (the constructor's ``default_*``
arguments set them for every request):

``X-Fake-Delay-Ms``
    gap between content chunks; the first is sent at once.  Non-streamed
    answers wait as long as the whole stream would have taken.
``X-Fake-Chunk-Bytes``
    padding bytes (``x``) added to every chunk's text.
``X-Fake-Fail-After``
    close the connection, without finishing the response, after that many
    content chunks (a backend dying mid-stream).  The chunks already written are
    delivered, then the body ends short.
``X-Fake-Status``
    answer that status (400-599) with an OpenAI-shaped JSON error instead.
``X-Fake-Stamp``
    (any value) each streamed chunk's text becomes ``Tok{k}@{ns}`` where
    ``ns`` is ``time.monotonic_ns()`` at write time, for measuring transit.
``X-Fake-Load-Ms``
    Ollama flavors: report this ``load_duration`` (a backend that reloaded the
    model on its own, e.g. for a different ``num_ctx``).

Streams are produced by a push producer registered on the request: a slow
reader pauses the fake, so a response of any size never sits in its memory.

The package, in the order a request meets it: :mod:`~jano.demo.server` (routes,
load state, counters), :mod:`~jano.demo.parsing` (what a request asks),
:mod:`~jano.demo.generation` (the simulated numbers), :mod:`~jano.demo.formats`
(the bytes per wire format), :mod:`~jano.demo.streams` (paced writers) and
:mod:`~jano.demo.swapper`.  It imports none of Jano's serving stages, so demo
mode does not depend on :mod:`jano.testing`.
"""

from jano.demo.generation import OLLAMA_LOAD_NS, Flavor
from jano.demo.parsing import MAX_CHUNK_BYTES, MAX_DELAY, MAX_TOKENS
from jano.demo.server import FakeModelServer, SeenRequest
from jano.demo.swapper import SimulatedSwapper

__all__ = [
    "FakeModelServer",
    "Flavor",
    "MAX_CHUNK_BYTES",
    "MAX_DELAY",
    "MAX_TOKENS",
    "OLLAMA_LOAD_NS",
    "SeenRequest",
    "SimulatedSwapper",
]
