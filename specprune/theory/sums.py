"""Exact mode sums of the power-law model, with the k > K tail added analytically.

Model (normalised so that mode 1 has unit eigenvalue and unit target energy):

    λ_k = k^(−b),   e_k = λ_k w_k² = k^(−a),   w_k² = k^(b−a),   f_k(t) = w_k (1 − e^(−g(λ_k, t))).

Sums over k = 1..N (N = ``n_exact``, default 10^6) are evaluated term by term (vectorised numpy);
the rest k = N+1..K_max (K_max = ``k_max``, None = infinitely many modes) is added analytically:
pure power parts with the Hurwitz zeta function ζ(s, N+1), the remainder with the midpoint
(Euler–Maclaurin) integral ∫_{N+1/2}^{K_max+1/2} h(x) dx evaluated by adaptive quadrature in
u = ln x (relative error O(N^−2)). Adding the tail removes the finite-mode bias that otherwise
pushes fitted exponents upward when a is near 1 (correction 4).

* L(t) = Σ_k e_k e^(−2g_k)                       (eq 6; target energy beyond a finite K_max counts
                                                   in full: a model with K_max modes cannot learn it)
* Σ_k f_k² = Σ_k w_k² (1 − e^(−g_k))²            (diverges when 2 b m_tail ≤ 1 + b − a and K_max = ∞)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import integrate, special

from ..errors import SpecpruneError
from .evolution import Evolution, as_evolution
from .frontier import KAPPA, asymptotics, k_star

__all__ = [
    "Spectrum",
    "energy_beyond",
    "loglog_slope",
    "loss",
    "loss_and_f2",
    "loss_at_zero",
    "sum_f2",
    "tail_integral",
]


@dataclass(frozen=True)
class Spectrum:
    """Power-law spectrum λ_k = k^(−b), e_k = k^(−a) (a, b > 1) over ``k_max`` modes (None = ∞);
    the first ``n_exact`` modes are summed exactly."""

    a: float
    b: float
    n_exact: int = 1_000_000
    k_max: int | None = None

    def __post_init__(self) -> None:
        for key in ("a", "b"):
            val = getattr(self, key)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 1):
                raise SpecpruneError(f"{key} must be a number > 1 (power-law exponent), got {val!r}")
        if int(self.n_exact) < 1:
            raise SpecpruneError(f"n_exact must be >= 1, got {self.n_exact!r}")
        if self.k_max is not None and (isinstance(self.k_max, bool) or not isinstance(self.k_max, (int, np.integer))
                                       or int(self.k_max) < 1):
            raise SpecpruneError(f"k_max must be an integer >= 1 (or None for ∞), got {self.k_max!r}")

    @property
    def n(self) -> int:
        """Number of modes summed exactly: min(n_exact, k_max)."""
        return int(self.n_exact if self.k_max is None else min(self.n_exact, self.k_max))

    @property
    def has_tail(self) -> bool:
        return self.k_max is None or int(self.k_max) > self.n

    @cached_property
    def k(self) -> np.ndarray:
        return np.arange(1, self.n + 1, dtype=float)

    @cached_property
    def lam(self) -> np.ndarray:
        return np.power(self.k, -float(self.b))

    @cached_property
    def energy(self) -> np.ndarray:
        return np.power(self.k, -float(self.a))

    @cached_property
    def w2(self) -> np.ndarray:
        return np.power(self.k, float(self.b - self.a))

    @property
    def c(self) -> float:
        """1 + b − a: the exponent of Σ_{k≤K} w_k² ∝ K^c."""
        return 1.0 + self.b - self.a

    def upper(self) -> float:
        """Upper limit (+1/2) of the tail integral."""
        return math.inf if self.k_max is None else float(self.k_max) + 0.5

    def zeta_tail(self, s: float, start: int) -> float:
        """Σ_{k=start}^{K_max} k^(−s) (Hurwitz zeta differences)."""
        if start > (self.k_max or math.inf):
            return 0.0
        val = float(special.zeta(s, start))
        if self.k_max is not None:
            val -= float(special.zeta(s, self.k_max + 1))
        return val


def tail_integral(log_h: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """∫_lo^hi h(x) dx with h given by its log as a function of u = ln x (handles underflow)."""
    if not hi > lo:
        return 0.0

    def integrand(u: float) -> float:
        with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
            v = float(np.exp(u + log_h(np.array([u]))[0]))
        return v if math.isfinite(v) else 0.0

    ulo = math.log(lo)
    uhi = math.log(hi) if math.isfinite(hi) else math.inf
    val, _err = integrate.quad(integrand, ulo, uhi, limit=400, epsabs=0.0, epsrel=1e-10)
    return float(val)


def _times(t: Any) -> tuple[np.ndarray, bool]:
    arr = np.asarray(t, dtype=float)
    scalar = arr.ndim == 0
    arr = np.atleast_1d(arr)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise SpecpruneError("t must be positive and finite")
    return arr, scalar


def _ret(vals: np.ndarray, scalar: bool):
    return float(vals[0]) if scalar else vals


def _g_at(g: Evolution, lam: np.ndarray, t: float) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        out = g(lam, t)
    if np.any(np.isnan(out)) or np.any(out < 0):
        raise SpecpruneError(f"evolution {g.name!r} returned a negative or NaN value")
    return out


def _g_of_u(g: Evolution, b: float, t: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(u: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return g(np.exp(-b * u), t)

    return fn


def _loss_tail(spec: Spectrum, g: Evolution, t: float) -> float:
    """Σ_{k>N} e_k e^(−2g_k): ζ-tail of e_k minus ∫ x^(−a) (1 − e^(−2g)) dx, plus the energy beyond K_max."""
    start = spec.n + 1
    pure = spec.zeta_tail(spec.a, start)
    gu = _g_of_u(g, spec.b, t)
    corr = tail_integral(lambda u: -spec.a * u + np.log(-np.expm1(-2.0 * gu(u))), spec.n + 0.5, spec.upper())
    beyond = 0.0 if spec.k_max is None else float(special.zeta(spec.a, spec.k_max + 1))
    return pure - corr + beyond


def _f2_tail(spec: Spectrum, g: Evolution, t: float) -> float:
    gu = _g_of_u(g, spec.b, t)
    return tail_integral(lambda u: (spec.b - spec.a) * u + 2.0 * np.log(-np.expm1(-gu(u))),
                         spec.n + 0.5, spec.upper())


def _f2_diverges(spec: Spectrum, g: Evolution) -> bool:
    if spec.k_max is not None:
        return False
    m_tail = asymptotics(g).m_tail
    return 2.0 * spec.b * m_tail <= spec.c + 1e-12


def loss_and_f2(spec: Spectrum, g: Any, t: Any) -> tuple[Any, Any]:
    """(L(t), Σ_k f_k(t)²) for each t (exact sums + analytic tail); Σf² is inf when it diverges."""
    g = as_evolution(g)
    ts, scalar = _times(t)
    diverges = _f2_diverges(spec, g)
    L = np.empty_like(ts)
    F = np.empty_like(ts)
    for i, tv in enumerate(ts):
        gk = _g_at(g, spec.lam, tv)
        L[i] = float(np.dot(spec.energy, np.exp(-2.0 * gk)))
        F[i] = math.inf if diverges else float(np.dot(spec.w2, np.square(-np.expm1(-gk))))
        if spec.has_tail:
            L[i] += _loss_tail(spec, g, tv)
            if not diverges:
                F[i] += _f2_tail(spec, g, tv)
        elif spec.k_max is not None:
            L[i] += float(special.zeta(spec.a, spec.k_max + 1))
    return _ret(L, scalar), _ret(F, scalar)


def loss(spec: Spectrum, g: Any, t: Any) -> Any:
    """L(t) = Σ_k λ_k w_k² e^(−2 g(λ_k, t)) (eq 6)."""
    g = as_evolution(g)
    ts, scalar = _times(t)
    out = np.empty_like(ts)
    for i, tv in enumerate(ts):
        gk = _g_at(g, spec.lam, tv)
        out[i] = float(np.dot(spec.energy, np.exp(-2.0 * gk)))
        if spec.has_tail:
            out[i] += _loss_tail(spec, g, tv)
        elif spec.k_max is not None:
            out[i] += float(special.zeta(spec.a, spec.k_max + 1))
    return _ret(out, scalar)


def sum_f2(spec: Spectrum, g: Any, t: Any) -> Any:
    """Σ_k f_k(t)² = Σ_k w_k² (1 − e^(−g_k))² (inf when it diverges with the number of modes)."""
    g = as_evolution(g)
    ts, scalar = _times(t)
    if _f2_diverges(spec, g):
        return _ret(np.full_like(ts, math.inf), scalar)
    out = np.empty_like(ts)
    for i, tv in enumerate(ts):
        gk = _g_at(g, spec.lam, tv)
        out[i] = float(np.dot(spec.w2, np.square(-np.expm1(-gk))))
        if spec.has_tail:
            out[i] += _f2_tail(spec, g, tv)
    return _ret(out, scalar)


def loss_at_zero(spec: Spectrum) -> float:
    """L(0) = Σ_k e_k: nothing learned (the saturation level of the pruning curve)."""
    return float(special.zeta(spec.a, 1))


def energy_beyond(spec: Spectrum, g: Any, t: float, kappa: float = KAPPA) -> dict[str, float]:
    """Share of Σf² carried by modes past the frontier (k > k*): what eq (23) ignores."""
    g = as_evolution(g)
    ks = float(k_star(g, spec.b, np.array([t]), kappa)[0])
    if ks >= spec.n:
        raise SpecpruneError(f"k* = {ks:.3g} is beyond the exactly summed modes (n_exact = {spec.n})")
    gk = _g_at(g, spec.lam, float(t))
    f2 = spec.w2 * np.square(-np.expm1(-gk))
    beyond = float(f2[math.floor(ks):].sum())
    total = float(f2.sum())
    if spec.has_tail:
        tail = _f2_tail(spec, g, float(t))
        beyond += tail
        total += tail
    return {"k_star": ks, "sum_f2": total, "beyond": beyond, "fraction": beyond / total}


def loglog_slope(x: Any, y: Any) -> float:
    """Least-squares slope of ln y against ln x (x and y positive and finite, at least two points)."""
    try:
        xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        raise SpecpruneError("loglog_slope needs numbers") from None
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise SpecpruneError(f"loglog_slope needs two 1-D arrays of the same length >= 2, got shapes {xs.shape} "
                             f"and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise SpecpruneError("loglog_slope needs positive finite x and y")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
