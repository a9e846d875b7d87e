"""recommend(): per-layer ranks and bit-widths that keep the predicted metric delta under a
tolerance at the smallest size.

1. Candidates per layer: keep; RTN int-B for every B in ``bits_choices`` (per channel, and per
   group of ``group_size`` columns); low-rank truncation (``spectral`` or ``whitened``) at ranks
   that actually save parameters, alone and with quantized factors. Ranks below the layer's
   learning frontier k* are not offered: the theory's r* = 1 − k*/k_max is an upper bound on
   safe pruning, and the calibrated prediction decides within it.
2. Each candidate's layer distortion D is exact from Σ (see :mod:`specprune.sensitivity`);
   its predicted delta is s_l·D with measured sensitivities, and its size counts weights at
   their bits plus one 16-bit scale per group or channel (the contract's ``bits_after``). The
   sensitivities come from ``sensitivity="gradient"`` (the metric's Gauss–Newton form scored by a
   few backward passes for all layers at once, :mod:`specprune.curvature`; output-mse and lm-loss
   on linear layers) or ``"probe"`` (each layer perturbed alone, every metric and layer type);
   ``"auto"`` takes the gradient where it is defined.
3. Allocation: minimise total bits subject to Σ_l δ_l ≤ budget — a multiple-choice knapsack
   solved by Lagrangian relaxation (bisection on the multiplier) followed by a greedy pass
   that spends what is left of the budget. The budget is 80% of the tolerance (calibration
   windows are not the evaluation windows), each candidate's quantization and truncation parts
   scaled by the slope of their kind's calibration map at that target.
4. Verification: the chosen plan is applied temporarily and measured on calibration windows held
   out of the analysis when given (``verify_data``; 16 for output-mse, 32 for losses); the budget is
   rescaled by target/(measured + one standard error), kept inside the bracket of budgets known
   to meet and to miss the target, and the allocation repeated (at most five rounds). The
   smallest plan whose measurement plus one standard error met the target is kept — the uniform settings measured for
   the calibration map compete too — and that measurement is its calibrated prediction (the
   model-only prediction is kept in ``details``). When nothing met the target, the plan
   measured closest to it is returned with ``details["warning"]``.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .layers import TargetLayer, select_layers
from .plan import LayerPlan, Plan, settings_digest
from .sensitivity import (
    CalibrationMap,
    LayerGeometry,
    LayerSensitivity,
    break_even_rank,
    map_uncertainty,
    measure_sensitivities,
)

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
RANK_FRACTIONS = (0.9, 0.75, 0.6, 0.45, 0.3, 0.15)
COMBO_BITS = (4, 6, 8)
SCALE_BITS = 16
TARGET_FRACTION = 0.8  # aim below the tolerance: calibration windows are not the evaluation windows
MAX_ROUNDS = 5
SENSITIVITY_MODES = ("auto", "gradient", "probe")
# a whitened truncation verified on the windows its covariance came from: held-apart delta ≈ in-sample ×
# (1 + IN_SAMPLE_EXCESS · d_in/N) (all-MiniLM-L6-v2, uniform truncations, N = 1,024…16,384 tokens for
# d_in ≤ 1536: the measured excess over d_in/N was 1.1–1.7)
IN_SAMPLE_EXCESS = 1.5


class InSampleVerificationWarning(UserWarning):
    """A plan with truncations was verified on the analysis' own windows: its prediction is optimistic."""


def check_sensitivity_mode(mode: str) -> None:
    """``--sensitivity`` takes one of :data:`SENSITIVITY_MODES` (checked by the CLI before any work)."""
    if mode not in SENSITIVITY_MODES:
        raise InputError(f"--sensitivity takes {', '.join(SENSITIVITY_MODES)}, got {mode!r}")


def check_gradient_defined(model: nn.Module, layers, metric: str, batches) -> None:
    """``--sensitivity gradient`` is refused, with the reason, where the Gauss–Newton scores are not defined
    (a metric other than output-mse/lm-loss, a layer that is not a linear map of token features); the CLI
    calls this before the analysis so that the refusal costs nothing."""
    from .curvature import unsupported
    from .evaluation import resolve_metric

    _refuse_gradient(unsupported(layers, resolve_metric(metric, model, batches)))


def _is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _methods(methods) -> tuple:
    """``methods``: an iterable of names, or one string (``"prune"``, ``"prune,quantize"``)."""
    if isinstance(methods, str):
        ms = tuple(m.strip() for m in methods.split(",") if m.strip())
        return ("prune", "quantize") if ms == ("both",) else ms
    try:
        return tuple(methods)
    except TypeError:
        raise InputError(f"--methods takes prune and/or quantize, got {methods!r}") from None


def _bits_choices(bits_choices) -> tuple[int, ...]:
    """``bits_choices``: a non-empty iterable of integers in 2..8, sorted and deduplicated."""
    why = f"--bits-choices must be integers in 2..8, got {bits_choices!r}"
    if isinstance(bits_choices, (str, bytes)) or not isinstance(bits_choices, Iterable):
        raise InputError(why)
    bits = tuple(bits_choices)
    if not bits or not all(_is_int(b) and 2 <= b <= 8 for b in bits):
        raise InputError(why)
    return tuple(sorted({int(b) for b in bits}))


