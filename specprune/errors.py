"""Known errors: one line for the user, exit code 1 from the CLI, never a traceback."""

from __future__ import annotations


class SpecpruneError(Exception):
    """A known, user-facing failure (bad input, refused action, out-of-range value).

    The CLI prints ``str(err)`` on one line to stderr and exits with ``exit_code``.
    """

    exit_code: int = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(SpecpruneError):
    """A missing, unreadable or malformed input (model, data, analysis, plan)."""


class RefusedError(SpecpruneError):
    """An action specprune will not take (unsafe pickle, remote code, overwriting an input)."""


class ToleranceExceeded(SpecpruneError):
    """`compress` finished but the measured delta exceeds the tolerance beyond its uncertainty."""

    exit_code = 3
