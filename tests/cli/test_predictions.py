"""A plan's prediction is never a silent 0 ± 0: when the verification measurement does not stand out of
zero, the maps' prediction stands with an honest uncertainty, and the per-layer shares (never negative)
add up to it. Plans that predict nothing say so (``Plan.prediction`` is None)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from specprune.cli.app import app
from specprune.plan import Plan

FAST = ["--samples", "8", "--seq-len", "32", "--batch-size", "4"]


def test_noise_level_tolerance_keeps_a_real_prediction(tmp_path, tiny_dirs, text_file):
    """tiny random GPT-2, lm-loss on 8 windows: quantization moves the loss by less than its noise, so the
    verification measures ≤ 0; before, the plan then claimed 0 ± 0 with negative per-layer shares."""
    res = CliRunner().invoke(app, ["compress", str(tiny_dirs["gpt2"]), "--data", str(text_file), "--tolerance",
                                   "1e-9", "--out", str(tmp_path / "c"), *FAST, "--quiet"])
    assert res.exit_code in (0, 3), res.stderr
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    shares = [lp["predicted_delta"] for lp in plan["layers"].values()]
    assert plan["metric"] == "lm-loss"
    changed = [n for n, lp in plan["layers"].items() if lp["bits"] is not None or lp["rank"] is not None]
    if changed:  # a plan that compresses something predicts a positive delta, with an uncertainty
        assert plan["predicted_delta"] > 0 and plan["predicted_delta_uncertainty"] > 0
    else:  # nothing fits under such a tolerance: nothing is changed, and nothing is predicted
        assert plan["predicted_delta"] == 0
    assert all(s >= 0 for s in shares)
    assert sum(shares) == pytest.approx(plan["predicted_delta"], rel=1e-9, abs=1e-15)
    # a uniform setting whose loss fell on the calibration windows (noise) is no evidence that it meets
    # a tolerance far below its predicted delta: before, "uniform bits 3" won with 0 ± 0
    assert not plan["details"]["chosen"].startswith("uniform"), plan["details"]["chosen"]
    verified = plan["details"]["verification"]
    if verified and verified[-1]["measured_on_calibration"] <= 0:
        assert plan["predicted_delta_uncertainty"] >= plan["predicted_delta"] - \
            verified[-1]["measured_on_calibration"] - 1e-12


def test_plans_without_a_prediction_say_so():
    assert Plan.uniform(["a"], rate=0.5).prediction is None
    assert Plan.from_dict({"format": 1, "layers": {"a": {"bits": 4}}}).prediction is None
    made = Plan.from_dict({"format": 1, "metric": "output-mse", "predicted_delta": 0.01, "layers": {}})
    assert made.prediction == 0.01


def test_plans_are_verified_out_of_the_analysis_sample_and_predict_their_own_metric(tmp_path, tiny_dirs, text_file):
    """compress verifies on calibration windows held out of the analysis (a whitened truncation measured on the
    covariance it was fitted to looks better than it is); evaluate compares the plan's prediction only with a
    measurement of the metric it predicts."""
    out = tmp_path / "c"
    res = CliRunner().invoke(app, ["compress", str(tiny_dirs["gpt2"]), "--data", str(text_file), "--tolerance",
                                   "0.05", "--out", str(out), *FAST])
    assert res.exit_code in (0, 3), res.stderr
    assert "verifying on calibration windows held out of the analysis" in res.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["details"]["verification_windows"] == "8 held out of the analysis"
    same = CliRunner().invoke(app, ["evaluate", str(out), "--data", str(text_file), *FAST, "--format", "json"])
    assert same.exit_code == 0, same.stderr
    assert json.loads(same.stdout)["predicted_delta"] == pytest.approx(plan["predicted_delta"])
    other = CliRunner().invoke(app, ["evaluate", str(out), "--data", str(text_file), *FAST, "--metric", "output-mse",
                                     "--format", "json"])
    assert other.exit_code == 0, other.stderr
    doc = json.loads(other.stdout)
    assert doc["metric"] == "output-mse" and doc["predicted_delta"] is None
    assert doc["prediction_note"] == ("the plan predicts the lm-loss delta, not output-mse: no prediction to "
                                      "compare with")


@pytest.mark.parametrize("doc,expect", [
    ({"layers": {"a": {"method": "spectral", "rank": True}}}, "plan layer a: rank must be a positive integer"),
    ({"layers": {"a": {"bits": 4, "group_size": True}}}, "plan layer a: group_size must be a positive integer"),
    ({"layers": {"a": {"bits": True}}}, "plan layer a: bits must be an integer in 2..8 or null, got True"),
    ({"layers": {"a": {"method": "spectral", "prune_rate": True}}}, "plan layer a: prune_rate must be in [0, 1)"),
    ({"layers": {}, "details": [1, 2]}, "plan: 'model', 'size' and 'details' must be objects"),
])
def test_hand_written_plan_values_of_the_wrong_type_are_refused(doc, expect):
    """JSON true is not the integer 1, and a plan's details are an object (before: accepted as 1; a raw
    TypeError)."""
    from specprune.errors import InputError

    with pytest.raises(InputError) as err:
        Plan.from_dict({"format": 1, **doc})
    assert str(err.value).startswith(expect)


def test_a_plan_nested_too_deeply_is_one_clear_error(tmp_path):
    from specprune.errors import InputError

    (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="its JSON is nested too deeply"):
        Plan.load(tmp_path / "p.json")
