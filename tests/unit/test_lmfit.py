"""The batched Levenberg–Marquardt that screens the frontier fits (specprune.lmfit)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from specprune.lmfit import Problem, frontier_rows, lm_batch, null_rows, soft_l1_cost, solve_problems

LK = np.log(np.arange(1, 161, dtype=np.float64))
TRUE = np.array([0.5, 1.2, np.log(30.0), np.log(2.0), -4.0])  # ln A, c, ln k*, ln β, ln F
LO = np.array([-np.inf, -20.0, np.log(0.5), np.log(0.2), -20.0])
HI = np.array([np.inf, 20.0, np.log(1600.0), np.log(20.0), 5.0])


@pytest.mark.parametrize("decaying", [True, False])
def test_frontier_jacobian_matches_finite_differences(decaying):
    model = frontier_rows(LK, np.array([decaying]))
    th = TRUE[None, :]
    _, jac = model(th, np.arange(1))
    eps = 1e-6
    for i in range(5):
        up, dn = th.copy(), th.copy()
        up[0, i] += eps
        dn[0, i] -= eps
        fd = (model(up, np.arange(1))[0] - model(dn, np.arange(1))[0]) / (2 * eps)
        assert np.allclose(jac[0, :, i], fd[0], rtol=1e-5, atol=1e-7), i


def test_null_jacobian_matches_finite_differences():
    model = null_rows(LK)
    th = np.array([[1.0, 0.8, -3.0]])
    _, jac = model(th, np.arange(1))
    for i in range(3):
        up, dn = th.copy(), th.copy()
        up[0, i] += 1e-6
        dn[0, i] -= 1e-6
        fd = (model(up, np.arange(1))[0] - model(dn, np.arange(1))[0]) / 2e-6
        assert np.allclose(jac[0, :, i], fd[0], rtol=1e-5, atol=1e-7)


def test_screening_finds_the_best_basin_scipy_finds_from_the_same_starts():
    """What the screening is for: over the starts of each floor kind, the lowest cost equals the lowest
    one-start-at-a-time ``least_squares`` reaches (a single start may end in a worse basin), every row
    stays in bounds, and the reported cost is the cost at the returned parameters."""
    rng = np.random.default_rng(0)
    dec = np.array([True] * 4 + [False] * 4)
    y = frontier_rows(LK, np.array([True]))(TRUE[None, :], np.arange(1))[0][0] + 0.05 * rng.standard_normal(LK.size)
    w = np.ones_like(y)
    starts = np.array([[0.0, 1.0, np.log(kc), np.log(1.5), -3.0] for kc in (3, 10, 60, 200)] * 2)
    th, cost = lm_batch(frontier_rows(LK, dec), y, w, starts, LO, HI, 0.05, max_iter=40)
    assert np.all(th >= LO) and np.all(th <= HI)
    ref = []
    for s in range(len(starts)):
        single = frontier_rows(LK, dec[s:s + 1])
        assert soft_l1_cost((single(th[s:s + 1], np.arange(1))[0][0] - y) * w, 0.05) == pytest.approx(cost[s])
        r = optimize.least_squares(lambda t, f=single: (f(t[None, :], np.arange(1))[0][0] - y) * w,
                                   np.clip(starts[s], LO + 1e-9, HI - 1e-9), bounds=(LO, HI), loss="soft_l1",
                                   f_scale=0.05, x_scale="jac", max_nfev=2000)
        ref.append(r.cost)
    ref = np.array(ref)
    for part in (slice(0, 4), slice(4, 8)):
        assert cost[part].min() == pytest.approx(ref[part].min(), rel=0.01)
    best = int(np.argmin(cost[:4]))
    assert np.exp(th[best, 2]) == pytest.approx(30.0, rel=0.1)  # the decaying floor recovers k*


def test_rows_that_start_non_finite_stay_put():
    y = np.zeros(LK.size)
    starts = np.array([[0.0, 1.0, 1.0, 0.0, -3.0], [0.0, 1.0, 1.0, 0.0, -3.0]])

    def model(th, rows):
        f, jac = frontier_rows(LK, np.array([True, True]))(th, rows)
        f[rows == 1] = np.nan
        return f, jac

    th, cost = lm_batch(model, y, np.ones_like(y), starts, LO, HI, 0.1)
    assert np.isfinite(cost[0]) and np.isinf(cost[1])
    assert np.array_equal(th[1], np.clip(starts[1], LO + 1e-9, HI - 1e-9))


def test_problems_solved_in_one_batch_equal_each_solved_alone():
    """Many independent problems (own series lengths, weights, bounds and σ; both model kinds) in one
    ``solve_problems`` call, chunked or not: each gets what ``lm_batch`` gives it alone."""
    rng = np.random.default_rng(1)
    probs = []
    for i, (m, k_true, sigma) in enumerate(((160, 30.0, 0.05), (90, 8.0, 0.1), (40, 12.0, 0.02))):
        lk = np.log(np.arange(1, m + 1, dtype=np.float64))
        true = np.array([0.5, 1.0 + 0.2 * i, np.log(k_true), np.log(2.0), -4.0])
        y = frontier_rows(lk, np.array([True]))(true[None, :], np.arange(1))[0][0]
        y = y + sigma * rng.standard_normal(m)
        w = np.linspace(1.5, 0.5, m)
        starts = np.array([[0.0, 1.0, np.log(kc), np.log(1.5), -3.0] for kc in (3, 10, 60)] * 2)
        hi = HI.copy()
        hi[2] = np.log(10.0 * m)
        dec = np.repeat([True, False], 3)
        probs.append(Problem("frontier", lk, y, w, starts, LO, hi, sigma, decaying=dec))
        probs.append(Problem("null", lk, y, w, np.array([[0.0, 1.0, -6.0], [0.5, 0.5, -2.0]]),
                             np.array([-np.inf, -20.0, -20.0]), np.array([np.inf, 20.0, 5.0]), sigma))
    for max_rows in (2048, 7):
        together = solve_problems(probs, max_rows=max_rows)
        for p, (th, cost) in zip(probs, together):
            model = frontier_rows(p.lk, p.decaying) if p.kind == "frontier" else null_rows(p.lk)
            th1, cost1 = lm_batch(model, p.y, p.w, p.theta0, p.lo, p.hi, p.sigma, max_iter=40)
            np.testing.assert_allclose(th, th1, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(cost, cost1, rtol=1e-9)
            assert np.all(np.isfinite(cost))