def _group_sizes(group_sizes) -> tuple:
    """``group_sizes``: a non-empty iterable of positive integers and/or None (one scale per channel)."""
    why = f"group_sizes must be positive integers or None (one scale per output channel), got {group_sizes!r}"
    if isinstance(group_sizes, (str, bytes)) or not isinstance(group_sizes, Iterable):
        raise InputError(why)
    sizes = tuple(group_sizes)
    if not sizes or not all(g is None or (_is_int(g) and g > 0) for g in sizes):
        raise InputError(why)
    return tuple(None if g is None else int(g) for g in sizes)


def _refuse_gradient(why: str | None) -> None:
    if why:
        raise InputError(f"--sensitivity gradient is not defined here: {why}; use --sensitivity probe")


@dataclass
class Option:
    """One way to compress one layer."""

    method: str | None
    rank: int | None
    bits: int | None
    group_size: int | None
    size_bits: int
    d_quant: float
    d_prune: float
    params: int
    prune_rate: float

    def delta(self, sens: LayerSensitivity) -> float:
        return sens.delta(self.d_quant, self.d_prune)

    def parts(self, sens: LayerSensitivity) -> tuple[float, float]:
        return sens.parts(self.d_quant, self.d_prune)


def weight_bits(d_in: int, d_out: int, rank: int | None, bits: int | None, group_size: int | None,
                dtype_bits: int) -> tuple[int, int]:
    """(bits, params) of a layer's weight under (rank, bits, group_size): factors when rank is set,
    B bits per weight plus one 16-bit scale per group/channel when quantized."""
    mats = [(d_out, rank), (rank, d_in)] if rank is not None else [(d_out, d_in)]
    total, params = 0, 0
    for rows, cols in mats:
        n = rows * cols
        params += n
        if bits is None:
            total += n * dtype_bits
        else:
            groups = rows * (math.ceil(cols / group_size) if group_size else 1)
            total += n * bits + groups * SCALE_BITS
    return total, params


def _dtype_bits(layer: TargetLayer) -> int:
    return torch.finfo(layer.module.weight.dtype).bits if layer.module.weight.is_floating_point() else 32


def layer_options(layer: TargetLayer, geom: LayerGeometry, mode_energy: np.ndarray | None,
                  k_star: int | None, *, quantize: bool, prune_method: str | None,
                  bits_choices, group_sizes) -> list[Option]:
    from .compress.prune import can_factorize
    from .compress.quantize import quantization_error

    d_in, d_out = geom.d_in, geom.d_out
    db = _dtype_bits(layer)
    full_bits, full_params = weight_bits(d_in, d_out, None, None, None, db)
    opts = [Option(None, None, None, None, full_bits, 0.0, 0.0, full_params, 0.0)]
    if quantize:
        for b in bits_choices:
            for g in group_sizes:
                if g is not None and g >= d_in:
                    continue
                dq = geom.distortion(quantization_error(geom.w, b, g))
                sb, _ = weight_bits(d_in, d_out, None, b, g, db)
                opts.append(Option(None, None, b, g, sb, dq, 0.0, full_params, 0.0))
    if prune_method is not None and can_factorize(layer.module):  # else a rank would save nothing
        kb = break_even_rank(d_in, d_out)
        ranks = sorted({max(1, int(f * kb)) for f in RANK_FRACTIONS})
        if k_star is not None:
            ranks = [k for k in ranks if k >= k_star]
        # directions calibration never saw (rank-deficient Σ) cost nothing on calibration data but do
        # on new data: never truncate into them
        seen = int(np.sum(geom.eigenvalues > 1e-10 * max(float(geom.eigenvalues[0]), 1e-300)))
        ranks = [k for k in ranks if k <= seen] if seen < min(d_in, d_out) else ranks
        for k in ranks:
            dp = geom.truncation_distortion(prune_method, k)
            sb, params = weight_bits(d_in, d_out, k, None, None, db)
            rate = 1.0 - params / full_params
            opts.append(Option(prune_method, k, None, None, sb, 0.0, dp, params, rate))
            combo = [b for b in COMBO_BITS if b in bits_choices] if quantize else []
            factors = geom.factors(prune_method, k) if combo else None  # once per rank, for every bit-width
            for b in combo:
                dq_total = _combo_distortion(geom, factors, b)
                sbq, _ = weight_bits(d_in, d_out, k, b, None, db)
                opts.append(Option(prune_method, k, b, None, sbq, max(dq_total - dp, 0.0), dp, params, rate))
    return opts


def _combo_distortion(geom: LayerGeometry, factors: tuple[torch.Tensor, torch.Tensor], bits: int) -> float:
    """Distortion of rank-k factors (A, B) each quantized to ``bits`` (per channel, RTN: the dequantized
    factor is X + its quantization error)."""
    from .compress.quantize import quantization_error

    a, b = factors
    return geom.factored_distortion(a + quantization_error(a, bits, None), b + quantization_error(b, bits, None))


