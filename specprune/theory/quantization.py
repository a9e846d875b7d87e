"""Quantization as coefficient noise (corrections 6 and 9).

Convention (Theorem 2 / Appendix B): coefficients f_k on an ORTHONORMAL basis, so a perturbation
η_k of coefficient k costs η_k². Theorem 2 exactly (independent zero-mean η_k with variance τ²
and basis noise ε_k with variance σ²):

    ΔL = σ² Σ_k f_k² + τ² Σ_k E[φ_k²] + σ² τ² K  =  σ² Σ_k f_k² + τ² K (1 + σ²)   (orthonormal φ),

i.e. "ΔL = Θ(σ² t^γ)" means σ²Σf² plus a t-independent constant.

Noise models for B-bit round-to-nearest with symmetric integer levels ±(2^(B−1) − 1)
(step Δ = max_k |f_k| / (2^(B−1) − 1)) over K = K_max coefficients — always say which one:

* ``additive``: every coefficient gets independent noise of variance Δ²/12:
  ΔL = K Δ²/12 ∝ 4^(−B) max|f|², t-dependence only through max|f|² ∝ t^max(0, (b−a)ρ/b) — never t^γ.
* ``relative``: per-mode relative noise (floating-point-like, relative step 2^(1−B)):
  ΔL = (4^(1−B)/12) Σ f_k² ∝ 4^(−B) t^γ.
* ``rtn-zero``: RTN whose grid contains 0: coefficients with |f_k| < Δ/2 are zeroed (error f_k²),
  the others get Δ²/12. When b > a, |f_k| peaks near k* and decays as (k/k*)^(−q) beyond it with
  q = b m − (b − a)/2, so ΔL ∝ k* max|f|² 2^(−(2 − 1/q)B) ∝ t^γ 2^(−(2 − 1/q)B).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import SpecpruneError
from .evolution import as_evolution
from .frontier import KAPPA, _number, asymptotics
from .sums import Spectrum, _g_at, _g_of_u, sum_f2, tail_integral

__all__ = ["NOISE_MODELS", "BitLaw", "bit_law", "perturbation_excess_loss", "quantization_excess_loss"]

NOISE_MODELS = ("additive", "relative", "rtn-zero")


def _check_bits(bits: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(bits, dtype=float))
    if np.any(arr < 2) or np.any(arr != np.floor(arr)) or np.any(arr > 64):
        raise SpecpruneError("bits must be integers in 2..64 (symmetric levels ±(2^(B−1) − 1))")
    return arr


def _need_k_max(spec: Spectrum) -> int:
    if spec.k_max is None:
        raise SpecpruneError("quantization needs a finite number of modes k_max (the model's coefficients)")
    return int(spec.k_max)


def _abs_f(spec: Spectrum, g, t: float) -> np.ndarray:
    gk = _g_at(g, spec.lam, t)
    return np.sqrt(spec.w2) * (-np.expm1(-gk))


def _abs_f_at(spec: Spectrum, g, t: float, x: float) -> float:
    lam = x ** -spec.b
    gv = float(g(np.array([lam]), np.array([t]))[0])
    return x ** ((spec.b - spec.a) / 2.0) * (-math.expm1(-gv))


def _max_abs_f(spec: Spectrum, g, t: float, absf: np.ndarray) -> float:
    idx = int(np.argmax(absf))
    if spec.has_tail and (idx == spec.n - 1 or _abs_f_at(spec, g, t, spec.n + 1.0) > absf[-1]):
        raise SpecpruneError(
            f"max |f_k| lies beyond the {spec.n} exactly summed modes; raise n_exact (k* is too close to it)"
        )
    return float(absf[idx])


def quantization_excess_loss(spec: Spectrum, g: Any, t: float, bits: Any, noise: str = "additive") -> Any:
    """ΔL of B-bit quantization at time t under the named noise model (see module docstring)."""
    g = as_evolution(g)
    if noise not in NOISE_MODELS:
        raise SpecpruneError(f"unknown noise model {noise!r}; expected one of {', '.join(NOISE_MODELS)}")
    K = _need_k_max(spec)
    B = _check_bits(bits)
    scalar = np.ndim(bits) == 0
    t = float(t)
    if noise == "relative":
        f2 = float(sum_f2(spec, g, t))
        out = (4.0 ** (1.0 - B)) / 12.0 * f2
        return float(out[0]) if scalar else out
    absf = _abs_f(spec, g, t)
    fmax = _max_abs_f(spec, g, t, absf)
    step = fmax / (2.0 ** (B - 1.0) - 1.0)
    if noise == "additive":
        out = K * step**2 / 12.0
        return float(out[0]) if scalar else out
    # rtn-zero
    f2 = absf**2
    gu = _g_of_u(g, spec.b, t)

    def log_f2(u: np.ndarray) -> np.ndarray:
        return (spec.b - spec.a) * u + 2.0 * np.log(-np.expm1(-gu(u)))

    out = np.empty_like(B)
    for i, d in enumerate(step):
        zeroed = absf < d / 2.0
        val = float(f2[zeroed].sum()) + float((~zeroed).sum()) * d**2 / 12.0
        if spec.has_tail:  # |f| decreases past the exact modes (checked in _max_abs_f)
            if _abs_f_at(spec, g, t, spec.n + 1.0) < d / 2.0:
                val += tail_integral(log_f2, spec.n + 0.5, K + 0.5)
            else:
                lo, hi = float(spec.n + 1), float(K)
                if _abs_f_at(spec, g, t, hi) >= d / 2.0:
                    lo = hi
                while hi - lo > 1:
                    mid = math.floor(0.5 * (lo + hi))
                    if _abs_f_at(spec, g, t, mid) >= d / 2.0:
                        lo = mid
                    else:
                        hi = mid
                kept = int(lo) - spec.n
                val += kept * d**2 / 12.0 + tail_integral(log_f2, lo + 0.5, K + 0.5)
        out[i] = val
    return float(out[0]) if scalar else out


def perturbation_excess_loss(spec: Spectrum, g: Any, t: Any, sigma2: float, tau2: float) -> Any:
    """Theorem 2, exact: ΔL = σ² Σf_k² + τ² K (1 + σ²) for an orthonormal basis (K = k_max)."""
    sigma2 = _number(sigma2, "noise variance sigma2", 0.0, inclusive=True)
    tau2 = _number(tau2, "noise variance tau2", 0.0, inclusive=True)
    K = _need_k_max(spec)
    return sigma2 * np.asarray(sum_f2(spec, g, t)) + tau2 * K * (1.0 + sigma2)


@dataclass(frozen=True)
class BitLaw:
    """ΔL ∝ 2^(log2_slope · B) · t^t_exponent under ``noise`` (None where the model gives no clean law)."""

    noise: str
    log2_slope: float | None
    t_exponent: float | None
    q: float | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bit_law(a: float, b: float, g: Any = "ntk", noise: str = "additive", t: float | None = None,
            kappa: float = KAPPA) -> BitLaw:
    """Bit law and t-exponent of the quantization excess loss for each noise model (correction 9)."""
    from .exponents import exponents

    ex = exponents(a, b, g, t=t, kappa=kappa)
    rho = ex.rho
    if noise == "additive":
        return BitLaw(noise, -2.0, max(0.0, (b - a) * rho / b), None,
                      "K Δ²/12 with Δ ∝ max|f| 2^-B: ΔL ∝ 4^-B, t-dependence only via max|f|²")
    if noise == "relative":
        if ex.gamma_regime == "power":
            return BitLaw(noise, -2.0, ex.gamma, None, "σ² Σf² with σ² ∝ 4^-B: ΔL ∝ 4^-B t^γ")
        return BitLaw(noise, -2.0, ex.gamma_effective, None,
                      f"σ² Σf² with σ² ∝ 4^-B; Σf² is {ex.gamma_regime} in t (no power t^γ)")
    if noise == "rtn-zero":
        m = asymptotics(g, t=t, kappa=kappa).m_tail
        q = b * m - (b - a) / 2.0
        if b <= a:
            return BitLaw(noise, None, None, q,
                          "b ≤ a: |f_k| decreases from k = 1, the zero level cuts learned modes; "
                          "no single bit law (evaluate quantization_excess_loss)")
        if q <= 0.5:
            return BitLaw(noise, None, None, q, "q ≤ 1/2: the zeroed tail Σf² diverges (cut-off dominated)")
        return BitLaw(noise, -(2.0 - 1.0 / q), ex.gamma, q,
                      "b > a: coefficients below Δ/2 past the frontier are zeroed: ΔL ∝ t^γ 2^-(2-1/q)B")
    raise SpecpruneError(f"unknown noise model {noise!r}; expected one of {', '.join(NOISE_MODELS)}")
