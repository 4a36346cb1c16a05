"""
One simulated generation: what the fake "generates" and the numbers it reports.

Nothing is generated.  Content chunk ``i`` is ``Tok{i % 10}`` plus padding, and
counts and timings are computed from the request and the server's configured
speeds, so a test can predict every number.  The wire formats
(:mod:`jano.demo.formats`) only arrange these values.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

__all__ = ["FLAVORS", "Flavor", "Generation", "OLLAMA_LOAD_NS", "iso_ns"]

Flavor = Literal["llamacpp", "ollama", "openai"]
FLAVORS: tuple[str, ...] = ("llamacpp", "ollama", "openai")

#: ``load_duration`` reported in every Ollama final object (1 ms).
OLLAMA_LOAD_NS = 1_000_000


@dataclass(frozen=True, slots=True)
class Generation:
    """Everything one simulated generation needs; counts are final before the first byte."""

    flavor: Flavor
    model: str
    n: int
    #: The client set a token limit: stop reason ``length``/``limit``, else ``stop``/``eos``.
    limited: bool
    prompt_n: int
    pad: int
    stamp: bool
    include_usage: bool
    stream: bool
    created: float
    serial: int
    gen_tok_s: float
    prompt_tok_s: float
    prompt_text: str
    #: Ollama's ``load_duration``, in ns (``X-Fake-Load-Ms`` sets it: a reload).
    load_ns: int = OLLAMA_LOAD_NS

    @property
    def created_s(self) -> int:
        return int(self.created)

    @property
    def created_at(self) -> str:
        return iso_ns(self.created)

    @property
    def predicted_ms(self) -> float:
        return self.n / self.gen_tok_s * 1000.0

    @property
    def prompt_ms(self) -> float:
        return self.prompt_n / self.prompt_tok_s * 1000.0

    def texts(self) -> list[bytes]:
        """The ten chunk texts, indexed by ``i % 10``."""
        padding = b"x" * self.pad
        return [b"Tok%d" % k + padding for k in range(10)]

    def stamped(self, i: int) -> bytes:
        return b"Tok%d@%d" % (i % 10, time.monotonic_ns()) + b"x" * self.pad

    def all_text(self) -> bytes:
        texts = self.texts()
        full, rest = divmod(self.n, 10)
        return b"".join(texts) * full + b"".join(texts[:rest])

    def timings(self) -> dict[str, Any]:
        prompt_ms = self.prompt_ms
        predicted_ms = self.predicted_ms
        return {
            "cache_n": 0,
            "prompt_n": self.prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / self.prompt_n,
            "prompt_per_second": self.prompt_tok_s,
            "predicted_n": self.n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / self.n if self.n else 0.0,
            "predicted_per_second": self.gen_tok_s,
        }

    def usage(self) -> dict[str, Any]:
        if self.flavor == "llamacpp":
            return {
                "completion_tokens": self.n,
                "prompt_tokens": self.prompt_n,
                "total_tokens": self.n + self.prompt_n,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
        return {
            "prompt_tokens": self.prompt_n,
            "completion_tokens": self.n,
            "total_tokens": self.n + self.prompt_n,
        }

    def ollama_durations(self) -> dict[str, int]:
        prompt_ns = round(self.prompt_n / self.prompt_tok_s * 1e9)
        eval_ns = round(self.n / self.gen_tok_s * 1e9)
        return {
            "total_duration": self.load_ns + prompt_ns + eval_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_n,
            "prompt_eval_duration": prompt_ns,
            "eval_count": self.n,
            "eval_duration": eval_ns,
        }

    @property
    def openai_id(self) -> str:
        if self.flavor == "llamacpp":
            return "chatcmpl-fake%028d" % self.serial
        return "chatcmpl-%d" % self.serial

    @property
    def fingerprint(self) -> str:
        return {"llamacpp": "b0-unknown", "ollama": "fp_ollama"}.get(self.flavor, "fp_jano_fake")

    @property
    def finish_reason(self) -> str:
        return "length" if self.limited else "stop"


def iso_ns(t: float) -> str:
    """Ollama's ``created_at``: RFC 3339 with nanoseconds, UTC."""
    whole = math.floor(t)
    ns = min(int(round((t - whole) * 1e9)), 999_999_999)
    stamp = datetime.fromtimestamp(whole, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns:09d}Z"
