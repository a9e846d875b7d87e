"""Figures and the readable report (``specprune report DIR...``).

* :mod:`specprune.report.figures` — one function per figure; each takes plain data (an
  :class:`~specprune.analysis.Analysis` or its JSON dict, plan/evaluation/sweep dicts) and an
  optional matplotlib ``ax``, and returns the :class:`matplotlib.figure.Figure`. Matplotlib is
  imported only when a figure is drawn, and figures are rendered with the headless Agg canvas
  (no pyplot state, no display needed).
* :mod:`specprune.report.document` — :func:`collect` reads what a directory holds (analysis,
  series, plan, evaluation, sweep) and :func:`write_report` writes the PNGs, a self-contained
  ``report.html`` (images embedded as data URIs) and ``report.md``.

Nothing here is imported by ``import specprune``.
"""

from __future__ import annotations

__all__ = ["ReportInputs", "collect", "figures", "write_report"]


def __getattr__(name: str):  # lazy: importing the package does not import matplotlib
    if name in ("collect", "write_report", "ReportInputs", "build_report"):
        from . import document

        return getattr(document, name)
    if name == "figures":
        import importlib

        return importlib.import_module(".figures", __name__)
    raise AttributeError(f"module 'specprune.report' has no attribute {name!r}")
