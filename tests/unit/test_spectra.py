"""Spectra, power-law fits and the learning-frontier estimator, validated on synthetic layers.

The frontier grid: a ∈ {1.5, 2.5}, b ∈ {1.5, 2, 3}, true k* at 4–60% of d, init noise 0 … 1/√d per
element, Grams sampled from N = 10·d Gaussian tokens. Every case must land within ±25% of the true k*.
"""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specprune.errors import InputError
from specprune.spectra import (
    FrontierFit,
    LayerSpectrum,
    PowerLawFit,
    compute_spectrum,
    default_fit_range,
    effective_rank,
    estimate_frontier,
    fit_power_law,
    participation_ratio,
)
from specprune.synthetic import random_orthogonal, synthetic_frontier, synthetic_layer, time_for_frontier

TOLERANCE = 0.25  # relative error allowed on k*


def _layer(d, a, b, k_star, noise, *, tokens_per_dim=10, d_out=None, seed=0, **kw):
    """A synthetic layer with its true frontier at k_star (noise in units of 1/√d)."""
    t = time_for_frontier(k_star, b)
    tokens = None if tokens_per_dim is None else tokens_per_dim * d
    return synthetic_layer(
        d, d_out or d, a, b, t, init_std=noise / math.sqrt(d), tokens=tokens, seed=seed, **kw
    )


def _case_id(case):
    return "a{}-b{}-k{}-noise{}".format(*case)


# --------------------------------------------------------------------------- frontier grid (d = 256)
D = 256
GRID = [
    (a, b, max(2, round(frac * D)), noise)
    for a, b, frac, noise in itertools.product(
        (1.5, 2.5), (1.5, 2.0, 3.0), (0.04, 0.1, 0.25, 0.6), (0.0, 0.5, 1.0)
    )
]


@pytest.fixture(scope="module")
def grid_results():
    """Fit every grid case once; tests below read the results."""
    out = {}
    for i, case in enumerate(GRID):
        a, b, k_star, noise = case
        gram, n, w, true_k, _ = _layer(D, a, b, k_star, noise, seed=1000 + i)
        out[case] = (true_k, compute_spectrum(gram, n, w, keep_eigenvectors=False))
    return out


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_frontier_within_25_percent(grid_results, case):
    true_k, spec = grid_results[case]
    assert true_k == case[2]
    f = spec.frontier
    assert f.detected, f.message
    assert spec.k_star is not None
    assert abs(spec.k_star - true_k) <= TOLERANCE * true_k, (spec.k_star, true_k, f.message)
    assert spec.r_star == pytest.approx(1.0 - spec.k_star / D)


def test_frontier_grid_is_mostly_tight_and_ranges_cover(grid_results):
    """Beyond the ±25% contract: the typical error is small and the reported range covers the truth."""
    errors, covered = [], 0
    for true_k, spec in grid_results.values():
        f = spec.frontier
        errors.append(abs(f.k_star - true_k) / true_k)
        covered += f.k_star_lo <= true_k <= f.k_star_hi
        assert f.k_star_lo <= f.k_star <= f.k_star_hi
    assert np.median(errors) <= 0.05
    assert covered >= 0.85 * len(grid_results)


def test_gain_exponent_matches_theory(grid_results):
    """The fitted learned-gain slope c estimates a − b (w_k² ∝ k^(b−a))."""
    for (a, b, _, _), (_, spec) in grid_results.items():
        assert spec.frontier.gain_exponent == pytest.approx(a - b, abs=0.15)


# ------------------------------------------------------- steep learned gain: c = a − b ≥ 1 (a ≥ b + 1)
STEEP = [
    (a, b, max(2, round(frac * D)), noise)
    for (a, b), frac, noise in itertools.product(
        ((3.5, 1.5), (4.0, 2.0), (4.5, 2.0), (4.0, 3.0)), (0.04, 0.1, 0.25), (0.0, 1.0)
    )
]


@pytest.mark.parametrize("case", STEEP, ids=_case_id)
def test_steep_learned_gain_is_found_or_reported_missing_never_misplaced(case):
    """With c = a − b ≥ 1 and k* at 4% of d, the learned part holds ~10 modes whose soft bend a steeper
    power law plus a floor fits as well (equal costs): the estimator then says "no frontier" instead of
    guessing. From 10% of d on it is found, within the ±25% contract (measured: within 12%)."""
    a, b, k_star, noise = case
    gram, n, w, true_k, _ = _layer(D, a, b, k_star, noise, seed=7)
    f = compute_spectrum(gram, n, w, keep_eigenvectors=False).frontier
    if f.detected:
        assert abs(f.k_star - true_k) <= TOLERANCE * true_k, (f.k_star, true_k)
    else:
        assert true_k <= 0.04 * D + 1, f.message
        assert f.message.startswith("no frontier")


