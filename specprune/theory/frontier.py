"""The learning frontier and the spectral–temporal elasticity ρ, for any g.

Frontier (correction 3): the level set g(λ*(t), t) = κ with the documented constant κ = 1
(the argmax-of-rate definition instead selects g = 1 − (b−a)/(2bm) and has no interior maximum
when 2bm ≤ b − a, see :func:`rate_argmax_level`). With λ_k = k^(−b), k*(t) = λ*(t)^(−1/b).

Log-elasticities E_λ = ∂ ln g/∂ ln λ and E_t = ∂ ln g/∂ ln t, evaluated ON the frontier, give
(correction 1, sign-correct)

    ρ = E_t / E_λ = −d ln λ*/d ln t          (= n/m for g = C λ^m t^n),

so λ* ∝ t^(−ρ) and k* ∝ t^(ρ/b). Correction 2: ρ/b is the k* exponent, not ρ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import SpecpruneError
from .evolution import Evolution, Monomial, Polynomial, as_evolution

KAPPA = 1.0
"""Frontier level: a mode counts as learned once g(λ, t) ≥ κ (f_k ≥ (1 − 1/e) w_k)."""

_H = 1e-4  # log-step of the central differences
_LN_MIN, _LN_MAX = -690.0, 690.0  # ln of the smallest/largest λ or t searched

__all__ = [
    "KAPPA",
    "Asymptotics",
    "asymptotics",
    "elasticities",
    "frontier_lambda",
    "frontier_time",
    "k_star",
    "rate_argmax_level",
    "rho_from_frontier",
    "rho_local",
    "t_at_k_star",
]


def _number(x: Any, what: str, minimum: float = 0.0, inclusive: bool = False) -> float:
    """A finite real number > ``minimum`` (≥ with ``inclusive``; not a bool, not a string), or one clear
    error."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(x) \
            or x < minimum or (x == minimum and not inclusive):
        raise SpecpruneError(f"{what} must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {x!r}")
    return float(x)


def _check_kappa(kappa: float) -> float:
    return _number(kappa, "frontier level kappa")


