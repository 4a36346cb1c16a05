"""
:class:`FakeModelServer`: routes, the simulated load state and the counters.

It reads a request (:mod:`jano.demo.parsing`), decides the answer, and hands
the bytes (:mod:`jano.demo.formats`) to a writer (:mod:`jano.demo.streams`)
when the answer outlives ``render``; status lines, headers and errors in the
backend's shape are :mod:`jano.demo.replies`'.  Served through a plain twisted.web leaf
resource.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

import jano.demo.formats as formats
from jano.demo.formats import EVENT_STREAM, JSON_LLAMA, JSON_PLAIN, NDJSON, dumps
from jano.demo.generation import FLAVORS, Flavor, Generation
from jano.demo.parsing import (INFERENCE, MAX_BODY_TEXT_BYTES, MAX_CHUNK_BYTES, MAX_DELAY,
                               MAX_REQUEST_BYTES, MAX_STREAM_TEXT_BYTES, MAX_TOKENS, ROUTES,
                               Knobs, count_words, is_unload, parse_body, parse_knobs,
                               token_limit)
from jano.demo.replies import Replies
from jano.demo.streams import DelayedAnswer, Outcome, PacedStream

__all__ = ["CRASH_FLUSH", "FakeModelServer", "SeenRequest"]

#: Seconds between a crashing stream's first content chunk and the crash, so
#: the chunk is on the wire when the process dies.
CRASH_FLUSH = 0.05


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request the fake received: never a body, only where it went and for what."""

    method: str
    path: str
    #: The body's ``model`` field, ``None`` when absent or not a JSON string.
    model: Optional[str]


