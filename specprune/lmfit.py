"""Batched, bounded Levenberg–Marquardt with the soft-L1 loss: many starts of one small model at once.

The frontier estimator (:mod:`specprune.spectra`) screens ~16 starting points per layer before it polishes
the best one with ``scipy.optimize.least_squares``. Run one at a time, each screening solve is a few dozen
trust-region iterations of a 5-parameter model on ≤ 160 points: almost all of its cost is the solver's
Python bookkeeping. Here every start advances together, as one array operation per step:

- ``model(θ, rows)`` gives ``f(θ)`` of shape ``(S, m)`` and its Jacobian ``(S, m, P)`` for the parameter
  rows θ (S × P) of the starts ``rows`` (indices into ``theta0``, for models that differ per start);
- residuals ``r = (f(θ) − y)·w``; the robust cost is scipy's ``soft_l1`` with scale σ,
  ``½ Σ σ² ρ((r/σ)²)``, ``ρ(z) = 2(√(1+z) − 1)`` (so costs compare directly with ``least_squares``);
- each step solves the iteratively reweighted Gauss–Newton system
  ``(JᵀVJ + μ·diag(JᵀVJ)) δ = −JᵀVr``, ``V = diag(ρ'(z)) = diag(1/√(1+z))`` (Marquardt's scaling, the
  analogue of ``x_scale="jac"``), and projects ``θ + δ`` onto the bounds;
- a row takes its step only if its cost falls (then μ ← μ/3, else μ ← 4μ); a row stops when its cost
  changes by less than ``ftol`` relatively or μ grows past 1e10.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Model = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def soft_l1_cost(resid: np.ndarray, sigma: float) -> np.ndarray:
    """``½ Σ σ² ρ((r/σ)²)`` over the last axis (``least_squares``' cost with ``loss="soft_l1"``)."""
    z = (resid / sigma) ** 2
    return sigma**2 * np.sum(np.sqrt(1.0 + z) - 1.0, axis=-1)


def lm_batch(
    model: Model,
    y: np.ndarray,
    w: np.ndarray,
    theta0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    sigma: float,
    *,
    max_iter: int = 40,
    ftol: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the soft-L1 cost of ``(model(θ) − y)·w`` from each row of ``theta0`` (S × P) within
    ``[lo, hi]``; returns the final parameters (S × P) and costs (S,). Rows whose model is not finite at
    the start get cost ``inf`` and stay where they are."""
    th = np.clip(np.asarray(theta0, dtype=np.float64), lo + 1e-9, hi - 1e-9)
    s, p = th.shape
    with np.errstate(all="ignore"):
        f, jac = model(th, np.arange(s))
        r = (f - y) * w
        cost = soft_l1_cost(r, sigma)
        cost[~np.isfinite(cost)] = np.inf
        mu = np.full(s, 1e-3)
        active = np.isfinite(cost)
        eye = np.eye(p)
        for _ in range(max_iter):
            if not active.any():
                break
            idx = np.flatnonzero(active)
            ja = jac[idx] * w[:, None]
            v = 1.0 / np.sqrt(1.0 + (r[idx] / sigma) ** 2)
            jv = ja * v[:, :, None]
            a = np.einsum("smi,smj->sij", jv, ja)
            g = np.einsum("smi,sm->si", jv, r[idx])
            d = np.einsum("sii->si", a) + 1e-12
            lhs = a + (mu[idx][:, None] * d)[:, :, None] * eye
            try:
                step = np.linalg.solve(lhs, -g[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                step = -g / d
            cand = np.clip(th[idx] + step, lo, hi)
            f_c, jac_c = model(cand, idx)
            r_c = (f_c - y) * w
            cost_c = soft_l1_cost(r_c, sigma)
            better = np.isfinite(cost_c) & (cost_c < cost[idx])
            gain = np.where(better, (cost[idx] - cost_c) / np.maximum(cost[idx], 1e-300), 0.0)
            take = idx[better]
            th[take], r[take], jac[take], cost[take] = cand[better], r_c[better], jac_c[better], cost_c[better]
            mu[idx] = np.where(better, mu[idx] / 3.0, mu[idx] * 4.0)
            done = (better & (gain < ftol)) | (mu[idx] > 1e10)
            active[idx[done]] = False
    return th, cost


def frontier_rows(lk: np.ndarray, decaying: np.ndarray) -> Model:
    """The learning-frontier model (:mod:`specprune.spectra`) for S parameter rows at once:
    ``ln q̂ = logaddexp(ln A − c ln k + 2 ln(1 − e^{−x}), ln F − 2x·[decaying])``, ``x = (k*/k)^β``, in
    ``θ = (ln A, c, ln k*, ln β, ln F)``; row s has the decaying floor when ``decaying[s]``. ``expm1``
    keeps ``ln(1 − e^{−x})`` and its derivative ``x/expm1(x)`` accurate for tiny x; x is capped at e^700
    so nothing overflows. Returns ``(ln q̂ (S × m), Jacobian (S × m × 5))``."""
    dec = np.asarray(decaying, dtype=np.float64)[:, None]

    def model(th: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        la, c, lks, lb, lf = (th[:, i : i + 1] for i in range(5))
        beta = np.exp(lb)
        u = beta * (lks - lk)
        x = np.exp(np.minimum(u, 700.0))
        lval = np.log(-np.expm1(-x))
        lder = x / np.expm1(np.minimum(x, 700.0))
        pw = la - c * lk + 2.0 * lval
        x2 = 2.0 * x * dec[rows]
        fl = lf - x2
        m = np.logaddexp(pw, fl)
        sp = np.exp(pw - m)
        sf = np.exp(fl - m)
        du = sp * 2.0 * lder - sf * x2
        jac = np.stack([sp, -sp * lk, du * beta, du * u, sf], axis=-1)
        return m, jac

    return model


def null_rows(lk: np.ndarray) -> Model:
    """The no-frontier model ``ln(A k^{−c} + F)`` in ``(ln A, c, ln F)`` for S rows at once."""

    def model(th: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        la, c, lf = (th[:, i : i + 1] for i in range(3))
        pw = la - c * lk
        m = np.logaddexp(pw, lf)
        sp = np.exp(pw - m)
        return m, np.stack([sp, -sp * lk, 1.0 - sp], axis=-1)

    return model
