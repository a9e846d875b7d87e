"""Model-level prediction: from exact layer-local distortions to the metric's delta.

Layer-local distortion is exact and cheap from the input covariance Σ = U Λ Uᵀ: any weight
change ΔW of layer l costs

    D_l(ΔW) = E‖ΔW x‖² = tr(ΔW Σ ΔWᵀ) = ‖ΔW U Λ^½‖_F²        (per token).

How much of that reaches the metric depends on what follows the layer, so it is *measured*:

1. **Per-layer response (antithetic noise injection).** On a few calibration windows each
   layer alone is perturbed by a realistic weight change ΔW and by −ΔW, and the two metric
   deltas are averaged: the first-order term (which has either sign and does not survive on
   other data) cancels and the curvature term that compression really pays remains.
   Quantization is probed at two sizes (RTN int-5 and int-2, per channel), giving the layer's
   response law δ_l(D) = s_l·D^{p_l} (p_l clipped to [0.7, 2]); pruning is probed once (a rank
   truncation at half the factorization break-even rank) and shares p_l. Cost: six forward
   passes of the probe windows per layer — a small multiple of one calibration pass.
2. **Additive prediction.** For a plan, P = Σ_l δ_l(D_l) summed over layers.
3. **Global calibration map.** Layers interact (errors compound through later layers and
   normalisations), so P is mapped to the measured delta by δ ≈ c·P^p, fitted in log-log
   space on whole-model perturbations (uniform int-8/6/4/3, and uniform ranks when pruning is
   allowed) measured on the verification windows (32 calibration windows). The spread of those
   points around the fit gives the multiplicative uncertainty σ.

Noise model of the prediction: the actual RTN / truncation weight errors (not an
idealised additive model), scored exactly per layer and mapped through measured sensitivities.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .evaluation import Evaluator
from .layers import TargetLayer
from .progress import track

PROBE_BITS = (5, 2)
MIN_SENSITIVITY = 1e-12


@dataclass
class LayerSensitivity:
    """A layer's measured response δ(D) = s·D^p to weight changes of output-energy distortion D."""

    name: str
    quant: float          # s for quantization-type ΔW
    prune: float | None   # s for low-rank truncation (None when pruning is not considered)
    power: float = 1.0    # p, shared by both kinds
    probes: list[dict] = field(default_factory=list)

    def delta(self, d_quant: float, d_prune: float = 0.0) -> float:
        out = 0.0
        if d_quant > 0:
            out += self.quant * d_quant ** self.power
        if d_prune > 0:
            out += (self.prune if self.prune is not None else self.quant) * d_prune ** self.power
        return out

    def to_dict(self) -> dict:
        return {"quant": self.quant, "prune": self.prune, "power": self.power, "probes": self.probes}


@dataclass
class CalibrationMap:
    """δ_measured ≈ c · P^p with multiplicative uncertainty exp(σ)."""

    c: float = 1.0
    p: float = 1.0
    sigma: float = 0.35
    points: list[dict] = field(default_factory=list)

    def __call__(self, pred: float) -> float:
        if pred <= 0:
            return 0.0
        return float(self.c * pred ** self.p)

    def inverse(self, delta: float) -> float:
        """The additive prediction P whose mapped delta is ``delta``."""
        if delta <= 0:
            return 0.0
        return float((delta / self.c) ** (1.0 / self.p))

    def uncertainty(self, delta: float) -> float:
        return float(delta * (math.exp(self.sigma) - 1.0))

    @classmethod
    def fit(cls, points: list[dict], sigma_floor: float = 0.15) -> CalibrationMap:
        """Least squares in log space over points with measured delta and additive prediction > 0."""
        good = [pt for pt in points if pt["predicted_raw"] > 0 and pt["measured"] > 0]
        if not good:
            return cls(points=points)
        x = np.log([pt["predicted_raw"] for pt in good])
        y = np.log([pt["measured"] for pt in good])
        if len(good) >= 3 and np.ptp(x) > 0.5:
            p, logc = np.polyfit(x, y, 1)
            p = float(np.clip(p, 0.6, 1.6))
            logc = float(np.mean(y - p * x))
        else:
            p, logc = 1.0, float(np.mean(y - x))
        resid = y - (logc + p * x)
        dof = max(len(good) - (2 if len(good) >= 3 else 1), 1)
        sigma = float(max(sigma_floor, math.sqrt(float(np.sum(resid ** 2)) / dof)))
        return cls(c=float(math.exp(logc)), p=p, sigma=sigma, points=points)

    def to_dict(self) -> dict:
        return {"c": self.c, "p": self.p, "sigma": self.sigma, "points": self.points}


