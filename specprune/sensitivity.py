"""Model-level prediction: from exact layer-local distortions to the metric's delta.

Layer-local distortion is exact and cheap from the input covariance Σ = U Λ Uᵀ: any weight
change ΔW of layer l costs

    D_l(ΔW) = E‖ΔW x‖² = tr(ΔW Σ ΔWᵀ) = ‖ΔW U Λ^½‖_F²        (per token).

How much of that reaches the metric depends on what follows the layer, so it is *measured*:

1. **Per-layer response (noise and truncation injection).** On a few calibration windows each
   layer alone is perturbed by a realistic weight change ΔW and by −ΔW, and the two metric
   deltas are averaged: the first-order term (which has either sign and does not survive on
   other data) cancels and the curvature term that compression really pays remains.
   Quantization is probed at two sizes (RTN int-5 and int-2, per channel), giving the layer's
   response law δ_l(D) = s_l·D^{p_l} (p_l clipped to [0.7, 2]). Pruning is probed
   with real truncations, *one-sided*: a truncation's weight change is not zero-mean noise but
   removes output energy systematically, so its first-order term survives on any data (measured
   on the small trained Llama: the antithetic mean under-predicts whole-model truncation 3–5×,
   the one-sided sum is within 15%). A large truncation (rank half the factorization break-even
   rank) anchors s; on a few windows its one-sided delta also carries a random first-order part
   that can make it negative, so its antithetic mean (the curvature alone) is the floor. A light
   truncation (rank 3/4 of full) gives the truncation's own exponent q (δ = s·D^q, clipped to
   [0.5, 1.5]; 1 when the light probe is lost in its noise). Cost: seven forward passes of the
   probe windows (4, or 8 for loss metrics) per layer, of which the blocks that ran before the
   layer are replayed from one recording pass rather than recomputed (:mod:`specprune.prefix`,
   identical outputs): on all-MiniLM-L6-v2 ~9 s, about 2× a whole ``analyze`` of 64 windows
   (docs/benchmarks.md). For the output-mse and lm-loss metrics on linear layers the same seven
   numbers per layer come from the metric's Gauss–Newton form instead, for all layers from 16
   backward passes (:mod:`specprune.curvature`, 2.5 s on MiniLM); the recommender uses that by
   default and these probes elsewhere.
2. **Additive prediction.** For a plan, P = Σ_l δ_l(D_l) summed over layers.
3. **Global calibration maps.** Layers interact (errors compound through later layers and
   normalisations), so each kind's sum is mapped to the measured delta by δ ≈ c·P^p, fitted in
   log-log space on whole-model perturbations measured on the verification windows (32
   calibration windows): uniform int-8/6/4/3/2 (those among the bit choices) for quantization,
   and three uniform truncations (light: rank 3/4 of full; heavy: 3/4 and 0.45 of the
   break-even rank) for pruning — the two kinds compound differently (measured on MiniLM:
   whole-model truncation responds sublinearly to the per-layer sum, quantization linearly).
   A plan's prediction is δ_q(P_q) + δ_r(P_r). Points lost in their sampling noise or below 0.1%
   are left out and the others weighted by their precision; their spread around the fit gives
   the multiplicative uncertainty σ.

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
from .prefix import PrefixReplay
from .progress import track
from .solve import thin_svd

PROBE_BITS = (5, 2)
MIN_SENSITIVITY = 1e-12
MIN_MAP_DELTA = 1e-3
SLOPE_PRIOR_NATS = 0.5  # the calibration map's slope prior (see CalibrationMap.fit)


@dataclass
class LayerSensitivity:
    """A layer's measured response δ(D) = s·D^p to weight changes of output-energy distortion D."""

    name: str
    quant: float          # s for quantization-type ΔW
    prune: float | None   # s for low-rank truncation (None when pruning is not considered)
    power: float = 1.0    # p of the quantization response
    probes: list[dict] = field(default_factory=list)
    prune_power: float = 1.0  # q of the truncation response (see the module docstring)

    def parts(self, d_quant: float, d_prune: float = 0.0) -> tuple[float, float]:
        """(quantization part, truncation part) of the layer's predicted delta."""
        q = self.quant * d_quant ** self.power if d_quant > 0 else 0.0
        r = 0.0
        if d_prune > 0:
            r = self.prune * d_prune ** self.prune_power if self.prune is not None else self.quant * d_prune ** self.power
        return q, r

    def delta(self, d_quant: float, d_prune: float = 0.0) -> float:
        return sum(self.parts(d_quant, d_prune))

    def to_dict(self) -> dict:
        return {"quant": self.quant, "prune": self.prune, "power": self.power, "prune_power": self.prune_power,
                "probes": self.probes}


def map_uncertainty(delta: float, sigma: float) -> float:
    """Two standard deviations σ of a map's log misfit on a predicted delta: δ·(e^{2σ} − 1)."""
    return float(delta * (math.exp(2.0 * sigma) - 1.0))


