"""The Python API as a notebook or a training script calls it (contract: "Python API"): models in train
mode, the default model of ``recommend``, ``apply_`` without a covariance, data in plain forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import specprune
from specprune.errors import InputError


def _batches(n=4, bs=32, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, d, generator=g) for _ in range(n)]


def _mlp(train: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 8))
    return m.train(train)


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_left_in_train_mode():
    m = _mlp(train=True)
    data = _batches()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    e = specprune.evaluate(m, data, reference=m)
    assert e.measured_delta == 0.0  # no dropout: the model equals itself
    assert specprune.evaluate(m, data).reference_value == specprune.evaluate(m, data).reference_value
    analysis = specprune.analyze(m, data)
    plan = specprune.recommend(analysis, 0.05, model=m, data=data)
    assert all(mod.training for mod in m.modules())
    # BatchNorm statistics untouched by any of it
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    ref = specprune.recommend(analysis, 0.05, model=_mlp(train=False), data=data)
    assert plan.predicted_delta == pytest.approx(ref.predicted_delta, rel=1e-6)
    assert {n: (lp.bits, lp.rank) for n, lp in plan.layers.items()} == \
        {n: (lp.bits, lp.rank) for n, lp in ref.layers.items()}


def test_each_submodule_keeps_its_own_mode():
    """A BatchNorm frozen in eval mode inside a model in train mode stays frozen after analyze."""
    m = _mlp(train=True)
    m[1].eval()
    specprune.analyze(m, _batches())
    specprune.evaluate(m, _batches(), reference=m)
    assert m.training and not m[1].training and m[3].training


def test_recommend_without_a_model_reads_the_analysis_source(tiny_dirs, small_text_file, tmp_path):
    from specprune.data import load_data
    from specprune.models import load_model

    loaded = load_model(str(tiny_dirs["bert"]))
    calib = load_data([small_text_file], loaded.tokenizer, samples=8, seq_len=32, batch_size=4)
    analysis = specprune.analyze(loaded.model, calib, source=loaded.source)
    plan = specprune.recommend(analysis, 0.05, data=calib)
    assert plan.model["source"] == loaded.source
    assert plan.predicted_delta == pytest.approx(
        specprune.recommend(analysis, 0.05, model=loaded.model, data=calib).predicted_delta, rel=1e-9)
    nowhere = specprune.analyze(loaded.model, calib)  # source: the class name, not a path
    with pytest.raises(InputError, match=r"made on an in-memory model \(BertModel\), which only you hold: pass it"):
        specprune.recommend(nowhere, 0.05, data=calib)
    with pytest.raises(InputError, match="--tolerance must be a number > 0, got '5%'"):
        specprune.recommend(analysis, "5%", data=calib)


def test_apply_without_a_covariance_warns(tmp_path):
    from specprune.plan import LayerPlan, Plan

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    plan = Plan(model={}, tolerance=0.05, metric="output-mse",
                layers={"0": LayerPlan(method="whitened", rank=8)})
    with pytest.warns(specprune.compress.apply.IdentityCovarianceWarning, match="plain SVD of W"):
        specprune.apply_(m, plan)
    assert plan.details["applied"]["covariance"] == "identity"
    m2 = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specprune.apply_(m2, Plan(model={}, tolerance=0.05, metric="output-mse",
                                  layers={"0": LayerPlan(method="whitened", rank=8)}), data=_batches())


def test_data_in_plain_forms():
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 32)
    one = specprune.analyze(m, x)  # a bare tensor is one batch, not 64 batches of one row
    listed = specprune.analyze(m, [x])
    assert one.calibration["samples"] == listed.calibration["samples"] == 64
    assert [lay.tokens for lay in one.layers] == [64, 64]
    assert specprune.analyze(m, {"input": x}).calibration["samples"] == 64
    with pytest.raises(InputError, match="no data: pass an iterable of batches"):
        specprune.analyze(m, None)
    with pytest.raises(InputError, match="data must be an iterable of batches .* got int"):
        specprune.evaluate(m, 3)


def test_non_finite_outputs_are_named_as_such():
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    with pytest.raises(InputError, match="not finite — check the data for NaN or Inf values"):
        specprune.evaluate(m, [x], reference=m)


def test_wrong_kinds_of_argument_are_one_clear_error(tiny_dirs, small_text_file):
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = _batches(n=2, bs=16)
    with pytest.raises(InputError, match="analyze takes the model as a torch.nn.Module, got str"):
        specprune.analyze("./my-model", data)
    with pytest.raises(InputError, match="evaluate takes the reference as a torch.nn.Module, got str"):
        specprune.evaluate(m, data, reference="./my-model")
    with pytest.raises(InputError, match=r"a data batch \(dict\) must hold tensors"):
        specprune.analyze(m, [{}])
    analysis = specprune.analyze(m, data)
    other = nn.Sequential(nn.Linear(32, 4))
    with pytest.raises(InputError, match="the model has no layer '2' of the analysis .*the analysis was made on"):
        specprune.recommend(analysis, 0.05, model=other, data=data)


def test_more_bad_inputs_are_one_clear_error(tmp_path):
    from specprune.analysis import Analysis
    from specprune.plan import Plan

    m = nn.Sequential(nn.Linear(8, 3)).eval()
    x = torch.randn(16, 8)
    with pytest.raises(InputError, match="recommend takes an Analysis .* got NoneType"):
        specprune.recommend(None, 0.05, model=m, data=[x])
    with pytest.raises(InputError, match=r"class labels must lie in 0\.\.2"):
        specprune.evaluate(m, [(x, torch.full((16,), 7))], reference=m)
    with pytest.raises(InputError, match=r"the labels \(shape \(5,\)\) do not fit the model's output"):
        specprune.evaluate(m, [(x, torch.zeros(5, dtype=torch.long))], reference=m)
    with pytest.raises(InputError, match=r"the labels \(shape \(16, 2\)\) do not fit"):
        specprune.evaluate(m, [(x, torch.zeros(16, 2))], reference=m)
    with pytest.raises(InputError, match="is a directory: give the plan file's path"):
        Plan(model={}, tolerance=0.05, metric="output-mse", layers={}).save(tmp_path)
    specprune.analyze(m, [x]).save(tmp_path / "a")
    doc = (tmp_path / "a" / "analysis.json").read_text()
    import json

    d = json.loads(doc)
    for lay in d["layers"]:
        del lay["d_in"]
    (tmp_path / "a" / "analysis.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="is not a specprune analysis: layer entry 0 lacks d_in"):
        Analysis.load(tmp_path / "a")


def test_wrapped_models_give_the_model_s_own_layer_names():
    """nn.DataParallel (and torch.compile) wrappers are looked through: the analysis and the plan name
    the layers as the unwrapped model does, so the plan applies to the saved checkpoint; apply_ changes
    the wrapped model in place and returns the wrapper."""
    from specprune.models import unwrap

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    wrapped = nn.DataParallel(inner)
    assert unwrap(wrapped) is inner and unwrap(inner) is inner
    data = _batches(n=2, bs=32)
    analysis = specprune.analyze(wrapped, data)
    assert [lay.name for lay in analysis.layers] == ["0", "2"]
    plan = specprune.recommend(analysis, 0.05, model=wrapped, data=data)
    assert set(plan.layers) == {"0", "2"}
    assert any(not lp.is_noop for lp in plan.layers.values())
    with torch.no_grad():
        y0 = wrapped(data[0])
        out = specprune.apply_(wrapped, plan, analysis=analysis)
        assert out is wrapped
        assert not torch.equal(y0, wrapped(data[0]))  # the wrapped model itself was compressed


def test_a_plan_verified_on_the_analysis_sample_says_so_and_widens_its_uncertainty():
    """Truncations are fitted to the calibration covariance, so a plan that truncates and is checked on those
    same windows is flattered: recommend() warns and the uncertainty covers IN_SAMPLE_EXCESS · d_in/N of the
    truncations' share; with verify_data= (other windows) the check is out of sample and nothing is added."""
    from specprune.recommender import IN_SAMPLE_EXCESS, InSampleVerificationWarning

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    data, other = _batches(n=2, bs=64, seed=1), _batches(n=2, bs=64, seed=2)
    analysis = specprune.analyze(m, data)
    with pytest.warns(InSampleVerificationWarning, match="verified on the calibration data the analysis was made"):
        plan = specprune.recommend(analysis, 0.3, model=m, data=data, methods=("prune",), verify_samples=128)
    info = plan.details["in_sample_truncations"]
    assert info["max_d_in_over_tokens"] == pytest.approx(64 / 128)
    assert info["excess"] == pytest.approx(IN_SAMPLE_EXCESS * 64 / 128)
    assert plan.predicted_delta_uncertainty >= plan.predicted_delta * info["truncation_share"] * info["excess"] - 1e-15
    assert "in-sample" in plan.details["warning"]
    assert "(in-sample where the analysis was made on them)" in plan.details["verification_windows"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InSampleVerificationWarning)
        held = specprune.recommend(analysis, 0.3, model=m, data=data, methods=("prune",), verify_data=other,
                                   verify_samples=128)
    assert "in_sample_truncations" not in held.details and "warning" not in held.details
    assert held.details["verification_windows"] == "128 held out of the analysis"


