"""The report's figures, one function per figure.

Every function takes plain data — an :class:`~specprune.analysis.Analysis` (or its
``analysis.json`` dict with arrays added), plan / evaluation / sweep dicts as written to disk —
and an optional matplotlib ``ax`` to draw into, and returns the :class:`~matplotlib.figure.Figure`.
Figures are built with the object-oriented API on the Agg canvas: no pyplot state, no display,
nothing imported at ``import specprune`` time.

Artists that tests and readers look for carry a ``gid``: ``"k_star"`` (frontier markers),
``"measured"`` (measured points), ``"predicted"`` (prediction curves), ``"identity"`` (y = x),
``"tolerance"`` and ``"fit"`` lines.

The figures:

* :func:`spectrum_figure` — one layer: eigenvalues λ_k and mode energies e_k = λ_k‖W u_k‖² on
  log-log axes (as shares of their totals), the fitted power laws λ ∝ k^−b and e ∝ k^−a over their
  fit ranges, and the learning frontier k* with its uncertainty band. :func:`spectra_figure` is a
  grid of these for representative layers.
* :func:`mode_energy_figure` — the fraction of each layer's output energy E‖Wx‖² captured by its
  top-k input modes, against k/k_max, with k* marked on every curve.
* :func:`pruning_curve_figure` — the predicted metric after keeping the top-k modes of every layer,
  1 + δ(k/k_max) (plateau, power law, saturation), with measured points of uniform truncations.
* :func:`bits_figure` — predicted and measured δ of uniform round-to-nearest quantization per bit-width.
* :func:`predicted_vs_measured_figure` — every prediction against its measurement, with y = x.
* :func:`layer_map_figure` — the plan per layer (transformer block × role): weights removed, bits,
  and the frontier bound r*.
* :func:`series_figure` — k*, b and a against training step for a series of checkpoints, with the
  fitted slope of k* and the theory's k* ∝ t^(ρ/b) (NTK: ρ = 1) for comparison.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .labels import curve_obstacle, merge_close, place_labels

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "LayerView",
    "bits_figure",
    "layer_map_figure",
    "layer_views",
    "mode_energy_figure",
    "predicted_pruning_curve",
    "predicted_vs_measured_figure",
    "pruning_curve_figure",
    "save_figure",
    "select_layers_for_spectra",
    "series_figure",
    "spectra_figure",
    "spectrum_figure",
    "split_block",
    "uniform_truncation_raw",
]

BLUE, ORANGE, RED, GREEN, GREY = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "0.55"
# a phase label sits above right of the falling curve first (the curve is lower there), else below left
PHASE_OFFSETS = ((4, 6, "left", "bottom"), (-4, -6, "right", "top"), (0, 14, "center", "bottom"),
                 (0, -14, "center", "top"), (10, 18, "left", "bottom"), (-10, -18, "right", "top"))


# ------------------------------------------------------------------------------------------ plumbing
def _figure(figsize: tuple[float, float]) -> Figure:
    """A new figure on the headless Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.4, 4.2)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = _figure(figsize)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` as PNG (Agg, 110 dpi, no timestamp metadata so reruns give the same bytes)."""
    fig.savefig(str(path), format="png", dpi=110, metadata={"Software": None})


@dataclass
class LayerView:
    """One layer's analysis fields and arrays, whatever form the analysis came in."""

    name: str
    type: str
    d_in: int
    d_out: int
    b: float | None
    a: float | None
    k_star: int | None
    k_max: int
    r_star: float | None
    fit: dict
    eigenvalues: np.ndarray | None = None
    mode_energy: np.ndarray | None = None

    @property
    def has_spectrum(self) -> bool:
        return self.eigenvalues is not None and self.mode_energy is not None

    @property
    def frontier(self) -> dict:
        return dict((self.fit or {}).get("frontier") or {})


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def layer_views(analysis: Any) -> list[LayerView]:
    """:class:`LayerView` for every layer of an ``Analysis`` or an ``analysis.json`` dict (whose layer
    dicts may carry ``eigenvalues`` / ``mode_energy`` arrays)."""
    out = []
    for lay in _get(analysis, "layers", []) or []:
        ev, me = _get(lay, "eigenvalues"), _get(lay, "mode_energy")
        out.append(LayerView(
            name=str(_get(lay, "name")), type=str(_get(lay, "type", "")), d_in=int(_get(lay, "d_in", 0) or 0),
            d_out=int(_get(lay, "d_out", 0) or 0), b=_get(lay, "b"), a=_get(lay, "a"), k_star=_get(lay, "k_star"),
            k_max=int(_get(lay, "k_max", 0) or _get(lay, "d_in", 0) or 0), r_star=_get(lay, "r_star"),
            fit=dict(_get(lay, "fit") or {}),
            eigenvalues=None if ev is None else np.asarray(ev, dtype=np.float64),
            mode_energy=None if me is None else np.asarray(me, dtype=np.float64)))
    return out


_BLOCK = re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?P<block>\d+)\.(?P<role>.+)$")


def split_block(name: str) -> tuple[int | None, str]:
    """``encoder.layer.3.attention.self.query`` → (3, ``attention.self.query``); the first numeric
    component of a qualified name is the block. Names without one → (None, name)."""
    m = _BLOCK.match(name)
    if not m:
        return None, name
    return int(m.group("block")), m.group("role")


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _as_dict(obj: Any) -> dict | None:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def _fmt(v: Any, spec: str = ".3g", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


# ------------------------------------------------------------------------------------- per layer
def spectrum_figure(layer: Any, ax: Axes | None = None) -> Figure:
    """One layer's spectrum on log-log axes: eigenvalues λ_k and mode energies e_k (each as a share
    of its total, so both fit one axis), the fitted power laws k^−b and k^−a drawn over their fit
    ranges, and k* (vertical line, gid ``k_star``) with its uncertainty range shaded."""
    lay = layer if isinstance(layer, LayerView) else layer_views({"layers": [layer]})[0]
    if not lay.has_spectrum:
        raise ValueError(f"layer {lay.name} has no saved spectrum (eigenvalues and mode energies)")
    fig, ax = _axes(ax)
    k = np.arange(1, lay.eigenvalues.size + 1, dtype=np.float64)
    for values, key, color, sym, label in ((lay.eigenvalues, "b", BLUE, "λ", "eigenvalues λ_k"),
                                           (lay.mode_energy, "a", ORANGE, "e", "mode energy e_k")):
        total = float(np.sum(np.clip(values, 0, None)))
        if total <= 0:
            continue
        pos = values > 0
        ax.plot(k[pos], values[pos] / total, ".", ms=2.5, color=color, alpha=0.55, label=label, gid=f"data_{key}")
        f = (lay.fit or {}).get(key) or {}
        if f.get("success") and f.get("exponent") is not None and f.get("log_intercept") is not None:
            kf = np.geomspace(max(1, f["k_lo"]), max(f["k_hi"], f["k_lo"] + 1), 50)
            yf = np.exp(f["log_intercept"] - f["exponent"] * np.log(kf)) / total
            ax.plot(kf, yf, "-", lw=1.8, color=color, gid="fit",
                    label=f"{sym}_k ∝ k^-{key}, {key} = {f['exponent']:.2f}")
    fr = lay.frontier
    if lay.k_star is not None:
        lo, hi = fr.get("k_star_lo"), fr.get("k_star_hi")
        if lo is not None and hi is not None and hi > lo:
            ax.axvspan(lo, hi, color=RED, alpha=0.08, lw=0, gid="k_star_band")
        ax.axvline(lay.k_star, color=RED, ls="--", lw=1.4, gid="k_star",
                   label=f"k* = {lay.k_star} (r* = {_fmt(lay.r_star, '.0%')})")
    else:
        ax.text(0.02, 0.03, "no frontier detected", transform=ax.transAxes, fontsize=8, color=RED)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mode k")
    ax.set_ylabel("share of total (λ_k/Σλ, e_k/Σe)")
    ax.set_title(f"{_short(lay.name)}\n{lay.type} {lay.d_in}→{lay.d_out}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="major", alpha=0.25)
    return fig


def select_layers_for_spectra(views: Sequence[LayerView], max_layers: int = 9) -> list[LayerView]:
    """Representative layers for the spectra grid: with transformer blocks, every role of the first,
    middle and last block (in that order, up to ``max_layers``); otherwise evenly spaced layers."""
    views = [v for v in views if v.has_spectrum]
    if len(views) <= max_layers:
        return list(views)
    blocks = sorted({b for b, _ in (split_block(v.name) for v in views) if b is not None})
    if len(blocks) >= 2:
        picks: list[LayerView] = []
        wanted = list(dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]))
        per = math.ceil(max_layers / len(wanted))
        for blk in wanted:
            in_blk = [v for v in views if split_block(v.name)[0] == blk]
            idx = np.unique(np.linspace(0, len(in_blk) - 1, min(per, len(in_blk))).round().astype(int))
            picks.extend(in_blk[i] for i in idx)
        chosen = {v.name for v in picks}
        picks.extend(v for v in views if v.name not in chosen)  # fill up when blocks are small
        picks = picks[:max_layers]
        return sorted(picks, key=lambda v: views.index(v))
    idx = np.unique(np.linspace(0, len(views) - 1, max_layers).round().astype(int))
    return [views[i] for i in idx]


def spectra_figure(analysis: Any, layers: Iterable[str] | None = None, max_layers: int = 9,
                   ncols: int = 3) -> Figure:
    """A grid of :func:`spectrum_figure` panels for ``layers`` (names) or representative layers."""
    views = layer_views(analysis)
    if layers is not None:
        wanted = list(layers)
        by_name = {v.name: v for v in views}
        chosen = [by_name[n] for n in wanted if n in by_name and by_name[n].has_spectrum]
    else:
        chosen = select_layers_for_spectra(views, max_layers)
    if not chosen:
        raise ValueError("the analysis has no layer with a saved spectrum")
    ncols = min(ncols, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = _figure((4.6 * ncols, 3.7 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, lay in zip(axes.ravel(), chosen):
        spectrum_figure(lay, ax=ax)
    for ax in axes.ravel()[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle("Layer spectra: input-covariance eigenvalues and mode energies, fitted power laws, "
                 "learning frontier k*", fontsize=11)
    return fig


def mode_energy_figure(analysis: Any, ax: Axes | None = None) -> Figure:
    """Cumulative share of each layer's output energy E‖Wx‖² carried by its top-k input modes,
    1 − Σ_{k'>k} e_k' / Σ e, against k/k_max (log x); one line per layer (gid ``layer``), coloured
    by depth, and a marker at each layer's k* (gid ``k_star``)."""
    from matplotlib import colormaps

    views = [v for v in layer_views(analysis) if v.mode_energy is not None and v.mode_energy.size]
    if not views:
        raise ValueError("the analysis has no saved mode energies")
    fig, ax = _axes(ax, (6.8, 4.4))
    cmap = colormaps["viridis"]
    ks_x, ks_y = [], []
    for i, v in enumerate(views):
        e = np.clip(v.mode_energy, 0.0, None)
        total = float(e.sum())
        if total <= 0:
            continue
        captured = np.cumsum(e) / total
        x = np.arange(1, e.size + 1) / max(v.k_max, e.size)
        ax.plot(x, captured, "-", lw=0.9, alpha=0.8, color=cmap(i / max(len(views) - 1, 1)), gid="layer")
        if v.k_star is not None and 1 <= v.k_star <= e.size:
            ks_x.append(v.k_star / max(v.k_max, e.size))
            ks_y.append(captured[v.k_star - 1])
    if ks_x:
        ax.plot(ks_x, ks_y, "o", ms=5, mfc="none", mec=RED, mew=1.3, gid="k_star",
                label=f"k* ({len(ks_x)} of {len(views)} layers have a frontier)")
    else:
        ax.text(0.02, 0.95, "no layer has a detected frontier", transform=ax.transAxes, fontsize=8, color=RED)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("kept modes k / k_max")
    ax.set_ylabel("output energy captured (fraction)")
    ax.set_title(f"Mode-energy curves of {len(views)} layers (colour: depth, first → last)", fontsize=10)
    if ks_x:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    if len(views) > 1:  # which colour is which layer: a colour bar over the layer order
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(1, len(views)), cmap), ax=ax, pad=0.02, fraction=0.05)
        bar.set_label("layer, in model order", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_gid("depth_colorbar")
    return fig


# -------------------------------------------------------------------------------- pruning curve
def _calibration(plan: Any) -> tuple[dict[str, dict], dict] | None:
    """(sensitivities per layer, calibration map) from a calibrated plan's ``details``, or None."""
    doc = _as_dict(plan)
    if not doc:
        return None
    det = doc.get("details") or {}
    sens, cmap = det.get("sensitivities"), det.get("calibration_map")
    if not doc.get("calibrated") or not isinstance(sens, dict) or not isinstance(cmap, dict) or not sens:
        return None
    if not all(k in cmap for k in ("c", "p", "sigma")):
        return None
    return sens, cmap


def sensitivity_delta(sens: dict, distortion: float, kind: str = "prune") -> float:
    """A layer's measured response to a weight change of output-energy distortion D (the recommender's
    :class:`~specprune.sensitivity.LayerSensitivity` as saved in a plan): s·D^p, with s the pruning
    sensitivity and p its ``prune_power`` for ``kind == "prune"`` (the quantization ones when absent),
    else the quantization s and ``power`` (1 if absent)."""
    if distortion <= 0:
        return 0.0
    if kind == "prune" and sens.get("prune") is not None:
        return float(sens["prune"]) * float(distortion) ** float(sens.get("prune_power", sens.get("power", 1.0)) or 1.0)
    return float(sens.get("quant", 0.0)) * float(distortion) ** float(sens.get("power", 1.0) or 1.0)


def uniform_truncation_raw(views: Sequence[LayerView], keep_fraction: float,
                           sensitivities: dict[str, dict] | None = None) -> tuple[float, float]:
    """Keep the top round(f·k_max) input modes of every layer (spectral truncation, f = ``keep_fraction``):
    returns (Σ_l δ_l(D_l), Σ_l E_l) with D_l = Σ_{k>k_l} e_k the exact output-energy loss, E_l = Σ e_k and
    δ_l = :func:`sensitivity_delta`. Without ``sensitivities`` δ_l(D) = D; with them only the layers
    listed are counted."""
    num = den = 0.0
    for v in views:
        if v.mode_energy is None:
            continue
        if sensitivities is not None and v.name not in sensitivities:
            continue
        e = np.clip(v.mode_energy, 0.0, None)
        k = int(min(e.size, max(0, round(keep_fraction * v.k_max))))
        d = float(e[k:].sum())
        num += sensitivity_delta(sensitivities[v.name], d, "prune") if sensitivities is not None else d
        den += float(e.sum())
    return num, den


def predicted_pruning_curve(analysis: Any, plan: Any = None, keep: Sequence[float] | None = None,
                            points: int = 60) -> dict:
    """The predicted relative metric increase δ of truncating every layer to its top f·k_max modes.

    Calibrated (a plan whose ``details`` hold measured layer responses δ_l(D) = s_l·D^{p_l} and the map
    δ ≈ c·P^p with spread σ): δ(f) = c·(Σ_l δ_l(D_l(f)))^p, band δ·e^{±σ}. Otherwise the layer-local estimate
    δ(f) = Σ_l D_l(f) / Σ_l E_l (share of output energy removed), without a band.
    Returns ``{"keep_fraction", "delta", "lo", "hi", "calibrated", "label"}`` (numpy arrays)."""
    views = [v for v in layer_views(analysis) if v.mode_energy is not None]
    if not views:
        raise ValueError("the analysis has no saved mode energies")
    if keep is None:
        kmax = max(v.k_max for v in views)
        keep = np.geomspace(1.0 / kmax, 1.0, points)
    f = np.asarray(keep, dtype=np.float64)
    cal = _calibration(plan)
    if cal is not None:
        sens, cmap = cal
        tmap = ((_as_dict(plan) or {}).get("details") or {}).get("truncation_map")
        if isinstance(tmap, dict) and all(k in tmap for k in ("c", "p", "sigma")):
            cmap = tmap  # the truncation kind's own map (plans made since it exists)
        raw = np.array([uniform_truncation_raw(views, x, sens)[0] for x in f])
        delta = float(cmap["c"]) * np.power(np.clip(raw, 0, None), float(cmap["p"]))
        s = float(cmap["sigma"])
        return {"keep_fraction": f, "delta": delta, "lo": delta * math.exp(-s), "hi": delta * math.exp(s),
                "calibrated": True, "label": "predicted (calibrated sensitivities)"}
    vals = [uniform_truncation_raw(views, x) for x in f]
    delta = np.array([n / d if d > 0 else 0.0 for n, d in vals])
    return {"keep_fraction": f, "delta": delta, "lo": None, "hi": None, "calibrated": False,
            "label": "predicted, layer-local (share of output energy removed; uncalibrated)"}


def _sweep_points(sweep: Any, kind: str) -> list[dict]:
    doc = _as_dict(sweep) or {}
    return [p for p in doc.get("points", []) if p.get("kind") == kind]


def pruning_curve_figure(analysis: Any, plan: Any = None, sweep: Any = None, ax: Axes | None = None) -> Figure:
    """The predicted pruning curve 1 + δ against the kept fraction of modes k/k_max (log-log), with its
    three phases annotated — plateau (k ≫ k*: nothing learned is removed), power law, saturation
    (k → 0: everything removed) — the median frontier k*/k_max (gid ``k_star``) and measured uniform
    truncations from a sweep (gid ``measured``)."""
    curve = predicted_pruning_curve(analysis, plan)
    views = layer_views(analysis)
    fig, ax = _axes(ax, (6.8, 4.4))
    f, d = curve["keep_fraction"], curve["delta"]
    ax.plot(f, 1.0 + d, "-", color=BLUE, lw=2, gid="predicted", label=curve["label"])
    if curve["lo"] is not None:
        ax.fill_between(f, 1.0 + curve["lo"], 1.0 + curve["hi"], color=BLUE, alpha=0.15, lw=0,
                        label="prediction uncertainty (±σ of the calibration map)")
    fronts = [v.k_star / v.k_max for v in views if v.k_star is not None and v.k_max]
    f_star = float(np.median(fronts)) if fronts else None
    if f_star is not None:
        ax.axvline(f_star, color=RED, ls="--", lw=1.2, gid="k_star",
                   label=f"median frontier k*/k_max = {f_star:.3f} ({len(fronts)} layers)")
    pts = [p for p in _sweep_points(sweep, "rank") if p.get("measured_delta") is not None]
    if pts:
        x = np.array([p["keep_fraction"] for p in pts], dtype=np.float64)
        y = np.array([p["measured_delta"] for p in pts], dtype=np.float64)
        ax.plot(x, 1.0 + np.clip(y, 0, None), "s", color=ORANGE, ms=7, mec="k", gid="measured",
                label="measured (uniform spectral truncation, held-apart windows)")
    # phases of the curve
    d_sat = float(d[0]) if d.size else 0.0
    saturation = d >= 0.5 * d_sat
    if f_star is not None:
        plateau = (f >= f_star) & (d <= 0.1 * d_sat)
    else:
        plateau = d <= 0.01 * d_sat
    powerlaw = ~plateau & ~saturation
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kept input modes k / k_max (every layer)")
    ax.set_ylabel("metric relative to uncompressed, 1 + δ")
    ax.set_title("Pruning curve: keeping the top-k modes of every layer", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.2)
    phases = []
    for mask, name in ((plateau, "plateau"), (powerlaw, "power law"), (saturation, "saturation")):
        if mask.any():
            xs = f[mask]
            xc = float(np.sqrt(xs.min() * xs.max()))
            phases.append((xc, float(np.interp(np.log(xc), np.log(f), 1.0 + d)), name))
    if phases:  # beside the curve, clear of it, of the measured points and of the legend
        keep = np.isfinite(d) & (f > 0)
        obstacles = [curve_obstacle(ax, f[keep], 1.0 + d[keep])]
        if pts:
            obstacles.append(ax.transData.transform(np.column_stack([x, 1.0 + np.clip(y, 0, None)])))
        for ann in place_labels(ax, phases, obstacles=np.concatenate(obstacles), offsets=PHASE_OFFSETS,
                                fontsize=8, color="0.25"):
            ann.set_gid("phase")
    return fig


# ----------------------------------------------------------------------------------- bit-widths
def _calibration_bit_points(plan: Any) -> list[dict]:
    """The in-sample uniform-bits points of a calibrated plan's calibration map, as predicted/measured."""
    cal = _calibration(plan)
    if cal is None:
        return []
    _, cmap = cal
    out = []
    for pt in cmap.get("points") or []:
        m = re.fullmatch(r"uniform bits (\d+)", str(pt.get("setting", "")))
        if not m or pt.get("predicted_raw") is None:
            continue
        pred = float(cmap["c"]) * max(float(pt["predicted_raw"]), 0.0) ** float(cmap["p"])
        out.append({"bits": int(m.group(1)), "predicted_delta": pred,
                    "predicted_delta_uncertainty": pred * (math.exp(float(cmap["sigma"])) - 1.0),
                    "measured_delta": pt.get("measured")})
    return out


def bits_figure(sweep: Any = None, plan: Any = None, ax: Axes | None = None) -> Figure:
    """Predicted δ (line with uncertainty band, gid ``predicted``) and measured δ (markers, gid
    ``measured``) of uniform per-channel round-to-nearest quantization at each bit-width, on a log y
    axis. Data: a sweep's ``kind == "bits"`` points, else the calibration points stored in a
    calibrated plan (measured on the calibration subset, i.e. in-sample). The plan's tolerance is
    drawn as a horizontal line (gid ``tolerance``)."""
    pts = _sweep_points(sweep, "bits")
    source = "held-apart windows"
    if not pts:
        pts = _calibration_bit_points(plan)
        source = "calibration subset, in-sample"
    if not pts:
        raise ValueError("no bit-width predictions: needs a sweep with bits points or a calibrated plan")
    fig, ax = _axes(ax, (6.4, 4.2))
    pred = sorted((p for p in pts if p.get("predicted_delta") is not None and p["predicted_delta"] > 0),
                  key=lambda p: p["bits"])
    if pred:
        b = np.array([p["bits"] for p in pred], dtype=np.float64)
        y = np.array([p["predicted_delta"] for p in pred])
        u = np.array([p.get("predicted_delta_uncertainty") or 0.0 for p in pred])
        ax.plot(b, y, "-o", color=BLUE, ms=4, lw=1.8, gid="predicted", label="predicted")
        if np.any(u > 0):
            ax.fill_between(b, np.clip(y - u, y * 0.05, None), y + u, color=BLUE, alpha=0.15, lw=0,
                            label="predicted ± stated uncertainty")
    meas = sorted((p for p in pts if p.get("measured_delta") is not None), key=lambda p: p["bits"])
    shown = [p for p in meas if p["measured_delta"] > 0]
    if shown:
        ax.plot([p["bits"] for p in shown], [p["measured_delta"] for p in shown], "s", ms=8,
                color=ORANGE, mec="k", gid="measured", label=f"measured ({source})")
    hidden = [p for p in meas if p["measured_delta"] <= 0]
    if hidden:  # a metric can improve slightly (noise); a log axis cannot show it
        ax.text(0.02, 0.02, "measured δ ≤ 0, not on the log axis: " + ", ".join(
            f"int{p['bits']} ({p['measured_delta']:.2g})" for p in hidden), transform=ax.transAxes, fontsize=7,
            color="0.3", gid="nonpositive")
    tol = (_as_dict(plan) or {}).get("tolerance")
    if tol:
        ax.axhline(float(tol), color=RED, ls=":", lw=1.2, gid="tolerance", label=f"tolerance {float(tol):g}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (uniform RTN, per-channel scales)")
    ax.set_ylabel("relative metric increase δ")
    ax.set_title("Quantization: predicted vs measured by bit-width", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    return fig


def predicted_vs_measured_figure(points: Sequence[dict], ax: Axes | None = None) -> Figure:
    """Each ``{"label", "predicted", "uncertainty", "measured", "kind"}`` point as a marker with its
    stated uncertainty as a horizontal error bar, on log-log axes with the line y = x (gid
    ``identity``). The title counts the points whose measurement agrees with the prediction
    (:func:`specprune.report.document.within`: the stated uncertainty plus two standard errors of the
    measurement)."""
    from .document import measurement_margin, within

    good = [p for p in points if p.get("predicted") is not None and p.get("measured") is not None
            and p["predicted"] > 0 and p["measured"] > 0]
    if not good:
        raise ValueError("no point has both a positive prediction and a positive measurement")
    fig, ax = _axes(ax, (5.6, 5.0))
    styles = {"plan": ("*", RED, 14), "bits": ("s", ORANGE, 7), "rank": ("D", GREEN, 6)}
    seen: set[str] = set()
    inside = 0
    for p in good:
        marker, color, size = styles.get(p.get("kind", ""), ("o", GREY, 6))
        u = float(p.get("uncertainty") or 0.0)
        if within(p):
            inside += 1
        lab = {"plan": "recommended plan", "bits": "uniform bits", "rank": "uniform truncation"}.get(
            p.get("kind", ""), p.get("kind", "other"))
        ye = measurement_margin(p)
        ax.errorbar([p["predicted"]], [p["measured"]], xerr=[[min(u, p["predicted"] * 0.999)], [u]],
                    yerr=[[min(ye, p["measured"] * 0.999)], [ye]] if ye else None,
                    fmt=marker, color=color, ms=size, mec="k", capsize=2, gid="measured",
                    label=None if lab in seen else lab)
        seen.add(lab)
    vals = [p["predicted"] for p in good] + [p["measured"] for p in good]
    lo, hi = min(vals) / 2.0, max(vals) * 2.0
    ax.plot([lo, hi], [lo, hi], "--", color="0.4", lw=1, gid="identity", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted δ")
    ax.set_ylabel("measured δ")
    ax.set_title(f"Predicted vs measured: {inside} of {len(good)} agree within the stated uncertainty",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    # labels last, once the axes are final: coincident points share one, none overlaps another or a marker
    xy = [(p["predicted"], p["measured"], str(p.get("label", ""))) for p in good]
    obstacles = [ax.transData.transform(np.array([(x, y) for x, y, _ in xy]))]
    for p in good:  # the horizontal error bars
        u = float(p.get("uncertainty") or 0.0)
        xs = np.array([max(p["predicted"] - u, p["predicted"] * 1e-3), p["predicted"] + u])
        obstacles.append(curve_obstacle(ax, xs, np.full(2, p["measured"])))
    place_labels(ax, merge_close(ax, xy), obstacles=np.concatenate(obstacles), fontsize=7, color="0.3")
    ax.grid(True, which="both", alpha=0.2)
    return fig


# ------------------------------------------------------------------------------------- layer map
def _grid(names: Sequence[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (blocks, then ``other``) × columns (roles in first-seen order) and each name's cell."""
    parsed = [(n, *split_block(n)) for n in names]
    blocks = sorted({b for _, b, _ in parsed if b is not None})
    roles: list[str] = []
    for _, b, r in parsed:
        if b is not None and r not in roles:
            roles.append(r)
    others = [n for n, b, _ in parsed if b is None]
    rows = [f"block {b}" for b in blocks] + (["other"] if others else [])
    cols = roles + [o for o in others if o not in roles]
    cell = {}
    for n, b, r in parsed:
        cell[n] = (blocks.index(b), cols.index(r)) if b is not None else (len(blocks), cols.index(n))
    return rows, cols, cell


def layer_map_figure(plan: Any, analysis: Any = None) -> Figure:
    """The plan as maps over (block × role): fraction of weights removed, bits (blank = kept in its
    dtype), and — with an analysis — the frontier bound r* = 1 − k*/k_max. Each cell is annotated
    with its value (texts have gid ``cell``)."""
    from matplotlib import colormaps

    doc = _as_dict(plan) or {}
    layers = doc.get("layers") or {}
    if not layers:
        raise ValueError("the plan has no layers")
    names = list(layers)
    rows, cols, cell = _grid(names)
    rate = np.full((len(rows), len(cols)), np.nan)
    bits = np.full((len(rows), len(cols)), np.nan)
    for n, lp in layers.items():
        i, j = cell[n]
        rate[i, j] = float(lp.get("prune_rate") or 0.0)
        if lp.get("bits") is not None:
            bits[i, j] = float(lp["bits"])
    panels = [("weights removed (prune rate)", rate, "viridis", 0.0, 1.0, "{:.0%}"),
              ("bits (blank: kept in its dtype)", bits, "plasma", 2.0, 8.0, "{:.0f}")]
    views = {v.name: v for v in layer_views(analysis)} if analysis is not None else {}
    if views:
        rs = np.full((len(rows), len(cols)), np.nan)
        for n in names:
            v = views.get(n)
            if v is not None and v.r_star is not None:
                i, j = cell[n]
                rs[i, j] = float(v.r_star)
        panels.append(("frontier bound r* (blank: no frontier)", rs, "cividis", 0.0, 1.0, "{:.0%}"))
    width = max(4.0, 0.62 * len(cols) + 1.6)
    fig = _figure((width * len(panels), max(3.0, 0.42 * len(rows) + 2.4)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, data, cm, vmin, vmax, fmt) in zip(axes, panels):
        cmap = colormaps[cm].with_extremes(bad="white")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                frac = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if frac < 0.55 else "black", gid="cell")
        ax.set_xticks(range(len(cols)), [_short(c, 24) for c in cols], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Recommended plan per layer (tolerance {_fmt(doc.get('tolerance'), 'g')}, "
                 f"predicted δ {_fmt(doc.get('predicted_delta'), '.3g')})", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------- series
def _series_stats(entries: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per checkpoint: step, and the median / quartiles over layers of k*, b and a."""
    steps, stats = [], {k: ([], [], [], []) for k in ("k_star", "b", "a")}
    for e in entries:
        views = layer_views(e["analysis"])
        steps.append(float(e["step"]))
        for key, (med, q1, q3, cnt) in stats.items():
            vals = np.array([getattr(v, key) for v in views if getattr(v, key) is not None], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            med.append(float(np.median(vals)) if vals.size else np.nan)
            q1.append(float(np.percentile(vals, 25)) if vals.size else np.nan)
            q3.append(float(np.percentile(vals, 75)) if vals.size else np.nan)
            cnt.append(int(vals.size))
    out = {"step": np.array(steps)}
    for key, (med, q1, q3, cnt) in stats.items():
        out[key] = np.array(med)
        out[key + "_q1"] = np.array(q1)
        out[key + "_q3"] = np.array(q3)
        out[key + "_n"] = np.array(cnt)
    return out


def series_slope(steps: np.ndarray, k_star: np.ndarray) -> float | None:
    """Least-squares slope of ln k* on ln step over the checkpoints with step > 0 and a frontier."""
    ok = (steps > 0) & np.isfinite(k_star) & (k_star > 0)
    if ok.sum() < 2 or np.ptp(np.log(steps[ok])) == 0:
        return None
    return float(np.polyfit(np.log(steps[ok]), np.log(k_star[ok]), 1)[0])


def series_figure(series: Sequence[dict]) -> Figure:
    """k*, b and a against training step for ``series`` = ``[{"step": int, "analysis": Analysis|dict}]``:
    the median over layers (markers, gid ``measured``) with the interquartile range shaded. On the k*
    panel (log-log) the least-squares slope of median k* is drawn (gid ``fit``) beside the theory's
    k* ∝ t^(ρ/b) with NTK ρ = 1 and b the median b of the last checkpoint (gid ``theory``)."""
    entries = sorted(series, key=lambda e: e["step"])
    if len(entries) < 2:
        raise ValueError("a series needs at least two checkpoints")
    st = _series_stats(entries)
    steps = st["step"]
    logx = bool(np.all(steps > 0))
    fig = _figure((14.0, 4.2))
    axes = fig.subplots(1, 3)
    labels = {"k_star": "learning frontier k* (median over layers)", "b": "eigenvalue exponent b",
              "a": "mode-energy exponent a"}
    for ax, key in zip(axes, ("k_star", "b", "a")):
        y = st[key]
        ok = np.isfinite(y)
        ax.plot(steps[ok], y[ok], "o-", color=BLUE, ms=6, gid="measured", label="median over layers")
        band = ok & np.isfinite(st[key + "_q1"])
        if band.sum() >= 2:
            ax.fill_between(steps[band], st[key + "_q1"][band], st[key + "_q3"][band], color=BLUE, alpha=0.15,
                            lw=0, label="interquartile range")
        ax.set_xlabel("training step")
        ax.set_ylabel(labels[key])
        if logx:
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.2)
    ax = axes[0]
    ks = st["k_star"]
    if np.any(np.isfinite(ks)):
        ax.set_yscale("log")
    slope = series_slope(steps, ks)
    ok = (steps > 0) & np.isfinite(ks) & (ks > 0)
    if slope is not None:
        xs = steps[ok]
        lx = np.log(xs)
        inter = float(np.mean(np.log(ks[ok]) - slope * lx))
        ax.plot(xs, np.exp(inter + slope * lx), "-", color=GREEN, lw=1.5, gid="fit",
                label=f"fit: k* ∝ t^{slope:.2f}")
        b_last = st["b"][-1]
        if np.isfinite(b_last) and b_last > 0:
            expo = 1.0 / float(b_last)
            anchor = float(np.log(ks[ok][-1]) - expo * lx[-1])
            ax.plot(xs, np.exp(anchor + expo * lx), "--", color=RED, lw=1.3, gid="theory",
                    label=f"theory (NTK): k* ∝ t^(1/b) = t^{expo:.2f}")
    elif np.any(np.isfinite(ks)):
        ax.text(0.03, 0.9, "too few checkpoints with a frontier for a slope", transform=ax.transAxes,
                fontsize=8, color=RED)
    else:
        # nothing to plot: without this the panel autoscales to an empty 1..10 by -0.05..0.05 frame that
        # reads as data; give it the other panels' steps and say why it is empty
        ax.set_xlim(axes[1].get_xlim())
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no layer shows a frontier\nin any checkpoint", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color=RED)
    for a_ in axes:
        if any(len(line.get_xdata()) for line in a_.get_lines()):
            a_.legend(fontsize=7)
    fig.suptitle(f"Training series: {len(entries)} checkpoints", fontsize=11)
    return fig
