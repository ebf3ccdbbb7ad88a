"""Errors a user can fix, and errors as one line.

`UserError` is what every layer (kernels, indexer, query) raises for bad input: the CLI prints its message on one
line and exits non-zero, without a traceback. It lives here, at the bottom of the import order, so that kernels
can raise it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""

    exit_code = 1


class Interrupted(UserError):
    """The run was stopped (Ctrl-C, SIGTERM); the message says what was kept and how to continue."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 after Ctrl-C, 143 after SIGTERM


def not_found(kind: str, name: str, valid: Iterable[str], hint: str = "", limit: int = 100) -> UserError:
    """'unknown layer 'x'; did you mean …? valid layers: a, b, c' — long lists are cut after `limit`."""
    names = list(valid)
    message = f"unknown {kind} '{name}'"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        message += f"; did you mean {', '.join(close)}?"
    if names:
        shown = ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
        message += f" valid {kind}s: {shown}"
    return UserError(message + (f". {hint}" if hint else ""))


def first_line(error: BaseException) -> str:
    """The first line of an error's message, spaces collapsed; the error's type when it has no message."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def one_line(error: BaseException) -> str:
    """An error as one line: a UserError's message as it is, anything else as 'Type: first line'."""
    if isinstance(error, UserError):
        return str(error)
    text = first_line(error)
    return text if text == type(error).__name__ else f"{type(error).__name__}: {text}"
