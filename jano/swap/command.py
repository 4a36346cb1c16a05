"""
Check and build the swap script's argv.

:func:`check_swap_command` runs at start-up so a command that cannot run is
reported before the first swap; :func:`substitute` and :func:`session_argv`
build, at each swap, the argv that runs it in a process group of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Optional, Sequence

from jano.errors import SwapCommandError

__all__ = ["substitute", "check_swap_command", "session_argv"]

#: Wrapper used when no ``setsid`` program is installed: start a new session
#: (so the child's pid is its process group id), then become the command.
_SETSID_PY = "import os, sys\nos.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"

_PLACEHOLDER = re.compile(r"\{(model|previous)\}")


def substitute(command: Sequence[str], model: str, previous: str) -> list[str]:
    """
    Replace ``{model}`` and ``{previous}`` in every element of ``command``.

    One pass, so a model name that itself contains ``{previous}`` is not
    substituted again; every other brace is left alone.
    """
    values = {"model": model, "previous": previous}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


def check_swap_command(command: Sequence[str], *, cwd: Optional[str] = None,
                       what: str = "swap.command") -> None:
    """
    Fail at start-up, not at the first swap, when the swap command cannot run.

    ``argv[0]`` (placeholders replaced by ``x``) containing a ``/`` is resolved
    against ``cwd`` (default: the current directory), as the shell and
    ``execvp`` do; otherwise it is looked up on ``PATH``.

    :raises SwapCommandError: with a one-line reason.
    """
    if not command:
        raise SwapCommandError("swap.command is empty: give the script and its arguments, "
                               "e.g. [\"etc/swap-model.sh\", \"{model}\", \"{previous}\"]")
    argv0 = substitute(command[:1], "x", "x")[0]
    if not argv0:
        raise SwapCommandError(f"{what}: the program name (first element) is empty")
    if "/" in argv0:
        path = os.path.join(cwd if cwd is not None else os.getcwd(), argv0)
        if not os.path.exists(path):
            raise SwapCommandError(f"{what}: {argv0!r} not found (looked at {path})")
        if os.path.isdir(path):
            raise SwapCommandError(f"{what}: {argv0!r} is a directory ({path})")
        if not os.access(path, os.X_OK):
            raise SwapCommandError(f"{what}: {argv0!r} is not executable "
                                   f"(try: chmod +x {path})")
    elif shutil.which(argv0) is None:
        raise SwapCommandError(f"{what}: {argv0!r} not found on PATH "
                               "(give a path containing '/' or install it)")


def session_argv(argv: Sequence[str], setsid: Optional[str] = None) -> list[str]:
    """
    The argv that runs ``argv`` as the leader of a new session and process group.

    With util-linux ``setsid`` (which execs without forking when its caller is
    not a group leader, as a freshly spawned child never is) the child's pid
    is its process group id.  Without it, a two-line Python wrapper does the
    same.

    :param setsid: path of the ``setsid`` program, ``None`` to use the wrapper.
    """
    if setsid:
        return [setsid, *argv]
    return [sys.executable, "-c", _SETSID_PY, *argv]
