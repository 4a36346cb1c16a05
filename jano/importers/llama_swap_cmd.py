"""
llama-swap's ``${...}`` macros and its ``cmd`` strings, turned into the
argv Jano runs, with ``{port}`` and ``{model}`` placeholders.

Pure but for the ``${env.NAME}`` lookups, which read the mapping handed in.
"""

from __future__ import annotations

import math
import re
import shlex
from decimal import Decimal
from typing import Mapping, MutableSet, Optional, Sequence

__all__ = ["LlamaSwapError", "PORT", "MODEL", "Expander", "macro_table", "strip_comments",
           "split_command", "shell_features", "go_text"]

#: Stand-ins for ``${PORT}`` and ``${MODEL_ID}`` until the command is split:
#: private-use characters, so a config's own text never holds them and a
#: ``{port}`` of its own is told apart from ours.
PORT = "\ue000"
MODEL = "\ue001"

_MACRO = re.compile(r"\$\{([A-Za-z0-9_-]+)\}")
_ENV = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_JANO_PLACEHOLDER = re.compile(r"\{[a-z_]*\}")
_SHELL_OPERATORS = frozenset({"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "&>", "2>"})
_SHELL_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[^}]*\})")
_RESERVED = ("PORT", "MODEL_ID", "PID")


class LlamaSwapError(Exception):
    """A config that cannot be converted; ``str()`` is the one-line reason."""


def go_text(value: object, where: str) -> str:
    """A macro's value as llama-swap substitutes it (Go's ``%v``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return value
    raise LlamaSwapError(f"{where}: expected a string, number or boolean, "
                         f"got {type(value).__name__}")


def _go_float(v: float) -> str:
    """Go's ``%v`` of a float64: the shortest digits, ``e`` form from 1e+06 or below 1e-04."""
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    sign, digit_tuple, exponent = Decimal(repr(v)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # digits before the decimal point
    prefix = "-" if sign else ""
    if not -4 <= point - 1 < 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{prefix}{mantissa}e{point - 1:+03d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return prefix + digits + "0" * (point - len(digits))
    return f"{prefix}{digits[:point]}.{digits[point:]}"


def macro_table(raw: object, where: str) -> dict[str, str]:
    """A ``macros`` mapping: names checked, values as text."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LlamaSwapError(f"{where}: expected a mapping of macro names to values")
    table: dict[str, str] = {}
    for name, val in raw.items():
        name = str(name)
        if name in _RESERVED:
            raise LlamaSwapError(f"{where}.{name}: {name} is a built-in macro and cannot be "
                                 "redefined")
        table[name] = go_text(val, f"{where}.{name}")
    return table


class Expander:
    """
    Expands ``${env.NAME}`` and ``${name}`` in one model's fields.

    Macros may use macros, in any order of definition (llama-swap wants them
    defined before use; a config it loads therefore expands the same here).
    ``${PORT}`` becomes :data:`PORT`; ``${MODEL_ID}`` whatever the field asks.
    """

    def __init__(self, macros: Mapping[str, str], env: Mapping[str, str],
                 env_used: MutableSet[str]) -> None:
        self.macros = macros
        self.env = env
        self.env_used = env_used

    def __call__(self, text: str, where: str, model: str,
                 _stack: Sequence[str] = ()) -> str:
        text = _ENV.sub(lambda m: self._env(m.group(1), where), text)

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name == "PORT":
                return PORT
            if name == "MODEL_ID":
                return model
            if name not in self.macros:
                raise LlamaSwapError(f"{where}: unknown macro ${{{name}}}")
            if name in _stack:
                loop = " -> ".join([*_stack[_stack.index(name):], name])
                raise LlamaSwapError(f"{where}: macros refer to each other in a loop: {loop}")
            return self(self.macros[name], where, model, (*_stack, name))

        return _MACRO.sub(one, text)

    def _env(self, name: str, where: str) -> str:
        found: Optional[str] = self.env.get(name)
        if found is None:
            raise LlamaSwapError(f"{where}: environment variable {name} (${{env.{name}}}) "
                                 "is not set")
        self.env_used.add(name)
        return found


def strip_comments(cmd: str) -> str:
    """Drop the lines whose first non-blank character is ``#``, as llama-swap does."""
    return "\n".join(line for line in cmd.split("\n") if not line.strip().startswith("#"))


def split_command(cmd: str, where: str) -> list[str]:
    """
    Split an expanded ``cmd`` the way llama-swap does: comment lines dropped,
    a trailing ``\\`` joins a line to the next, then POSIX shell word
    splitting (quotes and backslashes; no expansion, no operators).
    """
    lines = []
    for line in cmd.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    try:
        argv = shlex.split("\n".join(lines))
    except ValueError as e:
        raise LlamaSwapError(f"{where}: cannot split into arguments: {e}") from None
    if not argv:
        raise LlamaSwapError(f"{where}: the command is empty")
    for arg in argv:
        found = _JANO_PLACEHOLDER.search(arg)
        if found:
            raise LlamaSwapError(f"{where}: argument {arg!r} holds {found.group()}, which "
                                 "Jano would read as a placeholder (only {port} and {model} "
                                 "exist); Jano cannot pass it through unchanged")
    return [a.replace(PORT, "{port}").replace(MODEL, "{model}") for a in argv]


def shell_features(argv: Sequence[str]) -> list[str]:
    """The arguments a reader might expect a shell to interpret (neither program uses one)."""
    return [a for a in argv if a in _SHELL_OPERATORS or _SHELL_VARIABLE.search(a)]
