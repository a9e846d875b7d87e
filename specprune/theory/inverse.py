"""Inverse identification: exponents from measured curves.

* :func:`fit_loss_curve`: χ from a loss curve L(t) ∝ t^(−χ) (optionally L − L_∞) by least squares
  in log-log coordinates, with the OLS standard error and a seeded pairs-bootstrap interval.
* :func:`fit_spectrum`: a power-law exponent (b from eigenvalues λ_k, a from energies e_k) over a
  stated index range.
* :func:`identify`: ρ = χ b/(a − 1) with propagated uncertainty, the predicted γ = (1+b−a) ρ/b
  (regime-aware), and, given an independently measured γ, the check χ + γ = ρ as a z-score.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SpecpruneError
from .exponents import _check_ab, classify_regime
from .frontier import _number

__all__ = [
    "Identification",
    "LossFit",
    "PowerFit",
    "fit_loss_curve",
    "fit_power_law",
    "fit_spectrum",
    "identify",
    "read_loss_csv",
    "read_spectrum_csv",
]


def _read_numeric_csv(path: str | Path, columns: tuple[str, ...], required: int) -> dict[str, np.ndarray]:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path} is a directory, not a CSV file")
    if not p.is_file():
        raise InputError(f"CSV file not found: {path}")
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if not rows:
        raise InputError(f"{path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    try:
        [float(c) for c in rows[0][:required]]
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        missing = [c for c in columns[:required] if c not in header]
        if missing:
            raise InputError(f"{path}: header needs columns {', '.join(columns[:required])} "
                             f"(found {', '.join(header)})")
        idx = {c: header.index(c) for c in columns if c in header}
        body = rows[1:]
    else:
        idx = {c: i for i, c in enumerate(columns) if i < len(rows[0])}
        body = rows
    out: dict[str, list[float]] = {c: [] for c in idx}
    for lineno, row in enumerate(body, start=2 if has_header else 1):
        try:
            for c, i in idx.items():
                out[c].append(float(row[i]))
        except (ValueError, IndexError):
            raise InputError(f"{path}, line {lineno}: expected numbers in columns "
                             f"{', '.join(idx)}, got {row!r}") from None
    arrays = {c: np.asarray(v, dtype=float) for c, v in out.items()}
    if len(body) == 0:
        raise InputError(f"{path} has a header but no data rows")
    for c, v in arrays.items():
        if not np.all(np.isfinite(v)):
            raise InputError(f"{path}: column {c} has non-finite values")
    return arrays


def read_loss_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(step, loss) from a CSV with columns step,loss (header optional; other columns ignored)."""
    cols = _read_numeric_csv(path, ("step", "loss"), 2)
    return cols["step"], cols["loss"]


def read_spectrum_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns k,lambda[,energy] (header optional): eigenvalues and optional mode energies."""
    return _read_numeric_csv(path, ("k", "lambda", "energy"), 2)


@dataclass(frozen=True)
class PowerFit:
    """y ≈ A x^(−exponent) over the points used."""

    exponent: float
    stderr: float
    amplitude: float
    r2: float
    n_points: int
    x_min: float
    x_max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float, float, float]:
    """slope, intercept, standard error of the slope, R²."""
    n = lx.size
    xm, ym = lx.mean(), ly.mean()
    sxx = float(np.sum((lx - xm) ** 2))
    if sxx <= 0:
        raise SpecpruneError("need at least two distinct x values to fit a power law")
    slope = float(np.sum((lx - xm) * (ly - ym)) / sxx)
    icpt = float(ym - slope * xm)
    resid = ly - (icpt + slope * lx)
    sse = float(np.sum(resid**2))
    sst = float(np.sum((ly - ym) ** 2))
    se = math.sqrt(sse / (n - 2) / sxx) if n > 2 else math.inf
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    return slope, icpt, se, r2


def fit_power_law(x: Any, y: Any, x_min: float | None = None, x_max: float | None = None) -> PowerFit:
    """Fit y ∝ x^(−exponent) on x_min ≤ x ≤ x_max (positive points only) by log-log least squares."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise SpecpruneError("x and y must be 1-D arrays of the same length")
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if x_min is not None:
        keep &= x >= x_min
    if x_max is not None:
        keep &= x <= x_max
    if keep.sum() < 3:
        raise SpecpruneError(f"need at least 3 positive points in the fit range, got {int(keep.sum())}")
    lx, ly = np.log(x[keep]), np.log(y[keep])
    slope, icpt, se, r2 = _ols(lx, ly)
    return PowerFit(-slope, se, math.exp(icpt), r2, int(keep.sum()), float(x[keep].min()),
                    float(x[keep].max()))


