"""Per-layer spectra: eigendecomposition of the input covariance, power-law fits, learning frontier.

For a layer ``y = W x`` (W is ``d_out × d_in``) with uncentred input covariance
``Σ = E[x xᵀ] = G / N`` (G the Gram sum over N tokens):

- eigenpairs ``Σ u_k = λ_k u_k``, λ descending (float64 ``eigh``; tiny negative round-off clipped to 0);
- per-mode gain ``q_k = ‖W u_k‖²`` (column norms of ``W U``) and mode energy ``e_k = λ_k q_k``, the
  output energy carried by input mode k. Exactly ``Σ_k e_k = tr(W Σ Wᵀ) = E‖W x‖²``, and keeping the
  top-k input modes (``W ← W U_k U_kᵀ``) removes exactly ``Σ_{k'>k} e_k'`` (``tail_energy[k]``);
- power laws ``λ_k ≈ C k^-b`` and ``e_k ≈ C' k^-a`` fitted by least squares in log-log
  (:func:`fit_power_law`); ``a`` is fitted over the clearly learned modes (see
  :meth:`LayerSpectrum.from_eigen`);
- effective rank ``exp(H(p))``, ``p_k = λ_k / Σλ`` (Roy & Vetterli's entropy effective rank), with the
  participation ratio ``(Σλ)² / Σλ²`` reported beside it.

Learning-frontier estimator (:func:`estimate_frontier`)
-------------------------------------------------------
Theory (THEORY_NOTES, "From theory to a real network"): under NTK dynamics from a random init W0,
``W(t) − W* = (W0 − W*) e^{−ηΣt}``, i.e. in mode k

    W(t) u_k = w_k (1 − e^{−g_k}) m_k + e^{−g_k} W0 u_k,      g_k = η λ_k t.

Learned modes (``g ≫ 1``) carry the target and have forgotten their init; unlearned ones (``g ≪ 1``) keep
it. The frontier k* is the mode where ``g_{k*} = 1``. Working with the gain ``q_k = e_k / λ_k = ‖W u_k‖²``
removes the eigenvalue decay and leaves

    q_k ≈ w_k² (1 − e^{−g_k})² + F e^{−2 g_k},      w_k² ∝ k^{b−a},  g_k = (k*/k)^b,  F = E‖W0 u_k‖².

On a log scale ``(1 − e^{−x})²`` has the asymptotes 0 (``x ≫ 1``) and ``2 ln x`` (``x ≪ 1``); they meet
exactly at ``x = 1``, i.e. at ``k = k*``: k* is the corner where the learned power law ``∝ k^{−c}``
bends down to ``∝ k^{−c−2β}``, ending on the init floor F (flat in gain, ∝ λ_k in energy). The model
fitted to ``y_k = ln q_k`` is

    ln q̂_k = ln( A k^{−c} (1 − exp(−x_k))² + F φ(x_k) ),   x_k = (k*/k)^β,   A, k*, β > 0,  F ≥ 0,  c real,

(theory: ``c = a − b``, ``β = b m``, m = 1 for NTK) with the floor either decaying, ``φ = e^{−2x}`` (the NTK
solution above), or constant, ``φ = 1`` (init noise that learning does not remove); ``floor="auto"`` fits
both and keeps the lower cost (same number of parameters). Parameters ``(ln A, c, ln k*, ln β, ln F)``;
the model is evaluated stably in log space (``expm1`` for ``1 − e^{−x}``, ``logaddexp`` for the sum) with
an analytic Jacobian.

Fitting: ``scipy.optimize.least_squares`` (trust-region reflective) with the robust ``soft_l1`` loss, its
scale the model-free noise level of y (MAD of first differences / √2). Residuals are weighted
``∝ k^(−1/2)`` so that each e-fold of k counts equally: the few learned top modes are otherwise outvoted
by the many tail modes, whose shape (finite-sample eigenvector mixing, init noise) the model describes only
roughly. Starts: ``n_starts`` frontier candidates on a log grid from 2 to 1.5·n, each initialised by a
segmented reading of the data (a line fitted below the candidate, the lower quartile above it as the floor,
β from the eigenvalue slope b); the starts of both floor kinds are screened together on ≤ 160 log-spaced
bin means by a batched Levenberg–Marquardt (:mod:`specprune.lmfit`, all starts advance as one array
operation: 4.7× less fitting time than one ``least_squares`` per start on all-MiniLM-L6-v2, same k*), and
the best is polished on every mode. The estimator is a step generator (:func:`frontier_steps`): an
analysis runs all its layers' generators together (:func:`run_steps`, :meth:`LayerSpectrum.from_eigen_many`),
so every layer's screening is one batch (MiniLM's 37 layers: fits 1.67 → 0.8 s, the same k* and fitted
parameters to 1e-10). The no-frontier alternative is a power law plus constant floor ``ln(A k^{−c} + F)``.

A frontier is *detected* only when all of these hold (each failure is named in ``message``):

1. the fit converged;
2. ``k_min_frontier ≤ k* ≤ max_fraction · n`` (defaults 2 and 0.9; n the highest usable mode): beyond it
   the bend cannot be told from the end of the spectrum (a fully learned layer fits k* ≥ n);
3. the frontier model beats the no-frontier one: ``ΔBIC = n ln(C₀/C₁) − 2 ln n > bic_threshold``
   (default 20), with C the *unweighted* robust costs: every mode's log-gain has the same noise, so the
   evidence is counted per mode and a fit that only bends through the first few (heavily weighted) modes
   gains nothing;
4. the bend is real: at ``min(2k*, n)`` the fitted gain lies at least ``min_drop`` (default ln 2) below the
   extrapolated learned power law (a floor that swamps the bend makes the frontier invisible);
5. k* is constrained: ``k_star_hi / k_star_lo ≤ max_spread`` (default 4).

Uncertainty: the Gauss–Newton covariance of ``ln k*`` (residual variance × ``(JᵀJ)⁻¹`` at the solution),
inflated by ``(1+ρ₁)/(1−ρ₁)`` for the lag-1 autocorrelation ρ₁ of the residuals (neighbouring modes are
not independent), gives ``[k* e^{−2σ}, k* e^{+2σ}]``, at least ±5% for the model's shape error.

Validation (``tests/unit/test_spectra.py``; synthetic layers from :mod:`specprune.synthetic`):
a ∈ {1.5, 2.5}, b ∈ {1.5, 2, 3}, true k* at 4–60% of d = 256 and 512, Grams sampled from N = 10·d
Gaussian tokens, init noise 0 … 1/√d per element: every estimate is within ±25% of the truth (typically
within 5%; the reported range covers the truth in 83 of 84 cases); fully learned layers (k* ≥ 1.5·d), untrained
layers and random weights on white inputs are reported as "no frontier". Cost: ~0.1–0.2 s CPU for d = 1024.
When the learned gain at the frontier is comparable to the init floor (signal-to-noise ≈ 1) the frontier
is mostly reported as not detected rather than misplaced. So is a steep learned gain (c = a − b ≥ 1, i.e.
a ≥ b + 1) with k* at 4% of d: its ~10 learned modes bend so softly that a steeper power law plus a floor
fits them as well (equal costs, ΔBIC = −2 ln n); from 10% of d on such layers are found within 12%.

Inputs may be numpy arrays or torch tensors (converted lazily, float64); torch is never imported here.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import linalg, optimize

from .errors import InputError
from .lmfit import Problem, frontier_rows, null_rows, soft_l1_cost, solve_problems

__all__ = [
    "FrontierFit",
    "LayerSpectrum",
    "PowerLawFit",
    "compute_spectrum",
    "default_fit_range",
    "effective_rank",
    "estimate_frontier",
    "fit_power_law",
    "frontier_steps",
    "run_steps",
    "participation_ratio",
]


# ----------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """A float64 numpy array from an array-like or a torch tensor (detected by duck typing, no import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} is not a numeric array: {err}") from None
    return arr


