"""Pruning curve and r* (corrections 7, 8), quantization bit laws (9), density (10), inverse fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from specprune import theory as T
from specprune.errors import InputError, SpecpruneError

K_WINDOW = np.logspace(2.5, 4.0, 8)


# --------------------------------------------------------------------------- pruning curve (correction 7)


@pytest.fixture(scope="module")
def spec15():
    return T.Spectrum(1.5, 2.0, n_exact=200_000, k_max=10**6)


def test_pruning_curve_has_plateau_power_law_and_saturation(spec15):
    t = float(T.t_at_k_star("ntk", 2.0, [1000.0])[0])
    curve = T.pruning_curve(spec15, "ntk", t, k_cut=[0, 1, 30, 300, 100_000, 10**6])
    L, L0 = curve.loss, curve.loss_zero
    assert L0 == pytest.approx(special.zeta(1.5), rel=1e-12)
    assert curve.pruned_loss[0] == pytest.approx(L0, rel=1e-9)  # everything pruned: L(0)
    assert curve.phase[0] == "saturation"
    assert curve.phase[2:4] == ["power-law", "power-law"]
    assert curve.phase[-2:] == ["plateau", "plateau"]
    assert curve.pruned_loss[-2] == pytest.approx(L, rel=1e-4)
    assert curve.delta_true[-1] == 0.0
    assert np.all(np.diff(curve.pruned_loss) <= 0)  # pruning less never hurts more


def test_power_law_phase_is_k_c_to_the_1_minus_a_and_t_independent():
    a, b = 2.5, 2.0
    spec = T.Spectrum(a, b, n_exact=200_000)
    kc = np.array([10, 20, 40, 80, 100])
    t1, t2 = T.t_at_k_star("ntk", b, [1e4, 1e5])
    d1 = T.pruned_loss_increase(spec, "ntk", t1, kc)
    d2 = T.pruned_loss_increase(spec, "ntk", t2, kc)
    assert T.loglog_slope(kc, d1) == pytest.approx(1.0 - a, rel=0.02)
    np.testing.assert_allclose(d1, d2, rtol=1e-3)
    # eq (20)'s distance is not that loss: at the same cuts it grows with t
    s1 = T.pruned_distance(spec, "ntk", t1, kc)
    s2 = T.pruned_distance(spec, "ntk", t2, kc)
    assert np.all(s2 > 2.0 * s1)


def test_true_increase_equals_loss_difference(spec15):
    t = 1e5
    L = T.loss(spec15, "ntk", t)
    kc = 50
    gk = spec15.lam * t
    w = np.sqrt(spec15.w2)
    f = w * (1 - np.exp(-gk))
    resid = np.sum(spec15.lam[:kc] * (w[:kc] - f[:kc]) ** 2) + np.sum(spec15.energy[kc:])
    resid += special.zeta(1.5, spec15.n + 1)  # target energy of the analytic tail, all unlearned-or-pruned
    assert L + T.pruned_loss_increase(spec15, "ntk", t, [kc])[0] == pytest.approx(resid, rel=1e-9)


def test_energy_beyond_frontier_and_eq23_slope():
    """Eq (23) drops the 8–32% of Σf² past k*, and its log-log slope is never 1+b−a."""
    fr1 = T.energy_beyond(T.Spectrum(1.5, 2.0), "ntk", float(T.t_at_k_star("ntk", 2.0, [3000.0])[0]))
    fr2 = T.energy_beyond(T.Spectrum(2.5, 2.0), "ntk", float(T.t_at_k_star("ntk", 2.0, [3000.0])[0]))
    assert fr1["fraction"] == pytest.approx(0.318, abs=0.005)
    assert fr2["fraction"] == pytest.approx(0.082, abs=0.005)
    for c in (0.5, 1.5):
        theta = np.linspace(0.001, 0.999, 999)
        y, x = 1 - theta**c, 1 - theta
        slope = np.diff(np.log(y)) / np.diff(np.log(x))
        # the slope runs between 1 (θ → 1) and 0 (c > 1) or ∞ (c < 1): it never equals c ≠ 1
        if c > 1:
            assert np.all(slope > 0) and np.all(slope <= 1.0 + 1e-9)
        else:
            assert np.all(slope >= 1.0 - 1e-9)
    # what does carry 1+b−a: Σ_{k≤k_c} f_k² ∝ k_c^c inside the frontier and the distance at the knee ∝ k*^c
    spec = T.Spectrum(1.5, 2.0, n_exact=200_000)
    t = float(T.t_at_k_star("ntk", 2.0, [1e4])[0])
    kc = np.array([30, 60, 120, 240])
    inside = T.pruned_distance(spec, "ntk", t, [0])[0] - T.pruned_distance(spec, "ntk", t, kc)
    assert T.loglog_slope(kc, inside) == pytest.approx(1.5, rel=0.01)
    ts = T.t_at_k_star("ntk", 2.0, K_WINDOW)
    knee = [T.pruned_distance(spec, "ntk", tt, [int(k)])[0] for tt, k in zip(ts, K_WINDOW)]
    assert T.loglog_slope(ts, knee) == pytest.approx(T.exponents(1.5, 2.0).gamma, rel=0.02)


@pytest.mark.parametrize("a,b,g", [(1.5, 2.0, "ntk"), (1.5, 2.0, "feature:beta=0.2"),
                                   (1.3, 1.5, "monomial:m=2,n=1.5")])
def test_critical_rate_exponent_true_loss_rule(a, b, g):
    """1 − r* ∝ t^(ρ/b) by the true-loss rule; the eq-20 mix gives another exponent (correction 8)."""
    ex = T.exponents(a, b, g)
    spec = T.Spectrum(a, b, n_exact=200_000, k_max=10**6)
    ts = T.t_at_k_star(g, b, K_WINDOW)
    cuts = [T.critical_cut(spec, g, t) for t in ts]
    one_minus_r = [1.0 - c.rate for c in cuts]
    assert T.loglog_slope(ts, one_minus_r) == pytest.approx(ex.k_star_exponent, rel=0.02)
    for c in cuts:  # the rule itself: within budget, and one more mode pruned breaks it
        assert c.delta <= 0.01 * c.loss
        assert T.pruned_loss_increase(spec, g, c.t, [c.k_cut - 1])[0] > 0.01 * c.loss
    wrong = [T.critical_cut(T.Spectrum(a, b, n_exact=200_000), g, t, rule="eq20-distance").k_cut for t in ts]
    m, cc = ex.m_tail, 1 + b - a
    expected_wrong = (2 * b * m + a - 1) / (2 * b * m - cc) * ex.k_star_exponent
    slope_wrong = T.loglog_slope(ts, wrong)
    assert slope_wrong == pytest.approx(expected_wrong, rel=0.02)
    assert abs(slope_wrong - ex.k_star_exponent) > 0.1 * ex.k_star_exponent


def test_critical_cut_in_the_analytic_tail():
    spec = T.Spectrum(1.5, 2.0, n_exact=2_000)  # the cut (~4.8 k*) lies beyond the exact modes
    t = float(T.t_at_k_star("ntk", 2.0, [1000.0])[0])
    far = T.critical_cut(spec, "ntk", t)
    near = T.critical_cut(T.Spectrum(1.5, 2.0, n_exact=200_000), "ntk", t)
    assert far.k_cut > spec.n
    assert abs(far.k_cut - near.k_cut) <= 1
    assert far.rate is None


# --------------------------------------------------------------------------- quantization (corrections 6, 9)


@pytest.fixture(scope="module")
def qspec():
    return {(a, b): T.Spectrum(a, b, k_max=10**6) for a, b in [(1.5, 2.0), (1.3, 1.5), (2.5, 2.0)]}


@pytest.mark.parametrize("a,b,g", [(1.5, 2.0, "ntk"), (1.5, 2.0, "monomial:m=2,n=1.5"),
                                   (1.3, 1.5, "feature:beta=0.5"), (2.5, 2.0, "ntk")])
@pytest.mark.parametrize("noise", T.NOISE_MODELS)
def test_bit_laws(qspec, a, b, g, noise):
    spec = qspec[(a, b)]
    law = T.bit_law(a, b, g, noise)
    bits = np.arange(6, 13)
    t = float(T.t_at_k_star(g, b, [30.0])[0])
    vals = T.quantization_excess_loss(spec, g, t, bits, noise)
    slope_b = np.polyfit(bits, np.log2(vals), 1)[0]
    ts = T.t_at_k_star(g, b, np.array([30.0, 100.0, 300.0]))
    vt = [T.quantization_excess_loss(spec, g, tt, 8, noise) for tt in ts]
    slope_t = T.loglog_slope(ts, vt)
    if law.log2_slope is None:
        assert noise == "rtn-zero" and b <= a
        return
    assert slope_b == pytest.approx(law.log2_slope, rel=0.015)
    if noise == "additive":  # never t^γ: only max|f|² ∝ t^max(0,(b−a)ρ/b)
        assert law.t_exponent == pytest.approx(max(0.0, (b - a) * T.exponents(a, b, g).rho / b))
        assert slope_t == pytest.approx(law.t_exponent, abs=0.005)
        assert abs(slope_t - T.exponents(a, b, g).gamma) > 0.2
    elif b > a:  # relative noise and RTN with a zero level see t^γ
        assert law.t_exponent == pytest.approx(T.exponents(a, b, g).gamma)
        assert slope_t == pytest.approx(law.t_exponent, rel=0.02)


def test_rtn_zero_q_and_errors(qspec):
    law = T.bit_law(1.5, 2.0, "ntk", "rtn-zero")
    assert law.q == pytest.approx(2.0 - 0.25)
    assert law.log2_slope == pytest.approx(-(2 - 1 / 1.75))
    with pytest.raises(SpecpruneError):
        T.quantization_excess_loss(T.Spectrum(1.5, 2.0), "ntk", 1e3, 8)  # no finite k_max
    with pytest.raises(SpecpruneError):
        T.quantization_excess_loss(qspec[(1.5, 2.0)], "ntk", 1e3, 1)
    with pytest.raises(SpecpruneError):
        T.quantization_excess_loss(qspec[(1.5, 2.0)], "ntk", 1e3, 8, noise="dither")


def test_rtn_zero_tail_handling_matches_exact():
    t = float(T.t_at_k_star("ntk", 2.0, [30.0])[0])
    exact = T.quantization_excess_loss(T.Spectrum(1.5, 2.0, n_exact=100_000, k_max=100_000), "ntk", t,
                                       [4, 8, 12], "rtn-zero")
    tail = T.quantization_excess_loss(T.Spectrum(1.5, 2.0, n_exact=2_000, k_max=100_000), "ntk", t,
                                      [4, 8, 12], "rtn-zero")
    np.testing.assert_allclose(tail, exact, rtol=2e-3)


# --------------------------------------------------------------------------- density (correction 10)


@pytest.mark.parametrize("g,b", [("ntk", 2.0), ("feature:beta=0.2", 2.0), ("monomial:m=2,n=1.5", 1.5)])
def test_density_exponent_along_p_of_c(g, b):
    rho = T.exponents(2.0, b, g).rho
    C = np.logspace(12, 20, 9)
    for s in (0.1, 0.3, 0.6):
        P = 1e3 * (C / C[0]) ** s
        d = T.density(C, P, b, g, capacity_per_param=1e30)  # cap far away: uncapped law
        assert not d["capped"].any()
        alpha = T.loglog_slope(C, d["density"])
        law = T.density_law(b, g, s)
        assert alpha == pytest.approx(law.alpha, abs=1e-6)
        assert law.alpha == pytest.approx((rho / b) * (1 - s) - s)
        assert abs(alpha - law.alpha_paper) == pytest.approx(s, abs=1e-6)  # the paper drops −s


def test_density_cap_and_compute_optimal_frontier():
    b, g = 2.0, "feature:beta=0.2"
    rho = T.asymptotics(g).rho
    s_opt = T.compute_optimal_exponent(rho, b)
    assert s_opt == pytest.approx(rho / (b + rho))
    C = np.logspace(10, 22, 13)
    # P ∝ C^s_opt with K_max = P exactly at the frontier: k*(C/P) = K_max(P) all along
    P0 = 1e4
    t0 = float(T.frontier_time(g, [P0 ** (-b)])[0])  # k*(t0) = P0
    P = P0 * (C / (t0 * P0)) ** s_opt
    d = T.density(C, P, b, g)
    np.testing.assert_allclose(d["k_star"], d["k_max"], rtol=1e-6)
    assert abs(T.loglog_slope(C, d["density"])) < 1e-6  # α = 0 on the compute-optimal frontier
    assert T.density_law(b, g, s_opt).alpha == pytest.approx(0.0, abs=1e-12)
    # below s_opt the cap binds: δ saturates (capped density is constant)
    P_small = P0 * (C / C[0]) ** 0.1
    d2 = T.density(C, P_small, b, g)
    assert d2["capped"][-1]
    assert np.all(d2["density"] <= 1.0 + 1e-12)
    assert T.density_law(b, g, 0.1).alpha > 0 and T.density_law(b, g, 0.1).alpha_capped == 0.0
    assert T.density_law(b, g, 0.8).alpha_capped < 0  # above s_opt density falls


# --------------------------------------------------------------------------- inverse identification


@pytest.mark.parametrize("a,b,g", [(1.5, 2.0, "feature:beta=0.2"), (2.5, 2.0, "monomial:m=2,n=1.5"),
                                   (1.5, 2.0, "poly")])
def test_loss_curve_fitted_back_to_chi(a, b, g):
    if g == "poly":
        g = T.Polynomial([(1.0, 1.0, 1.0), (1.0, 2.0, 3.0)])
    ex = T.exponents(a, b, g)
    spec = T.Spectrum(a, b, n_exact=100_000)
    t = T.t_at_k_star(g, b, np.logspace(0.0, 4.0, 60))  # includes the early, non-power part
    L = T.loss(spec, g, t)
    rng = np.random.default_rng(7)
    noisy = L * np.exp(0.02 * rng.standard_normal(L.size))
    t_min = float(T.t_at_k_star(g, b, [10**2.5])[0])
    fit = T.fit_loss_curve(t, noisy, t_min=t_min, bootstrap=300, seed=1)
    assert fit.chi == pytest.approx(ex.chi, rel=0.02)
    assert abs(fit.chi - ex.chi) < 4 * fit.chi_stderr
    lo, hi = fit.chi_ci
    assert lo < fit.chi < hi and hi - lo < 0.1 * ex.chi
    assert fit.chi_bootstrap_stderr == pytest.approx(fit.chi_stderr, rel=0.5)
    ident = T.identify(fit.chi, fit.chi_stderr, a, b)
    assert ident.rho == pytest.approx(ex.rho, rel=0.02)
    assert ident.gamma_predicted == pytest.approx(ex.gamma, rel=0.02)
    assert ident.gamma_predicted + fit.chi == pytest.approx(ident.rho, rel=1e-12)


def test_fit_with_irreducible_floor_and_closure_check():
    a, b, g = 1.5, 2.0, "ntk"
    spec = T.Spectrum(a, b, n_exact=100_000)
    t = T.t_at_k_star(g, b, np.logspace(2.5, 4.0, 30))
    L, F = T.loss_and_f2(spec, g, t)
    floor = 0.5 * float(L.min())
    fit = T.fit_loss_curve(t, L + floor, floor="fit", bootstrap=0)
    assert fit.floor_fitted and fit.floor == pytest.approx(floor, rel=0.05)
    assert fit.chi == pytest.approx(0.25, rel=0.02)
    naive = T.fit_loss_curve(t, L + floor, bootstrap=0)
    assert naive.chi < 0.9 * 0.25  # ignoring the floor flattens the curve
    gamma_meas = T.loglog_slope(t, F)
    ok = T.identify(fit.chi, 0.005, a, b, gamma=gamma_meas, gamma_stderr=0.01)
    assert ok.consistent and abs(ok.closure) < 0.01
    bad = T.identify(fit.chi, 0.005, a, b, gamma=1.5 * gamma_meas, gamma_stderr=0.01)
    assert bad.consistent is False and abs(bad.closure_z) > 2
    sat = T.identify(1.5, 0.01, 4.0, 2.0, gamma=0.0, gamma_stderr=0.01)
    assert sat.gamma_regime == "saturating" and sat.gamma_predicted is None and sat.consistent is False


def test_fit_spectrum_recovers_exponent():
    rng = np.random.default_rng(3)
    k = np.arange(1, 2001, dtype=float)
    lam = k**-1.7 * np.exp(0.05 * rng.standard_normal(k.size))
    fit = T.fit_spectrum(lam, k, k_min=10)
    assert fit.exponent == pytest.approx(1.7, abs=3 * fit.stderr + 1e-3)
    assert fit.n_points == 1991


def test_csv_readers(tmp_path):
    good = tmp_path / "loss.csv"
    good.write_text("step,loss,lr\n0,3.0,1\n10,2.0,1\n100,1.0,1\n1000,0.5,1\n")
    step, loss = T.read_loss_csv(good)
    assert step.tolist() == [0, 10, 100, 1000] and loss.tolist() == [3.0, 2.0, 1.0, 0.5]
    bare = tmp_path / "bare.csv"
    bare.write_text("10,2.0\n100,1.0\n1000,0.5\n")
    assert T.read_loss_csv(bare)[1].tolist() == [2.0, 1.0, 0.5]
    for name, text in [("bad.csv", "step,loss\n1,abc\n"), ("cols.csv", "x,y\n1,2\n"), ("empty.csv", ""),
                       ("nan.csv", "step,loss\n1,nan\n2,1\n3,0.5\n")]:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(InputError):
            T.read_loss_csv(p)
    with pytest.raises(InputError):
        T.read_loss_csv(tmp_path / "missing.csv")
    with pytest.raises(SpecpruneError):
        T.fit_loss_curve([0, 1, 2], [1.0, 0.5, 0.3])  # only two points with step > 0
    with pytest.raises(SpecpruneError):
        T.fit_loss_curve([1, 2, 3, 4], [1.0, 0.5, 0.3, 0.2], floor=0.25)  # loss below the floor
    spec_csv = tmp_path / "spec.csv"
    spec_csv.write_text("k,lambda,energy\n" + "\n".join(f"{k},{k ** -2.0},{k ** -1.5}" for k in range(1, 50)))
    cols = T.read_spectrum_csv(spec_csv)
    assert T.fit_spectrum(cols["energy"], cols["k"]).exponent == pytest.approx(1.5, abs=1e-9)
    assert math.isclose(T.fit_spectrum(cols["lambda"], cols["k"]).exponent, 2.0, abs_tol=1e-9)
