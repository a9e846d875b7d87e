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

Rows may belong to different problems (their own series, weights, bounds and σ): :func:`solve_problems`
screens every layer of an analysis in one batch (``specprune.spectra.run_steps``), which pays the
per-step Python cost once for the model instead of once per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Model = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def soft_l1_cost(resid: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """``½ Σ σ² ρ((r/σ)²)`` over the last axis (``least_squares``' cost with ``loss="soft_l1"``); σ is a
    scalar or one per row of ``resid`` (shape S × 1)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    z = (resid / sigma) ** 2
    return (sigma[..., 0] if sigma.ndim else sigma) ** 2 * np.sum(np.sqrt(1.0 + z) - 1.0, axis=-1)


def lm_batch(
    model: Model,
    y: np.ndarray,
    w: np.ndarray,
    theta0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    sigma: float | np.ndarray,
    *,
    max_iter: int = 40,
    ftol: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the soft-L1 cost of ``(model(θ) − y)·w`` from each row of ``theta0`` (S × P) within
    ``[lo, hi]``; returns the final parameters (S × P) and costs (S,). Rows whose model is not finite at
    the start get cost ``inf`` and stay where they are.

    ``y`` and ``w`` are one series (m,) shared by every row or one per row (S × m; padding points get
    ``w = 0``); ``lo``/``hi`` are (P,) or (S × P); ``sigma`` is a scalar or one per row (S,): so one call
    can fit many independent problems of the same model."""
    th0 = np.asarray(theta0, dtype=np.float64)
    s, p = th0.shape
    m = np.shape(y)[-1]
    y, w = np.broadcast_to(y, (s, m)), np.broadcast_to(w, (s, m))
    lo, hi = np.broadcast_to(lo, (s, p)), np.broadcast_to(hi, (s, p))
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (s,))[:, None]
    th = np.clip(th0, lo + 1e-9, hi - 1e-9)
    with np.errstate(all="ignore"):
        f, jac = model(th, np.arange(s))
        r = (f - y) * w
        cost = soft_l1_cost(r, sig)
        cost[~np.isfinite(cost)] = np.inf
        mu = np.full(s, 1e-3)
        active = np.isfinite(cost)
        eye = np.eye(p)
        for _ in range(max_iter):
            if not active.any():
                break
            idx = np.flatnonzero(active)
            wi, si = w[idx], sig[idx]
            ja = jac[idx] * wi[:, :, None]
            v = 1.0 / np.sqrt(1.0 + (r[idx] / si) ** 2)
            jvt = (ja * v[:, :, None]).transpose(0, 2, 1)
            a = jvt @ ja  # batched P × P normal matrices (matmul: 12× faster than the einsum here)
            g = (jvt @ r[idx][:, :, None])[:, :, 0]
            d = np.einsum("sii->si", a) + 1e-12
            lhs = a + (mu[idx][:, None] * d)[:, :, None] * eye
            try:
                step = np.linalg.solve(lhs, -g[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                step = -g / d
            cand = np.clip(th[idx] + step, lo[idx], hi[idx])
            f_c, jac_c = model(cand, idx)
            r_c = (f_c - y[idx]) * wi
            cost_c = soft_l1_cost(r_c, si)
            better = np.isfinite(cost_c) & (cost_c < cost[idx])
            gain = np.where(better, (cost[idx] - cost_c) / np.maximum(cost[idx], 1e-300), 0.0)
            take = idx[better]
            th[take], r[take] = cand[better], r_c[better]
            jac[take], cost[take] = jac_c[better], cost_c[better]
            mu[idx] = np.where(better, mu[idx] / 3.0, mu[idx] * 4.0)
            done = (better & (gain < ftol)) | (mu[idx] > 1e10)
            active[idx[done]] = False
    return th, cost


def frontier_rows(lk: np.ndarray, decaying: np.ndarray) -> Model:
    """The learning-frontier model (:mod:`specprune.spectra`) for S parameter rows at once:
    ``ln q̂ = logaddexp(ln A − c ln k + 2 ln(1 − e^{−x}), ln F − 2x·[decaying])``, ``x = (k*/k)^β``, in
    ``θ = (ln A, c, ln k*, ln β, ln F)``; row s has the decaying floor when ``decaying[s]``. ``expm1``
    keeps ``ln(1 − e^{−x})`` and its derivative ``x/expm1(x)`` accurate for tiny x; x is capped at e^700
    so nothing overflows. ``lk`` is one ``ln k`` series (m,) or one per row (S × m). Returns
    ``(ln q̂ (S × m), Jacobian (S × m × 5))``."""
    dec = np.asarray(decaying, dtype=np.float64)[:, None]
    lk_all = np.asarray(lk, dtype=np.float64)

    def model(th: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lk = lk_all if lk_all.ndim == 1 else lk_all[rows]
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
    """The no-frontier model ``ln(A k^{−c} + F)`` in ``(ln A, c, ln F)`` for S rows at once (``lk`` as in
    :func:`frontier_rows`)."""
    lk_all = np.asarray(lk, dtype=np.float64)

    def model(th: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lk = lk_all if lk_all.ndim == 1 else lk_all[rows]
        la, c, lf = (th[:, i : i + 1] for i in range(3))
        pw = la - c * lk
        m = np.logaddexp(pw, lf)
        sp = np.exp(pw - m)
        return m, np.stack([sp, -sp * lk, 1.0 - sp], axis=-1)

    return model


@dataclass
class Problem:
    """One screening problem: starts ``theta0`` (S × P) of one model kind on one series ``(lk, y, w)``.
    ``kind`` is ``"frontier"`` (``decaying`` gives each start's floor) or ``"null"``."""

    kind: str
    lk: np.ndarray
    y: np.ndarray
    w: np.ndarray
    theta0: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sigma: float
    decaying: np.ndarray | None = None


def solve_problems(problems: list[Problem], *, max_iter: int = 40,
                   max_rows: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`lm_batch` over many independent problems at once: the starts of every problem of a kind
    become rows of one batch (≤ ``max_rows`` per call), each with its own series, bounds and σ; shorter
    series are padded by repeating their last point with weight 0 (no residual, no gradient). Each
    row's iterations are its own, so every problem gets what it would get alone (to round-off). Returns
    ``(θ, cost)`` per problem, in order."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(problems)
    for kind in sorted({p.kind for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.kind == kind]
        while idx:
            chunk, rows = [], 0
            while idx and (not chunk or rows + len(problems[idx[0]].theta0) <= max_rows):
                rows += len(problems[idx[0]].theta0)
                chunk.append(idx.pop(0))
            for j, res in zip(chunk, _solve_chunk([problems[j] for j in chunk], kind, max_iter)):
                out[j] = res
    return out  # type: ignore[return-value]


def _solve_chunk(probs: list[Problem], kind: str, max_iter: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One :func:`lm_batch` call over the rows of ``probs`` (all of one kind), split back per problem."""
    m = max(p.y.size for p in probs)
    counts = [len(p.theta0) for p in probs]

    def rows_of(get, pad_last: bool) -> np.ndarray:
        out = []
        for p, c in zip(probs, counts):
            v = np.asarray(get(p), dtype=np.float64)
            v = np.concatenate([v, np.full(m - v.size, v[-1] if pad_last else 0.0)])
            out.append(np.broadcast_to(v, (c, m)))
        return np.concatenate(out)

    lk, y, w = rows_of(lambda p: p.lk, True), rows_of(lambda p: p.y, True), rows_of(lambda p: p.w, False)
    theta0 = np.concatenate([p.theta0 for p in probs])
    lo = np.concatenate([np.broadcast_to(p.lo, p.theta0.shape) for p in probs])
    hi = np.concatenate([np.broadcast_to(p.hi, p.theta0.shape) for p in probs])
    sigma = np.concatenate([np.full(c, p.sigma) for p, c in zip(probs, counts)])
    if kind == "frontier":
        model = frontier_rows(lk, np.concatenate([p.decaying for p in probs]))
    elif kind == "null":
        model = null_rows(lk)
    else:
        raise ValueError(f"unknown problem kind {kind!r}")
    th, cost = lm_batch(model, y, w, theta0, lo, hi, sigma, max_iter=max_iter)
    splits = np.cumsum(counts)[:-1]
    return list(zip(np.split(th, splits), np.split(cost, splits)))
