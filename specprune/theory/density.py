"""Model density under compute-limited training (Section 5, correction 10).

With C ≍ P t (one unit of compute per parameter per step, ``flops_per_param_step``) the learned
mode count is k*(C, P) = k*(t = C/P) ∝ (C/P)^(ρ/b), capped by the model's capacity
K_max = ``capacity_per_param`` · P. Density δ = k*/P:

    δ ∝ C^(ρ/b) P^(−(1 + ρ/b))                          (uncapped; the paper's relation, correct)
    along P ∝ C^s:  α = (ρ/b)(1 − s) − s                (the paper drops the −s)
    cap binds when s < s_opt = ρ/(b + ρ)  →  δ = const (α = 0)
    compute-optimal frontier P ∝ C^(ρ/(b+ρ)): k*(C/P) = K_max(P) and α = 0 exactly.

So along any P ∝ C^s the asymptotic density exponent is min(0, α) ≤ 0: the "densing" claim
(α > 0 along the compute-optimal frontier) does not follow from the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import SpecpruneError
from .evolution import as_evolution
from .exponents import _check_ab
from .frontier import KAPPA, _number, asymptotics, k_star

__all__ = ["DensityLaw", "cap_onset", "compute_optimal_exponent", "density", "density_exponent", "density_law"]


def _b_ok(b: float) -> float:
    return _check_ab(2.0, b)[1]


def density(C: Any, P: Any, b: float, g: Any = "ntk", capacity_per_param: float = 1.0,
            flops_per_param_step: float = 1.0, kappa: float = KAPPA) -> dict[str, np.ndarray]:
    """δ(C, P) = min(k*(C/(φP)), c_K P) / P, vectorised over broadcast C and P.

    Returns k_star (uncapped), k_max, k_learned (capped), density and a boolean ``capped``."""
    b = _b_ok(b)
    g = as_evolution(g)
    C = np.asarray(C, dtype=float)
    P = np.asarray(P, dtype=float)
    if np.any(~np.isfinite(C)) or np.any(C <= 0) or np.any(~np.isfinite(P)) or np.any(P <= 0):
        raise SpecpruneError("compute C and parameter count P must be positive and finite")
    if not (capacity_per_param > 0 and flops_per_param_step > 0):
        raise SpecpruneError("capacity_per_param and flops_per_param_step must be positive")
    C, P = np.broadcast_arrays(C, P)
    t = C / (flops_per_param_step * P)
    ks = k_star(g, b, t.ravel(), kappa).reshape(t.shape)
    kmax = capacity_per_param * P
    learned = np.minimum(ks, kmax)
    return {"t": t, "k_star": ks, "k_max": kmax, "k_learned": learned, "density": learned / P,
            "capped": ks >= kmax}


def density_exponent(rho: float, b: float, s: float) -> float:
    """Uncapped α along P ∝ C^s: (ρ/b)(1 − s) − s."""
    rho, b = _number(rho, "rho"), _number(b, "b")
    s = _number(s, "s", -math.inf)
    alpha = (rho / b) * (1.0 - s) - s
    # at s = s_opt the two terms cancel: report 0, not their rounding residue (5.6e-17)
    return 0.0 if abs(alpha) <= 1e-12 * max(1.0, abs(s), rho / b) else alpha


def compute_optimal_exponent(rho: float, b: float) -> float:
    """s_opt = ρ/(b + ρ): P ∝ C^s_opt is where k*(C/P) meets the capacity K_max ∝ P."""
    rho, b = _number(rho, "rho"), _number(b, "b")
    return rho / (b + rho)


@dataclass(frozen=True)
class DensityLaw:
    rho: float
    b: float
    s: float
    k_star_exponent_C: float  # ρ/b
    k_star_exponent_P: float  # −ρ/b
    alpha: float  # uncapped (ρ/b)(1−s) − s
    alpha_paper: float  # (ρ/b)(1−s): the paper's expression, missing −s
    alpha_capped: float  # min(0, alpha): asymptotic exponent with k* ≤ K_max ∝ P
    s_opt: float  # ρ/(b+ρ)
    cap_binds: bool  # s < s_opt: the capacity cap binds asymptotically (δ → const); see cap_onset for where

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def density_law(b: float, g: Any = "ntk", s: float = 0.5, t: float | None = None,
                kappa: float = KAPPA) -> DensityLaw:
    """Density exponents along P ∝ C^s (corrected, with the capacity cap)."""
    b = _b_ok(b)
    if not math.isfinite(s):
        raise SpecpruneError(f"s must be finite, got {s!r}")
    rho = asymptotics(as_evolution(g), t=t, kappa=kappa).rho
    alpha = density_exponent(rho, b, s)
    s_opt = compute_optimal_exponent(rho, b)
    return DensityLaw(rho, b, float(s), rho / b, -rho / b, alpha, (rho / b) * (1.0 - s),
                      min(0.0, alpha), s_opt, bool(s < s_opt))


def cap_onset(c0: float, p0: float, s: float, b: float, g: Any = "ntk", capacity_per_param: float = 1.0,
              flops_per_param_step: float = 1.0, kappa: float = KAPPA, decades: float = 200.0) -> float | None:
    """The smallest compute C ≥ ``c0`` at which k* reaches the capacity K_max along P = p0 (C/c0)^s:
    ``c0`` when it is capped there already, None when it is not reached within ``decades`` decades of C
    (or before t or P leave floating-point range). ``DensityLaw.cap_binds`` says whether the cap binds
    as C → ∞; this says where it starts to."""
    c0, p0 = _number(c0, "c0"), _number(p0, "p0")
    s = _number(s, "s", -math.inf)
    base_t = math.log10(c0 / (flops_per_param_step * p0))
    # decades of C to search: t = C/(φP) and P must stay well inside float range
    xs = np.arange(0.0, float(decades) + 1.0)
    ok = (np.abs(base_t + xs * (1.0 - s)) <= 250.0) & (np.abs(math.log10(p0) + xs * s) <= 250.0)
    xs = xs[: int(np.argmin(ok)) if not ok.all() else xs.size]
    if xs.size == 0:
        return None

    def capped(x: np.ndarray) -> np.ndarray:
        return density(c0 * 10.0 ** x, p0 * 10.0 ** (s * x), b, g, capacity_per_param, flops_per_param_step,
                       kappa)["capped"]

    hit = np.flatnonzero(capped(xs))
    if hit.size == 0:
        return None
    if hit[0] == 0:
        return c0
    lo, hi = float(xs[hit[0] - 1]), float(xs[hit[0]])
    for _ in range(50):  # bisection in log10 C: lo uncapped, hi capped
        mid = 0.5 * (lo + hi)
        if capped(np.array([mid]))[0]:
            hi = mid
        else:
            lo = mid
    return float(c0 * 10.0 ** hi)
