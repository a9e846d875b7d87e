"""The corrected spectral theory: reference values, exponents against exact sums, regimes, ρ.

Exact sums use ~10^6 modes plus the analytic tail (Hurwitz ζ / midpoint integral); slopes are
fitted where k* runs from 10^2.5 to 10^4 (THEORY_NOTES.md). Each test here can fail: the
expected numbers come from the closed-form corrected theory, the measured ones from the sums.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import special

from specprune import theory as T
from specprune.errors import SpecpruneError

K_WINDOW = np.logspace(2.5, 4.0, 16)  # k* range of the slope fits


def _window_times(g, b):
    return T.t_at_k_star(g, b, K_WINDOW)


def _poly():
    return T.Polynomial([(1.0, 1.0, 1.0), (1.0, 2.0, 3.0)])  # λt + λ²t³


def test_theory_is_pure_numpy_scipy():
    import pathlib
    import subprocess

    code = "import sys, specprune.theory; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    src = pathlib.Path(T.__file__).parent
    for path in src.glob("*.py"):
        assert "import torch" not in path.read_text(encoding="utf-8"), path


# --------------------------------------------------------------------------- reference values (notes table)

REFERENCE = [
    # a, b, g, chi, gamma, regime
    (1.5, 2.0, "ntk", 0.25, 0.75, "power"),
    (1.5, 2.0, "feature:beta=0.2", 0.4167, 1.25, "power"),
    (2.5, 2.0, "ntk", 0.75, 0.25, "power"),
    (3.0, 2.0, "ntk", 1.0, None, "logarithmic"),
    (4.0, 2.0, "ntk", 1.5, None, "saturating"),
]


@pytest.mark.parametrize("a,b,g,chi,gamma,regime", REFERENCE)
def test_reference_exponents(a, b, g, chi, gamma, regime):
    ex = T.exponents(a, b, g)
    assert ex.chi == pytest.approx(chi, abs=5e-5)
    assert ex.gamma_regime == regime
    if gamma is None:
        assert ex.gamma is None
        assert ex.gamma_effective == 0.0
        assert ex.chi_plus_gamma_equals_rho is False
    else:
        assert ex.gamma == pytest.approx(gamma, abs=5e-5)
        assert ex.chi + ex.gamma == pytest.approx(ex.rho, rel=1e-12)
    assert ex.k_star_exponent == pytest.approx(ex.rho / b)


@pytest.mark.parametrize("a,b,g,chi,gamma,regime", REFERENCE)
def test_reference_values_reproduced_by_exact_sums(a, b, g, chi, gamma, regime):
    spec = T.Spectrum(a, b)
    t = _window_times(g, b)
    L, F = T.loss_and_f2(spec, g, t)
    assert -T.loglog_slope(t, L) == pytest.approx(chi, rel=0.02)
    rho_over_b = T.exponents(a, b, g).k_star_exponent
    if regime == "power":
        assert T.loglog_slope(t, F) == pytest.approx(gamma, rel=0.02)
    elif regime == "logarithmic":
        # Σf² grows like (ρ/b) ln t: linear in ln t, not a power
        slope_ln = np.polyfit(np.log(t), F, 1)[0]
        assert slope_ln == pytest.approx(rho_over_b, rel=0.02)
        local = np.diff(np.log(F)) / np.diff(np.log(t))
        assert local[0] > 1.3 * local[-1]  # a log-log "slope" that keeps falling: no power law
    else:  # saturating: Σf² → ζ(a−b), γ_eff = 0
        assert abs(T.loglog_slope(t, F)) < 0.005
        assert F[-1] == pytest.approx(special.zeta(a - b), rel=1e-3)
        approach = T.loglog_slope(t, special.zeta(a - b) - F)
        assert approach == pytest.approx(T.exponents(a, b, g).approach_exponent, rel=0.02)


def test_k_star_exponent_reference():
    ex = T.exponents(2.0, 2.0, "monomial:m=2,n=1.5")
    assert ex.k_star_exponent == pytest.approx(0.375, abs=1e-12)
    t = np.logspace(3, 9, 13)
    assert T.loglog_slope(t, T.k_star("monomial:m=2,n=1.5", 2.0, t)) == pytest.approx(0.375, abs=1e-9)


# --------------------------------------------------------------------------- ρ from any g (corrections 1, 2)


@pytest.mark.parametrize("m,n,C", [(1, 1, 1), (1, 5 / 3, 1), (2, 1.5, 1), (0.5, 2, 3.0), (1.7, 0.6, 0.2)])
def test_numeric_rho_matches_n_over_m_for_opaque_callables(m, n, C):
    def g(lam, t):  # an opaque callable: no m/n attributes, numeric path
        return C * lam**m * t**n

    ev = T.as_evolution(g)
    assert ev.m is None
    t = np.logspace(1, 12, 12)
    rho = T.rho_local(ev, t)
    assert np.all(rho > 0)  # sign-correct (correction 1)
    assert np.max(np.abs(rho - n / m)) < 1e-3
    assert np.max(np.abs(T.rho_from_frontier(ev, t) - n / m)) < 1e-3
    asy = T.asymptotics(ev)
    assert asy.source == "numeric" and asy.converged
    assert asy.rho == pytest.approx(n / m, abs=1e-3)
    assert asy.m_tail == pytest.approx(m, abs=1e-3)
    # the paper's eq (4), −E_t/E_λ, is negative
    lam = T.frontier_lambda(ev, t)
    e_lam, e_t = T.elasticities(ev, lam, t)
    assert np.all(-e_t / e_lam < 0)
    # the appendix's "ρ = n/(mb)" is the k* exponent ν, not ρ (correction 2)
    b = 2.0
    assert T.loglog_slope(t, T.k_star(ev, b, t)) == pytest.approx(n / (m * b), abs=1e-6)


def test_rho_of_non_monomial_g_tends_to_its_dominant_term():
    def g(lam, t):
        return lam * t + lam**2 * t**3

    t = np.logspace(2, 30, 8)
    rho = T.rho_local(g, t)
    assert np.all(np.diff(rho) > -1e-9) and rho[0] < 1.48  # moves from the λt branch toward 3/2
    assert rho[-1] == pytest.approx(1.5, abs=1e-6)
    asy = T.asymptotics(g)
    assert asy.rho == pytest.approx(1.5, abs=1e-6)
    assert asy.m_tail == pytest.approx(1.0, abs=1e-6)  # deep tail: the λt term wins
    assert T.asymptotics(_poly()).rho == 1.5 and T.asymptotics(_poly()).m_tail == 1.0


def test_feature_exponent_and_frontier_level():
    assert T.feature_exponent(0.2) == pytest.approx(5 / 3)
    assert T.feature_exponent(1.5) == 1.0  # max(1, 2/(1+β))
    assert T.exponents(1.5, 2.0, "feature:beta=0.5").rho == pytest.approx(4 / 3)
    lam = T.frontier_lambda("ntk", 1e6)
    assert T.parse_g("ntk")(lam, 1e6) == pytest.approx(T.KAPPA)


# --------------------------------------------------------------------------- exponents vs exact sums (grid)

GRID = [
    (1.5, 2.0, "ntk"),
    (1.5, 2.0, "feature:beta=0.2"),
    (2.5, 2.0, "ntk"),
    (1.3, 1.5, "monomial:m=2,n=1.5"),
    (2.0, 3.0, "monomial:m=0.5,n=1"),
    (1.1, 1.5, "feature:beta=0.5"),
    (1.8, 2.5, "monomial:m=1.5,n=2,C=0.3"),
    (1.5, 2.0, "poly"),
    (2.0, 2.0, "poly-callable"),
]


def _g(spec):
    if spec == "poly":
        return _poly()
    if spec == "poly-callable":
        return lambda lam, t: lam * t + lam**2 * t**3
    return spec


@pytest.mark.parametrize("a,b,gspec", GRID)
def test_slopes_of_exact_sums_match_chi_and_gamma(a, b, gspec):
    g = _g(gspec)
    ex = T.exponents(a, b, g)
    assert ex.gamma_regime == "power"
    t = _window_times(g, b)
    L, F = T.loss_and_f2(T.Spectrum(a, b), g, t)
    chi_fit, gamma_fit = -T.loglog_slope(t, L), T.loglog_slope(t, F)
    assert chi_fit == pytest.approx(ex.chi, rel=0.02)
    assert gamma_fit == pytest.approx(ex.gamma, rel=0.02)
    assert chi_fit + gamma_fit == pytest.approx(ex.rho, rel=0.02)
    # k* exponent equals ρ/b
    assert T.loglog_slope(t, T.k_star(g, b, t)) == pytest.approx(ex.k_star_exponent, rel=0.02)


def test_sum_f2_is_power_plus_zeta_constant():
    """Σf² = A k*^(1+b−a) + ζ(a−b): the constant is what biases raw slopes when 1+b−a is small."""
    a, b = 2.8, 2.0
    ex = T.exponents(a, b, "ntk")
    t = _window_times("ntk", b)
    F = T.sum_f2(T.Spectrum(a, b), "ntk", t)
    raw = T.loglog_slope(t, F)
    assert raw > 1.2 * ex.gamma  # the constant ζ(0.8) < 0 steepens the raw slope by >20%
    assert T.loglog_slope(t, F - ex.sum_f2_constant) == pytest.approx(ex.gamma, rel=1e-6)


def test_finite_mode_truncation_biases_chi_upward_tail_removes_it():
    """Correction 4: without the k > K tail a near 1 gives a badly biased χ."""
    a, b, N = 1.1, 1.5, 10_000
    t = T.t_at_k_star("ntk", b, np.logspace(1.5, 3, 12))
    k = np.arange(1, N + 1, dtype=float)
    truncated = [float(np.sum(k**-a * np.exp(-2 * k**-b * tt))) for tt in t]
    chi = T.exponents(a, b, "ntk").chi
    assert -T.loglog_slope(t, truncated) > 2.0 * chi
    assert -T.loglog_slope(t, T.loss(T.Spectrum(a, b, n_exact=N), "ntk", t)) == pytest.approx(chi, rel=1e-6)


def test_analytic_tail_matches_larger_exact_sums():
    g = _poly()
    t = T.t_at_k_star(g, 1.5, [100.0, 3000.0])
    ref = T.loss_and_f2(T.Spectrum(1.2, 1.5, n_exact=1_000_000), g, t)
    small = T.loss_and_f2(T.Spectrum(1.2, 1.5, n_exact=5_000), g, t)
    for r, s in zip(ref, small):
        np.testing.assert_allclose(s, r, rtol=1e-8)


# --------------------------------------------------------------------------- regimes (correction 5)


def test_regime_classification():
    assert T.classify_regime(1.5, 2.0, 1.0) == "power"
    assert T.classify_regime(3.0, 2.0, 1.0) == "logarithmic"
    assert T.classify_regime(3.5, 2.0, 1.0) == "saturating"
    assert T.classify_regime(1.5, 2.0, 0.2) == "cutoff-dominated"  # 2bm = 0.8 ≤ 1.5
    assert T.classify_regime(1.5, 2.0, 0.375) == "cutoff-dominated"  # boundary 2bm = 1+b−a
    ex = T.exponents(1.5, 2.0, "monomial:m=0.2,n=1")
    assert ex.gamma is None and ex.gamma_regime == "cutoff-dominated"
    assert ex.gamma_effective == pytest.approx(2.0)


def test_cutoff_dominated_sum_grows_with_mode_count():
    g = "monomial:m=0.2,n=1"
    t = float(T.t_at_k_star(g, 2.0, [30.0])[0])
    assert math.isinf(T.sum_f2(T.Spectrum(1.5, 2.0), g, t))
    f4 = T.sum_f2(T.Spectrum(1.5, 2.0, k_max=10**4), g, t)
    f5 = T.sum_f2(T.Spectrum(1.5, 2.0, k_max=10**5), g, t)
    assert f5 / f4 > 4.0  # ∝ K^(1+b−a−2bm) = K^0.7
    # in the power regime the same comparison converges
    p4 = T.sum_f2(T.Spectrum(1.5, 2.0, k_max=10**4), "ntk", 1e4)
    p5 = T.sum_f2(T.Spectrum(1.5, 2.0, k_max=10**5), "ntk", 1e4)
    assert p5 / p4 == pytest.approx(1.0, abs=1e-4)


def test_bad_inputs_raise_known_errors():
    for a, b in [(1.0, 2.0), (1.5, 1.0), (0.5, 2.0), (float("nan"), 2.0), (1.5, float("inf"))]:
        with pytest.raises(SpecpruneError):
            T.exponents(a, b, "ntk")
        with pytest.raises(SpecpruneError):
            T.Spectrum(a, b)
    with pytest.raises(SpecpruneError):
        T.exponents(1.5, 2.0, "ntk", t=-1.0)
    with pytest.raises(SpecpruneError):
        T.frontier_lambda(lambda lam, t: np.ones_like(lam * t), 1.0)  # never crosses κ


# ------------------------------------------------------------------------- frontier definition (correction 3)


@pytest.mark.parametrize("a,b,m", [(1.5, 2.0, 1.0), (3.0, 2.0, 0.5), (1.2, 2.0, 2.0)])
def test_rate_argmax_selects_documented_level(a, b, m):
    lam = np.logspace(-12, 0, 200_001)
    t = 1e6
    g = lam**m * t  # C = 1, n = 1
    log_rate = (a - b) / (2 * b) * np.log(lam) - g + np.log(lam**m)  # ln(w e^-g ∂_t g) + const
    i = int(np.argmax(log_rate))
    assert 0 < i < lam.size - 1
    assert g[i] == pytest.approx(T.rate_argmax_level(a, b, m), rel=1e-3)


def test_rate_argmax_has_no_interior_maximum_when_2bm_le_b_minus_a():
    a, b, m = 1.2, 3.0, 0.25  # 2bm = 1.5 ≤ b − a = 1.8
    assert T.rate_argmax_level(a, b, m) is None
    lam = np.logspace(-12, 0, 20_001)
    log_rate = (a - b) / (2 * b) * np.log(lam) - lam**m * 1e6 + np.log(lam**m)
    assert int(np.argmax(log_rate)) == 0  # rate keeps growing toward λ → 0: no frontier


# --------------------------------------------------------------------------- Theorem 2 (correction 6)


def test_theorem2_exact_form_by_monte_carlo():
    """ΔL = σ²Σf² + τ²K(1+σ²) for an orthonormal basis (the τ part is constant in t)."""
    rng = np.random.default_rng(0)
    K, N, draws, sigma2, tau2 = 40, 2000, 100, 0.04, 0.01
    spec = T.Spectrum(1.5, 2.0, k_max=K)
    t = 30.0
    g = spec.lam * t
    w = np.sqrt(spec.w2)
    f = w * (1 - np.exp(-g))
    phi = np.linalg.qr(rng.standard_normal((N, K)))[0] * math.sqrt(N)  # E_x[φ_j φ_k] = δ_jk
    target = phi @ w
    base = np.mean((phi @ f - target) ** 2)
    excess = []
    for _ in range(draws):
        # Rademacher η (zero mean, variance τ² exactly: the theorem needs nothing more), Gaussian ε
        eta = math.sqrt(tau2) * rng.choice([-1.0, 1.0], K)
        eps = rng.normal(0, math.sqrt(sigma2), (N, K))
        # antithetic signs: terms odd in η or ε (zero-mean, but very noisy) cancel exactly
        for se in (1.0, -1.0):
            for sn in (1.0, -1.0):
                pert = (phi + se * eps) @ (f + sn * eta)
                excess.append(np.mean((pert - target) ** 2) - base)
    predicted = T.perturbation_excess_loss(spec, "ntk", t, sigma2, tau2)
    assert float(predicted) == pytest.approx(sigma2 * float(np.sum(f**2)) + tau2 * K * (1 + sigma2), rel=1e-9)
    assert np.mean(excess) == pytest.approx(float(predicted), rel=0.02)


@pytest.mark.parametrize("b", [-1.0, 0, float("nan"), float("inf"), None, "5", True])
def test_k_star_refuses_a_bad_eigen_exponent(b):
    with pytest.raises(SpecpruneError, match=r"b \(eigen-exponent\) must be a finite number > 0"):
        T.k_star("ntk", b, 10.0)
    with pytest.raises(SpecpruneError, match=r"b \(eigen-exponent\) must be a finite number > 0"):
        T.t_at_k_star("ntk", b, 10.0)


@pytest.mark.parametrize("kappa", [0, -1.0, float("nan"), "1"])
def test_exponents_refuse_a_bad_frontier_level(kappa):
    with pytest.raises(SpecpruneError, match="frontier level kappa must be a finite number > 0"):
        T.exponents(1.5, 2.0, "ntk", kappa=kappa)


@pytest.mark.parametrize("x,y", [([1, 2, float("nan")], [1, 2, 3]), ([1, 2], [1, -2]), ([1], [1]),
                                 ([1, 2, 3], [1, 2]), (["a", "b"], [1, 2])])
def test_loglog_slope_refuses_what_has_no_log(x, y):
    with pytest.raises(SpecpruneError, match="loglog_slope needs"):
        T.loglog_slope(x, y)


@pytest.mark.parametrize("k_max", [float("nan"), float("inf"), 2.5, 0, True])
def test_spectrum_k_max_must_be_a_positive_integer(k_max):
    with pytest.raises(SpecpruneError, match="k_max must be an integer >= 1"):
        T.Spectrum(1.5, 2.0, k_max=k_max)


@pytest.mark.parametrize("call", [
    lambda: T.perturbation_excess_loss(T.Spectrum(1.5, 2.0, k_max=100), "ntk", 10.0, float("nan"), 0.0),
    lambda: T.perturbation_excess_loss(T.Spectrum(1.5, 2.0, k_max=100), "ntk", 10.0, 0.1, -1.0),
    lambda: T.rate_argmax_level(-1.0, 2.0, 1.0),
    lambda: T.rate_argmax_level(1.5, 2.0, float("inf")),
    lambda: T.compute_optimal_exponent(0.5, float("nan")),
    lambda: T.density_exponent(float("nan"), 2.0, 0.5),
    lambda: T.asymptotics("monomial:m=2,n=1", t=-1.0),
    lambda: T.identify(0.5, -0.1, 1.5, 2.0),
], ids=["sigma2-nan", "tau2-negative", "argmax-a", "argmax-m", "s_opt-b", "alpha-rho", "asymptotics-t",
        "identify-stderr"])
def test_theory_helpers_refuse_values_outside_their_domain(call):
    with pytest.raises(SpecpruneError, match="must be"):
        call()