class FakeModelServer:
    """
    A model server that streams for real but generates nothing.

    :param reactor_or_clock: ``callLater``/``seconds`` provider: the reactor when
        serving sockets, a :class:`twisted.internet.task.Clock` in tests (call
        ``advance(0)`` to let a stream produce its next batch).
    :param models: model names served (listed by ``/v1/models`` and
        ``/api/tags``; the first is echoed when a request names none).
    :param flavor: whose OpenAI-compatible shapes to imitate: ``"llamacpp"``
        (llama-server: ``timings`` beside ``usage``), ``"ollama"`` or
        ``"openai"`` (``usage`` only).  Every flavor serves every route.
    :param gen_tok_s: simulated generation speed behind the reported timings.
    :param prompt_tok_s: simulated prompt-processing speed.
    :param default_tokens: completion length when the request sets none.
    :param default_delay: seconds between content chunks (``X-Fake-Delay-Ms``).
    :param default_chunk_bytes: padding per chunk (``X-Fake-Chunk-Bytes``).
    :param default_fail_after: drop connections after this many chunks.
    :param default_status: answer every inference request with this error status.
    :param start_loaded: start with ``models[0]`` loaded (else unloaded: 503).
    :param crash_after: once this many inference requests were answered
        completely (``answered``), every further one crashes the server: a
        stream after its first content chunk (``CRASH_FLUSH`` seconds later, so
        the chunk is on the wire), any other answer before it is sent.
    :param crash: what crashing does.  ``python -m jano.testing`` kills its
        own process here; in memory it returns (the default does nothing) and
        the fake then closes the connection as a dead server would.

    ``loading`` (503 ``Loading model`` on every route but ``/fake/*``, unknown
    ones included, with llama-server's ``Connection: close``) and
    ``loaded_model`` (``None``: unloaded, 503 ``Model not loaded``) simulate
    swaps; :class:`SimulatedSwapper` drives them, :meth:`simulate_load` a load
    at start-up.  The ``default_*`` values and ``crash_after`` are plain
    attributes a test may change at any time.
    """

    def __init__(self, reactor_or_clock: IReactorTime, *,
                 models: Sequence[str] = ("fake-model",),
                 flavor: Flavor = "llamacpp",
                 gen_tok_s: float = 50.0,
                 prompt_tok_s: float = 500.0,
                 default_tokens: int = 16,
                 default_delay: float = 0.0,
                 default_chunk_bytes: int = 0,
                 default_fail_after: Optional[int] = None,
                 default_status: Optional[int] = None,
                 start_loaded: bool = True,
                 crash_after: Optional[int] = None,
                 crash: Callable[[], None] = lambda: None) -> None:
        if isinstance(models, str) or not models or not all(isinstance(m, str) and m
                                                            for m in models):
            raise ValueError("models must be a non-empty sequence of non-empty names")
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")
        if not (gen_tok_s > 0 and math.isfinite(gen_tok_s)):
            raise ValueError("gen_tok_s must be a positive number")
        if not (prompt_tok_s > 0 and math.isfinite(prompt_tok_s)):
            raise ValueError("prompt_tok_s must be a positive number")
        if not 0 <= default_tokens <= MAX_TOKENS:
            raise ValueError(f"default_tokens must be between 0 and {MAX_TOKENS}")
        if not 0 <= default_delay <= MAX_DELAY:
            raise ValueError(f"default_delay must be between 0 and {MAX_DELAY} seconds")
        if not 0 <= default_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"default_chunk_bytes must be between 0 and {MAX_CHUNK_BYTES}")
        if default_fail_after is not None and default_fail_after < 0:
            raise ValueError("default_fail_after must be at least 0")
        if default_status is not None and not 400 <= default_status <= 599:
            raise ValueError("default_status must be between 400 and 599")
        if crash_after is not None and crash_after < 0:
            raise ValueError("crash_after must be at least 0")
        self.clock = reactor_or_clock
        self.models: tuple[str, ...] = tuple(models)
        self.reply = Replies(flavor)
        self.gen_tok_s = float(gen_tok_s)
        self.prompt_tok_s = float(prompt_tok_s)
        self.default_tokens = default_tokens
        self.default_delay = float(default_delay)
        self.default_chunk_bytes = default_chunk_bytes
        self.default_fail_after = default_fail_after
        self.default_status = default_status
        self.crash_after = crash_after
        self.crash = crash
        #: True while a (simulated) load runs: everything but /fake/* answers 503.
        self.loading = False
        #: The resident model; ``None`` means unloaded (503 until :meth:`set_loaded`).
        self.loaded_model: Optional[str] = self.models[0] if start_loaded else None
        #: Recent requests, oldest first: every route but ``/fake/*``; never a body.
        self.seen: deque[SeenRequest] = deque(maxlen=1000)
        self.requests = 0
        self.completed = 0
        self.disconnected = 0
        self.aborted = 0
        #: Inference requests answered completely (errors too), ever: what
        #: ``crash_after`` counts; :meth:`reset_stats` leaves it alone.
        self.answered = 0
        #: Times the server crashed (``crash`` was called).
        self.crashes = 0
        self._serial = 0

    # -- state and counters ---------------------------------------------------------

    @property
    def flavor(self) -> Flavor:
        return self.reply.flavor

    @flavor.setter
    def flavor(self, flavor: Flavor) -> None:
        self.reply.flavor = flavor

    def set_loaded(self, model: Optional[str]) -> None:
        """End any loading; ``model`` is now resident (``None``: nothing is, answer 503)."""
        self.loading = False
        self.loaded_model = model

    def simulate_load(self, seconds: float) -> Deferred[None]:
        """
        Load ``models[0]`` for ``seconds``: ``loading`` until then, like
        llama-server, which listens at once and loads its model afterwards.

        :return: fires once loaded (at once for 0).  Cancelling it stops the
            timer and leaves the server unloaded.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError("seconds must be a non-negative number")
        model = self.models[0]
        if seconds == 0:
            self.set_loaded(model)
            return succeed(None)
        calls: list[IDelayedCall] = []

        def cancel(_: Deferred[None]) -> None:
            if calls[0].active():
                calls[0].cancel()
            self.set_loaded(None)

        done: Deferred[None] = Deferred(cancel)

        def loaded() -> None:
            self.set_loaded(model)
            done.callback(None)

        self.loading = True
        calls.append(self.clock.callLater(seconds, loaded))
        return done

    @property
    def in_progress(self) -> int:
        """Inference requests received and not yet completed, disconnected or aborted."""
        return self.requests - self.completed - self.disconnected - self.aborted

    def stats(self) -> dict[str, int]:
        """
        Counts of inference requests (the five generation routes), as ``/fake/stats``.

        ``completed`` includes error answers; ``disconnected`` counts clients
        that went away before the end; ``aborted`` counts ``X-Fake-Fail-After``
        drops and crashes.
        """
        return {
            "requests": self.requests,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "in_progress": self.in_progress,
            "aborted": self.aborted,
        }

    def reset_stats(self) -> None:
        """Zero the counters and forget ``seen`` (requests in progress will go negative)."""
        self.requests = self.completed = self.disconnected = self.aborted = 0
        self.seen.clear()

    def _record(self, outcome: Outcome) -> None:
        if outcome == "completed":
            self.completed += 1
            self.answered += 1
        elif outcome == "disconnected":
            self.disconnected += 1
        else:
            self.aborted += 1

    def resource(self) -> IResource:
        """A leaf resource answering every path; mount it as a ``Site``'s root."""
        return _FakeResource(self)

    # -- dispatch -------------------------------------------------------------------

    def _render(self, request: Request) -> Union[bytes, int]:
        method = request.method
        path = request.path
        if path.startswith(b"/fake/"):
            if method == b"GET" and path == b"/fake/stats":
                return self.reply.json(request, 200, dumps(self.stats()), JSON_PLAIN)
            return self.reply.not_found(request)
        route = ROUTES.get((method, path))
        body: Optional[dict[str, Any]] = None
        bad_body: Optional[str] = None
        if route in INFERENCE:
            body, bad_body = self._read_body(request)
        model = body.get("model") if body is not None else None
        self.seen.append(SeenRequest(method.decode("latin-1"), path.decode("latin-1"),
                                     model if isinstance(model, str) else None))
        if route is None:
            return self._unavailable(request) if self.loading else self.reply.not_found(request)
        if route not in INFERENCE:
            if self.loading or self.loaded_model is None:
                return self._unavailable(request)
            return self._info(request, route)
        self.requests += 1
        self._serial += 1
        result = self._inference(request, route, body, bad_body)
        if result is not NOT_DONE_YET:
            self._record("completed")
        return result

    def _read_body(self, request: Request) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        content = request.content
        return parse_body(content.read(MAX_REQUEST_BYTES + 1) if content is not None else b"")

    def _inference(self, request: Request, route: str, body: Optional[dict[str, Any]],
                   bad_body: Optional[str]) -> Union[bytes, int]:
        native = route in ("generate", "ochat")
        if self.loading or self.loaded_model is None:
            return self._unavailable(request)
        knobs = self._knobs(request)
        if isinstance(knobs, str):
            return self.reply.error(request, 400, knobs, ollama=native)
        if knobs.status is not None:
            return self.reply.error(request, knobs.status,
                               f"fake error (X-Fake-Status: {knobs.status})")
        if body is None:
            return self.reply.error(request, 400, bad_body or "no body", ollama=native)

        limit = token_limit(route, body)
        if isinstance(limit, str):
            return self.reply.error(request, 400, limit, ollama=native)
        n = self.default_tokens if limit is None else limit
        if n > MAX_TOKENS:
            return self.reply.error(request, 400, f"the fake sends at most {MAX_TOKENS} tokens",
                               ollama=native)
        if native:
            stream = body.get("stream") is not False
        else:
            stream = body.get("stream") is True
        text_bytes = n * (len(b"Tok0@") + 20 + knobs.chunk_bytes)
        if text_bytes > (MAX_STREAM_TEXT_BYTES if stream else MAX_BODY_TEXT_BYTES):
            return self.reply.error(request, 400, "response too large for the fake", ollama=native)

        requested = body.get("model")
        model = requested if isinstance(requested, str) and requested else self.models[0]
        if route == "chat" or route == "ochat":
            prompt: Any = body.get("messages")
        else:
            prompt = body.get("prompt")
        load_only = native and (prompt is None or prompt == "" or prompt == [])
        crashing = self.crash_after is not None and self.answered >= self.crash_after
        if crashing and (not stream or load_only or n == 0):
            return self._crash_now(request)  # only an in-memory crash returns
        if load_only:
            # Ollama loads (or, with keep_alive 0, unloads) a model asked to generate nothing.
            reason = "unload" if is_unload(body.get("keep_alive")) else "load"
            payload = formats.ollama_load(model, self.clock.seconds(), chat=route == "ochat",
                                          reason=reason)
            return self.reply.json(request, 200, payload, JSON_LLAMA)

        options = body.get("stream_options")
        g = Generation(
            flavor=self.flavor, model=model, n=n, limited=limit is not None,
            prompt_n=max(1, count_words(prompt)), pad=knobs.chunk_bytes, stamp=knobs.stamp,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            stream=stream, created=self.clock.seconds(), serial=self._serial,
            gen_tok_s=self.gen_tok_s, prompt_tok_s=self.prompt_tok_s,
            prompt_text=prompt if route == "llama" and isinstance(prompt, str) else "",
        )
        if knobs.load_ms is not None:  # a reload the backend did on its own
            g = replace(g, load_ns=round(knobs.load_ms * 1e6))
        if stream:
            plan = formats.stream_plan(route, g)
            request.setResponseCode(200)
            self.reply.headers(request, NDJSON if native else EVENT_STREAM, sse=not native)
            def cut() -> None:  # the first content chunk is out: crash once it has left
                self.clock.callLater(CRASH_FLUSH, self._crash, request)

            PacedStream(request, self.clock, self._record, plan, knobs.delay,
                        1 if crashing else knobs.fail_after, cut if crashing else None).start()
            return NOT_DONE_YET

        payload = formats.whole_body(route, g)
        json_type = JSON_LLAMA if self.flavor == "llamacpp" or native else JSON_PLAIN
        fails = knobs.fail_after is not None and knobs.fail_after < n
        sent = knobs.fail_after if fails and knobs.fail_after is not None else n
        wait = max(0, sent - 1) * knobs.delay
        if not fails and wait == 0:
            return self.reply.json(request, 200, payload, json_type)
        request.setResponseCode(200)
        self.reply.headers(request, json_type)
        DelayedAnswer(request, self.clock, self._record, wait, None if fails else payload)
        return NOT_DONE_YET

    def _crash_now(self, request: Request) -> int:
        """Crash before answering (counted as aborted)."""
        self._record("aborted")
        self._crash(request)
        return NOT_DONE_YET

    def _crash(self, request: Request) -> None:
        self.crashes += 1
        self.crash()  # a real process dies here
        request.loseConnection()

    def _knobs(self, request: Request) -> Union[Knobs, str]:
        headers = request.requestHeaders

        def last(name: bytes) -> Optional[bytes]:
            values = headers.getRawHeaders(name)
            return values[-1] if values else None

        return parse_knobs(last, delay=self.default_delay, chunk_bytes=self.default_chunk_bytes,
                           fail_after=self.default_fail_after, status=self.default_status)

    # -- answers --------------------------------------------------------------------

    def _unavailable(self, request: Request) -> bytes:
        if not self.loading:
            return self.reply.error(request, 503, "Model not loaded")
        if self.flavor == "llamacpp":  # llama-server closes while loading
            request.setHeader(b"connection", b"close")
            channel = request.channel  # gone from the request once it finishes
            request.notifyFinish().addBoth(lambda _: channel.loseConnection())
        return self.reply.error(request, 503, "Loading model")

    def _info(self, request: Request, route: str) -> bytes:
        payload, content_type = formats.listing(route, self.flavor, self.models,
                                                self.loaded_model, self.clock.seconds())
        return self.reply.json(request, 200, payload, content_type)


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, server: FakeModelServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> Union[bytes, int]:
        return self._server._render(request)
