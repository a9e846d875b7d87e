"""Pruning as spectral truncation: the pruned-loss curve and the critical cut r* (corrections 7, 8).

Keeping modes k ≤ k_c and zeroing the rest raises the loss (eq 6) by the TRUE increase

    ΔL_P(k_c, t) = Σ_{k>k_c} λ_k [w_k² − (w_k − f_k)²] = Σ_{k>k_c} λ_k f_k (2w_k − f_k)
                 = Σ_{k>k_c} e_k (1 − e^(−2g_k)),

which is what this module uses for the curve and for r*. The paper's eq (20),
D(k_c, t) = Σ_{k>k_c} f_k², is the squared DISTANCE ‖f_P − f‖² in an orthonormal basis, not a loss
increase; it is provided under that name (:func:`pruned_distance`) and never used for r*.

The pruned loss L_P = L(t) + ΔL_P has three phases: a plateau at L(t) for k_c ≫ k*, a
t-independent power law ≈ k_c^(1−a)/(a−1) for 1 ≪ k_c ≪ k*, and saturation at L(0) = Σ e_k as
k_c → 0. Critical cut (true-loss rule): the smallest k_c with L_P ≤ (1+ε) L(t); then
r* = 1 − k_c*/K_max and 1 − r* ∝ k* ∝ t^(ρ/b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SpecpruneError
from .evolution import as_evolution
from .frontier import KAPPA, k_star
from .sums import Spectrum, _g_at, _g_of_u, loss, loss_at_zero, tail_integral

__all__ = [
    "DEFAULT_EPSILON",
    "CriticalCut",
    "PruningCurve",
    "critical_cut",
    "pruned_distance",
    "pruned_loss_increase",
    "pruning_curve",
]

DEFAULT_EPSILON = 0.01
"""Default relative loss budget ε of the true-loss rule (1% above the unpruned loss)."""

_RULES = ("true-loss", "eq20-distance")


def _terms(spec: Spectrum, g, t: float, rule: str) -> tuple[np.ndarray, Any]:
    """Per-mode terms of the chosen sum over the exact modes, and log of the tail integrand."""
    gk = _g_at(g, spec.lam, t)
    gu = _g_of_u(g, spec.b, t)
    if rule == "true-loss":
        terms = spec.energy * (-np.expm1(-2.0 * gk))
        return terms, (lambda u: -spec.a * u + np.log(-np.expm1(-2.0 * gu(u))))
    terms = spec.w2 * np.square(-np.expm1(-gk))
    return terms, (lambda u: (spec.b - spec.a) * u + 2.0 * np.log(-np.expm1(-gu(u))))


def _suffix_sums(spec: Spectrum, g, t: float, rule: str) -> tuple[np.ndarray, Any]:
    """S[j] = Σ_{k>j} term_k for j = 0..N (exact part + tail), and the tail function for j > N."""
    if rule not in _RULES:
        raise SpecpruneError(f"unknown pruning rule {rule!r}; expected one of {', '.join(_RULES)}")
    terms, log_h = _terms(spec, g, t, rule)
    tail = tail_integral(log_h, spec.n + 0.5, spec.upper()) if spec.has_tail else 0.0
    suffix = np.empty(spec.n + 1)
    suffix[:-1] = np.cumsum(terms[::-1])[::-1]
    suffix[-1] = 0.0
    suffix += tail

    def beyond(x: float) -> float:  # Σ_{k>x} for x ≥ N (midpoint integral)
        return tail_integral(log_h, x + 0.5, spec.upper())

    return suffix, beyond


def _sum_beyond(spec: Spectrum, g: Any, t: float, k_cut: Any, rule: str) -> np.ndarray:
    g = as_evolution(g)
    kc = np.atleast_1d(np.asarray(k_cut, dtype=float))
    if np.any(kc < 0) or not np.all(np.isfinite(kc)) or np.any(kc != np.floor(kc)):
        raise SpecpruneError("k_cut must be non-negative integers")
    if spec.k_max is not None and np.any(kc > spec.k_max):
        raise SpecpruneError(f"k_cut cannot exceed k_max = {spec.k_max}")
    suffix, beyond = _suffix_sums(spec, g, float(t), rule)
    out = np.empty_like(kc)
    inside = kc <= spec.n
    out[inside] = suffix[kc[inside].astype(np.int64)]
    for i in np.flatnonzero(~inside):
        out[i] = beyond(float(kc[i]))
    return out


def pruned_loss_increase(spec: Spectrum, g: Any, t: float, k_cut: Any) -> np.ndarray:
    """TRUE loss increase of keeping modes k ≤ k_cut: Σ_{k>k_cut} λ_k f_k (2 w_k − f_k)."""
    return _sum_beyond(spec, g, t, k_cut, "true-loss")


def pruned_distance(spec: Spectrum, g: Any, t: float, k_cut: Any) -> np.ndarray:
    """Eq (20): the squared distance ‖f_P − f‖² = Σ_{k>k_cut} f_k² (NOT a loss increase)."""
    return _sum_beyond(spec, g, t, k_cut, "eq20-distance")


@dataclass(frozen=True)
class CriticalCut:
    """Smallest cut k_cut whose pruned quantity stays within ε L(t); rate = 1 − k_cut/K_max."""

    t: float
    epsilon: float
    rule: str
    k_cut: int
    k_star: float
    loss: float
    delta: float
    rate: float | None
    k_max: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def critical_cut(spec: Spectrum, g: Any, t: float, epsilon: float = DEFAULT_EPSILON,
                 rule: str = "true-loss", kappa: float = KAPPA) -> CriticalCut:
    """The critical cut at time t.

    rule="true-loss" (correct, correction 8): the smallest k_c with ΔL_P(k_c) ≤ ε L(t), i.e. the
    largest pruning whose loss stays ≤ (1+ε) L(t); k_c ∝ k* ∝ t^(ρ/b).
    rule="eq20-distance" (the paper's mix, kept to show why it is wrong): the smallest k_c with
    Σ_{k>k_c} f_k² ≤ ε L(t); its t-exponent is not ρ/b."""
    g = as_evolution(g)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise SpecpruneError(f"epsilon must be positive, got {epsilon!r}")
    t = float(t)
    if not (math.isfinite(t) and t > 0):
        raise SpecpruneError(f"t must be positive and finite, got {t!r}")
    L = float(loss(spec, g, t))
    budget = epsilon * L
    suffix, beyond = _suffix_sums(spec, g, t, rule)
    ok = np.flatnonzero(suffix <= budget)
    if ok.size:
        kc = int(ok[0])
        delta = float(suffix[kc])
    else:  # the cut lies in the analytic tail: bisect on ln k
        hi_lim = spec.k_max if spec.k_max is not None else 1e300
        lo, hi = float(spec.n), float(spec.n) * 2
        while beyond(hi) > budget:
            lo, hi = hi, hi * 4
            if hi >= hi_lim:
                hi = float(hi_lim)
                break
        for _ in range(200):
            if hi - lo <= 1:
                break
            mid = math.floor(math.sqrt(lo * hi)) if hi / lo > 2 else math.floor(0.5 * (lo + hi))
            mid = min(max(mid, lo + 1), hi - 1)
            if beyond(mid) > budget:
                lo = mid
            else:
                hi = mid
        kc = math.ceil(hi)
        delta = beyond(kc)
    ks = float(k_star(g, spec.b, np.array([t]), kappa)[0])
    rate = None if spec.k_max is None else max(0.0, 1.0 - kc / spec.k_max)
    return CriticalCut(t, float(epsilon), rule, kc, ks, L, delta, rate, spec.k_max)


@dataclass(frozen=True)
class PruningCurve:
    """Pruned-loss curve at time t over cuts k_cut (rate = 1 − k_cut/K_max when K_max is finite).

    phase: "plateau" (ΔL_P ≤ ε L), "saturation" (L_P ≥ L(t) + (1−ε)(L(0) − L(t))), else
    "power-law"; in the power-law phase ΔL_P ≈ k_c^(1−a)/(a−1), independent of t."""

    t: float
    k_star: float
    loss: float
    loss_zero: float
    epsilon: float
    k_cut: np.ndarray
    rate: np.ndarray | None
    delta_true: np.ndarray
    distance_eq20: np.ndarray
    phase: list[str]
    critical: CriticalCut

    @property
    def pruned_loss(self) -> np.ndarray:
        return self.loss + self.delta_true

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t, "k_star": self.k_star, "loss": self.loss, "loss_zero": self.loss_zero,
            "epsilon": self.epsilon, "critical": self.critical.to_dict(),
            "points": [
                {"k_cut": int(k), "rate": None if self.rate is None else float(self.rate[i]),
                 "pruned_loss": float(self.pruned_loss[i]), "delta_true": float(self.delta_true[i]),
                 "distance_eq20": float(self.distance_eq20[i]), "phase": self.phase[i]}
                for i, k in enumerate(self.k_cut)
            ],
        }


def pruning_curve(spec: Spectrum, g: Any, t: float, k_cut: Any = None, points: int = 41,
                  epsilon: float = DEFAULT_EPSILON, kappa: float = KAPPA) -> PruningCurve:
    """The plateau / power-law / saturation curve at time t.

    Default cuts: ``points`` log-spaced integers from 0 (everything pruned) up to K_max (or
    1000·k* when K_max is infinite)."""
    g = as_evolution(g)
    t = float(t)
    ks = float(k_star(g, spec.b, np.array([t]), kappa)[0])
    if k_cut is None:
        top = float(spec.k_max) if spec.k_max is not None else max(10.0, 1000.0 * ks)
        grid = np.unique(np.floor(np.logspace(0.0, math.log10(top), max(2, points - 1))))
        k_cut = np.concatenate([[0.0], grid])
    kc = np.atleast_1d(np.asarray(k_cut, dtype=float))
    delta = pruned_loss_increase(spec, g, t, kc)
    dist = pruned_distance(spec, g, t, kc)
    L = float(loss(spec, g, t))
    L0 = loss_at_zero(spec)
    phase = []
    for d in delta:
        if d <= epsilon * L:
            phase.append("plateau")
        elif L + d >= L + (1.0 - epsilon) * (L0 - L):
            phase.append("saturation")
        else:
            phase.append("power-law")
    rate = None if spec.k_max is None else 1.0 - kc / spec.k_max
    crit = critical_cut(spec, g, t, epsilon, "true-loss", kappa)
    return PruningCurve(t, ks, L, L0, float(epsilon), kc.astype(np.int64), rate, delta, dist, phase, crit)