@dataclass
class CalibrationMap:
    """δ_measured ≈ c · P^p; σ is the spread of its log misfit, and a prediction's stated uncertainty is
    two of them (:meth:`uncertainty`: δ·(e^{2σ} − 1), the counterpart of a measured plan's two standard
    errors)."""

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
        """The stated uncertainty of a mapped prediction: δ·(e^{2σ} − 1)."""
        return map_uncertainty(delta, self.sigma)

    @classmethod
    def fit(cls, points: list[dict], sigma_floor: float = 0.15, model_sigma: float = 0.1) -> CalibrationMap:
        """Weighted least squares of log δ on log P over the points whose measured delta stands out of
        its sampling noise (measured > 2 standard errors, when a ``stderr`` is given) and, when two
        such points reach it, is at least 0.1%: a near-zero measurement of a tiny perturbation says
        little about the map and would drag it. Weights 1/(σ_rel² + model_sigma²), σ_rel =
        stderr/measured; the slope is shrunk toward 1 by a ridge (prior width SLOPE_PRIOR_NATS)."""
        good = []
        for pt in points:
            if not (pt["predicted_raw"] > 0 and pt["measured"] > 0):
                continue
            se = pt.get("stderr")
            if se is not None and math.isfinite(se) and pt["measured"] <= 2.0 * se:
                continue
            good.append(pt)
        # deltas below MIN_MAP_DELTA (0.1%) are under any tolerance a plan is made for, and their
        # relative noise, at the far end of the log scale, would tilt the slope: used only when
        # fewer than two larger points exist
        large = [pt for pt in good if pt["measured"] >= MIN_MAP_DELTA]
        if len(large) >= 2:
            good = large
        if not good:
            return cls(points=points)
        x = np.log([pt["predicted_raw"] for pt in good])
        y = np.log([pt["measured"] for pt in good])
        rel = np.array([(pt["stderr"] / pt["measured"]) if pt.get("stderr") is not None
                        and math.isfinite(pt["stderr"]) else 0.0 for pt in good])
        w = 1.0 / (rel ** 2 + model_sigma ** 2)
        # the slope, shrunk toward 1 (additive, second-order responses) by a ridge of weight W·s0²:
        # points spanning little of the log scale barely move it, wide spans set it; smooth in the
        # data, so near-identical inputs give near-identical maps
        xm = float(np.sum(w * x) / np.sum(w))
        z = y - x
        zm = float(np.sum(w * z) / np.sum(w))
        sxx = float(np.sum(w * (x - xm) ** 2))
        p = 1.0 + float(np.sum(w * (x - xm) * (z - zm))) / (sxx + float(np.sum(w)) * SLOPE_PRIOR_NATS ** 2)
        p = float(np.clip(p, 0.6, 1.6))
        logc = float(np.sum(w * (y - p * x)) / np.sum(w))
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
        self._mode_energy: np.ndarray | None = None
        self._wm = wm

    @property
    def d_in(self) -> int:
        return self.w.shape[1]

    @property
    def d_out(self) -> int:
        return self.w.shape[0]

    def distortion(self, delta_w: torch.Tensor) -> float:
        return float((delta_w.to(torch.float32) @ self.m).double().pow(2).sum())

    def factored_distortion(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """D(A B − W) as ‖A (B M) − W M‖² (W M is kept): k·d_in·(d_in + d_out) multiply-adds instead of
        d_out·d_in·(k + d_in) for forming A B first."""
        return float((a.to(torch.float32) @ (b.to(torch.float32) @ self.m) - self._wm).double().pow(2).sum())

    def _svd(self) -> tuple[torch.Tensor, np.ndarray]:
        """Left singular vectors P and singular values s of W Σ^½ = W U Λ^½ (computed once, in float32 like
        W M itself: 0.71 s against 0.96 s in float64 for MiniLM's 37 layers; there the tail sums Σ_{i>k} s_i² that price
        truncations, and the residuals of the projections P_k P_kᵀ, moved by ≤ 3e-5 of their float64 values
        wherever they hold more than 1e-6 of the layer's energy)."""
        if self._sv is None:
            p, sv, _ = thin_svd(self._wm)
            self._p = p.to(torch.float32)
            self._sv = sv.double().numpy()
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

    def truncation_distortion(self, method: str, k: int) -> float:
        """D of the rank-k truncation in closed form: ``Σ_{i>k} s_i²`` over the singular values of
        W Σ^½ (whitened), ``Σ_{j>k} ‖W u_j‖² λ_j`` over the input modes (spectral)."""
        if method == "whitened":
            return float(np.sum(self._svd()[1][k:].astype(np.float64) ** 2))
        if self._mode_energy is None:
            self._mode_energy = self._wm.double().pow(2).sum(0).numpy()
        return float(np.sum(self._mode_energy[k:]))

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


def probe_delta(layer: TargetLayer, new_w: torch.Tensor, evaluator: Evaluator, model: nn.Module,
                replay: PrefixReplay | None = None) -> float:
    """The metric delta with the layer's weight set to ``new_w`` (restored after); ``replay`` replays
    the blocks that ran before the layer instead of recomputing them (same outputs)."""
    skip = replay.skipping(layer.name) if replay is not None else contextlib.nullcontext()
    with patched_weight(layer, new_w), skip:
        return evaluator.delta(model, "probe")


def antithetic_delta(layer: TargetLayer, w: torch.Tensor, dw: torch.Tensor, evaluator: Evaluator,
                     model: nn.Module, replay: PrefixReplay | None = None) -> float:
    """Mean of the metric deltas for W + ΔW and W − ΔW (the first-order term cancels)."""
    plus = probe_delta(layer, w + dw, evaluator, model, replay)
    minus = probe_delta(layer, w - dw, evaluator, model, replay)
    return 0.5 * (plus + minus)


def measure_sensitivities(layers: list[TargetLayer], geoms: dict[str, LayerGeometry], evaluator: Evaluator,
                          model: nn.Module, prune_method: str | None) -> dict[str, LayerSensitivity]:
    """Quantization noise (antithetic) and real truncations (one-sided), one layer at a time (see the
    module docstring)."""
    from .compress.quantize import quantization_error

    replay = PrefixReplay(model, layers)
    with replay.recording():  # one unperturbed pass: the blocks' outputs, replayed below
        evaluator.delta(model, "probe")
    out: dict[str, LayerSensitivity] = {}
    for layer in track(layers, "sensitivity"):
        g = geoms[layer.name]
        probes = []
        for bits in PROBE_BITS:
            dq = quantization_error(g.w, bits, None).to(torch.float32)
            probes.append({"kind": "quant", "bits": bits, "distortion": g.distortion(dq),
                           "delta": antithetic_delta(layer, g.w, dq, evaluator, model, replay)})
        power, s_q = _response_law(probes)
        sens = LayerSensitivity(layer.name, s_q, None, power, probes)
        if prune_method is not None:
            _probe_truncation(layer, g, evaluator, model, prune_method, sens, replay)
        out[layer.name] = sens
    return out


def _probe_truncation(layer: TargetLayer, g: LayerGeometry, evaluator: Evaluator, model: nn.Module,
                      method: str, sens: LayerSensitivity, replay: PrefixReplay | None = None) -> None:
    """The truncation response δ = s·D^q from two real truncations: a large one (rank half the
    break-even rank), measured one-sided and antithetically, and a light one (rank 3/4 of the
    full rank), one-sided (see :func:`truncation_law`)."""
    k1, k2 = truncation_ranks(g)
    dp = g.low_rank_delta(method, k1)
    plus = probe_delta(layer, g.w + dp, evaluator, model, replay)  # one-sided: the truncation itself
    minus = probe_delta(layer, g.w - dp, evaluator, model, replay)
    light = se = None
    anti = 0.5 * (plus + minus)
    if k2 < min(g.d_in, g.d_out) and g.truncation_distortion(method, k1) > 0 and max(plus, anti) > 0:
        light = probe_delta(layer, g.w + g.low_rank_delta(method, k2), evaluator, model, replay)
        se = evaluator.last_stderr
    truncation_law(sens, g, method, k1, plus, anti, k2, light, se)


def truncation_ranks(g: LayerGeometry) -> tuple[int, int]:
    """The ranks the truncation response is probed at: half the break-even rank, and 3/4 of full."""
    k1 = max(1, break_even_rank(g.d_in, g.d_out) // 2)
    return k1, max(k1 + 1, int(0.75 * min(g.d_in, g.d_out)))


def truncation_law(sens: LayerSensitivity, g: LayerGeometry, method: str, k1: int, plus: float,
                   antithetic: float, k2: int, light: float | None, se: float | None) -> None:
    """Set ``sens.prune`` and ``sens.prune_power`` from the large truncation's one-sided delta ``plus``
    and antithetic mean, and the light truncation's one-sided delta (None when not probed) with its
    standard error. q comes from the pair when the light one stands out of its sampling noise
    (clipped to [0.5, 1.5]), else 1."""
    dist = g.truncation_distortion(method, k1)
    # the one-sided delta carries the truncation's systematic first-order term, but on a few windows
    # also a random one that can make it negative; the antithetic mean (curvature only) is its floor
    delta = max(plus, antithetic)
    sens.probes.append({"kind": "prune", "rank": k1, "distortion": dist, "delta": delta,
                        "one_sided": plus, "antithetic": antithetic})
    if dist <= 0 or delta <= 0:
        sens.prune = MIN_SENSITIVITY
        return
    if light is not None:
        dist2 = g.truncation_distortion(method, k2)
        se = se if se is not None and math.isfinite(se) else None
        sens.probes.append({"kind": "prune", "rank": k2, "distortion": dist2, "delta": light, "stderr": se})
        if 0 < dist2 < dist and light > 2.0 * (se or 0.0) and light > 0:
            sens.prune_power = float(np.clip(math.log(delta / light) / math.log(dist / dist2), 0.5, 1.5))
    sens.prune = delta / dist ** sens.prune_power + MIN_SENSITIVITY


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
