"""The readable report: collect what directories hold, write PNGs, ``report.html`` and ``report.md``.

:func:`collect` reads, from each path given (a directory, searched with two levels of
sub-directories, or a single JSON file):

* ``analysis.json`` (+ ``spectra.safetensors``) — :class:`~specprune.analysis.Analysis` (``analyze``,
  or the ``analysis/`` sub-directory written by ``compress``);
* ``series.json`` — ``{"series": [{"model", "dir", "step"}]}`` with one analysis per sub-directory
  (``analyze CKPT1 CKPT2 …``);
* ``plan.json`` (``recommend``/``compress``), ``evaluation.json`` (``evaluate``/``compress``);
* ``sweep.json`` — uniform settings with predicted and measured deltas (written by ``demo``):
  ``{"metric", "points": [{"setting", "kind": "bits"|"rank", "bits", "keep_fraction",
  "predicted_delta", "predicted_delta_uncertainty", "measured_delta", ...}]}``.

The first file of each kind found wins (later ones are listed as skipped). :func:`write_report`
then writes, atomically into a new directory, the figures of :mod:`specprune.report.figures` that
the inputs allow and one report that reads top-down: what was analysed, what is recommended and
why, what was measured. ``report.html`` is self-contained (images as base64 data URIs, inline CSS,
no scripts, no external resources); ``report.md`` links the PNGs beside it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..plan import edited_since_prediction

ANALYSIS_FILE = "analysis.json"
SERIES_FILE = "series.json"
PLAN_FILE = "plan.json"
EVALUATION_FILE = "evaluation.json"
SWEEP_FILE = "sweep.json"
KNOWN_FILES = (ANALYSIS_FILE, SERIES_FILE, PLAN_FILE, EVALUATION_FILE, SWEEP_FILE)
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
MAX_DEPTH = 2
"""Sub-directory levels searched below each given directory (a demo folder holds compressed/analysis/)."""


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class ReportInputs:
    """What :func:`collect` found, with where each piece came from."""

    paths: list[Path]
    analysis: Any = None                      # Analysis
    analysis_path: Path | None = None
    plan: dict | None = None
    plan_path: Path | None = None
    evaluation: dict | None = None
    evaluation_path: Path | None = None
    sweep: dict | None = None
    sweep_path: Path | None = None
    series: list[dict] = field(default_factory=list)  # [{"model", "dir", "step", "analysis": dict}]
    series_path: Path | None = None
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # inputs that do not belong together

    @property
    def empty(self) -> bool:
        return (self.analysis is None and self.plan is None and self.evaluation is None
                and self.sweep is None and not self.series)

    def found(self) -> dict[str, str | None]:
        """Where each kind of input was read from (JSON-ready)."""
        return {k: (str(getattr(self, k + "_path")) if getattr(self, k + "_path") else None)
                for k in ("analysis", "series", "plan", "evaluation", "sweep")}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not readable JSON: {err}") from None


def _kind_of(path: Path, doc: Any) -> str | None:
    """Which input a JSON file is, by name first, then by its fields."""
    if path.name in KNOWN_FILES:
        return path.name[:-5]
    if not isinstance(doc, dict):
        return None
    if "series" in doc:
        return "series"
    if "format" in doc and isinstance(doc.get("layers"), dict):
        return "plan"
    if "measured_delta" in doc:
        return "evaluation"
    if isinstance(doc.get("points"), list):
        return "sweep"
    if isinstance(doc.get("layers"), list) and "calibration" in doc:
        return "analysis"
    return None


class _Collector:
    def __init__(self, paths: Sequence[str | Path]):
        self.inputs = ReportInputs([Path(p) for p in paths])
        self._series_dirs: set[Path] = set()

    def add_file(self, path: Path, doc: Any = None) -> bool:
        doc = _read_json(path) if doc is None else doc
        kind = _kind_of(path, doc)
        if kind is None:
            return False
        inp = self.inputs
        if getattr(inp, kind + "_path") is not None:
            article = "an" if kind[0] in "aeiou" else "a"
            inp.skipped.append(f"{path} ({article} {kind} was already read from {getattr(inp, kind + '_path')})")
            return True
        if kind == "analysis":
            from ..analysis import Analysis

            inp.analysis, inp.analysis_path = Analysis.load(path.parent), path
        elif kind == "plan":
            from ..plan import Plan

            inp.plan, inp.plan_path = Plan.from_dict(doc, str(path)).to_dict(), path
        elif kind == "evaluation":
            if not isinstance(doc, dict) or "measured_delta" not in doc:
                raise InputError(f"{path} is not a specprune evaluation (no measured_delta)")
            inp.evaluation, inp.evaluation_path = doc, path
        elif kind == "sweep":
            if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
                raise InputError(f"{path} is not a specprune sweep (no points list)")
            inp.sweep, inp.sweep_path = doc, path
        elif kind == "series":
            inp.series, inp.series_path = self._series(path, doc), path
        return True

    def _series(self, path: Path, doc: Any) -> list[dict]:
        entries = doc.get("series") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise InputError(f"{path} holds no series entries")
        out = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "dir" not in e:
                raise InputError(f"{path}: series entry {i} has no 'dir'")
            d = path.parent / str(e["dir"])
            f = d / ANALYSIS_FILE
            if not f.is_file():
                raise InputError(f"{path}: series entry {i} names {d}, which holds no {ANALYSIS_FILE}")
            try:
                step = int(e.get("step", i))
            except (TypeError, ValueError):
                raise InputError(f"{path}: series entry {i} has a non-integer step {e.get('step')!r}") from None
            self._series_dirs.add(d.resolve())
            out.append({"model": str(e.get("model", d.name)), "dir": str(d), "step": step,
                        "analysis": _read_json(f)})
        return out

    def scan_dir(self, d: Path, depth: int) -> bool:
        found = False
        # the series first, so its checkpoint sub-directories are not taken for the analysis
        for name in (SERIES_FILE, ANALYSIS_FILE, PLAN_FILE, EVALUATION_FILE, SWEEP_FILE):
            f = d / name
            if f.is_file() and not (name == ANALYSIS_FILE and d.resolve() in self._series_dirs):
                found = self.add_file(f) or found
        if depth < MAX_DEPTH:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if sub.resolve() in self._series_dirs:
                    continue
                found = self.scan_dir(sub, depth + 1) or found
        return found


def collect(paths: Sequence[str | Path]) -> ReportInputs:
    """Read every analysis / series / plan / evaluation / sweep file in ``paths`` (directories are
    searched ``MAX_DEPTH`` sub-directory levels deep; files are recognised by name or fields)."""
    if not paths:
        raise InputError("report needs at least one directory")
    col = _Collector(paths)
    for p in col.inputs.paths:
        if not p.exists():
            raise InputError(f"not found: {p}")
        if p.is_dir():
            ok = col.scan_dir(p, 0)
        else:
            ok = p.suffix == ".json" and col.add_file(p)
        if not ok:
            raise InputError(f"{p} holds no {', '.join(KNOWN_FILES)} (nor do its sub-directories)")
    inp = col.inputs
    fa = ((inp.analysis.model or {}).get("fingerprint") if inp.analysis is not None else None) or None
    fp = ((inp.plan or {}).get("model") or {}).get("fingerprint") or None
    if fa and fp and fa != fp:
        inp.warnings.append(f"the plan ({inp.plan_path}) was made for other weights than the analysis "
                            f"({inp.analysis_path}): fingerprints {fp} and {fa}; this report mixes two models")
    return inp


# ---------------------------------------------------------------------------------------- document
@dataclass
class _Doc:
    """Format-neutral report blocks, rendered to HTML and Markdown."""

    title: str
    blocks: list[tuple] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def h2(self, text: str) -> None:
        self.sections.append(text)
        self.blocks.append(("h2", text))

    def h3(self, text: str) -> None:
        self.blocks.append(("h3", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.blocks.append(("items", list(pairs)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], note: str | None = None) -> None:
        self.blocks.append(("table", list(headers), [list(map(str, r)) for r in rows], note))

    def figure(self, filename: str, caption: str) -> None:
        self.blocks.append(("figure", filename, caption))


def _f(v: Any, spec: str = ".3g", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def flag_rows(layers: Sequence[Any]) -> list[list[str]]:
    """The analysis' layer flags by kind (the text before the first ':' — undersampled, sampled,
    truncated, nonfinite): how many layers carry it, and the first one's flag in full."""
    kinds: dict[str, list[tuple[str, str]]] = {}
    for lay in layers:
        for flag in getattr(lay, "flags", None) or []:
            kind, _, text = str(flag).partition(":")
            kinds.setdefault(kind.strip(), []).append((lay.name, text.strip() or kind))
    return [[kind, str(len(v)), f"{v[0][0]}: {v[0][1]}"] for kind, v in kinds.items()]


