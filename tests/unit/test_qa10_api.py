"""QA pass 10 (Python API journey): bad arguments give InputError with one line, never a raw torch/Python
error, and the objects the API returns print usefully."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import specprune
from specprune.errors import InputError
from specprune.plan import LayerPlan, Plan


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act=nn.ReLU(), fc2=nn.Linear(32, 8)))


@pytest.fixture(scope="module")
def mlp_analysis():
    model = _mlp()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    return model, data, specprune.analyze(model, data)


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def _same(model: nn.Module, state) -> bool:
    sd, modes = _state(model)
    return all(torch.equal(sd[k], state[0][k]) for k in sd) and modes == state[1]


@pytest.mark.parametrize("bits", ["4,8", 4, (4.5,), (True, 4), (1, 4), (4, 9), ()])
def test_recommend_bad_bits_choices_are_input_errors(mlp_analysis, bits):
    model, data, analysis = mlp_analysis
    with pytest.raises(InputError, match="bits-choices must be integers in 2..8") as err:
        specprune.recommend(analysis, 0.05, model=model, data=data, bits_choices=bits)
    assert "\n" not in str(err.value)


def test_recommend_bits_choices_take_numpy_integers(mlp_analysis):
    model, data, analysis = mlp_analysis
    plan = specprune.recommend(analysis, 0.05, model=model, data=data, bits_choices=np.array([4, 8]),
                               methods=("quantize",), verify=False)
    assert {lp.bits for lp in plan.layers.values()} <= {None, 4, 8}


@pytest.mark.parametrize("sizes", [8, "128", (0,), (-4,), (None, 2.5), ()])
def test_recommend_bad_group_sizes_are_input_errors(mlp_analysis, sizes):
    model, data, analysis = mlp_analysis
    with pytest.raises(InputError, match="group_sizes must be positive integers or None"):
        specprune.recommend(analysis, 0.05, model=model, data=data, group_sizes=sizes)


@pytest.mark.parametrize("kw, match", [({"sensitivity_samples": 0}, "sensitivity_samples must be a positive"),
                                       ({"sensitivity_samples": -1}, "sensitivity_samples must be a positive"),
                                       ({"verify_samples": 0}, "verify_samples must be a positive"),
                                       ({"verify_samples": 2.5}, "verify_samples must be a positive"),
                                       ({"seed": "a"}, "seed must be an integer")])
def test_recommend_bad_counts_and_seed_are_input_errors(mlp_analysis, kw, match):
    """Were IndexError from deep inside resolve_metric (0 or negative windows) or silently accepted (seed)."""
    model, data, analysis = mlp_analysis
    with pytest.raises(InputError, match=match):
        specprune.recommend(analysis, 0.05, model=model, data=data, **kw)


def test_recommend_methods_as_one_string(mlp_analysis):
    """methods="quantize" used to be read letter by letter ("got q,u,a,n,t,i,z,e")."""
    model, data, analysis = mlp_analysis
    plan = specprune.recommend(analysis, 0.05, model=model, data=data, methods="quantize", verify=False)
    assert all(lp.method is None for lp in plan.layers.values())
    with pytest.raises(InputError, match="--methods takes prune and/or quantize, got pruning"):
        specprune.recommend(analysis, 0.05, model=model, data=data, methods="pruning")


def test_recommend_refuses_a_model_with_other_layer_shapes(mlp_analysis):
    """Same layer names, other widths: was a raw RuntimeError (mat1 and mat2 shapes) from the sensitivities."""
    _, data, analysis = mlp_analysis
    torch.manual_seed(1)
    other = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 30), act=nn.ReLU(), fc2=nn.Linear(30, 8)))
    state = _state(other)
    with pytest.raises(InputError, match=r"layer fc1 of the model is 16 → 30 but the analysis saw 16 → 32"):
        specprune.recommend(analysis, 0.05, model=other, data=data)
    assert _same(other, state)


def test_include_exclude_take_one_pattern_as_a_string(mlp_analysis):
    """include="fc2" was read as the patterns "f", "c", "2" (an error about 'f'); exclude="fc2" excluded
    nothing."""
    model, data, _ = mlp_analysis
    assert [lay.name for lay in specprune.analyze(model, data, include="fc2").layers] == ["fc2"]
    assert [lay.name for lay in specprune.analyze(model, data, exclude="fc2").layers] == ["fc1"]
    assert [lay.name for lay in specprune.analyze(model, data, include="re:fc[12]").layers] == ["fc1", "fc2"]
    with pytest.raises(InputError, match="include takes layer patterns"):
        specprune.analyze(model, data, include=2)
    with pytest.raises(InputError, match="exclude takes layer patterns .* an item 2 of type int"):
        specprune.analyze(model, data, exclude=["fc1", 2])


def test_model_untouched_when_a_bad_batch_follows_a_good_one(mlp_analysis):
    model, _, analysis = mlp_analysis
    model.train()
    model.fc1.weight.requires_grad_(False)
    try:
        state = _state(model)
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        bad = [torch.randn(2, 16), torch.randn(2, 7), torch.randn(2, 16)]
        for call in (lambda: specprune.analyze(model, bad),
                     lambda: specprune.recommend(analysis, 0.05, model=model, data=bad),
                     lambda: specprune.evaluate(model, bad, reference=_mlp())):
            with pytest.raises(InputError, match="does not fit the model"):
                call()
            assert _same(model, state)
            assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
            assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    finally:
        model.eval()
        model.fc1.weight.requires_grad_(True)


def test_plan_repr_is_one_short_line(mlp_analysis):
    """The dataclass repr printed ``details`` (kilobytes for a two-layer MLP)."""
    model, data, analysis = mlp_analysis
    plan = specprune.recommend(analysis, 0.05, model=model, data=data)
    text = repr(plan)
    assert "\n" not in text and len(text) < 200, text
    assert text.startswith("Plan(metric='output-mse', tolerance=0.05, predicted_delta=")
    assert f"layers={len(plan.layers)}" in text
    # a hand-built plan with odd values still prints
    odd = Plan(model={}, tolerance="x", metric="m", layers={"a": LayerPlan(bits=4)}, predicted_delta=None)
    assert "1 quantized" in repr(odd)
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize("kw, match", [({"rate": "0.5"}, "--rate must be in"), ({"rate": float("nan")}, "--rate"),
                                       ({"bits": 4.5}, "--bits must be in 2..8"), ({"bits": "4"}, "--bits")])
def test_plan_uniform_rejects_non_numbers(kw, match):
    """rate="0.5" was a raw TypeError ('<=' not supported between float and str)."""
    with pytest.raises(InputError, match=match):
        Plan.uniform(["fc1"], **kw)


def test_apply_and_evaluate_refuse_arguments_of_the_wrong_kind():
    from specprune.compress.apply import apply_
    from specprune.evaluation import evaluate
    from specprune.plan import Plan

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plan = Plan.uniform(["0"], bits=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ("m", None):
        with pytest.raises(InputError, match="apply_ takes the model as a torch.nn.Module"):
            apply_(bad, plan)
    with pytest.raises(InputError, match="apply_ takes the analysis as a specprune Analysis"):
        apply_(model, plan, analysis="analysis/")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    data = [torch.randn(4, 8)]
    for bad in ("0.1", float("nan"), True):
        with pytest.raises(InputError, match="predicted_delta must be a finite number or None"):
            evaluate(model, data, predicted_delta=bad)
    assert evaluate(model, data, reference=model, predicted_delta=0.01).to_dict()["predicted_delta"] == 0.01


def test_a_plan_edited_after_its_prediction_predicts_nothing(mlp_analysis, tmp_path):
    from specprune.compress.apply import apply_
    from specprune.plan import edited_since_prediction

    model, data, analysis = mlp_analysis
    plan = specprune.recommend(analysis, 0.05, model, data, methods=("quantize",))
    assert not plan.edited and plan.prediction == plan.predicted_delta
    applied = apply_(_mlp(), Plan.from_dict(plan.to_dict()), analysis=analysis)
    assert applied is not None
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert not back.edited and back.prediction == plan.predicted_delta
    doc = back.to_dict()
    name = next(iter(doc["layers"]))
    doc["layers"][name]["bits"] = 2 if doc["layers"][name]["bits"] != 2 else 3
    assert edited_since_prediction(doc)
    edited = Plan.from_dict(doc)
    assert edited.edited and edited.prediction is None
    assert "predicted_delta=none" in repr(edited)
    shortcut = Plan.uniform(["fc1"], bits=4)  # no prediction recorded: never "edited"
    assert not shortcut.edited and shortcut.prediction is None


def test_save_writes_a_directory_load_reads_whole_or_not_at_all(mlp_analysis, tmp_path):
    model, data, analysis = mlp_analysis
    plan = Plan.uniform(["fc1", "fc2"], bits=4)
    compressed = specprune.apply_(_mlp(), plan)
    out = specprune.save(compressed, plan, tmp_path / "c")
    assert out == tmp_path / "c" and (out / "model.safetensors").is_file() and (out / "plan.json").is_file()
    x = data[0]
    with torch.no_grad():
        assert torch.equal(specprune.load(out, arch=_mlp)(x), compressed(x))
    before = sorted(p.name for p in out.iterdir())
    from specprune.errors import RefusedError

    with pytest.raises(RefusedError, match="already exists; pass --overwrite"):
        specprune.save(compressed, plan, out)
    assert sorted(p.name for p in out.iterdir()) == before  # refused: untouched
    assert specprune.save(compressed, plan, out, overwrite=True) == out
    for args, what in (((None, plan, tmp_path / "d"), "the model as a torch.nn.Module"),
                       ((compressed, "plan.json", tmp_path / "d"), "the plan that was applied"),
                       ((compressed, plan, None), "the output directory as a path")):
        with pytest.raises(InputError, match=what):
            specprune.save(*args)
    assert not (tmp_path / "d").exists()

    class Boom(RuntimeError):
        pass

    import specprune.compress.saved as saved_mod

    def failing(*a, **k):
        raise Boom("disk full")

    real = saved_mod.save_compressed
    saved_mod.save_compressed = failing
    try:
        with pytest.raises(Boom):
            specprune.save(compressed, plan, tmp_path / "e")
    finally:
        saved_mod.save_compressed = real
    assert not any(p.name.startswith(".e") or p.name == "e" for p in tmp_path.iterdir())  # nothing half-written


def test_evaluation_round_trips_through_json(mlp_analysis, tmp_path):
    from specprune.evaluation import Evaluation

    model, data, _ = mlp_analysis
    ev = specprune.evaluate(specprune.apply_(_mlp(), Plan.uniform(["fc1", "fc2"], bits=3)), data, reference=model,
                            predicted_delta=0.02)
    ev.extra["eval_windows"] = 6
    back = Evaluation.load(ev.save(tmp_path / "evaluation.json"))
    assert back.to_dict() == ev.to_dict()
    assert Evaluation.load(tmp_path).measured_delta == ev.measured_delta  # a directory: its evaluation.json
    doc = ev.to_dict()
    for key, bad, what in (("measured_delta", "0.1", "'measured_delta' must be a finite number"),
                           ("predicted_delta", float("nan"), "'predicted_delta' must be a finite number"),
                           ("metric", 3, "'metric' must be a string"), ("plan", 5, "'plan' must be a string")):
        with pytest.raises(InputError, match=what):
            Evaluation.from_dict({**doc, key: bad})
    with pytest.raises(InputError, match="evaluation not found"):
        Evaluation.load(tmp_path / "none.json")


def test_methods_both_means_prune_and_quantize(mlp_analysis):
    from specprune.cli.recommend import parse_methods
    from specprune.recommender import _methods

    assert parse_methods("both") == ("prune", "quantize") == _methods("both")
    with pytest.raises(InputError, match="prune, quantize, prune,quantize or both"):
        parse_methods("both,prune")