# --------------------------------------------------------------------- d = 512 and other settings
GRID_512 = [
    (a, b, max(2, round(frac * 512)), 1.0)
    for a, b, frac in itertools.product((1.5, 2.5), (1.5, 2.0, 3.0), (0.04, 0.6))
]


@pytest.mark.parametrize("case", GRID_512, ids=_case_id)
def test_frontier_d512(case):
    a, b, k_star, noise = case
    gram, n, w, true_k, _ = _layer(512, a, b, k_star, noise, seed=7)
    spec = compute_spectrum(gram, n, w, keep_eigenvectors=False)
    assert spec.k_star is not None, spec.frontier.message
    assert abs(spec.k_star - true_k) <= TOLERANCE * true_k


@pytest.mark.parametrize(
    "a, b, k_star",
    [(1.5, 1.5, 10), (1.5, 3.0, 64), (2.5, 2.0, 26), (2.5, 1.5, 154)],
)
def test_frontier_with_additive_init_and_narrow_output(a, b, k_star):
    """Init noise that learning does not remove (constant floor), and d_out ≪ d (noisy gains)."""
    gram, n, w, true_k, _ = _layer(D, a, b, k_star, 1.0, init_decays=False, seed=3)
    spec = compute_spectrum(gram, n, w)
    assert spec.k_star is not None and abs(spec.k_star - true_k) <= TOLERANCE * true_k
    gram, n, w, true_k, _ = _layer(D, a, b, k_star, 1.0, d_out=16, seed=4)
    spec = compute_spectrum(gram, n, w)
    assert spec.k_star is not None and abs(spec.k_star - true_k) <= TOLERANCE * true_k


def test_frontier_with_fewer_tokens_than_inputs():
    """N < d: only the numerically non-zero modes are used; the frontier is still found."""
    t = time_for_frontier(26, 2.0)
    gram, n, w, true_k, _ = synthetic_layer(D, D, 2.0, 2.0, t, init_std=1 / 16, tokens=128, seed=5)
    spec = compute_spectrum(gram, n, w)
    assert spec.frontier.n_modes <= 128
    assert spec.k_star is not None and abs(spec.k_star - true_k) <= TOLERANCE * true_k


def test_frontier_invariant_to_scales():
    """Rescaling the weight or the inputs does not move k* (no hidden absolute scales)."""
    gram, n, w, _, _ = _layer(D, 2.5, 2.0, 40, 0.5, seed=11)
    base = compute_spectrum(gram, n, w).frontier.k_star_fit
    scaled = compute_spectrum(gram * 1e6, n, w * 1e-4).frontier.k_star_fit
    assert scaled == pytest.approx(base, rel=1e-3)


# ------------------------------------------------------------------------------------ no frontier
@pytest.mark.parametrize("a, b", list(itertools.product((1.5, 2.5), (1.5, 2.0, 3.0))))
@pytest.mark.parametrize("multiple", [1.5, 4.0])
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_fully_learned_layer_has_no_frontier(a, b, multiple, noise):
    gram, n, w, true_k, _ = _layer(D, a, b, multiple * D, noise, seed=21)
    assert true_k >= D
    spec = compute_spectrum(gram, n, w)
    assert spec.k_star is None, spec.frontier.message
    assert spec.r_star is None
    assert not spec.frontier.detected and spec.frontier.message.startswith("no frontier")
    assert spec.summary_dict()["k_star"] is None


@pytest.mark.parametrize("b", [1.5, 2.0, 3.0])
def test_untrained_layer_has_no_frontier(b):
    """t ≈ 0: every mode still carries only its random init (flat gain)."""
    gram, n, w, true_k, _ = synthetic_layer(
        D, D, 2.0, b, 1e-3, init_std=1 / math.sqrt(D), tokens=10 * D, seed=31
    )
    assert true_k == 0
    spec = compute_spectrum(gram, n, w)
    assert spec.k_star is None, spec.frontier.message