def _jfloat(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x + 0.0 if math.isfinite(x) else None  # + 0.0 turns -0.0 into 0.0


def _jint(x: Any) -> int | None:
    return None if x is None else int(x)


def _numerical_zero(eigenvalues: np.ndarray) -> float:
    """Eigenvalues at or below this are round-off of a (numerically) singular covariance."""
    if eigenvalues.size == 0:
        return 0.0
    top = float(np.max(eigenvalues))
    return max(eigenvalues.size, 1) * np.finfo(np.float64).eps * top if top > 0 else 0.0


def effective_rank(eigenvalues: Any) -> float:
    """Entropy effective rank ``exp(−Σ p_k ln p_k)``, ``p_k = λ_k / Σλ`` (NaN if ``Σλ = 0``).

    Equals d for a flat spectrum and 1 for a single mode (Roy & Vetterli, 2007).
    """
    lam = np.clip(_to_numpy(eigenvalues, "eigenvalues").ravel(), 0.0, None)
    total = lam.sum()
    if not total > 0:
        return float("nan")
    p = lam[lam > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def participation_ratio(eigenvalues: Any) -> float:
    """Participation ratio ``(Σλ)² / Σλ²`` (NaN if ``Σλ = 0``); ≤ the entropy effective rank."""
    lam = np.clip(_to_numpy(eigenvalues, "eigenvalues").ravel(), 0.0, None)
    top = float(lam.max()) if lam.size else 0.0
    if not top > 0:
        return float("nan")
    r = lam / top  # scaled so that the squares neither overflow nor underflow
    return float(r.sum() ** 2 / np.sum(r**2))


def default_fit_range(n: int) -> tuple[int, int]:
    """The default 1-based, inclusive power-law fit range for n values.

    Skips the first ``min(4, n // 20)`` modes (the uncentred mean direction and other leading outliers)
    and the last ~10% (where finite-sample bias bends the eigenvalues down): ``k_lo = 1 + min(4, n//20)``,
    ``k_hi = max(k_lo + 2, floor(0.9 n))``, capped at n.
    """
    if n < 1:
        return 1, 0
    k_lo = 1 + min(4, n // 20)
    k_hi = min(n, max(k_lo + 2, math.floor(0.9 * n)))
    return k_lo, k_hi


# ------------------------------------------------------------------------------------- power law
@dataclass
class PowerLawFit:
    """Result of :func:`fit_power_law`: ``values_k ≈ exp(log_intercept) · k^(−exponent)``.

    Fitted by ordinary least squares of ``ln v_k`` on ``ln k`` over the positive, finite values with
    ``k_lo ≤ k ≤ k_hi`` (1-based mode index, inclusive). ``r2`` and ``rmse_log`` are in log space;
    ``exponent_stderr`` is the OLS standard error (it ignores correlations between neighbouring modes,
    so it is a lower bound). On failure ``success`` is False, the numbers are NaN and ``message`` says why.
    """

    exponent: float
    log_intercept: float
    k_lo: int
    k_hi: int
    n_points: int
    r2: float
    rmse_log: float
    exponent_stderr: float
    success: bool
    message: str
    k: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def predict(self, k: Any) -> np.ndarray:
        """The fitted power law at mode index (or indices) k."""
        k = np.asarray(k, dtype=np.float64)
        return np.exp(self.log_intercept - self.exponent * np.log(k))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (NaN → None)."""
        return {
            "exponent": _jfloat(self.exponent),
            "log_intercept": _jfloat(self.log_intercept),
            "exponent_stderr": _jfloat(self.exponent_stderr),
            "k_lo": int(self.k_lo),
            "k_hi": int(self.k_hi),
            "n_points": int(self.n_points),
            "r2": _jfloat(self.r2),
            "rmse_log": _jfloat(self.rmse_log),
            "success": bool(self.success),
            "message": self.message,
        }

    def plot(self, ax: Any = None, *, label: str | None = None) -> Any:
        """Log-log plot of all values, the fitted range highlighted and the fit; returns the axes."""
        import matplotlib.pyplot as plt  # lazy: plotting is optional

        if ax is None:
            _, ax = plt.subplots()
        kk = np.arange(1, self.values.size + 1)
        pos = self.values > 0
        ax.loglog(kk[pos], self.values[pos], ".", ms=2, color="0.6", label=label or "values")
        if self.success:
            kf = np.array([self.k_lo, self.k_hi], dtype=np.float64)
            ax.loglog(
                kf,
                self.predict(kf),
                "-",
                color="C3",
                label=f"fit k^-{self.exponent:.3g} (k={self.k_lo}..{self.k_hi}, R²={self.r2:.3f})",
            )
        ax.set_xlabel("mode k")
        ax.legend(fontsize="small")
        return ax


def fit_power_law(values: Any, k_lo: int | None = None, k_hi: int | None = None) -> PowerLawFit:
    """Fit ``values_k ≈ C k^(−exponent)`` (k = 1..n) by least squares in log-log.

    Parameters
    ----------
    values : 1-D array, index 0 is mode k = 1 (e.g. eigenvalues → exponent b; mode energies → a).
    k_lo, k_hi : inclusive 1-based fit range; defaults from :func:`default_fit_range` (skip the first
        few modes and the last ~10%). Non-positive and non-finite values in the range are ignored.

    Returns a :class:`PowerLawFit`; with fewer than 3 usable points ``success`` is False.
    """
    v = _to_numpy(values, "values").ravel()
    n = v.size
    d_lo, d_hi = default_fit_range(n)
    lo = d_lo if k_lo is None else int(k_lo)
    hi = d_hi if k_hi is None else int(k_hi)
    lo = max(1, lo)
    hi = min(n, hi)
    nan = float("nan")

    def failed(msg: str, npts: int = 0) -> PowerLawFit:
        return PowerLawFit(nan, nan, lo, hi, npts, nan, nan, nan, False, msg, np.zeros(0), v)

    if hi - lo + 1 < 3:
        return failed(f"fit range k={lo}..{hi} holds fewer than 3 modes (n={n})")
    seg = v[lo - 1 : hi]
    kk = np.arange(lo, hi + 1, dtype=np.float64)
    ok = np.isfinite(seg) & (seg > 0)
    npts = int(ok.sum())
    if npts < 3:
        return failed(f"fewer than 3 positive values in k={lo}..{hi}", npts)
    x = np.log(kk[ok])
    y = np.log(seg[ok])
    xm, ym = x.mean(), y.mean()
    sxx = float(np.sum((x - xm) ** 2))
    slope = float(np.sum((x - xm) * (y - ym)) / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sse = float(np.sum(resid**2))
    syy = float(np.sum((y - ym) ** 2))
    r2 = 1.0 - sse / syy if syy > 0 else 1.0
    rmse = math.sqrt(sse / npts)
    stderr = math.sqrt(sse / (npts - 2) / sxx) if npts > 2 else nan
    msg = "ok" if npts == hi - lo + 1 else f"ok ({hi - lo + 1 - npts} non-positive values ignored)"
    return PowerLawFit(-slope, intercept, lo, hi, npts, r2, rmse, stderr, True, msg, kk[ok], v)


# -------------------------------------------------------------------------------------- frontier
class _FrontierModel:
    """``ln q̂_k`` of the frontier model and its Jacobian in ``θ = (ln A, c, ln k*, ln β, ln F)``.

    ``ln q̂ = logaddexp(ln A − c ln k + 2 L(u), ln F − 2x·[decaying])`` with ``u = β (ln k* − ln k)``,
    ``x = e^u = (k*/k)^β``, ``L(u) = ln(1 − e^{−x})``. With ``decaying`` the init floor is multiplied by
    ``e^{−2x}`` (NTK: ``W(t) − W* = (W0 − W*) e^{−ηΣt}``, so learned modes forget their init); without it
    the floor is a constant F. One parameter row of :func:`specprune.lmfit.frontier_rows` (where the
    formulas live, evaluated stably in log space); the last evaluation is cached for the Jacobian
    (``least_squares`` asks for it at the point it just evaluated).
    """

    n_params = 5

    def __init__(self, lk: np.ndarray, decaying: bool):
        self.lk = lk
        self.decaying = decaying
        self._rows = frontier_rows(lk, np.array([decaying]))
        self._key: bytes | None = None

    def _eval(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        th = np.asarray(theta, dtype=np.float64)
        key = th.tobytes()
        if key != self._key:
            f, jac = self._rows(th[None, :], _ROW0)
            self._key, self._cache = key, (f[0], jac[0])
        return self._cache

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        return self._eval(theta)[0]

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        return self._eval(theta)[1]


class _NullModel(_FrontierModel):
    """No frontier: ``ln q̂ = logaddexp(ln A − c ln k, ln F)`` in ``θ = (ln A, c, ln F)``
    (:func:`specprune.lmfit.null_rows`)."""

    n_params = 3

    def __init__(self, lk: np.ndarray):
        self.lk = lk
        self._rows = null_rows(lk)
        self._key = None


_ROW0 = np.arange(1)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS intercept and slope (slope 0 for fewer than 2 distinct x)."""
    if x.size < 2 or np.ptp(x) == 0:
        return (float(y.mean()) if y.size else 0.0), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


@dataclass
class FrontierFit:
    """Result of :func:`estimate_frontier` (see the module docstring for the model and decision rule).

    ``k_star`` is the detected frontier (1-based mode index, rounded) or ``None``; ``k_star_fit`` the raw
    fitted corner (also when not detected, NaN when the fit failed); ``[k_star_lo, k_star_hi]`` its
    uncertainty range. Model parameters: ``log_amplitude`` (ln A), ``gain_exponent`` (c, theory a − b),
    ``beta`` (β, theory b·m), ``floor`` (F, gain units). ``delta_bic`` compares against the no-frontier
    power law + floor (``null_*``); ``drop`` is the fitted fall (nats) below the learned power law at
    ``min(2k*, n)``.
    """

    k_star: int | None
    detected: bool
    success: bool
    message: str
    k_star_fit: float = float("nan")
    k_star_lo: int | None = None
    k_star_hi: int | None = None
    log_amplitude: float = float("nan")
    gain_exponent: float = float("nan")
    beta: float = float("nan")
    floor: float = float("nan")
    null_log_amplitude: float = float("nan")
    null_gain_exponent: float = float("nan")
    null_floor: float = float("nan")
    delta_bic: float = float("nan")
    drop: float = float("nan")
    cost: float = float("nan")
    cost_null: float = float("nan")
    noise_scale: float = float("nan")
    n_modes: int = 0
    floor_model: str = "decaying"
    k: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    gain: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def _theta(self) -> np.ndarray:
        return np.array(
            [
                self.log_amplitude,
                self.gain_exponent,
                math.log(self.k_star_fit),
                math.log(self.beta),
                math.log(max(self.floor, 1e-300)),
            ]
        )

    def predict(self, k: Any) -> np.ndarray:
        """The fitted frontier model's gain ``q̂_k`` at mode index (or indices) k."""
        lk = np.log(np.asarray(k, dtype=np.float64))
        model = _FrontierModel(lk.ravel(), decaying=self.floor_model == "decaying")
        return np.exp(model(self._theta())).reshape(lk.shape)

    def learned_fraction(self, k: Any) -> np.ndarray:
        """``(1 − exp(−(k*/k)^β))²``: the fitted fraction of mode k's target energy in place (NaN if no fit)."""
        k = np.asarray(k, dtype=np.float64)
        if not (math.isfinite(self.k_star_fit) and math.isfinite(self.beta)):
            return np.full(k.shape, np.nan)
        return (-np.expm1(-((self.k_star_fit / k) ** self.beta))) ** 2

    def predict_null(self, k: Any) -> np.ndarray:
        """The no-frontier model's gain ``A k^{−c} + F`` at mode index (or indices) k."""
        lk = np.log(np.asarray(k, dtype=np.float64))
        theta = np.array(
            [self.null_log_amplitude, self.null_gain_exponent, math.log(max(self.null_floor, 1e-300))]
        )
        return np.exp(_NullModel(lk.ravel())(theta)).reshape(lk.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (NaN → None)."""
        return {
            "k_star": _jint(self.k_star),
            "detected": bool(self.detected),
            "success": bool(self.success),
            "message": self.message,
            "k_star_fit": _jfloat(self.k_star_fit),
            "k_star_lo": _jint(self.k_star_lo),
            "k_star_hi": _jint(self.k_star_hi),
            "model": "ln q = ln(A k^-c (1 - exp(-x))^2 + F"
            + (" exp(-2x))" if self.floor_model == "decaying" else ")")
            + ", x = (k*/k)^beta",
            "floor_model": self.floor_model,
            "log_amplitude": _jfloat(self.log_amplitude),
            "gain_exponent": _jfloat(self.gain_exponent),
            "beta": _jfloat(self.beta),
            "floor": _jfloat(self.floor),
            "null_log_amplitude": _jfloat(self.null_log_amplitude),
            "null_gain_exponent": _jfloat(self.null_gain_exponent),
            "null_floor": _jfloat(self.null_floor),
            "delta_bic": _jfloat(self.delta_bic),
            "drop": _jfloat(self.drop),
            "noise_scale": _jfloat(self.noise_scale),
            "n_modes": int(self.n_modes),
        }

    def plot(self, ax: Any = None) -> Any:
        """Log-log plot of the per-mode gain, both fitted models and the frontier band; returns the axes."""
        import matplotlib.pyplot as plt  # lazy: plotting is optional

        if ax is None:
            _, ax = plt.subplots()
        if self.k.size:
            ax.loglog(self.k, self.gain, ".", ms=2, color="0.6", label="gain ‖W u_k‖²")
            if self.success:
                ax.loglog(self.k, self.predict(self.k), "-", color="C3", label="frontier model")
                ax.loglog(self.k, self.predict_null(self.k), "--", color="C0", lw=1, label="no frontier")
        if self.detected and self.k_star is not None:
            ax.axvline(self.k_star, color="C3", lw=1)
            if self.k_star_lo is not None and self.k_star_hi is not None:
                ax.axvspan(
                    self.k_star_lo,
                    self.k_star_hi,
                    color="C3",
                    alpha=0.15,
                    label=f"k* = {self.k_star} [{self.k_star_lo}, {self.k_star_hi}]",
                )
        ax.set_xlabel("mode k")
        ax.set_ylabel("gain")
        ax.set_title(self.message if not self.detected else f"frontier k* = {self.k_star}", fontsize="small")
        ax.legend(fontsize="small")
        return ax


def _noise_scale(y: np.ndarray) -> float:
    """Model-free noise level of a smooth-plus-noise sequence: MAD of first differences / (0.6745 √2)."""
    if y.size < 3:
        return 1.0
    dy = np.diff(y)
    s = float(np.median(np.abs(dy - np.median(dy))) / (0.6745 * math.sqrt(2.0)))
    return max(1e-06, s)


_SCREEN_BINS = 160


def _log_bins(lk: np.ndarray, y: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of ``ln k`` and ``y`` over ~_SCREEN_BINS log-spaced bins of consecutive modes, weights
    ``√(Σ w²)`` (so a bin's residual carries the weight of the modes it stands for)."""
    n = lk.size
    if n <= _SCREEN_BINS:
        return lk, y, wts
    edges = np.unique(np.round(np.geomspace(1, n + 1, _SCREEN_BINS + 1)).astype(np.int64)) - 1
    edges[-1] = n
    counts = np.diff(edges)
    w2 = np.add.reduceat(wts**2, edges[:-1])
    lk_b = np.add.reduceat(lk, edges[:-1]) / counts
    y_b = np.add.reduceat(y * wts**2, edges[:-1]) / w2
    return lk_b, y_b, np.sqrt(w2)


def _lsq(
    model: Any,
    y: np.ndarray,
    wts: np.ndarray,
    th0: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    sigma: float,
    max_nfev: int,
) -> Any:
    """Weighted robust (soft-L1) least squares of ``model(θ) − y``; None if the solver fails."""
    lo, hi = bounds
    th0 = np.clip(th0, lo + 1e-9, hi - 1e-9)
    try:
        with np.errstate(all="ignore"):
            r = optimize.least_squares(
                lambda th: (model(th) - y) * wts,
                th0,
                jac=lambda th: model.jacobian(th) * wts[:, None],
                bounds=(lo, hi),
                loss="soft_l1",
                f_scale=sigma,
                method="trf",
                x_scale="jac",
                max_nfev=max_nfev,
            )
    except (ValueError, np.linalg.LinAlgError):
        return None
    return r if np.isfinite(r.cost) else None


def frontier_steps(
    eigenvalues: Any,
    mode_energy: Any,
    *,
    gain: Any = None,
    beta_init: float | None = None,
    floor: str = "auto",
    n_starts: int = 8,
    max_fraction: float = 0.9,
    k_min_frontier: float = 2.0,
    bic_threshold: float = 20.0,
    min_drop: float = math.log(2.0),
    max_spread: float = 4.0,
    weight_power: float = 0.5,
    weight_offset: float = 0.0,
) -> Generator[list[Problem], list[tuple[np.ndarray, np.ndarray]], FrontierFit]:
    """Estimate the learning frontier k* from a layer's spectrum (model and rules: module docstring), as a
    generator: it yields its screening problems once, receives their solutions, and returns the
    :class:`FrontierFit` (``StopIteration.value``). :func:`run_steps` drives many layers' generators in
    lockstep so that their screenings run as one batch; :func:`estimate_frontier` runs one.

    Parameters
    ----------
    eigenvalues, mode_energy : λ_k (descending) and e_k = λ_k ‖W u_k‖², index 0 is mode k = 1.
    gain : optional ``‖W u_k‖²`` computed directly (else ``e_k / λ_k``); modes with numerically zero
        eigenvalue or non-positive gain are left out (their eigenvectors are arbitrary).
    beta_init : starting β (default: the eigenvalue slope b, clipped to [0.5, 6]).
    floor : ``"decaying"`` (init floor × e^{−2(k*/k)^β}, the NTK solution), ``"constant"`` (F under every
        mode), or ``"auto"`` (both, the lower robust cost wins; same number of parameters).
    n_starts : frontier candidates on a log grid from 2 to 1.5·n.
    max_fraction, k_min_frontier : the detectable range ``k_min_frontier ≤ k* ≤ max_fraction · n``.
    bic_threshold : minimum ΔBIC of the frontier model over the no-frontier model.
    min_drop : minimum fall (nats) of the fitted gain below the learned power law at ``min(2k*, n)``.
    max_spread : maximum ratio ``k_star_hi / k_star_lo`` of the uncertainty range.
    weight_power, weight_offset : residual weights ``∝ (k + weight_offset)^(−weight_power)``; the default
        ``k^(−1/2)`` gives each e-fold of k equal weight, so the few learned top modes are not outvoted by
        the many tail modes.
    """
    if floor not in ("auto", "decaying", "constant"):
        raise InputError(f"floor must be 'auto', 'decaying' or 'constant', got {floor!r}")
    lam = _to_numpy(eigenvalues, "eigenvalues").ravel()
    e = _to_numpy(mode_energy, "mode_energy").ravel()
    if lam.shape != e.shape:
        raise InputError(f"eigenvalues ({lam.size}) and mode_energy ({e.size}) differ in length")
    n_all = lam.size
    zero = _numerical_zero(np.clip(np.nan_to_num(lam), 0, None))
    usable = np.isfinite(lam) & (lam > zero)
    if gain is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(usable, e / np.where(usable, lam, 1.0), np.nan)
    else:
        q = _to_numpy(gain, "gain").ravel()
        if q.shape != lam.shape:
            raise InputError(f"gain ({q.size}) and eigenvalues ({lam.size}) differ in length")
    usable &= np.isfinite(q) & (q > 0)
    kk = np.arange(1, n_all + 1, dtype=np.float64)[usable]
    qv = q[usable]
    n = int(usable.sum())
    if n < 8:
        return FrontierFit(
            None, False, False, f"no frontier: too few usable modes ({n}) for a fit", n_modes=n, k=kk, gain=qv
        )
    lk = np.log(kk)
    y = np.log(qv)
    sigma = _noise_scale(y)
    n_top = float(kk[-1])  # highest usable mode index

    if beta_init is None or not math.isfinite(beta_init):
        bfit = fit_power_law(np.where(usable, lam, 0.0))
        beta_init = bfit.exponent if bfit.success else 2.0
    beta0 = float(np.clip(beta_init, 0.5, 6.0))

    ylo, yhi = float(y.min()), float(y.max())
    lf_lo, lf_hi = ylo - 12.0, yhi + 2.0
    bounds1 = (
        np.array([-np.inf, -20.0, math.log(0.5), math.log(0.2), lf_lo]),
        np.array([np.inf, 20.0, math.log(10.0 * n_top), math.log(20.0), lf_hi]),
    )
    wts = (kk + weight_offset) ** (-weight_power)
    wts /= np.sqrt(np.mean(wts**2))

    # segmented starts: a line below each candidate corner, the lower quartile above it as the floor
    starts = []
    for kc in np.geomspace(2.0, 1.5 * n_top, max(2, int(n_starts))):
        below = lk <= math.log(kc)
        if below.sum() < 3:
            below = np.zeros(n, bool)
            below[:3] = True
        a0, s0 = _line(lk[below], y[below])
        lf0 = float(np.percentile(y[~below], 25)) - 0.5 if (~below).any() else ylo - 2.0
        starts.append(np.array([a0, -s0, math.log(kc), math.log(beta0), lf0]))

    # screening on log-spaced bin means (≤ ~_SCREEN_BINS points; bin weights √count keep the cost
    # comparable), then the best start of each floor kind is polished on every mode
    lk_b, y_b, w_b = _log_bins(lk, y, wts)
    kinds = ("decaying", "constant") if floor == "auto" else (floor,)
    rows = np.array([th0 for _ in kinds for th0 in starts])
    dec = np.array([kind == "decaying" for kind in kinds for _ in starts])
    # the no-frontier alternative: power law + constant floor, screened in the same batch
    bounds0 = (np.array([-np.inf, -20.0, lf_lo]), np.array([np.inf, 20.0, lf_hi]))
    a_all, s_all = _line(lk, y)
    null_starts = np.array([[a_all, -s_all, lf0] for lf0 in (ylo - 6.0, float(np.percentile(y, 10)))])
    (th_s, cost_s), (th0s, cost0s) = yield [
        Problem("frontier", lk_b, y_b, w_b, rows, *bounds1, sigma, decaying=dec),
        Problem("null", lk_b, y_b, w_b, null_starts, *bounds0, sigma),
    ]
    screened = []
    for i, kind in enumerate(kinds):
        part = slice(i * len(starts), (i + 1) * len(starts))
        j = int(np.argmin(cost_s[part]))
        if np.isfinite(cost_s[part][j]):
            screened.append((float(cost_s[part][j]), kind, th_s[part][j]))
    # polish on every mode: the better-screened floor kind first; the other only when the two screened
    # within 20% of each other (a polish is most of the fit's cost)
    screened.sort(key=lambda t: t[0])
    best, best_kind = None, kinds[0]
    for i, (cost, kind, th_best) in enumerate(screened):
        if i > 0 and cost > 1.2 * screened[0][0]:
            break
        model = _FrontierModel(lk, decaying=kind == "decaying")
        cand = _lsq(model, y, wts, th_best, bounds1, sigma, max_nfev=300)
        if cand is None:
            continue
        if best is None or cand.cost < best.cost:
            best, best_kind = cand, kind
    if best is None:
        return FrontierFit(
            None,
            False,
            False,
            "no frontier: the fit failed from every start",
            n_modes=n,
            k=kk,
            gain=qv,
            noise_scale=sigma,
        )
    model = _FrontierModel(lk, decaying=best_kind == "decaying")

    null_model = _NullModel(lk)
    j0 = int(np.argmin(cost0s))
    null = _lsq(null_model, y, wts, th0s[j0] if np.isfinite(cost0s[j0]) else null_starts[0], bounds0, sigma,
                max_nfev=200)

    la, c, lks, lbeta, lf = best.x
    k_fit = math.exp(lks)
    # model comparison on the unweighted robust cost: the weights shape the fit, but every mode's
    # log-gain has the same noise, so evidence is counted per mode (a fit that only bends through the
    # first few heavily weighted modes gains almost nothing here)
    cost1 = max(float(soft_l1_cost(model(best.x) - y, sigma)), 1e-300)
    cost0 = float(soft_l1_cost(null_model(null.x) - y, sigma)) if null is not None else float("inf")
    cost0 = max(cost0, cost1)
    dbic = n * math.log(cost0 / cost1) - 2.0 * math.log(n)
    k_probe = min(2.0 * k_fit, n_top)
    probe = _FrontierModel(np.array([math.log(k_probe)]), decaying=model.decaying)
    drop = float((la - c * math.log(k_probe)) - probe(best.x)[0])

    # uncertainty of ln k*: Gauss-Newton covariance, inflated for residual autocorrelation
    resid = best.fun
    jm = best.jac
    s2 = float(resid @ resid) / max(n - 5, 1)
    rho = 0.0
    if n > 3 and np.std(resid) > 0:
        rho = float(np.clip(np.corrcoef(resid[:-1], resid[1:])[0, 1], 0.0, 0.95))
    try:
        cov = np.linalg.pinv(jm.T @ jm) * s2 * (1.0 + rho) / (1.0 - rho)
        se = math.sqrt(max(float(cov[2, 2]), 0.0))
    except (np.linalg.LinAlgError, ValueError):
        se = float("inf")
    half = max(2.0 * se, math.log(1.05))
    if math.isfinite(half) and half < 50:
        k_lo_unc = max(1, math.floor(k_fit * math.exp(-half)))
        k_hi_unc = math.ceil(k_fit * math.exp(half))
        spread = math.exp(2.0 * half)
    else:
        k_lo_unc, k_hi_unc, spread = 1, n_all, float("inf")

    reasons = []
    if not best.success:
        reasons.append(f"fit did not converge ({best.message})")
    if k_fit < k_min_frontier:
        reasons.append(f"fitted k*={k_fit:.3g} is below {k_min_frontier:g} modes")
    if k_fit > max_fraction * n_top:
        reasons.append(
            f"fitted k*={k_fit:.4g} lies at or beyond {max_fraction:g}·{int(n_top)} modes "
            "(learned throughout the spectrum)"
        )
    if not dbic > bic_threshold:
        reasons.append(
            f"the frontier model does not beat a power law + floor (ΔBIC={dbic:.3g} ≤ {bic_threshold:g})"
        )
    if drop < min_drop:
        reasons.append(
            f"no bend: the gain at k={k_probe:.3g} is only {drop:.2g} nats below the learned power law"
        )
    if spread > max_spread:
        reasons.append(f"k* poorly constrained (range {k_lo_unc}..{k_hi_unc})")
    detected = not reasons
    k_round = int(min(max(round(k_fit), 1), n_all)) if detected else None
    if detected:
        message = f"frontier detected at k*={k_round} (range {k_lo_unc}..{min(k_hi_unc, n_all)})"
    else:
        message = "no frontier: " + "; ".join(reasons)
    return FrontierFit(
        k_star=k_round,
        detected=detected,
        success=bool(best.success),
        message=message,
        k_star_fit=k_fit,
        k_star_lo=min(k_lo_unc, n_all) if detected else None,
        k_star_hi=min(k_hi_unc, n_all) if detected else None,
        log_amplitude=float(la),
        gain_exponent=float(c),
        beta=math.exp(lbeta),
        floor=math.exp(lf),
        null_log_amplitude=float(null.x[0]) if null is not None else float("nan"),
        null_gain_exponent=float(null.x[1]) if null is not None else float("nan"),
        null_floor=math.exp(null.x[2]) if null is not None else float("nan"),
        delta_bic=dbic,
        drop=drop,
        cost=cost1,
        cost_null=cost0,
        noise_scale=sigma,
        n_modes=n,
        floor_model=best_kind,
        k=kk,
        gain=qv,
    )


def run_steps(steps: Sequence[Generator[list[Problem], Any, Any]]) -> list[Any]:
    """Drive step generators (:func:`frontier_steps`, :meth:`LayerSpectrum.from_eigen_steps`) in lockstep:
    each round, every generator still running has yielded its screening problems; they are solved in one
    :func:`specprune.lmfit.solve_problems` batch and each generator gets its own solutions back. Returns
    the generators' return values, in order. One layer's screening is a few dozen small array steps whose
    cost is mostly Python's; a model's layers together pay that once."""
    results: list[Any] = [None] * len(steps)

    def advance(i: int, answer: Any) -> list[Problem] | None:
        """Step generator i; its next problems, or None once it has returned (its result stored)."""
        try:
            return steps[i].send(answer)
        except StopIteration as stop:
            results[i] = stop.value
            return None

    pending = {i: ps for i in range(len(steps)) if (ps := advance(i, None)) is not None}
    while pending:
        solved = iter(solve_problems([p for ps in pending.values() for p in ps]))
        answers = {i: [next(solved) for _ in ps] for i, ps in pending.items()}
        pending = {i: ps for i, ans in answers.items() if (ps := advance(i, ans)) is not None}
    return results


def estimate_frontier(eigenvalues: Any, mode_energy: Any, **options: Any) -> FrontierFit:
    """Estimate the learning frontier k* of one layer: :func:`frontier_steps` run on its own (options,
    model and detection rules there and in the module docstring)."""
    return run_steps([frontier_steps(eigenvalues, mode_energy, **options)])[0]


estimate_frontier.__signature__ = inspect.signature(frontier_steps).replace(  # type: ignore[attr-defined]
    return_annotation=FrontierFit)


# -------------------------------------------------------------------------------------- spectrum
@dataclass
class LayerSpectrum:
    """One layer's input spectrum, mode energies and fits (see the module docstring for the math).

    Arrays are indexed by mode, index 0 = k = 1 (largest eigenvalue). ``eigenvectors`` (columns,
    ``d_in × d_in``) is kept only when asked for. ``mode_gain`` is ``‖W u_k‖²``.
    """

    eigenvalues: np.ndarray
    mode_energy: np.ndarray
    mode_gain: np.ndarray
    tokens: int
    d_in: int
    d_out: int
    b_fit: PowerLawFit
    a_fit: PowerLawFit
    frontier: FrontierFit
    effective_rank: float
    participation_ratio: float
    eigenvectors: np.ndarray | None = field(default=None, repr=False)

    # ---- construction
    @classmethod
    def from_eigen(cls, eigenvalues: Any, mode_energy: Any, **kwargs: Any) -> LayerSpectrum:
        """Build from (saved) eigenvalues and mode energies, recomputing every fit: :meth:`from_eigen_steps`
        (arguments and fit ranges there) run on its own."""
        return run_steps([cls.from_eigen_steps(eigenvalues, mode_energy, **kwargs)])[0]

    @classmethod
    def from_eigen_many(cls, items: Sequence[dict[str, Any]]) -> list[LayerSpectrum]:
        """:meth:`from_eigen` of many layers (``items``: each one's keyword arguments, ``eigenvalues`` and
        ``mode_energy`` included) with their frontier screenings solved as one batch; each result equals
        what :meth:`from_eigen` gives for that layer alone (to round-off)."""
        return run_steps([cls.from_eigen_steps(**item) for item in items])

    @classmethod
    def from_eigen_steps(
        cls,
        eigenvalues: Any,
        mode_energy: Any,
        *,
        tokens: int,
        d_out: int,
        mode_gain: Any = None,
        eigenvectors: Any = None,
        frontier_options: dict[str, Any] | None = None,
        kept_tokens: int | None = None,
    ) -> Generator[list[Problem], Any, LayerSpectrum]:
        """Build from (saved) eigenvalues and mode energies, recomputing every fit; a step generator
        (:func:`run_steps`) that yields the frontier's screening problems.

        ``b`` is fitted to λ over :func:`default_fit_range`; the frontier from the gains; ``a`` to e_k over
        the clearly learned modes, the default range cut at ``k*/2`` (there ``g = 2^b`` and the mode is
        ≥ 88% learned for b ≥ 1.5; at k* itself only 40% of the energy is in place, which would bias a
        upward), starting at k = 1 when that leaves fewer than 3 modes; the default range when no
        frontier is detected. ``kept_tokens``: how many of the ``tokens`` entered the Gram (token
        sampling keeps fewer); the rank, and so the fits, stop at it.
        """
        lam = _to_numpy(eigenvalues, "eigenvalues").ravel()
        e = _to_numpy(mode_energy, "mode_energy").ravel()
        if lam.shape != e.shape:
            raise InputError("eigenvalues and mode_energy differ in length")
        d = lam.size
        # a Gram of N tokens has rank ≤ N: with fewer tokens than input dimensions the eigenvalues past the
        # N-th are round-off of the solve (float32 for wide inputs: far above the float64 zero below) and
        # their eigenvectors arbitrary, so the fits and the frontier stop at the rank
        rows = int(tokens) if kept_tokens is None else min(int(tokens), int(kept_tokens))
        rank = min(d, rows) if rows > 0 else d
        zero = _numerical_zero(lam)
        usable = lam > zero
        usable[rank:] = False
        if mode_gain is None:
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(usable, e / np.where(usable, lam, 1.0), np.nan)
        else:
            q = _to_numpy(mode_gain, "mode_gain").ravel()
        lam_fit = np.where(usable, lam, 0.0)
        b_fit = fit_power_law(lam_fit, *default_fit_range(rank))
        frontier = yield from frontier_steps(
            lam if rank == d else lam_fit, e, gain=q, beta_init=b_fit.exponent if b_fit.success else None,
            **(frontier_options or {})
        )
        k_lo, k_hi = default_fit_range(rank)
        e_fit = np.where(usable, e, 0.0)
        if frontier.detected and frontier.k_star is not None:
            k_hi = min(k_hi, max(3, frontier.k_star // 2))
            if k_hi - k_lo + 1 < 3:
                k_lo = 1
            learned = frontier.learned_fraction(np.arange(1, d + 1))
            e_fit = np.where(learned > 0, e_fit / np.where(learned > 0, learned, 1.0), 0.0)
        a_fit = fit_power_law(e_fit, k_lo, k_hi)
        if frontier.detected:
            a_fit.message += "; energies divided by the fitted learned fraction (1 - exp(-(k*/k)^beta))^2"
        vecs = None if eigenvectors is None else _to_numpy(eigenvectors, "eigenvectors")
        return cls(
            eigenvalues=lam,
            mode_energy=e,
            mode_gain=q,
            tokens=int(tokens),
            d_in=d,
            d_out=int(d_out),
            b_fit=b_fit,
            a_fit=a_fit,
            frontier=frontier,
            effective_rank=effective_rank(lam),
            participation_ratio=participation_ratio(lam),
            eigenvectors=vecs,
        )

    # ---- derived quantities
    @property
    def b(self) -> float:
        """Eigenvalue exponent b (λ_k ~ k^-b); NaN if the fit failed."""
        return self.b_fit.exponent

    @property
    def a(self) -> float:
        """Mode-energy exponent a (e_k ~ k^-a) over the learned modes; NaN if the fit failed."""
        return self.a_fit.exponent

    @property
    def k_star(self) -> int | None:
        """Detected learning frontier (1-based mode index) or None."""
        return self.frontier.k_star if self.frontier.detected else None

    @property
    def k_max(self) -> int:
        """Number of input modes, d_in."""
        return self.d_in

    @property
    def r_star(self) -> float | None:
        """``1 − k*/k_max``: the fraction of modes past the frontier (None without a frontier)."""
        return None if self.k_star is None else 1.0 - self.k_star / self.k_max

    @property
    def total_energy(self) -> float:
        """``Σ_k e_k = tr(W Σ Wᵀ) = E‖W x‖²``."""
        return float(self.tail_energy[0])

    @functools.cached_property
    def tail_energy(self) -> np.ndarray:
        """``tail_energy[k] = Σ_{k' > k} e_k'`` for k = 0..d (length d + 1; [0] = total, [d] = 0).

        The exact output-energy loss ``E‖(W − W U_k U_kᵀ) x‖²`` of keeping the top-k input modes.
        Summed from the smallest mode up (reverse cumulative sum) for accuracy; computed once.
        """
        e = np.clip(self.mode_energy, 0.0, None)
        return np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])

    def truncation_distortion(self, k: int) -> float:
        """Output-energy loss ``Σ_{k'>k} e_k'`` of keeping the top-k input modes (0 ≤ k ≤ d_in)."""
        k = int(k)
        if not 0 <= k <= self.d_in:
            raise InputError(f"rank {k} is outside 0..{self.d_in}")
        return float(self.tail_energy[k])

    def summary_dict(self) -> dict[str, Any]:
        """The analysis.json layer fields other than name/type; JSON-safe (NaN → None)."""
        return {
            "d_in": int(self.d_in),
            "d_out": int(self.d_out),
            "tokens": int(self.tokens),
            "b": _jfloat(self.b),
            "a": _jfloat(self.a),
            "k_star": _jint(self.k_star),
            "k_max": int(self.k_max),
            "r_star": _jfloat(self.r_star),
            "effective_rank": _jfloat(self.effective_rank),
            "participation_ratio": _jfloat(self.participation_ratio),
            "total_energy": _jfloat(self.total_energy),
            "fit": {
                "b": self.b_fit.to_dict(),
                "a": self.a_fit.to_dict(),
                "frontier": self.frontier.to_dict(),
            },
        }

    def plot(self, axes: Any = None) -> Any:
        """Three log-log panels: eigenvalues with the b fit, energies with the a fit, gains with the frontier."""
        import matplotlib.pyplot as plt  # lazy: plotting is optional

        if axes is None:
            _, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        self.b_fit.plot(axes[0], label="eigenvalues λ_k")
        self.a_fit.plot(axes[1], label="mode energy e_k")
        self.frontier.plot(axes[2])
        return axes


def compute_spectrum(
    gram: Any,
    tokens: int,
    weight: Any,
    *,
    keep_eigenvectors: bool = True,
    frontier_options: dict[str, Any] | None = None,
) -> LayerSpectrum:
    """Spectrum, mode energies, fits and frontier of one layer from its Gram sum and weight.

    Parameters
    ----------
    gram : ``(d_in, d_in)`` uncentred Gram sum ``G = Σ_tokens x xᵀ`` (numpy or torch); Σ = G / tokens.
        It is symmetrised; non-finite entries are an error.
    tokens : the token count N > 0.
    weight : ``(d_out, d_in)`` weight matrix W (the layer adapters' layout).
    keep_eigenvectors : keep U (``d_in × d_in`` float64) on the result (needed for spectral pruning).
    frontier_options : keyword arguments forwarded to :func:`estimate_frontier`.

    The eigendecomposition is float64 LAPACK ``syevd``; eigenvalues are sorted descending and negative
    round-off clipped to 0; gains are the squared column norms of ``W U`` (one matrix product, no loop).
    """
    g = _to_numpy(gram, "gram")
    w = _to_numpy(weight, "weight")
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise InputError(f"gram must be a non-empty square matrix, got shape {g.shape}")
    if w.ndim != 2 or w.shape[1] != g.shape[0]:
        raise InputError(f"weight shape {w.shape} does not match gram ({g.shape[0]} inputs)")
    if int(tokens) != tokens or tokens <= 0:
        raise InputError(f"tokens must be a positive integer, got {tokens!r}")
    if not (np.isfinite(g).all() and np.isfinite(w).all()):
        raise InputError("gram or weight contains NaN or inf")
    sigma = (g + g.T) * (0.5 / float(tokens))
    vals, vecs = linalg.eigh(sigma, driver="evd", check_finite=False)
    vals = np.clip(vals[::-1], 0.0, None)
    vecs = np.ascontiguousarray(vecs[:, ::-1])
    wu = w @ vecs
    gain = np.einsum("ij,ij->j", wu, wu)
    energy = vals * gain
    return LayerSpectrum.from_eigen(
        vals,
        energy,
        tokens=int(tokens),
        d_out=w.shape[0],
        mode_gain=gain,
        eigenvectors=vecs if keep_eigenvectors else None,
        frontier_options=frontier_options,
    )
