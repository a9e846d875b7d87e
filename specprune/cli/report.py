"""``specprune report DIR... [--out REPORT_DIR]``: figures and a readable report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Ctx, DebugOpt, FormatOpt, OutputFormat, OverwriteOpt, QuietOpt, command, console

EPILOG = """Examples:

  specprune report analysis/ --out analysis-report/

  specprune report compressed/          (writes compressed-report/)

  specprune report series/ plan.json --out report/ --format json

Reads analysis.json (+ spectra), series.json, plan.json, evaluation.json
and sweep.json from each DIR and two levels of its sub-directories.
Writes PNG figures, report.html (self-contained) and report.md.
Inputs are never modified: the default --out is <DIR>-report beside DIR.
"""


def default_out(first: str | Path) -> Path:
    """``<DIR>-report`` beside the first input (``<name>-report`` for a file)."""
    p = Path(first).expanduser()
    p = p.resolve() if str(p) in (".", "..") or p.name == "" else p
    base = p.stem if p.is_file() else p.name
    return p.parent / f"{base}-report"


def render_report(doc: dict) -> None:
    from rich.table import Table

    t = Table(title=f"report written to {doc['output']}", show_header=True)
    t.add_column("file")
    t.add_column("what")
    t.add_row(Path(doc["report"]).name, "self-contained HTML report (images embedded)")
    t.add_row(Path(doc["markdown"]).name, "Markdown report (links the PNGs)")
    for f in doc["figures"]:
        t.add_row(Path(f).name, "figure")
    console().print(t)
    found = ", ".join(f"{k} ({v})" for k, v in doc["found"].items() if v)
    console().print(f"inputs: {found}")
    for n in doc.get("notes", []):
        console().print(f"[dim]note: {n}[/dim]")
    console().print(f"open {doc['report']}")


def report_cmd(
    dirs: Annotated[list[str], typer.Argument(help="Directories (or JSON files) written by analyze, recommend, "
                                                   "evaluate, compress or demo.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="New directory for the report "
                                                "(default: <first DIR>-report beside it).")] = None,
    max_spectra: Annotated[int, typer.Option("--max-spectra", help="Layers shown in the spectra figure.")] = 9,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn analysis / plan / evaluation directories into PNG figures and one readable report (HTML with
    the images embedded, and Markdown): what was analysed, what is recommended and why, what was measured."""
    from ..errors import InputError
    from ..report.document import write_report

    ctx = Ctx(fmt, quiet)
    if max_spectra < 1:
        raise InputError(f"--max-spectra must be ≥ 1, got {max_spectra}")
    target = out if out is not None else default_out(dirs[0])
    doc = write_report(dirs, target, overwrite=overwrite, max_spectra=max_spectra)
    for w in doc.get("warnings", []):
        ctx.warn(w)
    for s in doc.get("skipped", []):
        ctx.warn(f"skipped {s}")
    if quiet and not ctx.json:
        typer.echo(doc["report"])
        return
    ctx.emit(doc, render_report)


def register(app: typer.Typer) -> None:
    app.command("report", epilog=EPILOG)(command(report_cmd))
