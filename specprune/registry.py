"""Typed plugin registries fed by ``importlib.metadata`` entry points.

Four kinds, one entry-point group each: ``specprune.evolution`` (theory g functions),
``specprune.compressors`` (prune/quantize methods), ``specprune.adapters`` (layer types),
``specprune.metrics``. Built-ins register through the same entry points (see pyproject.toml).
Discovery is lazy and cached; a plugin that fails to load warns and is skipped; two packages
registering the same name is an error naming both; unknown names get a near-match suggestion.
``SPECPRUNE_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only specprune's own built-ins.
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    package: str
    version: str
    value: str  # "module:attr"
    builtin: bool


class PluginConflict(SpecpruneError):
    """Two packages register the same (kind, name)."""


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=None)
def _entries(kind: str, autoload: bool) -> dict[str, tuple[PluginInfo, metadata.EntryPoint]]:
    if kind not in KINDS:
        raise SpecpruneError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
    found: dict[str, tuple[PluginInfo, metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=KINDS[kind]):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        builtin = package.lower() == "specprune"
        if not autoload and not builtin:
            continue
        info = PluginInfo(kind, ep.name, package, version, ep.value, builtin)
        if ep.name in found:
            other = found[ep.name][0]
            if other.value == ep.value:
                continue  # the same distribution seen twice on sys.path
            raise PluginConflict(
                f"{kind} plugin {ep.name!r} is registered by both {other.package} ({other.value}) "
                f"and {package} ({ep.value}); uninstall one"
            )
        found[ep.name] = (info, ep)
    return found


def clear_cache() -> None:
    """Forget discovered plugins (after installing one at run time, and in tests)."""
    _entries.cache_clear()
    _load.cache_clear()


def available(kind: str) -> list[PluginInfo]:
    """All plugins of a kind, built-ins included, sorted by name."""
    return [info for info, _ in sorted(_entries(kind, not _autoload_disabled()).values(),
                                       key=lambda t: t[0].name)]


@functools.lru_cache(maxsize=None)
def _load(kind: str, name: str, autoload: bool) -> Any:
    entries = _entries(kind, autoload)
    info, ep = entries[name]
    return ep.load()


def get(kind: str, name: str) -> Any:
    """Load the object registered as ``name`` in ``kind``; unknown names get a suggestion,
    a plugin that fails to import is reported in one line."""
    autoload = not _autoload_disabled()
    entries = _entries(kind, autoload)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(entries)) or "none"
        raise SpecpruneError(f"unknown {kind} {name!r}{hint} (known: {known})")
    try:
        return _load(kind, name, autoload)
    except Exception as err:  # a broken plugin must not take specprune down with a traceback
        raise SpecpruneError(f"{kind} plugin {name!r} failed to load: {type(err).__name__}: {err}") from err


def load_all(kind: str) -> dict[str, Any]:
    """Load every plugin of a kind; broken ones warn and are skipped."""
    out = {}
    for info in available(kind):
        try:
            out[info.name] = get(kind, info.name)
        except SpecpruneError as err:
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)
    return out
