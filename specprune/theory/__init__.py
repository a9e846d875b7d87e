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

from .density import DensityLaw, cap_onset, compute_optimal_exponent, density, density_exponent, density_law
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
    "DEFAULT_EPSILON",
    "KAPPA",
    "NOISE_MODELS",
    "REGIMES",
    "Asymptotics",
    "BitLaw",
    "CallableEvolution",
    "CriticalCut",
    "DensityLaw",
    "Evolution",
    "Exponents",
    "Identification",
    "LossFit",
    "Monomial",
    "Polynomial",
    "PowerFit",
    "PruningCurve",
    "Spectrum",
    "as_evolution",
    "asymptotics",
    "bit_law",
    "cap_onset",
    "classify_regime",
    "compute_optimal_exponent",
    "critical_cut",
    "density",
    "density_exponent",
    "density_law",
    "elasticities",
    "energy_beyond",
    "exponents",
    "feature_exponent",
    "feature_factory",
    "fit_loss_curve",
    "fit_power_law",
    "fit_spectrum",
    "frontier_lambda",
    "frontier_time",
    "identify",
    "k_star",
    "loglog_slope",
    "loss",
    "loss_and_f2",
    "loss_at_zero",
    "monomial_factory",
    "ntk_factory",
    "parse_g",
    "perturbation_excess_loss",
    "polynomial_factory",
    "pruned_distance",
    "pruned_loss_increase",
    "pruning_curve",
    "quantization_excess_loss",
    "rate_argmax_level",
    "read_loss_csv",
    "read_spectrum_csv",
    "rho_from_frontier",
    "rho_local",
    "sum_f2",
    "t_at_k_star",
]