@pytest.mark.parametrize("seed", range(6))
def test_random_weights_on_white_inputs_have_no_frontier(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((10 * D, D))
    w = rng.standard_normal((64, D))
    spec = compute_spectrum(x.T @ x, 10 * D, w)
    assert spec.k_star is None, spec.frontier.message


# ------------------------------------------------------------------------ spectrum and energies
@pytest.mark.parametrize("d_out", [80, 16])
def test_synthetic_layer_matches_its_design(d_out):
    d, a, b, t = 64, 2.5, 2.0, 100.0
    gram, n, w, true_k, lam = synthetic_layer(d, d_out, a, b, t, tokens=None, seed=2)
    assert w.shape == (d_out, d) and gram.shape == (d, d)
    assert true_k == round(synthetic_frontier(d, b, t)) == 10
    np.testing.assert_allclose(lam, np.arange(1, d + 1) ** -b)
    spec = compute_spectrum(gram, n, w)
    np.testing.assert_allclose(spec.eigenvalues, lam, rtol=1e-9)
    k = np.arange(1, d + 1)
    # target gain w_k² ∝ k^(b−a), scaled so that its minimum is snr · d_out/d (snr = 10)
    target_gain = k ** (b - a) * (10.0 * d_out / d) / min(k ** (b - a))
    expected = target_gain * (-np.expm1(-lam * t)) ** 2
    np.testing.assert_allclose(spec.mode_gain, expected, rtol=1e-8)
    np.testing.assert_allclose(spec.mode_energy, lam * expected, rtol=1e-8)
    again = synthetic_layer(d, d_out, a, b, t, tokens=None, seed=2)
    np.testing.assert_array_equal(again[2], w)


def test_synthetic_init_noise_sets_the_floor():
    """Unlearned modes keep the init: gain ≈ d_out · init_std²; learned modes lose it (NTK)."""
    d, std = 128, 0.05
    gram, n, w, _, _ = synthetic_layer(d, d, 2.0, 2.0, 1e-4, init_std=std, tokens=None, seed=3)
    spec = compute_spectrum(gram, n, w)
    assert np.mean(spec.mode_gain) == pytest.approx(d * std**2, rel=0.1)


def test_eigenvalues_within_sampling_error():
    """Top sample eigenvalues of N Gaussian tokens: relative error ≈ √(2/N) (well-separated modes)."""
    d, n_tok = 128, 20 * 128
    z_all = []
    for seed in range(4):
        gram, n, w, _, lam = synthetic_layer(d, d, 2.0, 2.0, 50.0, tokens=n_tok, seed=seed)
        spec = compute_spectrum(gram, n, w, keep_eigenvectors=False)
        z = (spec.eigenvalues[:5] - lam[:5]) / (lam[:5] * math.sqrt(2.0 / n))
        assert np.all(np.abs(z) < 5.0), z
        z_all.extend(z)
        assert spec.eigenvalues.sum() == pytest.approx(lam.sum(), rel=5 * math.sqrt(2.0 / n))
    assert 0.2 < np.mean(np.square(z_all)) < 3.0  # errors are of the stated size, not much smaller


def test_eigendecomposition_and_energy_identities():
    rng = np.random.default_rng(0)
    d, d_out, n = 48, 20, 500
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    gram = x.T @ x
    w = rng.standard_normal((d_out, d))
    spec = compute_spectrum(gram, n, w)
    sigma = gram / n
    u = spec.eigenvectors
    np.testing.assert_allclose(u.T @ u, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(sigma @ u, u * spec.eigenvalues, atol=1e-9 * spec.eigenvalues[0])
    assert np.all(np.diff(spec.eigenvalues) <= 0) and np.all(spec.eigenvalues >= 0)
    total = np.trace(w @ sigma @ w.T)
    assert spec.mode_energy.sum() == pytest.approx(total, rel=1e-10)
    assert spec.total_energy == pytest.approx(np.mean(np.sum((x @ w.T) ** 2, axis=1)), rel=1e-10)
    for k in (0, 1, 7, 30, d):
        dw = w - w @ u[:, :k] @ u[:, :k].T
        assert spec.truncation_distortion(k) == pytest.approx(np.trace(dw @ sigma @ dw.T), rel=1e-9, abs=1e-9)
    assert spec.tail_energy.shape == (d + 1,) and spec.tail_energy[-1] == 0.0
    assert np.all(np.diff(spec.tail_energy) <= 0)
    with pytest.raises(InputError):
        spec.truncation_distortion(d + 1)
    assert compute_spectrum(gram, n, w, keep_eigenvectors=False).eigenvectors is None


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 12),
    d_out=st.integers(1, 6),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_energy_sum_property(d, d_out, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, size=d)
    w = rng.standard_normal((d_out, d))
    spec = compute_spectrum(x.T @ x, n, w)
    total = np.trace(w @ (x.T @ x / n) @ w.T)
    assert spec.mode_energy.sum() == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert spec.tail_energy[0] == pytest.approx(total, rel=1e-9, abs=1e-12)
    json.dumps(spec.summary_dict(), allow_nan=False)


# --------------------------------------------------------------------------------- power laws
def test_fit_power_law_exact_and_robust_to_nonpositive():
    k = np.arange(1, 301, dtype=float)
    v = 3.0 * k**-1.7
    fit = fit_power_law(v)
    assert fit.success and fit.exponent == pytest.approx(1.7, abs=1e-12)
    assert fit.log_intercept == pytest.approx(math.log(3.0), abs=1e-10)
    assert fit.r2 == pytest.approx(1.0) and fit.rmse_log < 1e-12
    assert (fit.k_lo, fit.k_hi) == default_fit_range(300) == (5, 270)
    np.testing.assert_allclose(fit.predict([1, 10]), [3.0, 3.0 * 10**-1.7])
    v2 = v.copy()
    v2[[20, 40, 60]] = [0.0, -1.0, np.nan]
    fit2 = fit_power_law(v2, k_lo=10, k_hi=100)
    assert fit2.exponent == pytest.approx(1.7, abs=1e-12) and fit2.n_points == 88
    assert "ignored" in fit2.message
    noisy = v * np.exp(np.random.default_rng(0).normal(0, 0.1, v.size))
    fit3 = fit_power_law(noisy)
    assert abs(fit3.exponent - 1.7) < 4 * fit3.exponent_stderr + 0.01
    assert fit3.r2 < 1.0


def test_fit_power_law_failure_is_reported_and_json_safe():
    fit = fit_power_law(np.zeros(50))
    assert not fit.success and math.isnan(fit.exponent) and "fewer than 3" in fit.message
    d = fit.to_dict()
    assert d["exponent"] is None
    json.dumps(d, allow_nan=False)
    assert not fit_power_law([1.0, 0.5]).success


@pytest.mark.parametrize("a, b", [(1.5, 1.5), (2.5, 2.0), (1.5, 3.0), (2.5, 3.0)])
def test_b_and_a_recovered(a, b):
    # clean spectra (exact Gram): fully learned layer, then a layer with a frontier at 0.25·d
    for k_star in (4 * D, 64):
        gram, n, w, _, _ = _layer(D, a, b, k_star, 0.0, tokens_per_dim=None, seed=41)
        spec = compute_spectrum(gram, n, w)
        assert spec.b == pytest.approx(b, rel=0.03)
        assert spec.a == pytest.approx(a, rel=0.03), spec.a_fit.message
    # sampled Gram with init noise: finite-sample bias stays small
    gram, n, w, _, _ = _layer(D, a, b, 64, 1.0, seed=42)
    spec = compute_spectrum(gram, n, w)
    assert spec.b == pytest.approx(b, rel=0.04)
    assert spec.a == pytest.approx(a, rel=0.06)


def test_effective_rank_definitions():
    assert effective_rank(np.ones(10)) == pytest.approx(10.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert participation_ratio(np.ones(10)) == pytest.approx(10.0)
    lam = np.arange(1, 101, dtype=float) ** -1.5
    assert 1.0 < participation_ratio(lam) < effective_rank(lam) < 100.0
    assert math.isnan(effective_rank(np.zeros(4)))


# ---------------------------------------------------------------- results, JSON and input handling
def test_summary_dict_fields_and_json_safety():
    gram, n, w, _, _ = _layer(D, 2.0, 2.0, 30, 0.5, seed=51)
    spec = compute_spectrum(gram, n, w)
    s = spec.summary_dict()
    for key in ("d_in", "d_out", "tokens", "b", "a", "k_star", "k_max", "r_star", "effective_rank", "fit"):
        assert key in s
    assert set(s["fit"]) >= {"b", "a", "frontier"}
    assert s["d_in"] == s["k_max"] == D and s["d_out"] == D and s["tokens"] == n
    assert isinstance(s["k_star"], int) and isinstance(s["r_star"], float)
    assert s["r_star"] == pytest.approx(1 - s["k_star"] / D)
    assert json.loads(json.dumps(s, allow_nan=False)) == s


@pytest.mark.parametrize(
    "gram, weight",
    [
        (np.zeros((8, 8)), np.ones((3, 8))),  # dead inputs
        (np.eye(8), np.zeros((3, 8))),  # zero weight
        (np.array([[4.0]]), np.array([[2.0], [1.0]])),  # d_in = 1
        (np.diag([4.0, 3.0, 2.0, 1.0]), np.ones((2, 4))),  # too small for a frontier
        (np.outer(np.arange(1.0, 33.0), np.arange(1.0, 33.0)), np.ones((5, 32))),  # rank one
    ],
)
def test_degenerate_layers_are_json_safe(gram, weight):
    spec = compute_spectrum(gram, 10, weight)
    s = spec.summary_dict()
    json.dumps(s, allow_nan=False)
    assert s["k_star"] is None and s["r_star"] is None
    assert spec.mode_energy.sum() == pytest.approx(
        np.trace(weight @ (gram / 10) @ weight.T), rel=1e-10, abs=1e-12
    )


def test_invalid_inputs_raise_input_error():
    with pytest.raises(InputError):
        compute_spectrum(np.eye(3), 5, np.ones((2, 4)))
    with pytest.raises(InputError):
        compute_spectrum(np.ones((3, 2)), 5, np.ones((2, 2)))
    with pytest.raises(InputError):
        compute_spectrum(np.full((3, 3), np.nan), 5, np.ones((2, 3)))
    with pytest.raises(InputError):
        compute_spectrum(np.eye(3), 0, np.ones((2, 3)))
    with pytest.raises(InputError):
        estimate_frontier(np.ones(10), np.ones(9))
    with pytest.raises(InputError):
        estimate_frontier(np.ones(10), np.ones(10), floor="linear")


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    gram, n, w, _, _ = _layer(64, 2.0, 2.0, 10, 0.5, seed=61)
    ref = compute_spectrum(gram, n, w)
    spec = compute_spectrum(torch.from_numpy(gram), n, torch.from_numpy(w).float())
    np.testing.assert_allclose(spec.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=1e-12)
    assert spec.mode_energy.sum() == pytest.approx(ref.mode_energy.sum(), rel=1e-6)


def test_from_eigen_rebuilds_the_same_result():
    gram, n, w, _, _ = _layer(D, 1.5, 2.0, 40, 1.0, seed=71)
    spec = compute_spectrum(gram, n, w)
    rebuilt = LayerSpectrum.from_eigen(spec.eigenvalues, spec.mode_energy, tokens=n, d_out=D)
    assert rebuilt.k_star == spec.k_star
    assert rebuilt.b == pytest.approx(spec.b) and rebuilt.a == pytest.approx(spec.a, rel=1e-6)


def test_many_layers_fitted_together_match_each_fitted_alone():
    """``from_eigen_many`` (one batched screening for all layers) gives each layer exactly what
    ``from_eigen`` gives it alone: detected and undetected frontiers, different widths, a layer with too
    few modes for any fit, and frontier options passed per layer."""
    items = []
    for d, a, b, k, noise, seed in ((D, 1.5, 2.0, 40, 1.0, 71), (64, 2.5, 3.0, 8, 0.5, 72),
                                     (128, 2.0, 1.5, 100, 0.0, 73), (D, 2.0, 2.0, 30, 0.0, 74)):
        gram, n, w, _, _ = _layer(d, a, b, k, noise, seed=seed)
        spec = compute_spectrum(gram, n, w)
        items.append({"eigenvalues": spec.eigenvalues, "mode_energy": spec.mode_energy, "tokens": n,
                      "d_out": w.shape[0], "mode_gain": spec.mode_gain})
    items.append({"eigenvalues": np.array([3.0, 2.0, 1.0]), "mode_energy": np.ones(3), "tokens": 9,
                  "d_out": 2})
    items.append({**items[0], "frontier_options": {"floor": "constant", "n_starts": 5}})
    alone = [LayerSpectrum.from_eigen(**it) for it in items]
    together = LayerSpectrum.from_eigen_many(items)
    assert [s.k_star for s in together] == [s.k_star for s in alone]
    assert any(s.k_star is not None for s in alone) and any(s.k_star is None for s in alone)
    assert together[4].frontier.message.startswith("no frontier: too few usable modes")
    assert together[5].frontier.floor_model == "constant"
    for x, y in zip(together, alone):
        fx, fy = x.frontier, y.frontier
        assert fx.message == fy.message and fx.floor_model == fy.floor_model
        np.testing.assert_allclose([fx.k_star_fit, fx.delta_bic, fx.beta, fx.cost, fx.cost_null],
                                   [fy.k_star_fit, fy.delta_bic, fy.beta, fy.cost, fy.cost_null], rtol=1e-9)
        assert x.b == pytest.approx(y.b, rel=1e-12, nan_ok=True)
        assert x.a == pytest.approx(y.a, rel=1e-9, nan_ok=True)


def test_bad_input_in_a_batch_is_one_clear_error():
    good = {"eigenvalues": np.linspace(2, 1, 20), "mode_energy": np.ones(20), "tokens": 40, "d_out": 3}
    with pytest.raises(InputError, match="differ in length"):
        LayerSpectrum.from_eigen_many([good, {**good, "mode_energy": np.ones(19)}])


def test_frontier_fit_object_api():
    gram, n, w, _, _ = _layer(D, 2.5, 3.0, 26, 0.5, seed=81)
    spec = compute_spectrum(gram, n, w)
    f = spec.frontier
    assert isinstance(f, FrontierFit) and isinstance(spec.b_fit, PowerLawFit)
    assert f.success and f.detected and f.floor_model in ("decaying", "constant")
    d = f.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["k_star"] == f.k_star and d["k_star_lo"] <= d["k_star"] <= d["k_star_hi"]
    # the fitted model reproduces the measured gains closely (log scale)
    resid = np.log(f.predict(f.k)) - np.log(f.gain)
    assert np.median(np.abs(resid)) < 0.3
    assert np.all(f.predict_null(f.k) > 0)
    frac = f.learned_fraction([1, f.k_star_fit, 10 * f.k_star_fit])
    np.testing.assert_allclose(frac[1], (1 - math.exp(-1)) ** 2)
    assert frac[0] > 0.99 and frac[2] < 0.01


def test_plots_draw_without_a_display():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    gram, n, w, _, _ = _layer(64, 2.0, 2.0, 10, 0.5, seed=91)
    spec = compute_spectrum(gram, n, w)
    axes = spec.plot()
    assert len(axes) == 3 and axes[2].get_xscale() == "log"
    ax = spec.frontier.plot()
    assert ax.lines
    _, ax2 = plt.subplots()
    assert spec.b_fit.plot(ax2) is ax2
    plt.close("all")


def test_frontier_speed_d1024():
    """The estimator stays cheap (CPU time, generous bound for a loaded machine)."""
    d = 1024
    k = np.arange(1, d + 1, dtype=float)
    lam = k**-2.0
    rng = np.random.default_rng(0)
    gain = 10 * (-np.expm1(-((300 / k) ** 2))) ** 2 + np.exp(-2 * (300 / k) ** 2) * rng.chisquare(64, d) / 64
    t0 = time.process_time()
    f = estimate_frontier(lam, lam * gain)
    elapsed = time.process_time() - t0
    assert f.detected and abs(f.k_star - 300) <= 0.1 * 300
    assert elapsed < 1.0


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(20, np.random.default_rng(0))
    np.testing.assert_allclose(q.T @ q, np.eye(20), atol=1e-12)
    m = random_orthogonal(30, np.random.default_rng(0), cols=10)
    np.testing.assert_allclose(m.T @ m, np.eye(10), atol=1e-12)


def test_fits_stop_at_the_rank_of_an_undersampled_covariance():
    """N tokens for d > N input dimensions: the eigenvalues past the N-th are round-off of a float32 solve. The
    fits stop at the rank (b near the visible spectrum's, biased upward by undersampling only), where fitting
    into the round-off gave b ≈ 7 for a true 1.5 (QA 10, MiniLM's pooler and output.dense at 1,024 tokens)."""
    import torch

    rng = np.random.default_rng(0)
    d, n, b = 256, 128, 1.5
    x = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** (-b / 2)
    ev, u = torch.linalg.eigh(torch.tensor(x.T @ x / n, dtype=torch.float32))
    lam, u = ev.flip(0).double().clamp_min(0).numpy(), u.flip(1).double().numpy()
    gain = ((rng.standard_normal((64, d)) @ u) ** 2).sum(0)
    capped = LayerSpectrum.from_eigen(lam, lam * gain, tokens=n, d_out=64, mode_gain=gain)
    assert capped.b_fit.k_hi <= n and 1.4 < capped.b < 2.2
    uncapped = LayerSpectrum.from_eigen(lam, lam * gain, tokens=10 * d, d_out=64, mode_gain=gain)
    assert uncapped.b > 4  # the same spectrum fitted past its rank: what the cap prevents