def allocate(options: dict[str, list[Option]], sens: dict[str, LayerSensitivity], budget: float,
             weights: tuple[float, float] = (1.0, 1.0)) -> dict[str, Option]:
    """Minimise Σ size subject to Σ δ ≤ budget (Lagrangian bisection + greedy fill); each option's δ
    is w_q·(quantization part) + w_r·(truncation part)."""
    names = list(options)
    wq, wr = weights
    deltas = {n: np.array([wq * q + wr * r for q, r in (o.parts(sens[n]) for o in options[n])]) for n in names}
    sizes = {n: np.array([o.size_bits for o in options[n]], dtype=np.float64) for n in names}

    def pick(mu: float) -> dict[str, int]:
        return {n: int(np.argmin(sizes[n] + mu * deltas[n])) for n in names}

    def total(choice) -> float:
        return float(sum(deltas[n][i] for n, i in choice.items()))

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e30:
        hi *= 10.0
    best = pick(hi)
    if total(best) > budget:  # even the most accurate options exceed the budget: keep everything
        best = {n: 0 for n in names}
    else:
        for _ in range(80):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
            ch = pick(mid)
            if total(ch) <= budget:
                hi, best = mid, ch
            else:
                lo = mid
            if hi / max(lo, 1e-300) < 1.0001:
                break
    # greedy: spend the remaining budget on the best size saving per unit delta
    remaining = budget - total(best)
    improved = True
    while improved:
        improved = False
        cand = None
        for n in names:
            i = best[n]
            for j in range(len(options[n])):
                ds = sizes[n][i] - sizes[n][j]
                dd = deltas[n][j] - deltas[n][i]
                if ds > 0 and dd <= remaining:
                    score = ds / max(dd, 1e-30)
                    if cand is None or score > cand[0]:
                        cand = (score, n, j, dd)
        if cand is not None:
            _, n, j, dd = cand
            best[n] = j
            remaining -= dd
            improved = True
    return {n: options[n][i] for n, i in best.items()}


def choice_parts(choice: dict[str, Option], sens: dict[str, LayerSensitivity]) -> tuple[float, float]:
    """(Σ quantization parts, Σ truncation parts) of an allocation's per-layer predicted deltas."""
    q = r = 0.0
    for n, o in choice.items():
        dq, dr = o.parts(sens[n])
        q, r = q + dq, r + dr
    return q, r


def _to_plan_layers(choice: dict[str, Option], sens: dict[str, LayerSensitivity], total: float,
                    weights: tuple[float, float]) -> dict[str, LayerPlan]:
    """Plan layers; the model-level prediction ``total`` is shared in proportion to each layer's
    calibrated delta w_q·q + w_r·r."""
    wq, wr = weights
    raw = {n: wq * q + wr * r for n, (q, r) in ((n, o.parts(sens[n])) for n, o in choice.items())}
    total_raw = sum(raw.values())
    out = {}
    for n, o in choice.items():
        share = total * raw[n] / total_raw if total_raw > 0 else 0.0
        out[n] = LayerPlan(method=o.method, prune_rate=round(float(o.prune_rate), 6), rank=o.rank, bits=o.bits,
                           group_size=o.group_size, predicted_delta=float(share))
    return out


def option_weight(geom: LayerGeometry, o: Option) -> torch.Tensor:
    """The dense weight a layer computes with under option ``o`` (factors multiplied out,
    quantization applied as in :func:`specprune.compress.apply.apply_`)."""
    from .compress.quantize import quantize_weight

    if o.rank is not None:
        a, b = geom.factors(o.method, o.rank)
        if o.bits is not None:
            a = quantize_weight(a, o.bits, None).dequantize().to(torch.float32)
            b = quantize_weight(b, o.bits, None).dequantize().to(torch.float32)
        return a @ b
    if o.bits is not None:
        return quantize_weight(geom.w, o.bits, o.group_size).dequantize().to(torch.float32)
    return geom.w


def measure_choice(model: nn.Module, choice: dict[str, Option], geoms: dict[str, LayerGeometry],
                   evaluator) -> float:
    """Measure a candidate allocation: every changed layer computes with its option's dense weight
    for the duration of one evaluation, then the original weights are restored. (Same function as
    applying the plan, without building factorized modules.)"""
    import contextlib

    from .sensitivity import patched_weight

    with contextlib.ExitStack() as stack:
        for n, o in choice.items():
            if o.method is None and o.bits is None:
                continue
            stack.enter_context(patched_weight(geoms[n].layer, option_weight(geoms[n], o)))
        return evaluator.delta(model, "verification")


