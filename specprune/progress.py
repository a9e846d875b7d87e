"""Progress bars for long loops: rich on an interactive stderr, silent otherwise.

The CLI turns them off for ``--format json``, ``--quiet`` and non-TTY output; library users
control them with :func:`set_enabled`.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_enabled: bool | None = None  # None = auto (stderr is a TTY)


def set_enabled(value: bool | None) -> None:
    """Force progress bars on (True), off (False) or back to auto (None)."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    if _enabled is None:
        return sys.stderr.isatty()
    return _enabled


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a transient rich progress bar on stderr when enabled."""
    if not enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=total)
        for item in items:
            yield item
            prog.advance(task)