def fit_spectrum(values: Any, k: Any = None, k_min: float | None = None,
                 k_max: float | None = None) -> PowerFit:
    """Power-law exponent of a spectrum (λ_k ~ k^(−b) or e_k ~ k^(−a)); k defaults to 1..N."""
    values = np.asarray(values, dtype=float)
    k = np.arange(1, values.size + 1, dtype=float) if k is None else np.asarray(k, dtype=float)
    return fit_power_law(k, values, k_min, k_max)


@dataclass(frozen=True)
class LossFit:
    """χ fitted from L(t) − floor ∝ t^(−χ). ``chi_ci``: bootstrap percentile interval (level ``ci``)."""

    chi: float
    chi_stderr: float
    chi_bootstrap_stderr: float | None
    chi_ci: tuple[float, float] | None
    ci: float
    amplitude: float
    floor: float
    floor_fitted: bool
    r2: float
    n_points: int
    t_min: float
    t_max: float
    bootstrap: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chi_ci"] = None if self.chi_ci is None else list(self.chi_ci)
        return d


def _fit_floor(t: np.ndarray, L: np.ndarray) -> float:
    """Irreducible loss L_∞ maximising log-log linearity of L − L_∞ (grid + bounded refinement)."""
    from scipy import optimize

    lo_l = float(L.min())
    lt = np.log(t)

    def sse(f: float) -> float:
        r = L - f
        if np.any(r <= 0):
            return math.inf
        _, _, _, r2 = _ols(lt, np.log(r))
        return 1.0 - r2

    grid = lo_l * (1.0 - np.logspace(-6, 0, 61))
    vals = [sse(f) for f in grid]
    i = int(np.argmin(vals))
    a_, b_ = grid[min(i + 1, len(grid) - 1)], grid[max(i - 1, 0)]
    res = optimize.minimize_scalar(sse, bounds=(min(a_, b_), max(a_, b_)), method="bounded",
                                   options={"xatol": 1e-12 * max(1.0, abs(lo_l))})
    return float(res.x) if res.fun <= vals[i] else float(grid[i])


def fit_loss_curve(step: Any, loss: Any, t_min: float | None = None, t_max: float | None = None,
                   floor: float | str | None = 0.0, bootstrap: int = 200, seed: int = 0,
                   ci: float = 0.95) -> LossFit:
    """Fit χ from a loss curve: ln(L − floor) = ln A − χ ln t over t_min ≤ t ≤ t_max.

    ``floor``: a known irreducible loss, 0 (default), or "fit" to estimate it. Uncertainty: the OLS
    standard error of the slope, and a pairs bootstrap (``bootstrap`` resamples, seeded; 0 = off)
    giving a standard error and a percentile interval at level ``ci``. Steps ≤ 0 are dropped."""
    t = np.asarray(step, dtype=float)
    L = np.asarray(loss, dtype=float)
    if t.ndim != 1 or t.shape != L.shape:
        raise SpecpruneError("step and loss must be 1-D arrays of the same length")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(L))):
        raise SpecpruneError("step and loss must be finite")
    keep = t > 0
    if t_min is not None:
        keep &= t >= t_min
    if t_max is not None:
        keep &= t <= t_max
    t, L = t[keep], L[keep]
    if t.size < 3:
        raise SpecpruneError(f"need at least 3 points with step > 0 in the fit window, got {t.size}")
    fitted = False
    if floor == "fit":
        f = _fit_floor(t, L)
        fitted = True
    elif floor is None:
        f = 0.0
    else:
        try:
            f = float(floor)
        except (TypeError, ValueError):
            raise SpecpruneError(f"floor must be a number or 'fit', got {floor!r}") from None
    r = L - f
    if np.any(r <= 0):
        raise SpecpruneError(f"loss must stay above the floor {f:g} in the fit window")
    lt, lr = np.log(t), np.log(r)
    slope, icpt, se, r2 = _ols(lt, lr)
    boot_se = None
    interval = None
    if bootstrap and bootstrap > 0:
        if not 0 < ci < 1:
            raise SpecpruneError(f"ci must be in (0, 1), got {ci!r}")
        rng = np.random.default_rng(seed)
        slopes = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, t.size, t.size)
            if np.ptp(lt[idx]) == 0:
                continue
            slopes.append(-_ols(lt[idx], lr[idx])[0])
        if len(slopes) >= 2:
            arr = np.asarray(slopes)
            boot_se = float(arr.std(ddof=1))
            q = (1.0 - ci) / 2.0
            interval = (float(np.quantile(arr, q)), float(np.quantile(arr, 1.0 - q)))
    return LossFit(-slope, se, boot_se, interval, float(ci), math.exp(icpt), f, fitted, r2, int(t.size),
                   float(t.min()), float(t.max()), int(bootstrap), int(seed))