class Recommender:
    """Everything a plan is made from, measured once: per-layer geometry and candidate options,
    response laws (sensitivities) and the calibration map. :meth:`plan` then allocates for any
    tolerance (the sensitivities do not depend on it), and :meth:`predict` / :meth:`measure` score
    any setting — which is what sweeps and tests need.

    ``verify_data``: windows the analysis was not made on, for the calibration map and the plans'
    verification (the first ``verify_samples`` of them). Without it both use ``data``: when that is the
    analysis' own sample, whitened truncations are measured on the covariance they were fitted to, which
    flatters them (all-MiniLM-L6-v2, uniform truncations: held-apart / in-sample delta 1.3 at 8,192
    calibration tokens, 2.8 at 1,024; quantization 1.0)."""

    def __init__(self, analysis, model: nn.Module, data=None, *, metric: str = "auto",
                 methods=("prune", "quantize"), bits_choices=DEFAULT_BITS, group_sizes=(None, 128),
                 prune_method: str = "whitened", sensitivity_samples: int | None = None,
                 verify_samples: int | None = None,
                 source: str | None = None, sensitivity: str = "auto", seed: int = 0, verify_data=None):
        from .data import Batches, check_seed, from_iterable
        from .evaluation import Evaluator, resolve_metric

        t0 = time.perf_counter()
        methods = _methods(methods)
        unknown = set(methods) - {"prune", "quantize"}
        if unknown or not methods:
            raise InputError(f"--methods takes prune and/or quantize, got {','.join(methods) or 'nothing'}")
        bits_choices = _bits_choices(bits_choices)
        group_sizes = _group_sizes(group_sizes)
        for what, n in (("sensitivity_samples", sensitivity_samples), ("verify_samples", verify_samples)):
            if n is not None and (not _is_int(n) or n < 1):
                raise InputError(f"{what} must be a positive integer or None, got {n!r}")
        check_seed(seed)
        if prune_method not in ("whitened", "spectral"):
            raise InputError(f"prune method must be whitened or spectral, got {prune_method!r}")
        check_sensitivity_mode(sensitivity)
        if not hasattr(analysis, "has_spectra") or not hasattr(analysis, "layers"):
            raise InputError(f"recommend takes an Analysis (from specprune.analyze or Analysis.load), got "
                             f"{type(analysis).__name__}")
        if not analysis.has_spectra:
            raise InputError("the analysis has no saved spectra (spectra.safetensors); re-run specprune analyze")
        analysis.require_full_spectra("recommend")
        if model is None:
            raise InputError("Recommender needs the model (specprune.recommend reads it from the analysis' source)")
        if not isinstance(model, nn.Module):
            raise InputError(f"recommend takes the model as a torch.nn.Module, got {type(model).__name__}")
        from .models import unwrap

        model = unwrap(model)
        self.analysis, self.model, self.source = analysis, model, source
        self.prune_method = prune_method if "prune" in methods else None
        names = {n for n, _ in model.named_modules()}
        missing = [lay.name for lay in analysis.layers if lay.name not in names]
        if missing:
            raise InputError(f"the model has no layer {missing[0]!r} of the analysis ({len(missing)} missing): pass "
                             "the model the analysis was made on")
        self.layers = select_layers(model, include=[lay.name for lay in analysis.layers])
        for lay in self.layers:  # same names, other shapes: not the model the analysis was made on
            la = analysis.layer(lay.name)
            if (lay.d_in, lay.d_out) != (la.d_in, la.d_out):
                raise InputError(f"layer {lay.name} of the model is {lay.d_in} → {lay.d_out} but the analysis saw "
                                 f"{la.d_in} → {la.d_out}: pass the model the analysis was made on")
        from .compress.apply import _weight_users

        holders = _weight_users(model)
        # a weight shared with another module (a tied output head) is kept: compressing it would change the
        # other module too (apply_ refuses such plans)
        self.shared = {lay.name for lay in self.layers if len(holders.get(lay.module.weight.data_ptr(), [])) > 1}
        self.geoms: dict[str, LayerGeometry] = {}
        self.options: dict[str, list[Option]] = {}
        for lay in self.layers:
            la = analysis.layer(lay.name)
            grp = analysis.group_of(lay.name)
            self.geoms[lay.name] = LayerGeometry(lay, grp.eigenvalues, grp.eigenvectors)
            self.options[lay.name] = layer_options(
                lay, self.geoms[lay.name], la.mode_energy, la.k_star, quantize="quantize" in methods,
                prune_method=self.prune_method, bits_choices=bits_choices, group_sizes=group_sizes)
            if lay.name in self.shared:
                self.options[lay.name] = self.options[lay.name][:1]
        self.details: dict = {"noise_model": "RTN weight error and low-rank truncation, exact layer distortion "
                                             "tr(ΔW Σ ΔWᵀ), measured per-layer response laws",
                              "prune_method": self.prune_method, "bits_choices": list(bits_choices),
                              "group_sizes": list(group_sizes)}
        if self.shared:
            self.details["kept_shared"] = sorted(self.shared)
        sampled = sorted(n for n in self.geoms if analysis.group_of(n).sampling)
        if sampled:  # Σ of these layers came from a share of the tokens (analyze(token_sample=…))
            self.details["token_sampled"] = {"fraction": analysis.calibration.get("token_sample"),
                                             "layers": sampled}
        self.calibrated = data is not None
        self.in_sample = False
        if not self.calibrated and sensitivity != "auto":
            raise InputError(f"--sensitivity {sensitivity} needs calibration data (--data): without it the plan "
                             "is the uncalibrated layer-local estimate")
        self.verifier = None
        if self.calibrated:
            batches = data if isinstance(data, Batches) else from_iterable(data)
            resolved = resolve_metric(metric, model, batches)
            if sensitivity_samples is None:
                sensitivity_samples = default_sensitivity_samples(resolved)
            if verify_samples is None:
                verify_samples = default_verify_samples(resolved)
            windows = _subset(batches, sensitivity_samples)
            self.details["sensitivity_windows"] = windows.samples
            self.sens = self._sensitivities(sensitivity, windows, metric, seed)
            # windows the analysis did not see give predictions out of its sample; else the calibration data
            self.in_sample = verify_data is None
            vb = batches if self.in_sample else \
                verify_data if isinstance(verify_data, Batches) else from_iterable(verify_data)
            where = "of the calibration data (in-sample where the analysis was made on them)" if self.in_sample \
                else "held out of the analysis"
            self.details["verification_windows"] = f"{min(vb.samples, verify_samples)} {where}"
            self.verifier = Evaluator(model, _subset(vb, verify_samples), metric, description="reference")
            self.cmap, self.rmap, self.measured_uniform = _calibrate_map(
                model, self.layers, self.options, self.sens, self.geoms, self.verifier, bits_choices,
                self.prune_method, self.option)
            self.metric = self.verifier.metric
        else:
            self.sens = {lay.name: LayerSensitivity(lay.name, 1.0 / max(self.geoms[lay.name].energy, 1e-30),
                                                    1.0 / max(self.geoms[lay.name].energy, 1e-30))
                         for lay in self.layers}
            self.cmap = self.rmap = CalibrationMap(1.0, 1.0, math.log(3.0))
            self.measured_uniform = []
            self.metric = metric
        self.seconds = time.perf_counter() - t0

    def _sensitivities(self, mode: str, windows, metric: str, seed: int) -> dict[str, LayerSensitivity]:
        """Per-layer response laws on ``windows``: ``gradient`` (Gauss–Newton scores from backward passes,
        :mod:`specprune.curvature`) or ``probe`` (one layer perturbed at a time); ``auto`` takes the
        gradient where it is defined (linear layers, output-mse or lm-loss) and the probes elsewhere.
        Layers the gradient cannot score (not reached by the backward passes, non-finite scores) are
        probed; under ``auto`` a gradient pass that fails (e.g. an operation without a backward) falls
        back to probing every layer."""
        from . import curvature
        from .evaluation import Evaluator, resolve_metric

        name = resolve_metric(metric, self.model, windows)
        why = curvature.unsupported(self.layers, name)
        if mode == "gradient":
            _refuse_gradient(why)
        probed = self.layers
        sens: dict[str, LayerSensitivity] = {}
        skipped: dict[str, str] = {}
        if mode != "probe" and not why:
            try:
                sens, skipped = curvature.gradient_sensitivities(self.layers, self.geoms, windows.batches, name,
                                                                 self.model, self.prune_method, seed=seed)
            except RuntimeError as err:
                if mode == "gradient":
                    raise InputError(f"the gradient sensitivities failed ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200]}); use --sensitivity probe") from err
                self.details["sensitivity_fallback"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            probed = [lay for lay in self.layers if lay.name not in sens]
        label = f"gradient ({curvature.DRAWS} Gauss–Newton draws per window)"
        if probed and sens:  # some layers probed: say which and why (a pooler the output never reads, ...)
            reasons = {}
            for lay in probed:
                reasons.setdefault(skipped.get(lay.name, "not scored"), []).append(lay.name)
            label += "; probed: " + "; ".join(
                f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} ({reason})"
                for reason, names in reasons.items())
        self.details["sensitivity"] = "probe" if len(probed) == len(self.layers) else label
        if probed:
            if sens:
                self.details["probed_layers"] = [lay.name for lay in probed]
            probe = Evaluator(self.model, windows, metric, description="reference")
            sens.update(measure_sensitivities(probed, self.geoms, probe, self.model, self.prune_method))
        return {lay.name: sens[lay.name] for lay in self.layers}

    # -- scoring any setting --------------------------------------------------------------------
    def option(self, name: str, *, method: str | None = None, rank: int | None = None, bits: int | None = None,
               group_size: int | None = None) -> Option:
        """An :class:`Option` for any (method, rank, bits, group_size) of layer ``name``, scored exactly (a
        layer whose weight is shared with another module is kept as it is)."""
        if name in self.shared:
            return self.options[name][0]
        geom = self.geoms[name]
        lay = geom.layer
        db = _dtype_bits(lay)
        full_bits, full_params = weight_bits(geom.d_in, geom.d_out, None, None, None, db)
        if rank is not None and rank >= min(geom.d_in, geom.d_out):
            method, rank = None, None
        d_prune = geom.truncation_distortion(method, rank) if rank is not None else 0.0
        probe = Option(method, rank, bits, group_size, 0, 0.0, d_prune, 0, 0.0)
        d_total = geom.distortion(option_weight(geom, probe) - geom.w)
        sb, params = weight_bits(geom.d_in, geom.d_out, rank, bits, group_size, db)
        return Option(method if rank is not None else None, rank, bits, group_size, sb,
                      max(d_total - d_prune, 0.0), d_prune, params, max(0.0, 1.0 - params / full_params))

    def uniform(self, *, bits: int | None = None, group_size: int | None = None,
                rank_fraction: float | None = None, method: str | None = None) -> dict[str, Option]:
        """The same setting on every layer: int-``bits`` and/or rank round(f·min(d_in, d_out))."""
        out = {}
        for name, geom in self.geoms.items():
            rank = None
            if rank_fraction is not None:
                rank = max(1, int(round(rank_fraction * min(geom.d_in, geom.d_out))))
            out[name] = self.option(name, method=method or self.prune_method or "whitened", rank=rank, bits=bits,
                                    group_size=group_size)
        return out

    def predict(self, choice: dict[str, Option]) -> float:
        """Calibrated model-level prediction for an allocation (no measurement)."""
        q, r = choice_parts(choice, self.sens)
        return self.cmap(q) + self.rmap(r)

    def uncertainty(self, delta: float) -> float:
        """The maps' stated uncertainty on a predicted delta: two σ of the larger of their log misfits."""
        return map_uncertainty(delta, max(self.cmap.sigma, self.rmap.sigma))

    def weights(self, target: float) -> tuple[float, float]:
        """Each map's slope δ/P at the target: the maps linearised where the plan will sit."""
        return tuple(float(target / m.inverse(target)) if m.inverse(target) > 0 else 1.0
                     for m in (self.cmap, self.rmap))

    def measure(self, choice: dict[str, Option], evaluator=None) -> float:
        """Measured delta of an allocation (on the verification windows unless ``evaluator`` is given)."""
        return measure_choice(self.model, choice, self.geoms, evaluator or self.verifier)

    @staticmethod
    def size_bits(choice: dict[str, Option]) -> int:
        """Bits of the targeted weights (scales included) under an allocation."""
        return int(sum(o.size_bits for o in choice.values()))

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self, tolerance: float, verify: bool = True) -> Plan:
        """Smallest allocation predicted (and, when calibrated, measured) within ``tolerance``."""
        from .compress.apply import plan_size
        from .models import fingerprint

        t0 = time.perf_counter()
        if not tolerance > 0 or not math.isfinite(tolerance):
            raise InputError(f"--tolerance must be > 0, got {tolerance}")
        sens, options = self.sens, self.options
        verify = verify and self.calibrated
        target = tolerance * TARGET_FRACTION
        weights = self.weights(target)
        budget = target  # in calibrated units: Σ w_q·q + w_r·r
        history: list[dict] = []
        accepted: tuple | None = None
        last = closest = None
        lo, hi = 0.0, math.inf  # budgets known to meet / to miss the target
        chosen = "allocation" if not verify else "closest allocation (none met the target)"
        for _ in range(MAX_ROUNDS if verify else 1):
            choice = allocate(options, sens, budget, weights)
            raw = sum(choice_parts(choice, sens))
            size = self.size_bits(choice)
            last = (size, choice, None, None)
            if not verify or all(o.method is None and o.bits is None for o in choice.values()):
                break
            measured = self.measure(choice)
            stderr = self.verifier.last_stderr
            history.append({"budget": budget, "predicted_raw": raw, "predicted": self.predict(choice),
                            "measured_on_calibration": measured,
                            "stderr": stderr if math.isfinite(stderr) else None, "size_bits": size})
            last = (size, choice, measured, stderr)
            if closest is None or measured < closest[2]:
                closest = last
            # a plan meets the target when its measurement does by one standard error: on few or noisy
            # windows (a loss on a small model) a measurement just under the target is no evidence; and
            # when the measurement will not be its prediction (it does not stand out of zero: a loss that
            # fell), the maps' prediction it keeps must be within the tolerance too
            bound = measured + _se(stderr)
            if not _claim_within(history[-1]["predicted"], measured, stderr, tolerance):
                bound = max(bound, target * history[-1]["predicted"] / tolerance)
            if bound <= target:
                if accepted is None or size < accepted[0]:
                    accepted = (size, choice, measured, stderr)
                    chosen = f"allocation, verification round {len(history)}"
                if bound >= 0.75 * target:
                    break
                lo = max(lo, budget)
                proposal = budget * min(2.0, target / max(bound, 1e-12))
            else:
                hi = min(hi, budget)
                proposal = budget * 0.9 * target / bound
            # never step back outside what is known: below a budget that met the target or above one
            # that did not (the measured delta is not monotone in the budget, the bracket is)
            if not lo < proposal < hi:
                proposal = math.sqrt(lo * hi) if lo > 0 and math.isfinite(hi) else \
                    (lo * 1.5 if lo > 0 else hi * 0.5)
            budget = proposal
        # uniform settings measured for the calibration map compete too: never return a plan larger
        # than one of them that already met the target on the same windows — when the maps do not rule
        # it out (a measurement below the windows' noise, e.g. a loss that fell, is no evidence that a
        # setting predicted far above the target meets it)
        for label, u_size, u_choice, u_measured, u_stderr in (self.measured_uniform if verify else ()):
            if u_measured + _se(u_stderr) <= target and _claim_within(self.predict(u_choice), u_measured, u_stderr,
                                                                        tolerance) \
                    and (accepted is None or u_size < accepted[0]):
                accepted = (u_size, u_choice, u_measured, u_stderr)
                chosen = label
        # no round met the target: keep the plan measured closest to it and say so (plan.warning)
        size, choice, measured, stderr = accepted or closest or last
        warning = None
        if verify and accepted is None and measured is not None:
            warning = (f"no allocation measured within {target:.3%} (80% of the tolerance) on the calibration "
                       f"windows in {len(history)} rounds; the closest measured {measured:.3%}. "
                       "Use a larger --tolerance, fewer --methods, or more calibration --samples")
        pred = self.predict(choice)
        plan_layers = _to_plan_layers(choice, sens, pred, weights)
        model_prediction = pred
        uncertainty = self.uncertainty(pred)
        se = stderr if stderr is not None and math.isfinite(stderr) else 0.0
        if measured is not None and _stands_out(measured, stderr) and pred > 0:
            # the verified plan: its measurement on calibration windows is the calibrated prediction,
            # uncertain by its sampling error (2 standard errors) and at least 15%
            for lp in plan_layers.values():
                lp.predicted_delta = float(lp.predicted_delta * measured / pred)
            pred = float(measured)
            uncertainty = float(max(2.0 * se, 0.15 * pred))
        elif measured is not None:
            # a measurement that does not stand out of zero (few or noisy windows; a loss that fell) says
            # nothing about the size of the delta: the maps' prediction stands, no more certain than the
            # gap to that measurement or its sampling error
            uncertainty = float(max(uncertainty, 2.0 * se, abs(pred - measured)))
        in_sample = self._in_sample_excess(choice) if verify and self.in_sample else None
        if in_sample is not None:  # the truncations' measurement flatters them: the uncertainty covers that
            uncertainty = float(max(uncertainty, pred * in_sample["truncation_share"] * in_sample["excess"]))
            note = (f"the plan's truncations were verified on the calibration data the analysis was made on (in-"
                    f"sample): expect the held-apart delta to be up to ×{1 + in_sample['excess']:.2g} larger for "
                    f"their part; pass verify_data= (windows the analysis did not use) for an out-of-sample check")
            warning = f"{warning}; {note}" if warning else note
        analysis = self.analysis
        plan = Plan(model={"source": self.source or analysis.model.get("source", ""),
                           "fingerprint": fingerprint(self.model)},
                    tolerance=float(tolerance), metric=self.metric, layers=plan_layers,
                    calibrated=self.calibrated, predicted_delta=float(pred),
                    predicted_delta_uncertainty=uncertainty)
        plan.size = plan_size(self.model, plan)
        plan.details = {**self.details, "target": target, "model_prediction": model_prediction,
                        "calibration_map": self.cmap.to_dict(), "truncation_map": self.rmap.to_dict(),
                        "verification": history, "chosen": chosen,
                        "sensitivities": {n: s.to_dict() for n, s in sens.items()},
                        "frontier": {lay.name: {"k_star": analysis.layer(lay.name).k_star,
                                                "r_star": analysis.layer(lay.name).r_star}
                                     for lay in self.layers},
                        "seconds": round(self.seconds + time.perf_counter() - t0, 3)}
        plan.details["predicted_settings"] = settings_digest(plan.layers)  # Plan.edited: changed since
        if in_sample is not None:
            plan.details["in_sample_truncations"] = in_sample
        if warning:
            plan.details["warning"] = warning
        return plan

    def _in_sample_excess(self, choice: dict[str, Option]) -> dict | None:
        """For a plan verified in-sample: the expected relative optimism of its truncations,
        IN_SAMPLE_EXCESS · max d_in/N over its truncated layers, and their share of the prediction (None when
        it truncates nothing)."""
        cut = [n for n, o in choice.items() if o.rank is not None]
        if not cut:
            return None
        ratio = max(self.geoms[n].d_in / max(self.analysis.group_of(n).effective_tokens, 1) for n in cut)
        q, r = choice_parts(choice, self.sens)
        total = self.cmap(q) + self.rmap(r)
        return {"excess": IN_SAMPLE_EXCESS * ratio, "max_d_in_over_tokens": ratio,
                "truncation_share": float(self.rmap(r) / total) if total > 0 else 1.0}


