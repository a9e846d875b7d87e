"""Gradient-based (Gauss–Newton) layer responses (specprune.curvature) against the metric itself."""

from __future__ import annotations

import math

import pytest
import torch

from specprune import curvature
from specprune.data import from_iterable, load_data
from specprune.evaluation import Evaluator, output_tensor
from specprune.layers import select_layers
from specprune.models import load_model
from specprune.sensitivity import patched_weight


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _delta(lay, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = lay.weight_matrix().float()
    return torch.randn(w.shape, generator=g) * scale * float(w.std())


@pytest.fixture(scope="module")
def bert(tiny_dirs, small_text_file):
    loaded = load_model(str(tiny_dirs["bert"]))
    calib = load_data([small_text_file], loaded.tokenizer, samples=4, seq_len=32, batch_size=4)
    return loaded, calib


@pytest.fixture(scope="module")
def llama(trained_llama, small_text_file):
    loaded = load_model(str(trained_llama))
    calib = load_data([small_text_file], loaded.tokenizer, samples=4, seq_len=32, batch_size=4)
    return loaded, calib


def test_output_mse_curvature_is_the_measured_second_order_change(bert):
    """output-mse: the Gauss–Newton form is the whole second-order change at the reference. With many
    draws the estimate matches the antithetic measurement of small perturbations (relative noise
    √(2/(4·400)) ≈ 3.5%)."""
    loaded, calib = bert
    model = loaded.model
    layers = select_layers(model)[:4]
    ev = Evaluator(model, calib)
    assert ev.metric == "output-mse"
    deltas = {lay.name: torch.stack([_delta(lay, 0.02, i), _delta(lay, 0.01, 10 + i)])
              for i, lay in enumerate(layers)}
    scores = curvature.gauss_newton_scores(model, layers, deltas, calib.batches, ev.metric, draws=400)
    for lay in layers:
        w = lay.weight_matrix().float()
        for k in range(2):
            dw = deltas[lay.name][k]
            with patched_weight(lay, w + dw):
                plus = ev.delta(model)
            with patched_weight(lay, w - dw):
                minus = ev.delta(model)
            measured = 0.5 * (plus + minus)
            got = scores[lay.name]["curvature"][k]
            assert got == pytest.approx(measured, rel=0.15), (lay.name, k)
            assert scores[lay.name]["stderr"][k] < 0.1 * got
            assert scores[lay.name]["first"][k] == 0.0


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_responses_score_as_the_weight_gradients(which, bert, llama, monkeypatch):
    """The scores from the responses X ΔWᵀ kept from the forward pass equal those from one weight gradient
    per backward pass (``RESPONSE_BYTES`` = 0), windows and draws alike."""
    loaded, calib = bert if which == "bert" else llama
    layers = select_layers(loaded.model)
    deltas = {lay.name: torch.stack([_delta(lay, 0.02, i), _delta(lay, 0.01, 50 + i)]) for i, lay in enumerate(layers)}
    metric = Evaluator(loaded.model, calib).metric
    got = curvature.gauss_newton_scores(loaded.model, layers, deltas, calib.batches, metric, draws=3, seed=5)
    monkeypatch.setattr(curvature, "RESPONSE_BYTES", 0)
    want = curvature.gauss_newton_scores(loaded.model, layers, deltas, calib.batches, metric, draws=3, seed=5)
    for lay in layers:
        for key in ("curvature", "stderr", "first"):
            assert got[lay.name][key] == pytest.approx(want[lay.name][key], rel=1e-4, abs=1e-12), (lay.name, key)


def test_lm_loss_first_order_term_is_the_loss_gradient(llama):
    """lm-loss: the first-order term is ⟨∇L, ΔW⟩/L exactly (no sampling): it equals the odd part of
    the measured change, (δ(+ΔW) − δ(−ΔW))/2, for a small ΔW."""
    loaded, calib = llama
    model = loaded.model
    layers = select_layers(model)[:3]
    ev = Evaluator(model, calib)
    assert ev.metric == "lm-loss"
    deltas = {lay.name: _delta(lay, 1e-3, i)[None] for i, lay in enumerate(layers)}
    scores = curvature.gauss_newton_scores(model, layers, deltas, calib.batches, ev.metric, draws=2)
    for lay in layers:
        w = lay.weight_matrix().float()
        dw = deltas[lay.name][0]
        with patched_weight(lay, w + dw):
            plus = ev.delta(model)
        with patched_weight(lay, w - dw):
            minus = ev.delta(model)
        odd = 0.5 * (plus - minus)
        assert abs(odd) > 1e-7
        assert scores[lay.name]["first"][0] == pytest.approx(odd, rel=0.02, abs=1e-9), lay.name


def test_lm_loss_curvature_is_the_fisher_form(llama):
    """lm-loss: the curvature term is ½ Σ_t (J e)_tᵀ (diag p − p pᵀ) (J e)_t / ΣL, here with J e of the
    logits taken by central differences, within the sampling noise of 400 draws."""
    loaded, calib = llama
    model = loaded.model
    lay = select_layers(model)[1]
    batch = calib.batches[0]
    dw = _delta(lay, 0.02, 3)
    w = lay.weight_matrix().float()
    eps = 1e-3
    with torch.no_grad():
        f0 = output_tensor(model(**batch)).double()
        with patched_weight(lay, w + eps * dw):
            fp = output_tensor(model(**batch)).double()
        with patched_weight(lay, w - eps * dw):
            fm = output_tensor(model(**batch)).double()
    je = ((fp - fm) / (2 * eps))[:, :-1]
    p = torch.softmax(f0[:, :-1], -1)
    quad = (p * je ** 2).sum(-1) - (p * je).sum(-1) ** 2
    ids = batch["input_ids"]
    ce = torch.nn.functional.cross_entropy(f0[:, :-1].reshape(-1, f0.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
    expected = float(0.5 * quad.sum() / ce)
    scores = curvature.gauss_newton_scores(model, [lay], {lay.name: dw[None]}, [batch], "lm-loss", draws=400)
    assert scores[lay.name]["curvature"][0] == pytest.approx(expected, rel=0.15)


def test_scores_leave_the_model_as_it_was_also_on_error(bert, monkeypatch):
    loaded, calib = bert
    model = loaded.model
    layers = select_layers(model)
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    deltas = {lay.name: _delta(lay, 0.01, 0)[None] for lay in layers}
    curvature.gauss_newton_scores(model, layers, deltas, calib.batches, "output-mse", draws=3)
    assert _hooks(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(curvature, "_cotangents", boom)
    with pytest.raises(RuntimeError, match="injected"):
        curvature.gauss_newton_scores(model, layers, deltas, calib.batches, "output-mse", draws=3)
    assert _hooks(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags


def test_layers_the_output_does_not_read_score_zero(bert):
    """BertModel's pooler does not feed last_hidden_state: its perturbations cost nothing, measured or
    predicted."""
    loaded, calib = bert
    model = loaded.model
    pooler = [lay for lay in select_layers(model) if "pooler" in lay.name]
    assert pooler
    deltas = {pooler[0].name: _delta(pooler[0], 0.1, 0)[None]}
    scores = curvature.gauss_newton_scores(model, pooler, deltas, calib.batches, "output-mse", draws=3)
    assert scores[pooler[0].name]["curvature"][0] == 0.0


def test_tensor_models_and_windows_that_are_not_tokens():
    """A plain MLP on (N, d) tensors: windows are the rows; the estimate matches the exact form
    ‖J ΔW x‖² / Σ‖f‖² of a linear last layer (J = I)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).eval()
    x = torch.randn(32, 6)
    data = from_iterable([x[:16], x[16:]])
    layers = select_layers(model)
    last = layers[-1]
    dw = torch.randn(5, 8) * 0.05
    scores = curvature.gauss_newton_scores(model, [last], {last.name: dw[None]}, data.batches, "output-mse",
                                           draws=300)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        exact = float((h @ dw.T).pow(2).sum() / model(x).pow(2).sum())
    assert scores[last.name]["curvature"][0] == pytest.approx(exact, rel=0.1)


class _Twice(torch.nn.Module):
    """One Linear applied twice per forward (shared weights)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(5, 6)
        self.shared = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))


def test_a_layer_called_twice_per_forward_counts_both_calls():
    """The perturbation enters every call: the score is of the whole weight gradient (the sum over calls),
    so it matches the measured second-order change, not the sum of per-call squares."""
    torch.manual_seed(1)
    model = _Twice().eval()
    x = torch.randn(24, 5)
    data = from_iterable([x[:12], x[12:]])
    lay = [lay for lay in select_layers(model) if lay.name == "shared"][0]
    dw = torch.randn(6, 6) * 0.01
    scores = curvature.gauss_newton_scores(model, [lay], {lay.name: dw[None]}, data.batches, "output-mse",
                                           draws=600)
    ev = Evaluator(model, data)
    w = lay.weight_matrix().float()
    with patched_weight(lay, w + dw):
        plus = ev.delta(model)
    with patched_weight(lay, w - dw):
        minus = ev.delta(model)
    assert scores[lay.name]["curvature"][0] == pytest.approx(0.5 * (plus + minus), rel=0.1)


def test_supported_only_for_linear_layers_and_smooth_builtin_metrics(bert):
    from specprune.toy import TinyCNN

    layers = select_layers(bert[0].model)
    assert curvature.supported(layers, "output-mse") and curvature.supported(layers, "lm-loss")
    assert not curvature.supported(layers, "task-loss")
    assert not curvature.supported(layers, "mymodule:metric")
    assert not curvature.supported(select_layers(TinyCNN()), "output-mse")


def test_recommender_modes(llama, tmp_path):
    """auto takes the gradient for lm-loss; the same seed gives identical sensitivities, another seed
    other draws; ``gradient`` where it is not defined is one clear error; an unknown mode is refused."""
    from specprune.analysis import analyze
    from specprune.errors import InputError
    from specprune.recommender import Recommender

    loaded, calib = llama
    analysis = analyze(loaded.model, calib)
    a = Recommender(analysis, loaded.model, calib, sensitivity_samples=4, verify_samples=4)
    assert a.details["sensitivity"].startswith("gradient")
    b = Recommender(analysis, loaded.model, calib, sensitivity_samples=4, verify_samples=4)
    assert {n: s.to_dict() for n, s in a.sens.items()} == {n: s.to_dict() for n, s in b.sens.items()}
    c = Recommender(analysis, loaded.model, calib, sensitivity_samples=4, verify_samples=4, seed=1)
    assert {n: s.quant for n, s in a.sens.items()} != {n: s.quant for n, s in c.sens.items()}
    p = Recommender(analysis, loaded.model, calib, sensitivity_samples=4, verify_samples=4, sensitivity="probe")
    assert p.details["sensitivity"] == "probe"
    # the two agree on the order of magnitude of every layer that the loss feels
    for n, s in a.sens.items():
        if p.sens[n].quant > 1e-9:
            assert 0.2 < s.quant / p.sens[n].quant < 5, n
    with pytest.raises(InputError, match="--sensitivity takes auto, gradient, probe"):
        Recommender(analysis, loaded.model, calib, sensitivity="nonsense")
    with pytest.raises(InputError, match="--sensitivity gradient is not defined here: the metric is "):
        Recommender(analysis, loaded.model, calib, sensitivity="gradient", metric="tests.unit.test_curvature:metric")
    with pytest.raises(InputError, match="--sensitivity probe needs calibration data"):
        Recommender(analysis, loaded.model, None, sensitivity="probe")


def metric(model, batch, device=None):
    """A custom (sum, count) metric: gradient sensitivities are not defined for it."""
    out = output_tensor(model(**batch))
    return float(out.float().pow(2).sum()), int(out.numel())


# ------------------------------------------------------------------------------------------------
# models the backward passes cannot fully see: the affected layers are probed, never silently zero


def _tensor_recommenders(model, data, **kw):
    from specprune.analysis import analyze
    from specprune.recommender import Recommender

    analysis = analyze(model, data)
    return {mode: Recommender(analysis, model, data, sensitivity=mode, verify_samples=32, **kw)
            for mode in ("gradient", "probe")}


def test_an_inplace_op_after_the_first_layer():
    """ReLU(inplace=True) right after the first Linear: the graph starts at a copy of its output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(inplace=True), torch.nn.Linear(32, 32),
                                torch.nn.ReLU(inplace=True), torch.nn.Linear(32, 8)).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    recs = _tensor_recommenders(model, data)
    assert recs["gradient"].details["sensitivity"].startswith("gradient (")
    assert "probed_layers" not in recs["gradient"].details
    for name, s in recs["gradient"].sens.items():
        assert 0.5 < s.quant / recs["probe"].sens[name].quant < 2.0, name


class _Frozen(torch.nn.Module):
    """A backbone run under no_grad (or detached) and a head."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.backbone = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                h = self.backbone(x)
        else:
            h = self.backbone(x).detach()
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_layers_behind_no_grad_or_detach_are_probed(how):
    model = _Frozen(how).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    recs = _tensor_recommenders(model, data)
    grad, probe = recs["gradient"], recs["probe"]
    assert grad.details["probed_layers"] == ["backbone.0", "backbone.2"]
    assert grad.details["sensitivity"].endswith("; probed: backbone.0, backbone.2 (no backward pass reached it)")
    for name in ("backbone.0", "backbone.2"):
        assert grad.sens[name].quant > 1e-6  # felt by the output: not the 1e-12 of an unreached layer
        assert grad.sens[name].to_dict() == probe.sens[name].to_dict()
    assert grad.sens["head"].probes[0]["method"] == "gauss-newton"


class _Identity(torch.autograd.Function):
    """Identity forward; subclasses give the backward an unusual behaviour."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()


class _Overflow(_Identity):
    """A backward that overflows (as a float16 backward pass can)."""

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class _NoBackward(_Identity):
    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("this operation has no backward")


class _Sandwich(torch.nn.Module):
    """Linear → tanh → ``fn`` → Linear."""

    def __init__(self, fn):
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(self.fn.apply(torch.tanh(self.a(x))))


def test_non_finite_scores_are_probed_not_allocated():
    model = _Sandwich(_Overflow).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    recs = _tensor_recommenders(model, data)
    grad = recs["gradient"]
    assert grad.details["probed_layers"] == ["a"]
    assert grad.details["sensitivity"].endswith("; probed: a (non-finite scores)")
    assert all(math.isfinite(s.quant) and math.isfinite(s.prune) for s in grad.sens.values())
    assert grad.sens["a"].to_dict() == recs["probe"].sens["a"].to_dict()
    plan = grad.plan(0.05)
    assert math.isfinite(plan.predicted_delta) and math.isfinite(plan.predicted_delta_uncertainty)


def test_auto_falls_back_to_probes_when_the_backward_pass_fails():
    """An operation without a backward: ``auto`` probes every layer and says why; ``gradient`` is one
    clear error."""
    from specprune.analysis import analyze
    from specprune.errors import InputError
    from specprune.recommender import Recommender

    model = _Sandwich(_NoBackward).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    analysis = analyze(model, data)
    rec = Recommender(analysis, model, data, verify_samples=32)
    assert rec.details["sensitivity"] == "probe"
    assert "no backward" in rec.details["sensitivity_fallback"]
    with pytest.raises(InputError, match="the gradient sensitivities failed .*; use --sensitivity probe"):
        Recommender(analysis, model, data, sensitivity="gradient")
    assert all(p.requires_grad for p in model.parameters())
    assert _hooks(model) == 0


def test_the_refusal_names_the_layer_type():
    from specprune.analysis import analyze
    from specprune.errors import InputError
    from specprune.recommender import Recommender
    from specprune.toy import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    analysis = analyze(model, data)
    with pytest.raises(InputError, match=r"layer conv1 is a Conv2d \(it needs nn.Linear or Conv1D layers; 4 layers"):
        Recommender(analysis, model, data, sensitivity="gradient")


@pytest.mark.parametrize("cmd", ["recommend", "compress"])
def test_cli_refuses_gradient_before_the_analysis(cmd, tmp_path):
    """``--sensitivity gradient`` on a model it is not defined for (a CNN's Conv2d layers) is one error line
    before any work: no "analysing" line precedes it, nothing is written."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from conftest import one_error_line
    from specprune.cli.app import app
    from specprune.toy import build_cnn

    save_file(build_cnn().state_dict(), str(tmp_path / "cnn.safetensors"))
    save_file({"input": torch.randn(16, 3, 8, 8)}, str(tmp_path / "x.safetensors"))
    out = tmp_path / ("plan.json" if cmd == "recommend" else "out")
    res = CliRunner().invoke(app, [cmd, str(tmp_path / "cnn.safetensors"), "--arch", "specprune.toy:build_cnn",
                                   "--data", str(tmp_path / "x.safetensors"), "--tolerance", "0.05",
                                   "--sensitivity", "gradient", "--out", str(out)])
    assert res.exit_code == 1, res.stdout + res.stderr
    assert one_error_line(res.stderr).startswith("--sensitivity gradient is not defined here: layer ")
    assert "is a Conv2d" in res.stderr
    assert not out.exists()
