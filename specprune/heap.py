"""Cyclic-garbage-collector settings for the command-line process (``specprune.cli.app.main`` only).

A CLI run imports torch and transformers and loads a model before its real work starts: about 420,000
objects that the cycle collector tracks and will never free. While they are imported, every full
collection walks all of them again (7 collections, 0.66 s of one ``specprune analyze`` of
all-MiniLM-L6-v2 on 64 windows), and interpreter exit walks them once more (≈ 0.7 s). So, in a
single CLI process (not a torchrun rank, whose process-group threads keep the usual exit path):

- :func:`enable` (at start-up) defers *full* collections; young-generation collections, which free most
  cyclic garbage, run as usual;
- :func:`settle`, once the first model is loaded, moves every object alive into the collector's
  permanent generation (``gc.freeze``) and restores the default thresholds, so later collections (and
  the one at exit) only look at what the work itself allocates.

Objects are still freed by reference counting as usual; only reference cycles that already exist at a
freeze are kept until the process ends. A command that loads no model (``report``, ``theory``) keeps full
collections deferred to its end: ``specprune report`` on the demo's output peaked at 402 MB resident
against 393 MB with the default collector, and finished 1.0–1.1 s sooner (6.0 / 7.4 s against 7.0 / 8.5 s). Library use (``import specprune``) never changes the collector;
``SPECPRUNE_GC_FREEZE=0`` turns this off in the CLI too.
"""

from __future__ import annotations

import gc
import os

_enabled = False
_thresholds: tuple[int, ...] | None = None


def enable() -> None:
    """Defer full collections until :func:`settle` (called by the CLI's entry point alone)."""
    global _enabled, _thresholds
    if os.environ.get("SPECPRUNE_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    _enabled = True
    if _thresholds is None:
        _thresholds = gc.get_threshold()
        gc.set_threshold(_thresholds[0], _thresholds[1], 1 << 30)


def enabled() -> bool:
    return _enabled


def settle() -> None:
    """Freeze every object alive now out of the collector's view and restore the full collections
    :func:`enable` deferred: once, at the first model load (a later load, e.g. a reference model, changes
    nothing: freezing again would also keep whatever cyclic garbage the work made in between). A no-op
    unless :func:`enable` ran in this process. Exit then walks only what the work allocated: 0.25 s
    from the last line to the end of an ``analyze`` process, the same as with a second freeze at the
    end (measured, so there is none)."""
    global _thresholds
    if not _enabled or _thresholds is None:
        return
    gc.freeze()
    gc.set_threshold(*_thresholds)
    _thresholds = None