def _stands_out(measured: float, stderr: float | None) -> bool:
    """Whether a verification measurement is a positive delta clear of its sampling error (2 standard
    errors): it then becomes the plan's prediction (:meth:`Recommender.plan`)."""
    se = stderr if stderr is not None and math.isfinite(stderr) else 0.0
    return measured > 2.0 * se and measured > 0


def _claim_within(predicted: float, measured: float, stderr: float | None, tolerance: float) -> bool:
    """Whether the delta a plan will state is within ``tolerance``: its measurement when that stands out of
    zero, else the maps' prediction (a measurement below its noise, or a loss that fell, is no evidence that a
    setting predicted above the tolerance meets it)."""
    return _stands_out(measured, stderr) or predicted <= tolerance


def recommend(analysis, tolerance: float, model: nn.Module | None = None, data=None, *,
              metric: str = "auto", methods=("prune", "quantize"), bits_choices=DEFAULT_BITS,
              group_sizes=(None, 128), prune_method: str = "whitened", sensitivity_samples: int | None = None,
              verify_samples: int | None = None, source: str | None = None, seed: int = 0, verify: bool = True,
              sensitivity: str = "auto", verify_data=None) -> Plan:
    """A per-layer plan for ``tolerance`` (relative metric increase). With ``model`` and ``data``
    the prediction is calibrated by measurement (see module docstring); without data it is the
    uncalibrated layer-local estimate (each layer's relative output distortion, summed).
    ``verify_data``: windows held out of the analysis for the verification (:class:`Recommender`)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance > 0 \
            or not math.isfinite(tolerance):
        raise InputError(f"--tolerance must be a number > 0, got {tolerance!r}")
    if model is None:  # the contract's default: the model the analysis was made on, from its recorded source
        from .pipeline import source_model

        src = source_model(analysis, "the analysis")
        model, source = src.model, source or src.source
    rec = Recommender(analysis, model, data, metric=metric, methods=methods, bits_choices=bits_choices,
                      group_sizes=group_sizes, prune_method=prune_method,
                      sensitivity_samples=sensitivity_samples, verify_samples=verify_samples, source=source,
                      sensitivity=sensitivity, seed=seed, verify_data=verify_data)
    plan = rec.plan(tolerance, verify=verify)
    if "in_sample_truncations" in plan.details:
        import warnings

        warnings.warn(InSampleVerificationWarning(plan.details["warning"]), stacklevel=2)
    return plan


def default_sensitivity_samples(metric: str) -> int:
    """Windows for the per-layer probes: 4 for the output-MSE metric (a smooth function of the
    weights, nearly noiseless per window), 8 for losses (per-token cross-entropy carries a random
    first-order part; on the small trained Llama 4 windows let the allocator pick layers whose
    sensitivity was under-measured, and plans missed their target on verification)."""
    return 4 if metric == "output-mse" else 8


def _se(stderr) -> float:
    """A measurement's standard error, 0 when unknown (one batch)."""
    return float(stderr) if stderr is not None and math.isfinite(stderr) else 0.0


