"""Typed plugin registries fed by ``importlib.metadata`` entry points.

Four kinds, one entry-point group each: ``specprune.evolution`` (theory g functions),
``specprune.compressors`` (prune/quantize methods), ``specprune.adapters`` (layer types),
``specprune.metrics``. Built-ins register through the same entry points (see pyproject.toml).
Discovery is lazy and cached; a plugin that fails to load warns and is skipped where every plugin
of a kind is loaded (:func:`load_all`), and is a one-line error where it is used by name
(:func:`get`); two packages registering the same name make *using* that name an error naming
both (listing shows both registrations, marked); a name the CLI gives another meaning (``--metric
auto``, ``module:callable``) is marked too (``PluginInfo.reserved``); unknown names get a near-match
suggestion.
``SPECPRUNE_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only specprune's own built-ins.

Warnings about skipped plugins are :class:`PluginWarning` (the CLI prints them as one
``specprune: warning:`` line each); errors raised inside third-party plugin code can be made to
name the plugin and its package with :func:`blame`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

from .errors import SpecpruneError

KINDS = {
    "evolution": "specprune.evolution",
    "compressors": "specprune.compressors",
    "adapters": "specprune.adapters",
    "metrics": "specprune.metrics",
}
AUTOLOAD_ENV = "SPECPRUNE_DISABLE_PLUGIN_AUTOLOAD"
# what one plugin of each kind is called in messages ("compressor 'wanda' (specprune-wanda) failed: ...")
SINGULAR = {"evolution": "evolution", "compressors": "compressor", "adapters": "adapter", "metrics": "metric"}
_MUST_BE_CALLABLE = ("evolution", "metrics")  # factories / g functions and metric functions
# names the CLI reads as something else, so it never looks up a plugin registered under them:
# --metric auto (specprune.evaluation.METRICS), --backend fake (specprune.cli.compress_cmds), and a ':'
# (--metric module:callable; --g NAME:key=val, specprune.theory.evolution.parse_spec)
_RESERVED = {
    ("metrics", "auto"): "--metric auto is specprune's automatic choice (lm-loss, task-loss or output-mse), "
                         "never this plugin",
    ("compressors", "fake"): "--backend fake is specprune's own RTN quantizer, never this plugin",
}
_COLON = {
    "metrics": "--metric reads a name with ':' as module:callable, never as this plugin",
    "evolution": "--g reads what follows ':' as parameters (NAME:key=val), so it never finds this plugin",
}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    package: str
    version: str
    value: str  # "module:attr"
    builtin: bool
    # set when other packages register the same (kind, name): the one-line error using the name gives
    conflict: str | None = None
    # set when the CLI gives the name another meaning (``auto`` for --metric, a ':'): why it never reaches
    # the plugin (``get`` still loads it: the API and, for ``fake``, a plan layer's method can use it)
    reserved: str | None = None

    @property
    def label(self) -> str:
        """How messages name the plugin: ``compressor 'wanda' (specprune-wanda)``."""
        return f"{SINGULAR.get(self.kind, self.kind)} {self.name!r} ({self.package})"


class PluginConflict(SpecpruneError):
    """Two packages register the same (kind, name)."""


class PluginLoadError(SpecpruneError):
    """A plugin could not be loaded (its import failed, or its entry point is not the kind of object its
    kind needs). ``problem`` says what went wrong without naming the plugin (``failed to load:
    ImportError: ...``), so that :func:`load_all` can word its warning like :func:`skip_message`."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = " ".join(problem.split())


class PluginWarning(RuntimeWarning):
    """A plugin that could not be used was skipped (failed to load, or raised where specprune loads
    every plugin of a kind). The CLI shows these as one ``specprune: warning:`` line each."""


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _conflict_message(kind: str, name: str, infos: list[PluginInfo]) -> str:
    if len(infos) == 2:
        a, b = infos
        return (f"{kind} plugin {name!r} is registered by both {a.package} ({a.value}) "
                f"and {b.package} ({b.value}); uninstall one")
    who = ", ".join(f"{i.package} ({i.value})" for i in infos[:-1])
    last = infos[-1]
    return f"{kind} plugin {name!r} is registered by {who} and {last.package} ({last.value}); uninstall all but one"


def _reserved_message(kind: str, name: str, package: str, value: str) -> str | None:
    """Why the CLI never reaches a plugin registered under ``name`` (one line), or None."""
    why = _RESERVED.get((kind, name)) or (_COLON.get(kind) if ":" in name else None)
    if why is None:
        return None
    return f"{kind} plugin {name!r} of {package} ({value}) has a reserved name: {why}; rename it"


@functools.lru_cache(maxsize=None)
def _scan(kind: str, autoload: bool) -> tuple[tuple[PluginInfo, metadata.EntryPoint], ...]:
    """Every registration of a kind, in discovery order; a name registered by several packages keeps
    all of them, each with ``conflict`` set (nothing raises here: only using such a name fails)."""
    if kind not in KINDS:
        raise SpecpruneError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
    regs: dict[str, list[tuple[PluginInfo, metadata.EntryPoint]]] = {}
    for ep in metadata.entry_points(group=KINDS[kind]):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        builtin = package.lower() == "specprune"
        if not autoload and not builtin:
            continue
        same = regs.setdefault(ep.name, [])
        if any(info.value == ep.value for info, _ in same):
            continue  # the same distribution seen twice on sys.path
        reserved = _reserved_message(kind, ep.name, package, ep.value)
        same.append((PluginInfo(kind, ep.name, package, version, ep.value, builtin, reserved=reserved), ep))
    out: list[tuple[PluginInfo, metadata.EntryPoint]] = []
    for name, items in regs.items():
        if len(items) > 1:
            items.sort(key=lambda t: not t[0].builtin)  # a shadowed built-in first, then discovery order
            msg = _conflict_message(kind, name, [info for info, _ in items])
            items = [(replace(info, conflict=msg), ep) for info, ep in items]
        out.extend(items)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _entries(kind: str, autoload: bool) -> dict[str, tuple[PluginInfo, metadata.EntryPoint]]:
    """name → its (first) registration; a conflicting name carries ``info.conflict``."""
    found: dict[str, tuple[PluginInfo, metadata.EntryPoint]] = {}
    for info, ep in _scan(kind, autoload):
        found.setdefault(info.name, (info, ep))
    return found