class LayerGeometry:
    """Per-layer quantities for exact distortions: W (d_out×d_in) and M = U Λ^½ so that
    D(ΔW) = ‖ΔW M‖²; cached on the layer's first use."""

    def __init__(self, layer: TargetLayer, eigenvalues: np.ndarray, eigenvectors: np.ndarray):
        self.layer = layer
        self.w = layer.weight_matrix().detach().to("cpu", torch.float32).clone()
        lam = torch.as_tensor(np.clip(eigenvalues, 0, None), dtype=torch.float32)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.u = torch.as_tensor(np.asarray(eigenvectors), dtype=torch.float32)
        self.m = self.u * lam.sqrt()
        wm = self.w @ self.m
        self.energy = float(wm.double().pow(2).sum())
        self._sv: np.ndarray | None = None
        self._p: torch.Tensor | None = None
        self._wm = wm

    @property
    def d_in(self) -> int:
        return self.w.shape[1]

    @property
    def d_out(self) -> int:
        return self.w.shape[0]

    def distortion(self, delta_w: torch.Tensor) -> float:
        return float((delta_w.to(torch.float32) @ self.m).double().pow(2).sum())

    def _svd(self) -> tuple[torch.Tensor, np.ndarray]:
        """Left singular vectors P and singular values s of W Σ^½ = W U Λ^½ (computed once)."""
        if self._sv is None:
            p, sv, _ = torch.linalg.svd(self._wm.double(), full_matrices=False)
            self._p = p.to(torch.float32)
            self._sv = sv.numpy()
        return self._p, self._sv

    def whitened_singular_values(self) -> np.ndarray:
        """Singular values of W Σ^½ (descending): keeping k directions costs Σ_{i>k} s_i²."""
        return self._svd()[1]

    def factors(self, method: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-k factors (A, B), W_k = A B. ``whitened``: the top-k left singular directions P_k of
        W Σ^½, W_k = P_k (P_kᵀ W) — optimal for output energy; ``spectral``: the top-k input modes,
        W_k = (W U_k) U_kᵀ."""
        if method == "whitened":
            p = self._svd()[0][:, :k]
            return p, p.T @ self.w
        u = self.u[:, :k]
        return self.w @ u, u.T

    def low_rank_delta(self, method: str, k: int) -> torch.Tensor:
        a, b = self.factors(method, k)
        return a @ b - self.w


@contextlib.contextmanager
def patched_weight(layer: TargetLayer, new_w: torch.Tensor):
    """Temporarily set a layer's weight matrix; always restored."""
    adapter = layer.adapter
    original = layer.module.weight.detach().clone()
    try:
        adapter.set_weight_matrix(layer.module, new_w)
        yield
    finally:
        with torch.no_grad():
            layer.module.weight.copy_(original)


def break_even_rank(d_in: int, d_out: int) -> int:
    """Largest rank whose two factors hold fewer parameters than the dense matrix."""
    return max(1, (d_in * d_out - 1) // (d_in + d_out))


def antithetic_delta(layer: TargetLayer, w: torch.Tensor, dw: torch.Tensor, evaluator: Evaluator,
                     model: nn.Module) -> float:
    """Mean of the metric deltas for W + ΔW and W − ΔW (the first-order term cancels)."""
    with patched_weight(layer, w + dw):
        plus = evaluator.delta(model, "probe")
    with patched_weight(layer, w - dw):
        minus = evaluator.delta(model, "probe")
    return 0.5 * (plus + minus)


def measure_sensitivities(layers: list[TargetLayer], geoms: dict[str, LayerGeometry], evaluator: Evaluator,
                          model: nn.Module, prune_method: str | None) -> dict[str, LayerSensitivity]:
    """Antithetic noise injection, one layer at a time (see module docstring)."""
    from .compress.quantize import quantization_error

    out: dict[str, LayerSensitivity] = {}
    for layer in track(layers, "sensitivity"):
        g = geoms[layer.name]
        probes = []
        for bits in PROBE_BITS:
            dq = quantization_error(g.w, bits, None).to(torch.float32)
            probes.append({"kind": "quant", "bits": bits, "distortion": g.distortion(dq),
                           "delta": antithetic_delta(layer, g.w, dq, evaluator, model)})
        power, s_q = _response_law(probes)
        sens = LayerSensitivity(layer.name, s_q, None, power, probes)
        if prune_method is not None:
            k = max(1, break_even_rank(g.d_in, g.d_out) // 2)
            dp = g.low_rank_delta(prune_method, k)
            dist = g.distortion(dp)
            delta = antithetic_delta(layer, g.w, dp, evaluator, model)
            probes.append({"kind": "prune", "rank": k, "distortion": dist, "delta": delta})
            sens.prune = max(delta, 0.0) / dist ** power + MIN_SENSITIVITY if dist > 0 else MIN_SENSITIVITY
        out[layer.name] = sens
    return out


def _response_law(probes: list[dict]) -> tuple[float, float]:
    """(p, s) of δ = s·D^p through two probes; p = 1 when either is not measurably positive."""
    (d1, y1), (d2, y2) = [(pr["distortion"], pr["delta"]) for pr in probes[:2]]
    if d1 > 0 and d2 > 0 and y1 > 0 and y2 > 0 and abs(math.log(d2 / d1)) > 1e-6:
        p = float(np.clip(math.log(y2 / y1) / math.log(d2 / d1), 0.7, 2.0))
    else:
        p = 1.0
    # anchor on the larger (better measured) probe
    d, y = (d2, y2) if d2 >= d1 else (d1, y1)
    if d <= 0:
        return p, MIN_SENSITIVITY
    return p, max(y, 0.0) / d ** p + MIN_SENSITIVITY