@pytest.mark.parametrize("damage,expect", [
    (lambda d: d.update(layers=5), "'layers' must be a list of layer objects, got int"),
    (lambda d: d.update(layers=[5]), "layer entry 0 is not an object"),
    (lambda d: d.update(calibration=3), "'calibration' must be an object, got int"),
    (lambda d: d["layers"][0].update(d_in="8"), "layer entry 0: 'd_in' must be an integer, got \"8\""),
    (lambda d: d["layers"][0].update(k_star=True), "layer entry 0: 'k_star' must be an integer or null, got true"),
    (lambda d: d["layers"][0].update(b="x"), "layer entry 0: 'b' must be an integer or a number or null"),
    (lambda d: d["layers"][0].update(flags="none"), "layer entry 0: 'flags' must be a list, got \"none\""),
], ids=["layers-int", "layer-int", "calibration-int", "d_in-str", "k_star-bool", "b-str", "flags-str"])
def test_analysis_json_of_the_wrong_shape_is_one_clear_error(damage, expect, tmp_path):
    """A hand-edited or foreign analysis.json names what is wrong (report, recommend and apply read it)."""
    import json

    from specprune.analysis import Analysis

    specprune.analyze(nn.Sequential(nn.Linear(8, 3)).eval(), [torch.randn(64, 8)]).save(tmp_path / "a")
    f = tmp_path / "a" / "analysis.json"
    d = json.loads(f.read_text())
    damage(d)
    f.write_text(json.dumps(d))
    with pytest.raises(InputError) as err:
        Analysis.load(tmp_path / "a")
    assert str(err.value).startswith(f"{f} is not a specprune analysis: {expect}")