# (kind, name) → why: plugins that raised where specprune loads every plugin of a kind (an adapter's
# matches()); skipped by load_all until clear_cache()
_disabled: dict[tuple[str, str], str] = {}


def clear_cache() -> None:
    """Forget discovered plugins (after installing one at run time, and in tests)."""
    _scan.cache_clear()
    _entries.cache_clear()
    _load.cache_clear()
    _disabled.clear()


def available(kind: str) -> list[PluginInfo]:
    """All plugins of a kind, built-ins included, sorted by name. A name registered by several
    packages is listed once per package, each entry with ``conflict`` set."""
    return [info for info, _ in sorted(_scan(kind, not _autoload_disabled()), key=lambda t: t[0].name)]


def info(kind: str, name: str) -> PluginInfo | None:
    """The registration behind ``name`` (the first one if it conflicts), or None if there is none."""
    entry = _entries(kind, not _autoload_disabled()).get(name)
    return entry[0] if entry is not None else None


def describe(kind: str, name: str) -> str:
    """``compressor 'wanda' (specprune-wanda)``; without the package for a name not registered."""
    found = info(kind, name) if kind in KINDS else None
    return found.label if found is not None else f"{SINGULAR.get(kind, kind)} {name!r}"


@functools.lru_cache(maxsize=None)
def _load(kind: str, name: str, autoload: bool) -> Any:
    _, ep = _entries(kind, autoload)[name]
    return ep.load()


def get(kind: str, name: str) -> Any:
    """Load the object registered as ``name`` in ``kind``; unknown names get a suggestion,
    a plugin that fails to import is reported in one line, and so is a name that two packages
    register."""
    autoload = not _autoload_disabled()
    entries = _entries(kind, autoload)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(entries)) or "none"
        raise SpecpruneError(f"unknown {kind} {name!r}{hint} (known: {known})")
    found = entries[name][0]
    if found.conflict:
        raise PluginConflict(found.conflict)
    try:
        obj = _load(kind, name, autoload)
    except Exception as err:  # a broken plugin must not take specprune down with a traceback
        problem = f"failed to load: {type(err).__name__}: {err}"
        raise PluginLoadError(f"{kind} plugin {name!r} {problem}", problem) from err
    if kind in _MUST_BE_CALLABLE and not callable(obj):
        what = "a factory f(**params) or a g(lam, t)" if kind == "evolution" else "a function fn(model, batch, device)"
        why = f"(an object of type {type(obj).__name__}; it must be {what})"
        raise PluginLoadError(f"{found.label}: its entry point {found.value} is not callable {why}",
                              f"is not callable {why}")
    return obj


def disable(kind: str, name: str, message: str) -> None:
    """Skip plugin ``name`` from now on (until :func:`clear_cache`) in :func:`load_all`, with one
    :class:`PluginWarning` saying ``message``; a second call for the same plugin says nothing."""
    if (kind, name) in _disabled:
        return
    _disabled[(kind, name)] = message
    warnings.warn(message, PluginWarning, stacklevel=3)


def is_disabled(kind: str, name: str) -> bool:
    return (kind, name) in _disabled


def disabled_reason(kind: str, name: str) -> str | None:
    """The warning :func:`disable` gave for a skipped plugin, or None if it is not skipped."""
    return _disabled.get((kind, name))


def skip_message(kind: str, name: str, problem: str) -> str:
    """The one format of every "plugin skipped" warning: ``adapters plugin 'x' (package p 1.0, entry
    point m:A) failed in matches(): RuntimeError: boom; skipped`` (``problem`` is the part after the
    parentheses), whatever the step that failed (import, ``__init__``, ``matches``)."""
    found = info(kind, name)
    where = f" (package {found.package} {found.version}, entry point {found.value})" if found is not None else ""
    return f"{kind} plugin {name!r}{where} {problem}; skipped"


def load_all(kind: str) -> dict[str, Any]:
    """Load every plugin of a kind; broken (or conflicting) ones warn and are skipped."""
    out = {}
    for name in dict.fromkeys(p.name for p in available(kind)):
        if is_disabled(kind, name):
            continue
        try:
            out[name] = get(kind, name)
        except PluginConflict as err:  # names both packages already
            disable(kind, name, f"{err}; skipped")  # warns once, then skipped without a word
        except PluginLoadError as err:
            disable(kind, name, skip_message(kind, name, err.problem))
    return out


@contextlib.contextmanager
def blame(kind: str, name: str | None, where: str = "") -> Iterator[None]:
    """Run third-party plugin code: an unexpected exception from it becomes one line naming the
    plugin and its package, ``compressor 'x' (pkg) failed<where>: RuntimeError: boom`` (the original
    is chained, for ``--debug``). Known errors (``SpecpruneError``), interrupts, and errors from
    built-ins or from objects that are not registered plugins pass through unchanged."""
    try:
        yield
    except SpecpruneError:
        raise
    except Exception as err:
        found = info(kind, name) if (name is not None and kind in KINDS) else None
        if found is None or found.builtin:
            raise
        raise SpecpruneError(f"{found.label} failed{where}: {type(err).__name__}: {err}") from err
