"""``specprune plugins``: what the entry-point registries discovered, built-ins included.

Listing reads package metadata only (nothing is imported), so a broken plugin still shows up;
``--check`` imports each one and runs the checks its first real use runs (a compressor built and
checked against the protocol, a metric built and its signature checked, an adapter instantiated), and
reports whether it passes. A name registered by two packages is listed once per package, marked as a
conflict (``"conflict"``: the one-line error that using the name gives), with a warning on stderr; only
*using* that name is an error. A name the CLI reads as something else (``--metric auto``, a ':') is
marked the same way: no command can reach that plugin.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from .common import Ctx, DebugOpt, FormatOpt, OutputFormat, QuietOpt, command, console

EPILOG = """Examples:

  specprune plugins

  specprune plugins --kind compressors --format json

  specprune plugins --check
"""

KindOpt = Annotated[list[str] | None, typer.Option(
    "--kind", help="Only these kinds: evolution, compressors, adapters, metrics (repeatable).")]
CheckOpt = Annotated[bool, typer.Option("--check", help="Import and build every plugin as its first use would, "
                                        "and report whether it works.")]


@contextlib.contextmanager
def plugin_warnings_as_lines() -> Iterator[None]:
    """While a command runs, show specprune's plugin warnings (``registry.PluginWarning``: a broken
    plugin skipped) as one ``specprune: warning: ...`` line each on stderr, like ``Ctx.warn``, instead
    of Python's two-line ``file:line: RuntimeWarning`` form. Other warnings are shown as before; the
    previous warning settings are restored afterwards."""
    import warnings

    from ..registry import PluginWarning

    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if isinstance(category, type) and issubclass(category, PluginWarning):
                from ..distributed import is_main

                if is_main():
                    sys.stderr.write(f"specprune: warning: {' '.join(str(message).split())}\n")
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def check_plugin(info, adapters: list | None = None) -> str | None:
    """The one-line error the first real use of a plugin would give, or None: the registry's load, then
    the check that use runs (``get_compressor``; ``metric_function``, which builds the metric and checks
    its signature; for an adapter, :func:`specprune.layers.adapters`, which instantiates it: pass its
    result in ``adapters``). A reserved name fails too, since no command reaches it. Evolution factories
    are only loaded: building one needs the user's parameters."""
    from .. import registry

    if info.reserved:
        return info.reserved
    registry.get(info.kind, info.name)  # a conflict or an import failure: its one-line error
    if info.kind == "compressors":
        from ..compress.apply import get_compressor

        get_compressor(info.name)
    elif info.kind == "metrics":
        from ..evaluation import METRICS, metric_function

        if info.name not in METRICS:  # the built-in names are handled by the evaluator itself
            metric_function(info.name)
    elif (info.kind == "adapters" and not info.builtin and adapters is not None
          and info.name not in getattr(adapters, "plugins", {}).values()):
        return registry.disabled_reason("adapters", info.name) or f"{info.label} was not loaded"
    return None


def plugin_rows(kinds: list[str] | None = None, check: bool = False) -> list[dict]:
    """One dict per discovered plugin, ordered by kind (registry order) then name:
    ``{kind, name, package, version, value, builtin, conflict}`` (``conflict``: null, or the error that
    using a name registered by several packages gives, each of them having a row, or why a reserved name
    never reaches the plugin), plus ``loaded`` and ``error`` with ``check`` (see :func:`check_plugin`)."""
    from .. import registry
    from ..errors import InputError, SpecpruneError

    wanted = list(registry.KINDS) if not kinds else list(dict.fromkeys(kinds))
    unknown = [k for k in wanted if k not in registry.KINDS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(registry.KINDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown plugin kind {unknown[0]!r}{hint} (known: {', '.join(registry.KINDS)})")
    built = None
    if check and "adapters" in wanted:
        import warnings

        from ..layers import adapters

        with warnings.catch_warnings():  # each skipped adapter's warning is its row's error instead
            warnings.simplefilter("ignore", registry.PluginWarning)
            built = adapters()
    rows = []
    for kind in wanted:
        for info in registry.available(kind):
            conflict = "; ".join(m for m in (info.conflict, info.reserved) if m) or None
            row = {"kind": info.kind, "name": info.name, "package": info.package, "version": info.version,
                   "value": info.value, "builtin": info.builtin, "conflict": conflict}
            if check:
                try:
                    error = check_plugin(info, built)
                except SpecpruneError as err:  # the registry and the checks give one line each; keep listing
                    error = str(err)
                row.update(loaded=error is None, error=error)
            rows.append(row)
    return rows


def render_plugins(rows: list[dict]) -> None:
    """A rich table: kind, name, package, version, entry point, built-in (and load status)."""
    from rich.table import Table

    checked = any("loaded" in r for r in rows)
    conflicts = any(r.get("conflict") for r in rows)
    third = sum(1 for r in rows if not r["builtin"])
    t = Table(title=f"specprune plugins: {len(rows)} registered ({third} from other packages)",
              title_justify="left")
    for col in ("kind", "name", "package", "version", "entry point", "built-in"):
        t.add_column(col)
    if conflicts:
        t.add_column("conflict")
    if checked:
        t.add_column("loads")
    for r in rows:
        cells = [r["kind"], r["name"], r["package"], r["version"], r["value"],
                 "yes" if r["builtin"] else "no"]
        if conflicts:
            others = [o["package"] for o in rows if r.get("conflict") and o is not r
                      and (o["kind"], o["name"]) == (r["kind"], r["name"])]
            if others:
                cells.append(f"[red]also registered by {', '.join(others)}[/red]")
            else:  # a name alone in its kind is marked only when it is reserved
                cells.append("[red]reserved name[/red]" if r.get("conflict") else "")
        if checked:
            cells.append("ok" if r["loaded"] else f"[red]{r['error']}[/red]")
        t.add_row(*cells)
    c = console()
    c.print(t)
    from .. import registry

    if registry._autoload_disabled():
        c.print(f"{registry.AUTOLOAD_ENV} is set: only specprune's built-ins are listed", highlight=False)


def plugins_cmd(
    kind: KindOpt = None,
    check: CheckOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the registered evolution functions, compressors, layer adapters and metrics, with the
    package and version that provides each (built-ins register through the same entry points)."""
    ctx = Ctx(fmt, quiet)
    rows = plugin_rows(kind, check)
    for message in dict.fromkeys(r["conflict"] for r in rows if r["conflict"]):
        ctx.warn(message)
    ctx.emit(rows, render_plugins)


def register(app: typer.Typer) -> None:
    app.command("plugins", epilog=EPILOG)(command(plugins_cmd))
