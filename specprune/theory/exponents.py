"""Corrected exponents with their regimes (corrections 1, 2, 4, 5).

    ρ  = E_t/E_λ on the frontier (n/m for a monomial)     k* ∝ t^(ρ/b)
    χ  = (a − 1) ρ / b                                   L(t) ∝ t^(−χ)
    γ  = (1 + b − a) ρ / b                               Σf_k² ∝ t^γ  — only in regime "power"

Regimes of Σ_k f_k² (c = 1 + b − a, m = m_tail, the λ-elasticity of g deep in the tail):

* ``cutoff-dominated`` 2bm ≤ c: the sum diverges with the number of modes K (∝ K^(c−2bm) t^(2n));
* ``power``            0 < c < 2bm: Σf² = A k*^c + ζ(a−b) + o(1), γ = cρ/b, χ + γ = ρ;
* ``logarithmic``      c = 0 (a = 1 + b): Σf² ≈ (ρ/b) ln t + const, γ is not a power;
* ``saturating``       c < 0 (a > 1 + b): Σf² → ζ(a−b) (all target energy), γ_eff = 0, χ + γ ≠ ρ.

``gamma`` is None unless the regime is ``power``; nothing is returned as a power law that is not one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy import special

from ..errors import SpecpruneError
from .evolution import as_evolution
from .frontier import KAPPA, _check_kappa, asymptotics, rate_argmax_level

__all__ = ["LOG_TOL", "REGIMES", "Exponents", "classify_regime", "exponents"]

REGIMES = ("power", "logarithmic", "saturating", "cutoff-dominated")
LOG_TOL = 1e-9
"""|1 + b − a| below this counts as the logarithmic case a = 1 + b."""


def _check_ab(a: float, b: float) -> tuple[float, float]:
    for key, val in (("a", a), ("b", b)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 1:
            raise SpecpruneError(f"{key} must be a finite number > 1 (power-law exponent), got {val!r}")
    return float(a), float(b)


def _zeta_a_minus_b(a: float, b: float) -> float | None:
    """ζ(a − b), or None where a − b is so negative that the float has no fractional part left
    (|a − b| ≥ 2^52: ζ would come out as a meaningless 0 or ±inf)."""
    s = a - b
    if s <= -2.0 ** 52:
        return None
    val = float(special.zeta(s))
    return val if math.isfinite(val) else None


def classify_regime(a: float, b: float, m_tail: float) -> str:
    """Regime of Σf_k² for target exponent a, eigen-exponent b and tail λ-elasticity m."""
    a, b = _check_ab(a, b)
    c = 1.0 + b - a
    if c > LOG_TOL and 2.0 * b * m_tail <= c:
        return "cutoff-dominated"
    if abs(c) <= LOG_TOL:
        return "logarithmic"
    return "power" if c > 0 else "saturating"


@dataclass(frozen=True)
class Exponents:
    """Exponents of the corrected theory. Contract fields: rho, chi, gamma, gamma_regime,
    k_star_exponent. ``gamma_effective``: the observable growth exponent of Σf² (γ in "power",
    0 in "logarithmic"/"saturating", 2n in "cutoff-dominated" at fixed K)."""

    a: float
    b: float
    g: str
    rho: float
    chi: float
    gamma: float | None
    gamma_regime: str
    k_star_exponent: float
    gamma_effective: float
    chi_plus_gamma_equals_rho: bool
    m: float
    n: float
    m_tail: float
    n_tail: float
    c: float
    sum_f2_constant: float | None
    log_coefficient: float | None
    approach_exponent: float | None
    rate_argmax_level: float | None
    kappa: float
    rho_source: str
    rho_converged: bool
    t: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def exponents(a: float, b: float, g: Any = "ntk", t: float | None = None, kappa: float = KAPPA) -> Exponents:
    """χ, γ (with regime), ρ and the k* exponent ρ/b for spectrum exponents (a, b) and evolution g.

    ``t=None``: asymptotic (t → ∞) ρ; with ``t``: the local ρ on the frontier at that time (what a
    finite-time fit sees for a non-monomial g)."""
    a, b = _check_ab(a, b)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise SpecpruneError(f"t must be positive and finite, got {t!r}")
    kappa = _check_kappa(kappa)
    ev = as_evolution(g)
    asy = asymptotics(ev, t=t, kappa=kappa)
    rho = asy.rho
    if not (math.isfinite(rho) and rho > 0):
        raise SpecpruneError(f"evolution {ev.name!r} gives a non-positive elasticity ratio rho = {rho!r}")
    c = 1.0 + b - a
    nu = rho / b
    chi = (a - 1.0) * nu
    regime = classify_regime(a, b, asy.m_tail)
    notes: list[str] = []
    gamma = None
    sum_const = None
    log_coef = None
    approach = None
    if regime == "power":
        gamma = c * nu
        gamma_eff = gamma
        sum_const = _zeta_a_minus_b(a, b)
        notes.append("Σf² = A k*^(1+b-a) + ζ(a-b) + o(1); the constant biases finite-t slopes "
                     "when 1+b-a is small")
    elif regime == "logarithmic":
        gamma_eff = 0.0
        log_coef = nu
        notes.append(f"a = 1+b: Σf² ≈ ({nu:.6g}) ln t + const, not a power of t")
    elif regime == "saturating":
        gamma_eff = 0.0
        sum_const = _zeta_a_minus_b(a, b)
        approach = c * nu
        notes.append(f"a > 1+b: Σf² → ζ(a-b) = {sum_const:.6g} (rate t^({approach:.6g})); γ_eff = 0; "
                     "χ + γ = ρ does not hold")
    else:
        gamma_eff = 2.0 * asy.n_tail
        notes.append(f"2bm = {2 * b * asy.m_tail:.6g} <= 1+b-a = {c:.6g}: Σf² diverges with the number of "
                     f"modes K (∝ K^(1+b-a-2bm) t^(2n) at fixed K)")
    if not asy.converged:
        notes.append(f"rho still drifts at the deepest frontier probed (t = {asy.t:.3g}); "
                     "pass t for a local value")
    return Exponents(
        a=a, b=b, g=ev.name, rho=rho, chi=chi, gamma=gamma, gamma_regime=regime, k_star_exponent=nu,
        gamma_effective=gamma_eff, chi_plus_gamma_equals_rho=gamma is not None,
        m=asy.m, n=asy.n, m_tail=asy.m_tail, n_tail=asy.n_tail, c=c, sum_f2_constant=sum_const,
        log_coefficient=log_coef,
        approach_exponent=approach, rate_argmax_level=rate_argmax_level(a, b, asy.m_tail), kappa=kappa,
        rho_source=asy.source, rho_converged=asy.converged, t=t if t is not None else asy.t, notes=notes,
    )