def _positive(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise SpecpruneError(f"{what} must be positive and finite")
    return arr


def _log_g(g: Evolution, lam: np.ndarray, t: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        val = g(lam, t)
        if np.any(np.isnan(val)) or np.any(val < 0):
            raise SpecpruneError(f"evolution {g.name!r} returned a negative or NaN value")
        return np.log(val)


def _solve_log(fun, target: float, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Vectorised bisection for x with fun(x) = target, fun increasing in x (x = a log)."""
    lo = np.full(shape, -20.0)
    hi = np.full(shape, 20.0)
    for _ in range(12):  # widen the bracket where needed
        flo, fhi = fun(lo), fun(hi)
        bad_lo, bad_hi = ~(flo < target), ~(fhi > target)
        if not (bad_lo.any() or bad_hi.any()):
            break
        lo = np.where(bad_lo, np.maximum(2 * lo, _LN_MIN), lo)
        hi = np.where(bad_hi, np.minimum(2 * hi, _LN_MAX), hi)
    else:
        raise SpecpruneError(
            f"{what}: g never crosses the frontier level within 1e-300..1e300; "
            "g must be positive and increase without bound in both arguments"
        )
    for _ in range(90):
        mid = 0.5 * (lo + hi)
        above = fun(mid) > target
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
        if np.max(hi - lo) < 1e-13:
            break
    return 0.5 * (lo + hi)


def frontier_lambda(g: Any, t: Any, kappa: float = KAPPA) -> np.ndarray:
    """λ*(t): the solution of g(λ*, t) = κ (vectorised over t)."""
    g = as_evolution(g)
    kappa = _check_kappa(kappa)
    t = _positive(t, "t")
    if isinstance(g, Monomial):
        return g.frontier_lambda(t, kappa)
    x = _solve_log(lambda x: _log_g(g, np.exp(x), t), math.log(kappa), t.shape, "frontier")
    return np.exp(x)


def frontier_time(g: Any, lam: Any, kappa: float = KAPPA) -> np.ndarray:
    """The time t at which mode λ reaches the frontier: g(λ, t) = κ (vectorised over λ)."""
    g = as_evolution(g)
    kappa = _check_kappa(kappa)
    lam = _positive(lam, "lambda")
    if isinstance(g, Monomial):
        return g.frontier_time(lam, kappa)
    x = _solve_log(lambda x: _log_g(g, lam, np.exp(x)), math.log(kappa), lam.shape, "frontier time")
    return np.exp(x)


def k_star(g: Any, b: float, t: Any, kappa: float = KAPPA) -> np.ndarray:
    """Continuous frontier index k*(t) = λ*(t)^(−1/b) for λ_k = k^(−b)."""
    b = _number(b, "b (eigen-exponent)")
    return np.power(frontier_lambda(g, t, kappa), -1.0 / b)


def t_at_k_star(g: Any, b: float, k: Any, kappa: float = KAPPA) -> np.ndarray:
    """The time at which the frontier reaches index k (inverse of :func:`k_star`)."""
    k = _positive(k, "k*")
    return frontier_time(g, np.power(k, -_number(b, "b (eigen-exponent)")), kappa)


def elasticities(g: Any, lam: Any, t: Any, h: float = _H) -> tuple[np.ndarray, np.ndarray]:
    """(E_λ, E_t) = (∂ ln g/∂ ln λ, ∂ ln g/∂ ln t) by central differences in log space."""
    g = as_evolution(g)
    lam = _positive(lam, "lambda")
    t = _positive(t, "t")
    e = math.exp(h)
    e_lam = (_log_g(g, lam * e, t) - _log_g(g, lam / e, t)) / (2 * h)
    e_t = (_log_g(g, lam, t * e) - _log_g(g, lam, t / e)) / (2 * h)
    return e_lam, e_t


def rho_local(g: Any, t: Any, kappa: float = KAPPA) -> np.ndarray:
    """ρ(t) = E_t/E_λ on the frontier (λ = λ*(t)); positive; n/m for a monomial."""
    lam = frontier_lambda(g, t, kappa)
    e_lam, e_t = elasticities(g, lam, t)
    if np.any(e_lam <= 0) or np.any(e_t <= 0):
        raise SpecpruneError("g must increase in both λ and t on the frontier (non-positive elasticity)")
    return e_t / e_lam


def rho_from_frontier(g: Any, t: Any, kappa: float = KAPPA, h: float = 1e-3) -> np.ndarray:
    """ρ = −d ln λ*/d ln t, by central differences of the frontier itself (a cross-check)."""
    t = _positive(t, "t")
    e = math.exp(h)
    return -(np.log(frontier_lambda(g, t * e, kappa)) - np.log(frontier_lambda(g, t / e, kappa))) / (2 * h)


@dataclass(frozen=True)
class Asymptotics:
    """Large-t elasticities of g.

    rho: E_t/E_λ on the frontier as t → ∞ (or at the given t); m, n: the frontier elasticities
    there (rho = n/m); m_tail, n_tail: E_λ and E_t deep in the unlearned tail (λ → 0 at fixed t);
    m_tail decides whether Σf_k² converges; source: "analytic" or "numeric"; converged: False when a numeric ρ
    still drifts at the deepest frontier probed (the value is then the last one, at ``t``)."""

    rho: float
    m: float
    n: float
    m_tail: float
    n_tail: float
    source: str
    converged: bool
    t: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tail_elasticities(g: Evolution, t: float, lam_front: float) -> tuple[float, float]:
    """(E_λ, E_t) as λ → 0 at fixed t: probe decades below the frontier until g would underflow."""
    found = None
    lam = lam_front
    for _ in range(40):
        lam *= 1e-10
        if lam < 1e-290:
            break
        gv = float(g(np.array([lam]), np.array([t]))[0])
        if not (gv > 1e-280):
            break
        found = lam
    e_lam, e_t = elasticities(g, np.array([found if found is not None else lam_front]), np.array([t]))
    return float(e_lam[0]), float(e_t[0])


def asymptotics(g: Any, t: float | None = None, kappa: float = KAPPA) -> Asymptotics:
    """ρ, m, n (frontier) and m_tail for g; local at ``t`` when given, else t → ∞."""
    g = as_evolution(g)
    if t is not None:
        _number(t, "t")
    kappa = _check_kappa(kappa)
    if isinstance(g, Monomial):
        return Asymptotics(g.n / g.m, g.m, g.n, g.m, g.n, "analytic", True, t)
    if t is not None:
        t_arr = _positive([t], "t")
        lam = frontier_lambda(g, t_arr, kappa)
        e_lam, e_t = elasticities(g, lam, t_arr)
        if e_lam[0] <= 0 or e_t[0] <= 0:
            raise SpecpruneError("g must increase in both λ and t on the frontier")
        m_tail, n_tail = _tail_elasticities(g, float(t), float(lam[0]))
        return Asymptotics(float(e_t[0] / e_lam[0]), float(e_lam[0]), float(e_t[0]), m_tail, n_tail,
                           "numeric", True, float(t))
    if isinstance(g, Polynomial):
        _, m, n = max(g.terms, key=lambda term: (term[2] / term[1], -term[1]))
        _, m_tail, n_tail = min(g.terms, key=lambda term: (term[1], -term[2]))
        return Asymptotics(n / m, m, n, m_tail, n_tail, "analytic", True, None)
    # numeric t → ∞: follow the frontier down in λ* until ρ stops moving
    lams, ts = [], []
    for lam_val in 10.0 ** -np.arange(4.0, 64.0, 4.0):
        try:  # stop where the frontier time leaves the floating-point range
            tv = float(frontier_time(g, np.array([lam_val]), kappa)[0])
        except SpecpruneError:
            if not lams:  # g fails at an ordinary frontier: report its own error
                raise
            break
        if not (math.isfinite(tv) and tv < 1e300):
            break
        lams.append(lam_val)
        ts.append(tv)
    lam_grid, times = np.asarray(lams), np.asarray(ts)
    if lam_grid.size < 2:
        raise SpecpruneError(f"cannot follow the frontier of {g.name!r} to large t")
    e_lam, e_t = elasticities(g, lam_grid, times)
    if np.any(e_lam <= 0) or np.any(e_t <= 0):
        raise SpecpruneError("g must increase in both λ and t on the frontier")
    rhos = e_t / e_lam
    converged = bool(abs(rhos[-1] - rhos[-2]) <= 1e-6 * max(1.0, abs(rhos[-1])))
    t_ref = float(times[0])
    m_tail, n_tail = _tail_elasticities(g, t_ref, float(lam_grid[0]))
    return Asymptotics(float(rhos[-1]), float(e_lam[-1]), float(e_t[-1]), m_tail, n_tail, "numeric",
                       converged, None if converged else float(times[-1]))


def rate_argmax_level(a: float, b: float, m: float) -> float | None:
    """The level g selected by the paper's argmax-of-rate frontier, for g = C λ^m t^n.

    R(λ, t) = w_λ e^(−g) ∂_t g with w_λ ∝ λ^((a−b)/(2b)) gives d ln R/d ln λ = (a−b)/(2b) + m − m g,
    so the maximum sits at g = 1 − (b−a)/(2bm); there is no interior maximum (None) when
    2bm ≤ b − a. This is why the level set g = κ is used instead (correction 3)."""
    a, b, m = _number(a, "a", 1.0), _number(b, "b", 1.0), _number(m, "m")
    level = 1.0 - (b - a) / (2.0 * b * m)
    return level if level > 0 else None