def default_verify_samples(metric: str) -> int:
    """Windows for the calibration map and the verification: 16 for output-mse (its window-to-window spread
    is small: all-MiniLM-L6-v2's int6 delta has a 1.4% relative standard error on 64 windows; bench_sweep with
    16 windows gave plans as small, all within their tolerances, and a worst predicted/measured of 1.18
    against 1.20 with 32), 32 for losses (per-token cross-entropy is noisier)."""
    return 16 if metric == "output-mse" else 32


def _subset(batches, n: int):
    from .data import Batches

    sub = Batches(_take_windows(batches, n), 0, batches.seq_len, batches.seed, batches.sources)
    sub.samples = sum(int(next(iter(b.values())).shape[0]) for b in sub.batches)
    return sub


def _take_windows(batches, n: int):
    out, count = [], 0
    for b in batches.batches:
        if count >= n:
            break
        first = next(iter(b.values()))
        take = min(int(first.shape[0]), n - count)
        out.append({k: v[:take] for k, v in b.items()})
        count += take
    return out


def _calibrate_map(model, layers, options, sens, geoms, evaluator, bits_choices, pm, make_option):
    """Measure uniform settings on the verification windows and fit one map δ ≈ c·P^p per kind:
    quantization on uniform int-8/6/4/3/2 (those among the bit choices), truncation on a light
    uniform truncation (rank 3/4 of full, built with ``make_option``) and two heavy ones (3/4 and
    0.45 of the break-even rank). Returns (quantization map, truncation map, measured settings as
    (label, size_bits, choice, measured, stderr)); the quantization map's ``points`` hold them all."""
    settings = [("bits", b) for b in (8, 6, 4, 3, 2) if b in bits_choices]
    if pm is not None:
        settings += [("light rank", 0.75), ("rank", 0.75), ("rank", 0.45)]
    points, measured_settings = [], []
    for kind, val in settings:
        choice = {}
        for lay in layers:
            opts = options[lay.name]
            if kind == "bits":
                match = [o for o in opts if o.bits == val and o.rank is None and o.group_size is None]
            elif kind == "light rank":
                match = [make_option(lay.name, method=pm, rank=max(1, int(round(val * min(lay.d_in, lay.d_out)))))]
            else:
                target = val * break_even_rank(lay.d_in, lay.d_out)
                ranked = [o for o in opts if o.rank is not None and o.bits is None]
                match = sorted(ranked, key=lambda o: abs(o.rank - target))[:1]
            choice[lay.name] = match[0] if match else opts[0]
        if all(o.method is None and o.bits is None for o in choice.values()):
            continue
        q, r = choice_parts(choice, sens)
        measured = measure_choice(model, choice, geoms, evaluator)
        se = evaluator.last_stderr if math.isfinite(evaluator.last_stderr) else None
        label = f"uniform {kind} {val}"
        points.append({"setting": label, "kind": "bits" if kind == "bits" else "rank",
                       "predicted_raw": q if kind == "bits" else r, "measured": measured, "stderr": se})
        measured_settings.append((label, Recommender.size_bits(choice), choice, measured, se))
    quant = [pt for pt in points if pt["kind"] == "bits"]
    trunc = [pt for pt in points if pt["kind"] == "rank"]
    qmap = CalibrationMap.fit(quant or trunc)
    # no measurable truncation point (or none measured): truncations borrow the quantization map
    rmap = CalibrationMap.fit(trunc) if any(pt["measured"] > 0 for pt in trunc) \
        else CalibrationMap(qmap.c, qmap.p, qmap.sigma, trunc)
    qmap.points = points
    return qmap, rmap, measured_settings
