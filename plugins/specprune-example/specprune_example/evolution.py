"""An evolution function g(λ, t) for ``specprune theory``: training with learning-rate warmup.

    g(λ, t) = C · λ^m · t^n · t / (t + τ)

Mode λ is learned at rate ∝ λ^m t^n, slowed while t ≲ τ (a warmup of length τ: the factor
t/(t+τ) rises from 0 to 1). g is positive, smooth and increasing in λ and t, as specprune requires.

Elasticities (what the theory uses): E_λ = ∂ln g/∂ln λ = m everywhere, and
E_t = ∂ln g/∂ln t = n + τ/(t + τ), which falls from n + 1 (t ≪ τ) to n (t ≫ τ). So the frontier
exponent is ρ = E_t/E_λ = (n + τ/(t + τ))/m at a finite time t, and ρ → n/m as t → ∞: the
asymptotic exponents of this g are m and n, those of the monomial C λ^m t^n.

Registered as ``warmup`` (entry-point group ``specprune.evolution``)::

    specprune theory exponents --a 1.5 --b 2 --g warmup:m=1,n=1,tau=10
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from specprune.errors import SpecpruneError
from specprune.theory.evolution import Evolution


class Warmup(Evolution):
    """g = C λ^m t^n · t/(t + τ) (module docstring); ``m``, ``n`` are its large-t exponents."""

    def __init__(self, m: float = 1.0, n: float = 1.0, tau: float = 1.0, C: float = 1.0):
        for key, val in (("m", m), ("n", n), ("tau", tau), ("C", C)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise SpecpruneError(f"warmup: parameter {key} must be a positive number, got {val!r}")
        self.m, self.n, self.tau, self.C = float(m), float(n), float(tau), float(C)
        self.name = f"warmup(m={self.m:g},n={self.n:g},tau={self.tau:g},C={self.C:g})"

    def __call__(self, lam: Any, t: Any) -> np.ndarray:
        lam = np.asarray(lam, dtype=float)
        t = np.asarray(t, dtype=float)
        return self.C * np.power(lam, self.m) * np.power(t, self.n) * (t / (t + self.tau))

    def rho(self, t: float) -> float:
        """The exact frontier exponent at time t: (n + τ/(t + τ))/m."""
        return (self.n + self.tau / (t + self.tau)) / self.m


def warmup_factory(**params: Any) -> Warmup:
    """Entry point: ``warmup[:m=..,n=..,tau=..,C=..]`` (defaults m = n = τ = C = 1)."""
    allowed = {"m", "n", "tau", "C"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SpecpruneError(f"warmup: unknown parameter(s) {', '.join(unknown)} (accepted: C, m, n, tau)")
    try:
        values = {k: float(v) for k, v in params.items()}
    except (TypeError, ValueError):
        raise SpecpruneError(f"warmup: parameters must be numbers, got {params}") from None
    return Warmup(**values)
