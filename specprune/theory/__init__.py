"""The corrected generalized spectral theory (pure numpy/scipy; no torch).

Model: λ_k = k^(−b), λ_k w_k² = k^(−a) (a, b > 1), f_k(t) = w_k (1 − e^(−g(λ_k, t))), frontier
g(λ*, t) = κ = 1. See docs/theory.md for the ten corrections to the paper and the numbers behind them.

Quick use::

    from specprune import theory
    ex = theory.exponents(1.5, 2.0, "feature:beta=0.2")      # ρ, χ, γ (+ regime), k* exponent
    theory.k_star("ntk", b=2.0, t=1e6)                       # frontier index k*(t)
    spec = theory.Spectrum(a=1.5, b=2.0, k_max=100_000)
    theory.critical_cut(spec, "ntk", t=1e6).rate             # r* by the true-loss rule
    theory.bit_law(1.5, 2.0, "ntk", noise="rtn-zero")        # ΔL ∝ 2^(slope·B) t^exponent
"""

from __future__ import annotations

from .density import DensityLaw, compute_optimal_exponent, density, density_exponent, density_law
from .evolution import (
    CallableEvolution,
    Evolution,
    Monomial,
    Polynomial,
    as_evolution,
    feature_exponent,
    feature_factory,
    monomial_factory,
    ntk_factory,
    parse_g,
    polynomial_factory,
)
from .exponents import REGIMES, Exponents, classify_regime, exponents
from .frontier import (
    KAPPA,
    Asymptotics,
    asymptotics,
    elasticities,
    frontier_lambda,
    frontier_time,
    k_star,
    rate_argmax_level,
    rho_from_frontier,
    rho_local,
    t_at_k_star,
)
from .inverse import (
    Identification,
    LossFit,
    PowerFit,
    fit_loss_curve,
    fit_power_law,
    fit_spectrum,
    identify,
    read_loss_csv,
    read_spectrum_csv,
)
from .pruning import (
    DEFAULT_EPSILON,
    CriticalCut,
    PruningCurve,
    critical_cut,
    pruned_distance,
    pruned_loss_increase,
    pruning_curve,
)
from .quantization import NOISE_MODELS, BitLaw, bit_law, perturbation_excess_loss, quantization_excess_loss
from .sums import Spectrum, energy_beyond, loglog_slope, loss, loss_and_f2, loss_at_zero, sum_f2

__all__ = [
    # evolution functions
    "Evolution", "Monomial", "Polynomial", "CallableEvolution", "parse_g", "as_evolution",
    "ntk_factory", "feature_factory", "monomial_factory", "polynomial_factory", "feature_exponent",
    # frontier and elasticity
    "KAPPA", "frontier_lambda", "frontier_time", "k_star", "t_at_k_star", "elasticities", "rho_local",
    "rho_from_frontier", "Asymptotics", "asymptotics", "rate_argmax_level",
    # exponents
    "Exponents", "exponents", "classify_regime", "REGIMES",
    # sums
    "Spectrum", "loss", "sum_f2", "loss_and_f2", "loss_at_zero", "energy_beyond", "loglog_slope",
    # pruning
    "DEFAULT_EPSILON", "pruned_loss_increase", "pruned_distance", "PruningCurve", "pruning_curve",
    "CriticalCut", "critical_cut",
    # quantization
    "NOISE_MODELS", "quantization_excess_loss", "perturbation_excess_loss", "BitLaw", "bit_law",
    # density
    "density", "density_exponent", "compute_optimal_exponent", "DensityLaw", "density_law",
    # inverse identification
    "read_loss_csv", "read_spectrum_csv", "fit_loss_curve", "LossFit", "fit_power_law", "PowerFit",
    "fit_spectrum", "identify", "Identification",
]