@dataclass(frozen=True)
class Identification:
    """ρ and γ implied by a fitted χ and spectrum exponents a, b (with propagated 1-σ errors)."""

    a: float
    b: float
    chi: float
    chi_stderr: float
    rho: float
    rho_stderr: float
    k_star_exponent: float
    gamma_regime: str
    gamma_predicted: float | None
    gamma_predicted_stderr: float | None
    gamma_measured: float | None
    gamma_measured_stderr: float | None
    closure: float | None  # χ + γ_measured − ρ
    closure_z: float | None
    consistent: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def identify(chi: float, chi_stderr: float, a: float, b: float, a_stderr: float = 0.0, b_stderr: float = 0.0,
             gamma: float | None = None, gamma_stderr: float = 0.0, m_tail: float = 1.0,
             z_max: float = 2.0) -> Identification:
    """ρ = χ b/(a−1) (given a, b), γ_pred = (1+b−a) ρ/b in the power regime, and the check χ + γ = ρ.

    Errors propagate to first order (independent χ, a, b). With a measured ``gamma`` the closure
    χ + γ − ρ is reported with its z-score; ``consistent`` = |z| ≤ z_max (None without gamma; False
    outside the power regime, where χ + γ = ρ is not expected to hold)."""
    a, b = _check_ab(a, b)
    if not (math.isfinite(chi) and chi > 0):
        raise SpecpruneError(f"chi must be positive, got {chi!r}")
    for name, v in (("chi_stderr", chi_stderr), ("a_stderr", a_stderr), ("b_stderr", b_stderr),
                    ("gamma_stderr", gamma_stderr)):
        _number(v, name, 0.0, inclusive=True)
    rho = chi * b / (a - 1.0)
    d_chi = b / (a - 1.0)
    d_b = chi / (a - 1.0)
    d_a = -chi * b / (a - 1.0) ** 2
    rho_se = math.sqrt((d_chi * chi_stderr) ** 2 + (d_b * b_stderr) ** 2 + (d_a * a_stderr) ** 2)
    regime = classify_regime(a, b, m_tail)
    g_pred = g_se = None
    if regime == "power":
        # γ = χ (1+b−a)/(a−1)
        g_pred = chi * (1.0 + b - a) / (a - 1.0)
        dg_chi = (1.0 + b - a) / (a - 1.0)
        dg_b = chi / (a - 1.0)
        dg_a = -chi * b / (a - 1.0) ** 2
        g_se = math.sqrt((dg_chi * chi_stderr) ** 2 + (dg_b * b_stderr) ** 2 + (dg_a * a_stderr) ** 2)
    closure = z = consistent = None
    if gamma is not None:
        closure = chi + gamma - rho
        # closure = γ − γ_pred; its variance combines the measured γ and the predicted γ
        var = gamma_stderr**2 + (g_se if g_se is not None else rho_se) ** 2
        z = closure / math.sqrt(var) if var > 0 else None
        consistent = bool(regime == "power" and (abs(z) <= z_max if z is not None else closure == 0))
    return Identification(a, b, float(chi), float(chi_stderr), rho, rho_se, rho / b, regime, g_pred, g_se,
                          gamma, gamma_stderr if gamma is not None else None, closure, z, consistent)
