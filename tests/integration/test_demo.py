"""``specprune demo`` from the installed CLI: the whole pipeline on the embedded default finishes and
writes the compressed model, the sweep, the report and figures whose content matches the numbers."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "specprune", "demo", "--out", str(out), "--quiet", "--format",
                          "json"], check=False, capture_output=True, text=True, env=env,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)  # --format json: stdout is one JSON document and nothing else


def test_demo_summary_has_prediction_and_measurement(demo):
    out, doc = demo
    assert doc["output"] == str(out.resolve())
    for key in ("predicted_delta", "predicted_delta_uncertainty", "measured_delta"):
        assert isinstance(doc[key], float) and math.isfinite(doc[key]), key
    assert doc["predicted_delta"] > 0 and doc["measured_delta"] > 0
    ev = json.loads((out / "compressed" / "evaluation.json").read_text())
    assert ev["measured_delta"] == pytest.approx(doc["measured_delta"])
    assert ev["predicted_delta"] == pytest.approx(doc["predicted_delta"])
    s = doc["size"]
    assert s["bits_after"] < s["bits_before"], "the plan compresses the model"
    measured = [p for p in doc["sweep"] if p["measured_delta"] is not None]
    assert len(measured) >= 4 and all(p["predicted_delta"] is not None for p in measured)
    assert not (out / "INCOMPLETE").exists()
    assert json.loads((out / "summary.json").read_text())["report"] == doc["report"]


def test_demo_writes_model_data_and_report(demo):
    out, doc = demo
    assert (out / "data" / "calibration.txt").stat().st_size > 10_000
    for f in ("model.safetensors", "plan.json", "specprune.json", "analysis/analysis.json",
              "analysis/spectra.safetensors"):
        assert (out / "compressed" / f).is_file(), f
    report = Path(doc["report"])
    assert report == out.resolve() / "report" / "report.html" and report.is_file()
    names = {Path(f).name for f in doc["figures"]}
    assert names == {"spectra.png", "mode_energy.png", "layer_map.png", "pruning_curve.png", "bits.png",
                     "predicted_vs_measured.png"}
    html = report.read_text(encoding="utf-8")
    for name in names:
        png = (report.parent / name).read_bytes()
        assert base64.b64encode(png).decode() in html, f"{name} not embedded"
    assert f"{doc['measured_delta']:.4g}" in html


def test_demo_figures_have_content(demo):
    """The PNGs are real plots (not blank), and the figures redrawn from the demo's files hold its data."""
    from matplotlib.image import imread

    from specprune.analysis import Analysis
    from specprune.report.document import comparison_points
    from specprune.report.figures import bits_figure, predicted_vs_measured_figure, pruning_curve_figure

    out, doc = demo
    for f in doc["figures"]:
        img = imread(f)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 400
        ink = np.any(img < 0.9, axis=-1).mean()
        colour = ((img.max(-1) - img.min(-1)) > 0.2).mean()
        assert ink > 0.03 and colour > 0.002, f"{f}: {ink:.1%} ink, {colour:.1%} colour"
    analysis = Analysis.load(out / "compressed" / "analysis")
    plan = json.loads((out / "compressed" / "plan.json").read_text())
    ev = json.loads((out / "compressed" / "evaluation.json").read_text())
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    ax = pruning_curve_figure(analysis, plan, sweep).axes[0]
    meas = [a for a in ax.lines if a.get_gid() == "measured"]
    assert len(meas[0].get_xdata()) == sum(p["kind"] == "rank" for p in sweep["points"])
    ax = bits_figure(sweep, plan).axes[0]
    meas = [a for a in ax.lines if a.get_gid() == "measured"]
    assert len(meas[0].get_xdata()) == sum(p["kind"] == "bits" and p["measured_delta"] is not None
                                           for p in sweep["points"])
    pts = comparison_points(ev, plan, sweep)
    ax = predicted_vs_measured_figure(pts).axes[0]
    n = int(re.search(r"(\d+) of (\d+) agree within", ax.get_title()).group(2))
    assert n == len(pts) >= 5


def test_demo_without_minilm_trains_its_own_model(tmp_path):
    """The fallback default: a small Llama trained by the demo (lm-loss metric), --fast settings."""
    out = tmp_path / "llama"
    res = subprocess.run([sys.executable, "-m", "specprune", "demo", "--model", "llama", "--fast", "--out", str(out),
                          "--format", "json", "--quiet"], check=False, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr == "", "--quiet: no progress bars (transformers' 'Writing model shards' leaked, QA F15)"
    doc = json.loads(res.stdout)
    assert doc["metric"] == "lm-loss" and doc["model_label"].startswith("small Llama")
    assert (out / "model" / "config.json").is_file() and (out / "model" / "training.json").is_file()
    assert math.isfinite(doc["measured_delta"]) and doc["predicted_delta"] > 0
    assert doc["measured_delta"] <= doc["tolerance"] + doc["predicted_delta_uncertainty"]
    assert Path(doc["report"]).is_file() and len(doc["figures"]) == 6