def _mb(bits: Any) -> str:
    return "–" if bits is None else f"{bits / 8e6:.2f} MB"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #1f77b4;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:.6em 0}th,td{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f3f5f8}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}dt{font-weight:600}dd{margin:0}
.note{font-size:12px;color:#555}
"""


def _render_html(doc: _Doc, images: dict[str, bytes]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(doc.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{esc(doc.title)}</h1>"]
    for blk in doc.blocks:
        kind = blk[0]
        if kind in ("h2", "h3"):
            out.append(f"<{kind}>{esc(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(blk[1])}</p>")
        elif kind == "items":
            out.append("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in blk[1]) + "</dl>")
        elif kind == "table":
            _, headers, rows, note = blk
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</tbody></table>")
            if note:
                out.append(f'<p class="note">{esc(note)}</p>')
        elif kind == "figure":
            _, name, caption = blk
            data = base64.b64encode(images[name]).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}" '
                       f'data-file="{esc(name)}"><figcaption>{esc(caption)}</figcaption></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_markdown(doc: _Doc) -> str:
    out = [f"# {doc.title}", ""]
    for blk in doc.blocks:
        kind = blk[0]
        if kind == "h2":
            out += [f"## {blk[1]}", ""]
        elif kind == "h3":
            out += [f"### {blk[1]}", ""]
        elif kind == "p":
            out += [blk[1], ""]
        elif kind == "items":
            out += [f"- **{k}**: {v}" for k, v in blk[1]] + [""]
        elif kind == "table":
            _, headers, rows, note = blk
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join(":--" if i == 0 else "--:" for i in range(len(headers))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
            if note:
                out += [f"*{note}*", ""]
        elif kind == "figure":
            _, name, caption = blk
            out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------- content
def comparison_point(doc: dict, label: str = "", kind: str = "") -> dict:
    """One predicted-vs-measured pair from a document with ``predicted_delta``,
    ``predicted_delta_uncertainty``, ``measured_delta`` and ``measured_delta_stderr`` (an evaluation, a
    sweep point, the demo's summary)."""
    return {"label": label, "kind": kind, "predicted": doc.get("predicted_delta"),
            "uncertainty": doc.get("predicted_delta_uncertainty"), "measured": doc.get("measured_delta"),
            "measured_stderr": doc.get("measured_delta_stderr")}


def comparison_points(evaluation: dict | None, plan: dict | None, sweep: dict | None) -> list[dict]:
    """Predicted-vs-measured pairs: the applied plan (evaluation) and every measured sweep setting."""
    pts = []
    if evaluation and evaluation.get("predicted_delta") is not None:
        pt = comparison_point(evaluation, "plan", "plan")
        if pt["uncertainty"] is None and plan:
            pt["uncertainty"] = plan.get("predicted_delta_uncertainty")
        pts.append(pt)
    for p in (sweep or {}).get("points", []):
        if p.get("measured_delta") is not None and p.get("predicted_delta") is not None:
            pts.append(comparison_point(p, p.get("setting", ""), p.get("kind", "")))
    return pts


def measurement_margin(p: dict) -> float:
    """Two standard errors of a point's measurement (0 when its standard error is unknown)."""
    se = p.get("measured_stderr")
    return 2.0 * float(se) if isinstance(se, (int, float)) and math.isfinite(se) and se > 0 else 0.0


def within(p: dict) -> bool | None:
    """Whether a measurement agrees with its prediction: |measured − predicted| ≤ the stated uncertainty
    plus two standard errors of the measurement itself (when known: a measurement on a few windows is
    noisy too). None when either number is missing."""
    if p.get("measured") is None or p.get("predicted") is None:
        return None
    return abs(p["measured"] - p["predicted"]) <= float(p.get("uncertainty") or 0.0) + measurement_margin(p)


def _within(p: dict) -> str:
    w = within(p)
    return "–" if w is None else ("yes" if w else "no")


def agreement_note(points: Sequence[dict]) -> str | None:
    """One paragraph on how the measurements sit against the predictions: how many agree, and the median
    ratio measured/predicted; when most disagree in one direction it names the likely cause. None
    without two comparable points."""
    good = [p for p in points if within(p) is not None and p["predicted"] > 0 and p["measured"] > 0]
    if len(good) < 2:
        return None
    inside = sum(within(p) for p in good)
    ratios = [p["measured"] / p["predicted"] for p in good]
    med = math.exp(statistics.median(math.log(r) for r in ratios))  # even counts: the geometric mean of the two
    text = (f"{inside} of {len(good)} measurements agree with their prediction (within the stated uncertainty "
            f"and two standard errors of the measurement); the measured deltas are a median ×{med:.2f} of "
            "the predicted ones.")
    over = sum(r < 1 for r in ratios)
    if inside < len(good) / 2 and max(over, len(good) - over) >= 0.75 * len(good):
        way = "below" if over > len(good) / 2 else "above"
        text += (f" Most measurements lie {way} their predictions: the predictions are calibrated on the "
                 "calibration windows, and a systematic difference between those and the held-apart windows "
                 "(for instance text the model was trained on, where its loss is lower and the same change a "
                 "larger relative delta) shifts every measurement the same way. The stated uncertainty covers "
                 "the map's misfit and the calibration windows' sampling noise, not such a shift.")
    return text


class _Builder:
    """Writes figures into ``out`` and assembles the document."""

    def __init__(self, inputs: ReportInputs, out: Path, max_spectra: int):
        self.inp = inputs
        self.out = out
        self.max_spectra = max_spectra
        self.images: dict[str, bytes] = {}
        self.notes: list[str] = []
        model = self._model_name()
        self.doc = _Doc(f"specprune report — {model}" if model else "specprune report")

    def _model_name(self) -> str:
        a = self.inp.analysis
        src = (a.model.get("source") if a is not None else None) or ((self.inp.plan or {}).get("model") or {}).get(
            "source") or (self.inp.series[-1]["model"] if self.inp.series else "")
        if not src:
            return ""
        p = Path(str(src))
        generic = {"model", "models", "checkpoint", "weights", "hf", "compressed", "dense"}
        return f"{p.parent.name}/{p.name}" if p.name.lower() in generic and p.parent.name else p.name

    def fig(self, name: str, make: Callable[[], Any], caption: str) -> bool:
        """Draw a figure; a figure the inputs do not allow is skipped with a note, never an error."""
        from .figures import save_figure

        try:
            fig = make()
        except ValueError as err:
            self.notes.append(f"{name}: not drawn ({err})")
            return False
        path = self.out / name
        save_figure(fig, path)
        self.images[name] = path.read_bytes()
        self.doc.figure(name, caption)
        return True

    # -- sections
    def analysed(self) -> None:
        from . import figures as F

        a = self.inp.analysis
        d = self.doc
        d.h2("What was analysed")
        cal = a.calibration or {}
        d.items([("model", str(a.model.get("source", "?"))),
                 ("architecture", str(a.model.get("architecture", "–"))),
                 ("parameters", f"{a.model.get('num_parameters', 0):,}"),
                 ("calibration", f"{cal.get('tokens', '?'):,} tokens in {cal.get('samples', '?')} windows of "
                                 f"{cal.get('seq_len')} tokens (seed {cal.get('seed', '–')})"
                  if isinstance(cal.get("tokens"), int) and cal.get("seq_len") else
                  f"{cal.get('samples', '?')} samples of tensor data (seed {cal.get('seed', '–')}); each layer's "
                  "tokens (positions × groups for a convolution) are in analysis.json"
                  if isinstance(cal.get("tokens"), int) else json.dumps(cal)),
                 ("layers", str(len(a.layers)))])
        views = F.layer_views(a)
        fronts = [v for v in views if v.k_star is not None]
        rs = sorted(v.r_star for v in fronts if v.r_star is not None)
        ts = cal.get("token_sample")
        sampled = (f" (for inputs ≥ 1024 wide about {ts:.3g} of them, drawn ∝ ‖x‖² and weighted 1/p: see the "
                   "caveats)" if isinstance(ts, (int, float)) and not isinstance(ts, bool) else "")
        d.p(f"Every target layer's input covariance Σ = E[x xᵀ] was accumulated over the calibration tokens{sampled} "
            f"and diagonalised. b is the decay exponent of its eigenvalues (λ_k ∝ k^-b), a that of the mode energies "
            f"e_k = λ_k‖W u_k‖² (the output energy each input mode carries); k* is the learning frontier, the "
            f"mode where the learned power law bends down to the random-initialisation floor, and "
            f"r* = 1 − k*/k_max the share of modes beyond it. {len(fronts)} of {len(views)} layers show a frontier"
            + ("." if not rs else f"; its r* is {rs[0]:.0%}." if len(rs) == 1 else
               f"; their r* is {rs[0]:.0%} for all of them." if f"{rs[0]:.0%}" == f"{rs[-1]:.0%}" else
               f"; their r* ranges from {rs[0]:.0%} to {rs[-1]:.0%} (median {statistics.median(rs):.0%})."))
        rows = [[v.name, v.type, v.d_in, v.d_out, _f(v.b, ".2f"), _f(v.a, ".2f"),
                 "none" if v.k_star is None else v.k_star, v.k_max, _f(v.r_star, ".0%")] for v in views]
        d.table(["layer", "type", "d_in", "d_out", "b", "a", "k*", "k_max", "r*"], rows)
        caveats = flag_rows(a.layers)
        if caveats:
            d.table(["caveat", "layers", "for example"], caveats,
                    note="What the analysis flagged (each layer's flags in analysis.json): read the fits of these "
                         "layers with it in mind.")
        self.fig("spectra.png", lambda: F.spectra_figure(a, max_layers=self.max_spectra),
                 "Per-layer spectra (log-log): eigenvalues λ_k and mode energies e_k as shares of their totals, "
                 "the fitted power laws k^-b and k^-a, and the learning frontier k* (dashed, uncertainty shaded).")
        self.fig("mode_energy.png", lambda: F.mode_energy_figure(a),
                 "Mode-energy curves: the share of each layer's output energy carried by its top-k input modes; "
                 "circles mark k*.")

    def series(self) -> None:
        from . import figures as F

        d = self.doc
        ser = sorted(self.inp.series, key=lambda e: e["step"])
        d.h2("Training series")
        st = F._series_stats(ser)
        rows = [[e["step"], Path(e["model"]).name, _f(st["k_star"][i], ".1f"), f"{st['k_star_n'][i]}",
                 _f(st["b"][i], ".2f"), _f(st["a"][i], ".2f")] for i, e in enumerate(ser)]
        d.table(["step", "checkpoint", "median k*", "layers with k*", "median b", "median a"], rows)
        slope = F.series_slope(st["step"], st["k_star"])
        b_last = st["b"][-1]
        if slope is not None and math.isfinite(b_last) and b_last > 0:
            trend = ("does not move with the step (k* ∝ t^0.00)" if abs(slope) < 0.005 else
                     "shrinks as k* ∝ t^{:.2f}" if slope < 0 else "grows as k* ∝ t^{:.2f}").format(slope)
            d.p(f"Across the checkpoints the median frontier {trend}; the theory predicts "
                f"k* ∝ t^(ρ/b), which for NTK-like dynamics (ρ = 1) and the last checkpoint's median b = "
                f"{b_last:.2f} is t^{1 / b_last:.2f}.")
        else:
            d.p("Too few checkpoints have a detected frontier to fit how k* grows with the training step.")
        self.fig("series.png", lambda: F.series_figure(ser),
                 "k*, b and a against training step (median over layers, interquartile range shaded); "
                 "on the k* panel the fitted slope and the theory's k* ∝ t^(ρ/b).")

    def recommended(self) -> None:
        from . import figures as F

        plan = self.inp.plan
        a = self.inp.analysis
        d = self.doc
        d.h2("What is recommended and why")
        size = plan.get("size") or {}
        layers = plan.get("layers") or {}
        pred, unc = plan.get("predicted_delta"), plan.get("predicted_delta_uncertainty")
        items = [("tolerance", f"{_f(plan.get('tolerance'), 'g')} (relative increase of {plan.get('metric')})"),
                 ("predicted delta", f"{_f(pred, '.4g')} ± {_f(unc, '.2g')}" + (
                     " — of the plan as recommended: its layer settings were edited since"
                     if edited_since_prediction(plan) else "")),
                 ("calibrated", "yes — sensitivities measured on the calibration data" if plan.get("calibrated")
                  else "no — layer-local estimate")]
        if size:
            items.append(("size", (f"{_mb(size.get('bits_before'))} → {_mb(size.get('bits_after'))} "
                                  f"({size.get('bits_after', 0) / max(size.get('bits_before', 1), 1):.1%}); "
                                  f"parameters {size.get('params_before', 0):,} → {size.get('params_after', 0):,}")))
        d.items(items)
        n_fact = sum(1 for lp in layers.values() if lp.get("rank") is not None)
        n_q = sum(1 for lp in layers.values() if lp.get("bits") is not None)
        bits_hist: dict[int, int] = {}
        for lp in layers.values():
            if lp.get("bits") is not None:
                bits_hist[lp["bits"]] = bits_hist.get(lp["bits"], 0) + 1
        hist = ", ".join(f"{n}×int{b}" for b, n in sorted(bits_hist.items()))
        det = plan.get("details") or {}
        cmap = det.get("calibration_map") or {}
        def are(n: int) -> str:
            return f"{n} is" if n == 1 else f"{n} are"

        why = [(f"Of {len(layers)} layers, {are(n_q)} quantized ({hist or 'none'}) and {are(n_fact)} factorized to a "
               "lower rank; the rest are kept.")]
        tmap = det.get("truncation_map") or {}
        if plan.get("calibrated") and cmap:
            maps = (f"a map δ ≈ c·P^p (c = {_f(cmap.get('c'), '.3g')}, p = {_f(cmap.get('p'), '.3g')}"
                    + (f"; for truncations c = {_f(tmap.get('c'), '.3g')}, p = {_f(tmap.get('p'), '.3g')}"
                       if tmap else "") + ")")
            how = str(det.get("sensitivity") or "")
            sens = ("per-layer sensitivities from the metric's Gauss–Newton curvature (random-cotangent backward "
                    f"passes: {how})" if how.startswith("gradient") else
                    "per-layer sensitivities measured by injecting each layer's real weight change")
            where = det.get("verification_windows")
            where = f"calibration windows ({where})" if where else "calibration windows"
            model_pred = det.get("model_prediction")
            measured_headline = (model_pred is not None and pred is not None
                                 and abs(float(model_pred) - float(pred)) > 1e-12 * max(abs(float(pred)), 1e-300))
            why.append(f"Each candidate's layer distortion tr(ΔW Σ ΔWᵀ) is exact from the layer's input covariance; "
                       f"{sens} turn it into a metric change, and {maps} fitted on "
                       f"{len(cmap.get('points') or [])} measured whole-model perturbations predicts each candidate, "
                       f"uncertain by a factor e^(2σ), σ = {_f(cmap.get('sigma'), '.2f')} (its log misfit)"
                       + (f"; for this plan it predicted {_f(model_pred, '.4g')}" if model_pred is not None else "")
                       + f". The smallest plan whose measurement on {where} stays inside the tolerance was chosen"
                       + (f", and that measurement ({_f(pred, '.4g')}) is its predicted delta above, uncertain by two "
                          "standard errors of the measurement and at least 15%." if measured_headline else "."))
        frontier = det.get("frontier") or {}
        kstars = {n: (frontier.get(n) or {}).get("k_star") for n in layers}
        if a is not None:
            kstars.update({v.name: v.k_star for v in F.layer_views(a) if v.name in layers})
        below = [n for n, lp in layers.items() if lp.get("rank") is not None and kstars.get(n) is not None
                 and lp["rank"] < kstars[n]]
        with_front = sum(1 for n in layers if kstars.get(n) is not None)
        why.append(f"Frontier bound: the theory's r* = 1 − k*/k_max is an upper bound on safe pruning "
                   f"({with_front} {'layer has' if with_front == 1 else 'layers have'} a frontier). "
                   + (f"{len(below)} factorized {'layer keeps' if len(below) == 1 else 'layers keep'} fewer modes "
                      f"than {'its' if len(below) == 1 else 'their'} k*: {', '.join(below)}."
                      if below else "No factorized layer keeps fewer modes than its k*."))
        for w in why:
            d.p(w)
        rows = []
        for n, lp in layers.items():
            rows.append([n, lp.get("method") or "–", lp.get("rank") or "–", f"{float(lp.get('prune_rate') or 0):.0%}",
                         lp.get("bits") or "–", lp.get("group_size") or "–", _f(kstars.get(n), "d", "none"),
                         _f(lp.get("predicted_delta"), ".2e")])
        d.table(["layer", "method", "rank", "weights removed", "bits", "group", "k*", "predicted δ share"], rows)
        self.fig("layer_map.png", lambda: F.layer_map_figure(plan, a),
                 "Layer map of the plan: share of weights removed, bits per weight"
                 + (", and the frontier bound r*." if a is not None else "."))
        if a is not None:
            self.fig("pruning_curve.png", lambda: F.pruning_curve_figure(a, plan, self.inp.sweep),
                     "Predicted pruning curve: the metric after keeping the top-k modes of every layer (plateau past "
                     "the frontier, power law, saturation), with measured uniform truncations.")

    def measured(self) -> None:
        from ..evaluation import value_labels
        from . import figures as F

        ev, plan, sweep = self.inp.evaluation, self.inp.plan, self.inp.sweep
        d = self.doc
        d.h2("What was measured")
        if ev:
            unc = ev.get("predicted_delta_uncertainty", (plan or {}).get("predicted_delta_uncertainty"))
            ref_label, value_label = value_labels(str(ev.get("metric")))
            items = [("metric", str(ev.get("metric"))),
                     (ref_label, _f(ev.get("reference_value"), ".5g")),
                     (value_label, _f(ev.get("value"), ".5g")),
                     ("measured delta", _f(ev.get("measured_delta"), ".4g")),
                     ("predicted delta", f"{_f(ev.get('predicted_delta'), '.4g')} ± {_f(unc, '.2g')}")]
            if "tolerance" in ev:
                items.append(("tolerance", f"{_f(ev.get('tolerance'), 'g')} — "
                                           + ("met" if ev.get("within_tolerance", True) else "EXCEEDED")))
            if ev.get("eval_windows") is not None:
                items.append(("evaluation windows", f"{ev['eval_windows']} (held apart from calibration)"))
            if ev.get("output"):
                items.append(("compressed model", str(ev["output"])))
            d.items(items)
        if sweep and sweep.get("points"):
            d.h3("Uniform settings")
            d.p(f"Every target layer compressed the same way and measured on the {sweep.get('eval_windows', '')} "
                f"held-apart windows ({sweep.get('metric', '')}); predictions use the plan's calibrated sensitivities.")
            pts = [comparison_point(p, p.get("setting", "")) for p in sweep["points"]]
            rows = [[pt["label"], _f(pt["predicted"], ".3g"), _f(pt["uncertainty"], ".2g"),
                     _f(pt["measured"], ".3g") + (f" ± {_f(measurement_margin(pt), '.2g')}"
                                                  if measurement_margin(pt) else ""), _within(pt)]
                    for pt in pts]
            d.table(["setting", "predicted δ", "± uncertainty", "measured δ", "within"], rows,
                    note="within: |measured − predicted| ≤ the stated uncertainty (two σ of the calibration map's "
                         "misfit) + two standard errors of the measurement.")
        pts = comparison_points(ev, plan, sweep)
        note = agreement_note(pts)
        if note:
            d.p(note)
        self.fig("bits.png", lambda: F.bits_figure(sweep, plan),
                 "Quantization by bit-width: predicted δ (line, uncertainty shaded) and measured δ (squares).")
        self.fig("predicted_vs_measured.png", lambda: F.predicted_vs_measured_figure(pts),
                 "Every prediction against its measurement (dashed: measured = predicted; horizontal bars: the stated "
                 "uncertainty, vertical bars: two standard errors of the measurement).")

    def build(self) -> _Doc:
        inp = self.inp
        d = self.doc
        found = [f"{k}: {v}" for k, v in inp.found().items() if v]
        d.p("Inputs — " + "; ".join(found) + ".")
        if inp.analysis is not None:
            self.analysed()
        if inp.series:
            self.series()
        if inp.plan is not None:
            self.recommended()
        if inp.evaluation is not None or inp.sweep is not None or (inp.plan or {}).get("calibrated"):
            self.measured()
        if self.notes or inp.skipped or inp.warnings:
            d.h2("Notes")
            for w in inp.warnings:
                d.p(f"Warning: {w}.")
            for n in self.notes:
                d.p(n)
            for s in inp.skipped:
                d.p(f"skipped: {s}")
        return d


def build_report(inputs: ReportInputs, out: str | Path, *, max_spectra: int = 9) -> dict:
    """Write the figures, ``report.html`` and ``report.md`` into the existing directory ``out``
    (no atomicity here; see :func:`write_report`). Returns the summary of :func:`write_report`."""
    out = Path(out)
    b = _Builder(inputs, out, max_spectra)
    doc = b.build()
    (out / HTML_FILE).write_text(_render_html(doc, b.images), encoding="utf-8")
    (out / MARKDOWN_FILE).write_text(_render_markdown(doc), encoding="utf-8")
    return {"title": doc.title, "sections": doc.sections, "figures": sorted(b.images), "notes": b.notes,
            "found": inputs.found(), "skipped": inputs.skipped}


def write_report(paths: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                 max_spectra: int = 9) -> dict:
    """Collect ``paths`` and write the report into the new directory ``out``, whole or not at all
    (an existing ``out`` only with ``overwrite``; never one that is, contains or lies inside an
    input). Returns ``{"output", "report", "markdown", "figures", "files", "sections", "found",
    "skipped", "warnings", "notes", "seconds"}`` with final paths."""
    import warnings

    from ..io import check_output_path, output_dir

    t0 = time.perf_counter()
    check_output_path(out, paths, overwrite)
    inputs = collect(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # matplotlib layout/glyph warnings are not the user's
        with output_dir(out, paths, overwrite) as tmp:
            summary = build_report(inputs, tmp, max_spectra=max_spectra)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    o = Path(out)
    return {"output": str(o), "report": str(o / HTML_FILE), "markdown": str(o / MARKDOWN_FILE),
            "figures": [str(o / f) for f in summary["figures"]], "files": files,
            "sections": summary["sections"], "found": summary["found"], "skipped": summary["skipped"],
            "warnings": list(inputs.warnings), "notes": summary["notes"],
            "seconds": round(time.perf_counter() - t0, 3)}
