"""Figures (checked for content: axes, scales, data, markers) and the report document/CLI.

Inputs are made by the real stages: a synthetic training run with a known frontier
(:mod:`specprune.synthetic` → :func:`specprune.spectra.compute_spectrum`), and ``compress`` of a
tiny BERT on generated text plus the demo's sweep of uniform settings."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_hash

# ----------------------------------------------------------------------------------------- inputs
B_TRUE = 2.0


def synthetic_layer_dict(k_star: float, name: str = "blocks.0.fc", seed: int = 1, d: int = 128) -> dict:
    """A layer dict (analysis.json fields + arrays) of a synthetic layer whose true frontier is k_star."""
    from specprune.spectra import compute_spectrum
    from specprune.synthetic import synthetic_layer, time_for_frontier

    t = time_for_frontier(k_star, B_TRUE)
    gram, n, w, _, _ = synthetic_layer(d, 64, 1.5, B_TRUE, t, init_std=1 / math.sqrt(d), tokens=20 * d, seed=seed)
    spec = compute_spectrum(gram, n, w, keep_eigenvectors=False)
    return {"name": name, "type": "Linear", **spec.summary_dict(), "eigenvalues": spec.eigenvalues,
            "mode_energy": spec.mode_energy}


@pytest.fixture(scope="module")
def synthetic_series() -> list[dict]:
    """Four checkpoints of one synthetic run (k* = 6, 12, 24, 48 ⇒ t ∝ k*^b), two layers each."""
    from specprune.synthetic import time_for_frontier

    out = []
    for k in (6, 12, 24, 48):
        layers = [synthetic_layer_dict(k, f"blocks.{i}.fc", seed=i + 1) for i in range(2)]
        out.append({"step": round(time_for_frontier(k, B_TRUE)), "model": f"ckpt-{k}",
                    "analysis": {"layers": layers}})
    return out


@pytest.fixture(scope="module")
def frontier_layer(synthetic_series) -> dict:
    lay = synthetic_series[2]["analysis"]["layers"][0]
    assert lay["k_star"] is not None, "the synthetic layer must have a detected frontier"
    return lay


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    from specprune.textgen import write_text

    return write_text(tmp_path_factory.mktemp("short") / "short.txt", max_words=3000)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_dirs, short_text):
    """A real ``compress`` output of tiny BERT (analysis/, plan.json, evaluation.json) and the demo's
    sweep (sweep/sweep.json) measured on the same held-apart windows."""
    from specprune.demo import DemoSettings, run_sweep
    from specprune.io import dumps
    from specprune.models import load_model
    from specprune.pipeline import DataSpec, compress

    root = tmp_path_factory.mktemp("report-inputs")
    src = str(tiny_dirs["bert"])
    spec = DataSpec([str(short_text)], None, 16, 32, 8, 0)
    out = root / "compressed"
    compress(load_model(src), spec, 0.05, out, inputs=[src, str(short_text)])
    settings = DemoSettings.make(0.05, fast=True)
    sweep = run_sweep(src, out / "analysis", out / "plan.json", spec, settings)
    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.json").write_text(dumps(sweep), encoding="utf-8")
    return {"root": root, "compressed": out, "sweep_dir": root / "sweep", "sweep": sweep, "settings": settings}


@pytest.fixture(scope="module")
def analysis(compressed):
    from specprune.analysis import Analysis

    return Analysis.load(compressed["compressed"] / "analysis")


@pytest.fixture(scope="module")
def plan_doc(compressed) -> dict:
    return json.loads((compressed["compressed"] / "plan.json").read_text())


def _gid(ax, gid: str) -> list:
    return [a for a in [*ax.lines, *ax.collections, *ax.texts, *ax.patches] if a.get_gid() == gid]


# -------------------------------------------------------------------------------------- figures
def test_import_does_not_pull_matplotlib():
    code = ("import sys, specprune, specprune.report, specprune.cli.app; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spectrum_figure_shows_data_fits_and_frontier(frontier_layer):
    from specprune.report.figures import spectrum_figure

    fig = spectrum_figure(frontier_layer)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "mode k" and "share" in ax.get_ylabel()
    d = frontier_layer["d_in"]
    data = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("data_")]
    assert len(data) == 2 and all(len(ln.get_xdata()) == d for ln in data)
    lam = np.asarray(frontier_layer["eigenvalues"])
    np.testing.assert_allclose(data[0].get_ydata(), lam / lam.sum())
    fits = _gid(ax, "fit")
    assert len(fits) == 2
    # the drawn b-fit has log-log slope −b over the fitted range
    x, y = fits[0].get_xdata(), fits[0].get_ydata()
    assert np.polyfit(np.log(x), np.log(y), 1)[0] == pytest.approx(-frontier_layer["b"], rel=1e-6)
    assert x.min() == frontier_layer["fit"]["b"]["k_lo"]
    (ks,) = _gid(ax, "k_star")
    assert ks.get_xdata()[0] == frontier_layer["k_star"]
    assert _gid(ax, "k_star_band"), "uncertainty range of k* not shaded"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith(f"k* = {frontier_layer['k_star']}") for t in labels)
    assert any("b = " in t for t in labels) and any("a = " in t for t in labels)


def test_spectrum_figure_without_frontier_says_so(frontier_layer):
    from specprune.report.figures import spectrum_figure

    lay = dict(frontier_layer, k_star=None, r_star=None)
    ax = spectrum_figure(lay).axes[0]
    assert not _gid(ax, "k_star")
    assert any("no frontier" in t.get_text() for t in ax.texts)


def test_spectrum_figure_needs_arrays(frontier_layer):
    from specprune.report.figures import spectrum_figure

    lay = {k: v for k, v in frontier_layer.items() if k not in ("eigenvalues", "mode_energy")}
    with pytest.raises(ValueError, match="no saved spectrum"):
        spectrum_figure(lay)


def test_spectrum_figure_draws_into_given_axes(frontier_layer):
    from specprune.report.figures import _figure, spectrum_figure

    fig = _figure((8, 3))
    axes = fig.subplots(1, 2)
    assert spectrum_figure(frontier_layer, ax=axes[1]) is fig
    assert not axes[0].lines and axes[1].lines


def test_spectra_grid_of_real_analysis(analysis):
    from specprune.report.figures import spectra_figure

    fig = spectra_figure(analysis, max_layers=4)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(visible) == 4
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in visible)
    names = {lay.name for lay in analysis.layers}
    assert all(ax.get_title().split("\n")[0].lstrip("…") in " ".join(names) for ax in visible)


def test_mode_energy_figure(analysis):
    from specprune.report.figures import mode_energy_figure

    fig = mode_energy_figure(analysis)
    ax = fig.axes[0]
    lines = _gid(ax, "layer")
    assert len(lines) == len(analysis.layers)
    bars = [a for a in fig.axes if a.get_gid() == "depth_colorbar"]
    assert len(bars) == 1 and "layer" in bars[0].get_ylabel()  # which colour is which layer
    for ln in lines:
        y = np.asarray(ln.get_ydata())
        assert y[-1] == pytest.approx(1.0) and np.all(np.diff(y) >= -1e-12)
    n_front = sum(lay.k_star is not None for lay in analysis.layers)
    marks = _gid(ax, "k_star")
    assert (len(marks[0].get_xdata()) if marks else 0) == n_front
    assert ax.get_xscale() == "log" and "captured" in ax.get_ylabel()


def test_mode_energy_marks_every_frontier(synthetic_series):
    from specprune.report.figures import mode_energy_figure

    layers = [lay for e in synthetic_series for lay in e["analysis"]["layers"]]
    ax = mode_energy_figure({"layers": layers}).axes[0]
    (marks,) = _gid(ax, "k_star")
    expected = sorted(lay["k_star"] / lay["k_max"] for lay in layers if lay["k_star"] is not None)
    assert sorted(marks.get_xdata()) == pytest.approx(expected)


def test_pruning_curve_uncalibrated_is_the_energy_tail(analysis):
    from specprune.report.figures import predicted_pruning_curve, pruning_curve_figure

    curve = predicted_pruning_curve(analysis, keep=[1.0, 0.5, 0.1])
    e = [np.clip(lay.mode_energy, 0, None) for lay in analysis.layers]
    k = [round(0.5 * lay.k_max) for lay in analysis.layers]
    expect = sum(x[kk:].sum() for x, kk in zip(e, k)) / sum(x.sum() for x in e)
    assert curve["delta"][0] == 0.0 and curve["delta"][1] == pytest.approx(expect)
    assert curve["delta"][2] > curve["delta"][1] and not curve["calibrated"]
    ax = pruning_curve_figure(analysis).axes[0]
    (line,) = _gid(ax, "predicted")
    y = np.asarray(line.get_ydata())
    assert np.all(np.diff(y) <= 1e-12), "keeping more modes can only lower the predicted metric"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_pruning_curve_calibrated_with_measured_points(analysis, plan_doc, compressed):
    from specprune.report.figures import predicted_pruning_curve, pruning_curve_figure

    cm = plan_doc["details"]["truncation_map"]  # truncations have their own map
    sens = plan_doc["details"]["sensitivities"]
    curve = predicted_pruning_curve(analysis, plan_doc, keep=[0.5])
    raw = 0.0  # the recommender's response model, δ_l = s_l·D_l^q_l, summed over the planned layers
    for lay in analysis.layers:
        s = sens[lay.name]
        d = float(np.clip(lay.mode_energy, 0, None)[round(0.5 * lay.k_max):].sum())
        if s.get("prune") is not None:
            coef, power = s["prune"], s["prune_power"]
        else:
            coef, power = s["quant"], s.get("power", 1.0)
        raw += coef * d ** power if d > 0 else 0.0
    assert curve["calibrated"]
    assert curve["delta"][0] == pytest.approx(cm["c"] * raw ** cm["p"])
    assert curve["hi"][0] / curve["delta"][0] == pytest.approx(math.exp(cm["sigma"]))
    ax = pruning_curve_figure(analysis, plan_doc, compressed["sweep"]).axes[0]
    (meas,) = _gid(ax, "measured")
    ranks = [p for p in compressed["sweep"]["points"] if p["kind"] == "rank"]
    assert sorted(meas.get_xdata()) == pytest.approx(sorted(p["keep_fraction"] for p in ranks))
    assert sorted(meas.get_ydata()) == pytest.approx(sorted(1 + p["measured_delta"] for p in ranks))
    assert {t.get_text() for t in _gid(ax, "phase")} >= {"saturation"}
    assert ax.collections, "uncertainty band missing"


def test_sweep_is_predicted_and_measured(compressed):
    sweep = compressed["sweep"]
    s = compressed["settings"]
    bits = {p["bits"]: p for p in sweep["points"] if p["kind"] == "bits"}
    assert set(bits) == set(s.sweep_bits_predicted) | set(s.sweep_bits_measured)
    assert all(bits[b]["measured_delta"] is not None for b in s.sweep_bits_measured)
    preds = [bits[b]["predicted_delta"] for b in sorted(bits)]
    assert all(x > y for x, y in itertools.pairwise(preds)), "more bits must predict a smaller delta"
    assert bits[4]["measured_delta"] > bits[8]["measured_delta"] > 0
    for p in sweep["points"]:
        if p["measured_delta"] is not None:  # the calibrated prediction is the right order of magnitude
            assert 0.1 < p["predicted_delta"] / p["measured_delta"] < 10, p
    assert sweep["eval_windows"] > 0 and sweep["metric"] == "output-mse"


def test_bits_figure_from_sweep(compressed, plan_doc):
    from specprune.report.figures import bits_figure

    sweep = compressed["sweep"]
    ax = bits_figure(sweep, plan_doc).axes[0]
    (pred,) = _gid(ax, "predicted")
    bits = sorted(p["bits"] for p in sweep["points"] if p["kind"] == "bits")
    assert list(pred.get_xdata()) == bits
    (meas,) = _gid(ax, "measured")
    measured = sorted(p["bits"] for p in sweep["points"] if p["kind"] == "bits" and p["measured_delta"] is not None)
    assert sorted(meas.get_xdata()) == measured
    (tol,) = _gid(ax, "tolerance")
    assert tol.get_ydata()[0] == pytest.approx(plan_doc["tolerance"])
    assert ax.get_yscale() == "log" and "bits" in ax.get_xlabel()


def test_bits_figure_reports_nonpositive_measurements():
    from specprune.report.figures import bits_figure

    sweep = {"points": [
        {"kind": "bits", "bits": 8, "predicted_delta": 1e-4, "predicted_delta_uncertainty": 1e-5, "measured_delta": -2e-5},
        {"kind": "bits", "bits": 4, "predicted_delta": 1e-2, "predicted_delta_uncertainty": 1e-3, "measured_delta": 0.012},
    ]}
    ax = bits_figure(sweep).axes[0]
    (meas,) = _gid(ax, "measured")
    assert list(meas.get_xdata()) == [4] and list(meas.get_ydata()) == [0.012]
    (note,) = _gid(ax, "nonpositive")
    assert "int8" in note.get_text()
    assert not _gid(ax, "tolerance"), "no plan, no tolerance line"


def test_bits_figure_falls_back_to_calibration_points(plan_doc):
    from specprune.report.figures import bits_figure

    ax = bits_figure(None, plan_doc).axes[0]
    cal = [p for p in plan_doc["details"]["calibration_map"]["points"] if p["setting"].startswith("uniform bits")]
    (meas,) = _gid(ax, "measured")
    assert len(meas.get_xdata()) == len(cal)
    assert "in-sample" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(ValueError):
        bits_figure(None, dict(plan_doc, calibrated=False))


def test_predicted_vs_measured_figure():
    from specprune.report.figures import predicted_vs_measured_figure

    pts = [{"label": "plan", "kind": "plan", "predicted": 0.01, "uncertainty": 0.002, "measured": 0.011},
           {"label": "int4", "kind": "bits", "predicted": 0.2, "uncertainty": 0.01, "measured": 0.5},
           {"label": "none", "kind": "bits", "predicted": None, "uncertainty": None, "measured": 0.5}]
    ax = predicted_vs_measured_figure(pts).axes[0]
    assert _gid(ax, "identity")
    assert "1 of 2 agree within" in ax.get_title()
    assert ax.get_xscale() == ax.get_yscale() == "log"
    with pytest.raises(ValueError):
        predicted_vs_measured_figure(pts[2:])
    # a measurement's own sampling error counts: int4 measured 0.5 ± 2·0.15 agrees with 0.2 ± 0.01
    noisy = [dict(pts[0]), {**pts[1], "measured_stderr": 0.15}]
    assert "2 of 2 agree within" in predicted_vs_measured_figure(noisy).axes[0].get_title()


def test_point_labels_never_overlap_and_coincident_points_share_one():
    """The demo's crowded case: the plan lands on a uniform setting's point, and neighbours crowd the
    diagonal; every label is drawn once, no two label boxes overlap, none covers a marker."""
    from specprune.report.figures import predicted_vs_measured_figure

    pts = [{"label": "plan", "kind": "plan", "predicted": 0.0135, "uncertainty": 0.003, "measured": 0.0142},
           {"label": "int6", "kind": "bits", "predicted": 0.0136, "uncertainty": 0.004, "measured": 0.0141}]
    pts += [{"label": f"keep {k}% of modes", "kind": "rank", "predicted": p, "uncertainty": 0.3 * p,
             "measured": m} for k, p, m in ((90, 0.05, 0.048), (75, 0.15, 0.14), (50, 0.42, 0.34), (25, 1.05, 0.7))]
    pts += [{"label": f"int{b}", "kind": "bits", "predicted": p, "uncertainty": 0.3 * p, "measured": m}
            for b, p, m in ((8, 0.0012, 0.0011), (4, 0.19, 0.22), (3, 0.95, 1.15))]
    fig = predicted_vs_measured_figure(pts)
    ax = fig.axes[0]
    labels = _gid(ax, "label")
    assert sorted(t.get_text() for t in labels) == sorted(
        ["plan, int6"] + [p["label"] for p in pts[2:]])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in labels]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    markers = ax.transData.transform([(p["predicted"], p["measured"]) for p in pts])
    assert all(b.count_contains(markers) == 0 for b in boxes)
    legend = ax.get_legend().get_window_extent(r)
    assert not any(b.overlaps(legend) for b in boxes)


def test_within_counts_the_measurement_noise():
    from specprune.report.document import within

    assert within({"predicted": 0.01, "uncertainty": 0.001, "measured": 0.0125}) is False
    assert within({"predicted": 0.01, "uncertainty": 0.001, "measured": 0.0125, "measured_stderr": 0.001}) is True
    assert within({"predicted": 0.01, "uncertainty": 0.001, "measured": 0.0125, "measured_stderr": None}) is False
    assert within({"predicted": None, "uncertainty": 0.001, "measured": 0.0125}) is None


def test_agreement_note_names_a_systematic_shift():
    from specprune.report.document import agreement_note

    over = [{"predicted": p, "uncertainty": 0.1 * p, "measured": 0.6 * p} for p in (0.001, 0.01, 0.02, 0.1)]
    note = agreement_note(over)
    assert note.startswith("0 of 4 measurements agree with their prediction")
    assert "a median ×0.60 of the predicted ones" in note
    assert "Most measurements lie below their predictions" in note and "not such a shift" in note
    fine = [{"predicted": p, "uncertainty": 0.2 * p, "measured": m * p}
            for p, m in ((0.001, 1.1), (0.01, 0.95), (0.02, 1.3), (0.1, 1.05))]
    note = agreement_note(fine)
    assert note.startswith("3 of 4 measurements agree") and "Most measurements" not in note
    assert agreement_note(fine[:1]) is None


def test_layer_map_figure(plan_doc, analysis):
    from specprune.report.figures import layer_map_figure, split_block

    fig = layer_map_figure(plan_doc, analysis)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    layers = plan_doc["layers"]
    n_bits = sum(lp["bits"] is not None for lp in layers.values())
    assert len(_gid(panels[0], "cell")) == len(layers)
    assert len(_gid(panels[1], "cell")) == n_bits
    assert len(_gid(panels[2], "cell")) == sum(lay.r_star is not None for lay in analysis.layers)
    blocks = {split_block(n)[0] for n in layers} - {None}
    rows = [t.get_text() for t in panels[0].get_yticklabels()]
    assert [r for r in rows if r.startswith("block")] == [f"block {b}" for b in sorted(blocks)]
    assert len(layer_map_figure(plan_doc).axes) == 4  # 2 panels + 2 colour bars without an analysis


def test_split_block():
    from specprune.report.figures import split_block

    assert split_block("encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert split_block("model.layers.12.mlp.down_proj") == (12, "mlp.down_proj")
    assert split_block("pooler.dense") == (None, "pooler.dense")
    assert split_block("fc") == (None, "fc")


def test_series_figure_recovers_the_frontier_growth(synthetic_series):
    from specprune.report.figures import series_figure

    fig = series_figure(synthetic_series)
    ax_k, ax_b, ax_a = fig.axes[:3]
    assert ax_k.get_xscale() == "log" and ax_k.get_yscale() == "log"
    (meas,) = _gid(ax_k, "measured")
    assert len(meas.get_xdata()) == len(synthetic_series)
    (fit,) = _gid(ax_k, "fit")
    slope = float(re.search(r"t\^([-0-9.]+)", fit.get_label()).group(1))
    assert slope == pytest.approx(1 / B_TRUE, abs=0.06), "k* ∝ t^(1/b) for NTK dynamics"
    (theory,) = _gid(ax_k, "theory")
    assert "1/b" in theory.get_label()
    (b_pts,) = _gid(ax_b, "measured")
    assert np.allclose(b_pts.get_ydata(), B_TRUE, atol=0.15)
    assert _gid(ax_a, "measured")
    with pytest.raises(ValueError):
        series_figure(synthetic_series[:1])


# --------------------------------------------------------------------------------------- document
def _check_report(out: Path) -> tuple[str, str]:
    html = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="([^"]+)"', html)
    assert sorted(name for _, name in uris) == pngs, "every PNG is embedded exactly once"
    for data, name in uris:
        assert base64.b64decode(data) == (out / name).read_bytes()
    assert html.count("<img") == len(pngs)
    assert not re.search(r"(src|href)=\"(?!data:)", html), "no external resources"
    assert "<script" not in html.lower()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == pngs and all((out / f).is_file() for f in linked)
    return html, md


def test_report_of_compress_dir(compressed, tmp_path):
    from specprune.report.document import write_report

    before = tree_hash(compressed["root"])
    out = tmp_path / "rep"
    res = write_report([compressed["compressed"], compressed["sweep_dir"]], out)
    assert tree_hash(compressed["root"]) == before, "inputs must never change"
    html, md = _check_report(out)
    assert res["sections"][:3] == ["What was analysed", "What is recommended and why", "What was measured"]
    assert {Path(f).name for f in res["figures"]} >= {"spectra.png", "mode_energy.png", "layer_map.png",
                                                      "pruning_curve.png", "bits.png", "predicted_vs_measured.png"}
    assert sorted(res["files"]) == sorted(p.name for p in out.iterdir())
    ev = json.loads((compressed["compressed"] / "evaluation.json").read_text())
    assert f"{ev['measured_delta']:.4g}" in html and f"{ev['measured_delta']:.4g}" in md
    # the prose says where the headline prediction comes from: the map's, or the plan's own measurement
    plan = json.loads((compressed["compressed"] / "plan.json").read_text())
    model_pred = plan["details"]["model_prediction"]
    assert f"for this plan it predicted {model_pred:.4g}" in md
    if abs(model_pred - plan["predicted_delta"]) > 1e-12 * plan["predicted_delta"]:
        assert f"and that measurement ({plan['predicted_delta']:.4g}) is its predicted delta above" in md
    assert re.search(r"\d+ of \d+ measurements agree with their prediction", md)
    # output-mse's two values are different quantities, and say so
    assert ev["metric"] == "output-mse"
    assert f"- **reference output energy (mean ‖f(x)‖² per position)**: {ev['reference_value']:.5g}" in md
    assert f"- **output error (mean ‖f̃(x) − f(x)‖² per position)**: {ev['value']:.5g}" in md
    # reads top-down
    pos = [html.index(s) for s in ("What was analysed", "What is recommended and why", "What was measured")]
    assert pos == sorted(pos)
    layers = json.loads((compressed["compressed"] / "analysis" / "analysis.json").read_text())["layers"]
    for lay in layers:
        assert lay["name"] in html
    # every kind of flag the analysis raised is reported, with how many layers carry it
    kinds = {}
    for lay in layers:
        for flag in lay["flags"]:
            kinds.setdefault(flag.split(":")[0], []).append(lay["name"])
    assert kinds, "the tiny calibration (16 x 32 tokens) leaves wide inputs undersampled"
    for kind, names in kinds.items():
        assert re.search(rf"<td>{kind}</td>\s*<td>{len(names)}</td>", html), kind
        assert f"| {kind} | {len(names)} |" in md, kind


def test_compress_writes_its_own_report(compressed):
    """compress: "all of the above + report" — figures and the report inside the same atomic output, naming
    its inputs where they ended up (not the temporary directory they were written in)."""
    out = compressed["compressed"]
    html, md = _check_report(out / "report")
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["report"] == str(out / "report" / "report.html")
    assert f"{ev['measured_delta']:.4g}" in html and ".tmp-" not in html + md
    assert str(out / "plan.json") in md
    assert {p.name for p in (out / "report").glob("*.png")} >= {"spectra.png", "layer_map.png"}


def test_report_refuses_unsafe_outputs(compressed, tmp_path):
    from specprune.errors import RefusedError
    from specprune.report.document import write_report

    with pytest.raises(RefusedError):
        write_report([compressed["compressed"]], compressed["compressed"] / "report")
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(RefusedError):
        write_report([compressed["compressed"]], out)
    write_report([compressed["compressed"] / "plan.json"], out, overwrite=True)
    html, _ = _check_report(out)
    assert "What is recommended and why" in html and "What was analysed" not in html


def test_collect_finds_inputs_and_rejects_empty(compressed, tmp_path):
    from specprune.errors import InputError
    from specprune.report.document import collect

    inp = collect([compressed["root"]])
    assert inp.analysis is not None and inp.plan is not None and inp.evaluation is not None
    assert inp.sweep is not None
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        collect([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "plan.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        collect([bad])


class _Result:
    def __init__(self, res):
        self.returncode, self.stdout, self.stderr = res.exit_code, res.stdout, res.stderr


def _cli(*args) -> _Result:
    """The CLI in-process (click's runner keeps stdout and stderr apart)."""
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return _Result(CliRunner().invoke(app, [str(a) for a in args]))


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory, tokenizer, short_text) -> Path:
    """``specprune analyze ckpt-5 ckpt-40 ckpt-200 --out series``: checkpoints of a real (tiny) training run."""
    import torch

    from specprune.toy import tiny_model

    root = tmp_path_factory.mktemp("series")
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden=32, layers=1)
    ids = tokenizer(short_text.read_text(), add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids[: len(ids) // 32 * 32]).reshape(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    ckpts = []
    for step in range(1, 201):
        batch = data[torch.randint(0, data.shape[0], (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (5, 40, 200):
            d = root / f"ckpt-{step}"
            model.save_pretrained(str(d))
            tokenizer.save_pretrained(str(d))
            ckpts.append(d)
    r = _cli("analyze", *ckpts, "--data", short_text, "--samples", 16, "--seq-len", 32, "--include", "q_proj",
             "--include", "down_proj", "--out", root / "series", "--format", "json")
    assert r.returncode == 0, r.stderr
    return root / "series"


def test_cli_report_of_series(series_dir):
    r = _cli("report", series_dir, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    out = Path(doc["output"])
    assert out == series_dir.parent / "series-report"
    assert "Training series" in doc["sections"] and "What was analysed" not in doc["sections"]
    assert [Path(f).name for f in doc["figures"]] == ["series.png"]
    html, _ = _check_report(out)
    steps = [e["step"] for e in json.loads((series_dir / "series.json").read_text())["series"]]
    assert steps == [5, 40, 200]
    for s in steps:
        assert f"<td>{s}</td>" in html


def test_cli_report_errors_and_quiet(compressed, tmp_path):
    r = _cli("report", tmp_path / "missing")
    assert r.returncode == 1 and r.stderr.startswith("specprune: error:") and "Traceback" not in r.stderr
    r = _cli("report", compressed["compressed"], "--out", compressed["compressed"] / "inside")
    assert r.returncode == 1 and "input" in r.stderr
    r = _cli("report", compressed["compressed"], "--out", tmp_path / "q", "--quiet")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "q" / "report.html")
    r = _cli("report", compressed["compressed"], "--out", tmp_path / "q")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    r = _cli("report", "--help")
    assert r.returncode == 0 and "Examples" in r.stdout


def test_demo_directory_is_whole_or_nothing(tmp_path):
    from specprune.demo import MARKER, default_out, demo_directory
    from specprune.errors import RefusedError

    out = tmp_path / "d"
    with pytest.raises(RuntimeError), demo_directory(out) as d:
        assert (d / MARKER).exists()
        raise RuntimeError("boom")
    assert not out.exists()
    with demo_directory(out) as d:
        (d / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first" and not (out / MARKER).exists()
    with pytest.raises(RefusedError), demo_directory(out):
        pass
    with pytest.raises(RuntimeError), demo_directory(out, overwrite=True) as d:
        assert not (d / "a.txt").exists()
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first", "a failed --overwrite puts the old output back"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no temporary leftovers"
    assert re.fullmatch(r"specprune-demo-\d{8}-\d{6}", default_out().name)


def test_demo_settings():
    from specprune.demo import DemoSettings
    from specprune.errors import InputError

    full, fast = DemoSettings.make(), DemoSettings.make(fast=True, model="llama")
    assert fast.samples < full.samples and fast.model == "llama" and full.model == "auto"
    assert set(fast.sweep_bits_measured) <= set(fast.sweep_bits_predicted)
    assert DemoSettings.make(samples=10).samples == 10
    with pytest.raises(InputError, match="--model"):
        DemoSettings.make(model="gpt5")


def test_report_names_how_the_sensitivities_and_the_verification_were_made(compressed, plan_doc):
    """The report's account of the plan follows plan.details: gradient sensitivities are not described as
    injected weight changes, and the verification windows are named."""
    text = (compressed["compressed"] / "report" / "report.md").read_text(encoding="utf-8")
    assert plan_doc["details"]["sensitivity"].startswith("gradient")
    assert "Gauss–Newton curvature" in text and "injecting" not in text
    assert f"calibration windows ({plan_doc['details']['verification_windows']})" in text
    assert plan_doc["details"]["verification_windows"].endswith("held out of the analysis")


def test_demo_table_says_which_measurements_agree(capsys):
    """The demo's human table: each measurement with its two standard errors, whether it agrees with the
    prediction, and the agreement paragraph (here a systematic shift: measured ×0.6 of predicted)."""
    from specprune.cli.demo import render_demo

    doc = {"model_label": "x", "metric": "lm-loss", "tolerance": 0.02, "predicted_delta": 0.01175,
           "predicted_delta_uncertainty": 0.0018, "measured_delta": 0.00857, "measured_delta_stderr": 0.0004,
           "sweep": [{"setting": "int4", "predicted_delta": 0.00109, "predicted_delta_uncertainty": 0.00023,
                      "measured_delta": 0.000541, "measured_delta_stderr": 0.0001},
                     {"setting": "keep 40%", "predicted_delta": 0.0175, "predicted_delta_uncertainty": 0.0067,
                      "measured_delta": 0.0130, "measured_delta_stderr": 0.0005},
                     {"setting": "int3", "predicted_delta": 0.01, "predicted_delta_uncertainty": 0.003,
                      "measured_delta": None}],
           "size": {"bits_before": 8e6, "bits_after": 4e6}, "compressed": "c", "report": "r", "seconds": 3}
    render_demo(doc)
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert "0.00857 ± 0.0008" in rows["recommended plan (tolerance 0.02)"] and " no " in rows[
        "recommended plan (tolerance 0.02)"]
    assert " yes " in rows["uniform keep 40%"] and " no " in rows["uniform int4"]
    assert "uniform int3" not in rows  # not measured
    assert "1 of 3 measurements agree with their prediction" in " ".join(out.split())


def test_report_warns_about_inputs_that_do_not_belong_together(compressed, tmp_path):
    """A plan made for other weights than the analysis is named (the report would mix two models), and a
    second directory's files that were not used are reported on stderr, not only in the JSON."""
    import shutil

    from typer.testing import CliRunner

    from specprune.cli.app import app

    src = compressed["compressed"]
    other = tmp_path / "other"
    other.mkdir()
    plan = json.loads((src / "plan.json").read_text())
    plan["model"]["fingerprint"] = "sha256:" + "0" * 32
    (other / "plan.json").write_text(json.dumps(plan))
    shutil.copytree(src / "analysis", other / "analysis")
    res = CliRunner().invoke(app, ["report", str(other), "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.stderr
    assert "specprune: warning: the plan (" in res.stderr and "this report mixes two models" in res.stderr
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "Warning: the plan (" in md
    # two compress directories: the second one's files are reported as skipped
    res = CliRunner().invoke(app, ["report", str(src), str(other), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.stderr
    assert "specprune: warning: skipped " in res.stderr and "(an analysis was already read from" in res.stderr
