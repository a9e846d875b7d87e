"""apply_(): carry out a plan on a model, in place, and compute a plan's size from shapes.

Per planned layer, in plan order: first the pruning ``method`` (low-rank ``spectral`` /
``whitened``, unstructured ``magnitude``, or a plugin), then quantization to ``bits`` with
``group_size`` (RTN fake quantization: the weights become their dequantized values in the
module's dtype; a factorized layer has both factors quantized).

Ranks. For a low-rank method with ``rank`` null and ``prune_rate`` > 0 the rank is derived with
:func:`specprune.compress.prune.rank_for_rate` and written back into the plan's layer; when a
rank is given, the layer's ``prune_rate`` is rewritten to what that rank removes
(:func:`~specprune.compress.prune.prune_rate_for_rank`), so the plan describes what was done.

Covariance Σ of each low-rank layer's input, in order of preference: the ``analysis``
(``Analysis.group_of(name)``: stored eigenpairs), else ``data`` (batches streamed once through the
unmodified model with :func:`specprune.probe.run_probe`, Σ = G/N per input group), else Σ = I
(plain SVD of W). Which one was used is recorded in ``plan.details["applied"]`` as
``{"covariance": "analysis"|"data"|"identity"|"none", "identity_layers": [...]}`` for the
caller to report.

Safety. Before a layer is touched, its module object and a CPU copy of its state are kept; on any
exception or KeyboardInterrupt every touched layer is put back (original module object at its
qualified name, original tensor values copied into the same Parameter objects, pruning
reparametrisations removed, quantization records restored) and the plan's layers are restored,
then the error propagates. Only affected layers are copied, never the whole model.

Compressor protocol (``specprune.compressors`` entry points; ``--method NAME`` looks the name up
through :func:`specprune.registry.get`). A compressor is a class (instantiated without arguments)
or an instance with

* ``name: str``; ``kind: "prune" | "quantize"``;
* ``needs_covariance: bool`` — True to receive the layer's input covariance (an object with
  ``eigenvalues`` (descending, float64) and ``eigenvectors`` (columns, float32) of Σ, as
  :class:`specprune.analysis.InputGroup`), or None when only Σ = I is available;
* ``low_rank: bool`` (optional, default False) — True if it consumes ``layer_plan.rank``: apply_
  then fills the rank from ``prune_rate`` before calling it;
* ``apply(layer: TargetLayer, layer_plan: LayerPlan, covariance) -> nn.Module | None`` — modify
  ``layer.module`` in place and return None, or return a replacement module, which apply_ sets at
  the layer's qualified name. It must not keep hooks or reparametrisations on the module.

A ``quantize`` compressor used as a layer's ``method`` quantizes that layer (with ``bits``)
instead of the default ``rtn``. ``--method`` plugins for pruning, e.g. Wanda, are ``prune``
compressors with ``low_rank = False`` that zero weights in place.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import InputError, SpecpruneError
from ..layers import TargetLayer, adapter_for
from ..plan import LayerPlan, Plan
from .prune import Factorized, can_factorize, factorization_saves, prune_rate_for_rank, rank_for_rate
from .quantize import QUANT_ATTR

SCALE_BITS = 16


# --------------------------------------------------------------------------------------------
# compressors


def get_compressor(name: str) -> Any:
    """The registered compressor ``name`` as an instance (see the protocol in the module docstring)."""
    from .. import registry

    obj = registry.get("compressors", name)
    with registry.blame("compressors", name):  # a plugin's __init__ raising: one line naming it
        comp = obj() if isinstance(obj, type) else obj
    if getattr(comp, "kind", None) not in ("prune", "quantize") or not callable(getattr(comp, "apply", None)):
        raise SpecpruneError(f"{registry.describe('compressors', name)} does not follow the compressor protocol "
                             "(needs kind 'prune'|'quantize' and an apply() method)")
    return comp


def is_low_rank(method: str | None) -> bool:
    """Whether ``method`` consumes a rank (spectral, whitened, or a plugin with ``low_rank``)."""
    if method is None:
        return False
    return bool(getattr(get_compressor(method), "low_rank", False))


# --------------------------------------------------------------------------------------------
# sizes


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def layer_size(d_in: int, d_out: int, *, rank: int | None = None, bits: int | None = None,
               group_size: int | None = None, dtype_bits: int = 32, factorizable: bool = True,
               zeroed: int = 0) -> tuple[int, int]:
    """(parameters, bits) of one layer's weight after compression, from shapes alone.

    * rank k with factorizable and k(d_in + d_out) < d_in·d_out: two factors B (k × d_in) and
      A (d_out × k); otherwise one dense d_out × d_in matrix (a dense truncation keeps its size);
    * bits B: each weight of each matrix (r × c) takes B bits plus one 16-bit scale per group,
      r·ceil(c/G) scales (G = c when ``group_size`` is None: one per output channel);
      unquantized weights take ``dtype_bits``;
    * ``zeroed`` (unstructured pruning) is subtracted from the parameters but not from the bits:
      the zeros are still stored densely.
    """
    if rank is not None and factorizable and factorization_saves(d_in, d_out, rank):
        mats = [(rank, d_in), (d_out, rank)]
    else:
        mats = [(d_out, d_in)]
    params = sum(r * c for r, c in mats)
    if bits is None:
        total_bits = params * dtype_bits
    else:
        total_bits = 0
        for r, c in mats:
            g = c if group_size is None else min(group_size, c)
            total_bits += r * c * bits + SCALE_BITS * r * math.ceil(c / g)
    return params - int(zeroed), total_bits


def _resolved_rank(lp: LayerPlan, d_in: int, d_out: int, low_rank: bool) -> int | None:
    if not low_rank:
        return None
    if lp.rank is not None:
        return int(lp.rank)
    if lp.prune_rate and lp.prune_rate > 0:
        return rank_for_rate(d_in, d_out, float(lp.prune_rate))
    return None


class DequantizedWarning(UserWarning):
    """A plan changed layers that were stored quantized without giving them bits: they are floating point now."""


def carries_quant_record(module: nn.Module) -> bool:
    """Whether ``module`` (or a factor inside it) holds quantized weights: a QuantRecord left by a quantizer,
    or by :func:`~specprune.compress.saved.load` for a layer stored quantized."""
    return any(QUANT_ATTR in m.__dict__ for m in module.modules())


def dequantized_note(plan: Plan) -> str | None:
    """The one line :func:`apply_` warned (:class:`DequantizedWarning`), from ``details.applied``, for callers
    that say it themselves; None when no layer lost its stored quantization."""
    names = (plan.details.get("applied") or {}).get("dequantized_layers")
    return dequantized_summary(names) if names else None


def dequantized_summary(names: list[str]) -> str:
    """One line on the layers a plan took out of their stored quantization (``details.applied.dequantized_layers``)."""
    return (f"{len(names)} layer(s) stored quantized (e.g. {names[0]}) were changed without bits, so their new "
            "weights are kept in floating point and no longer quantized: give those layers bits (e.g. quantize the "
            "result again) to keep them small")


class IdentityCovarianceWarning(UserWarning):
    """A covariance-weighted method was applied without a covariance (Σ = I)."""


def identity_summary(plan: Plan, names: list[str]) -> str:
    """What Σ = I made of the covariance-weighted layers ``names``: low-rank ones are a plain SVD of W, the
    others (e.g. wanda) scored without input statistics (weight magnitudes alone)."""
    low = [n for n in names if getattr(get_compressor(plan.layers[n].method), "low_rank", False)]
    other = sorted({plan.layers[n].method for n in names if n not in low})
    parts = [f"{len(low)} low-rank layer(s) truncated by a plain SVD of W"] if low else []
    if other:
        parts.append(f"{len(names) - len(low)} {'/'.join(other)} layer(s) scored without input statistics "
                     "(weight magnitudes alone)")
    return "; ".join(parts)


def plan_size(model: nn.Module, plan: Plan) -> dict:
    """The contract's ``size`` of ``plan`` applied to ``model``, computed from shapes (the model is
    not modified; call it on the uncompressed model).

    Whole model, every parameter counted once (tied/shared tensors once): ``params_before`` = Σ
    numel, ``bits_before`` = Σ numel × dtype bits. After: each planned layer's weight is replaced by
    :func:`layer_size` (factors when factorized; B bits per quantized weight plus a 16-bit scale per
    group or channel; unstructured pruning removes ⌊rate·numel⌉ parameters but no stored bits);
    biases and everything else keep their size. A factorized layer whose weight is shared with
    another module keeps that weight (it is still used there) and adds its factors. (:func:`apply_`
    counts a low-rank layer a plugin truncated in place, unfactorized, at its dense size.)"""
    return _size_total(*_size_terms(model, plan), ())


def _size_terms(model: nn.Module, plan: Plan) -> tuple[dict, dict[str, dict[bool, tuple[int, int]]]]:
    """The uncompressed totals, and per planned layer its change in (params, bits) if factorized
    (``True``, where a rank is planned) and if kept dense (``False``)."""
    modules = dict(model.named_modules())
    seen: set[int] = set()
    params_before = bits_before = 0
    users = {ptr: len(names) for ptr, names in _weight_users(model).items()}
    stored = _stored_bits(model)
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        params_before += p.numel()
        bits_before += stored.get(p.data_ptr(), p.numel() * _dtype_bits(p.dtype))
    terms: dict[str, dict[bool, tuple[int, int]]] = {}
    method_cache: dict[str, tuple[bool, str]] = {}
    for name, lp in plan.layers.items():
        if lp.is_noop:
            continue
        module = modules.get(name)
        adapter = adapter_for(module) if module is not None else None
        if module is None or adapter is None:
            raise InputError(f"plan layer {name!r} is not a supported layer of the model")
        d_in, d_out = adapter.d_in(module), adapter.d_out(module)
        weight = module.weight
        low_rank, kind = False, "prune"
        if lp.method is not None:
            if lp.method not in method_cache:
                comp = get_compressor(lp.method)
                method_cache[lp.method] = (bool(getattr(comp, "low_rank", False)), comp.kind)
            low_rank, kind = method_cache[lp.method]
        rank = _resolved_rank(lp, d_in, d_out, low_rank)
        zeroed = 0
        if lp.method is not None and not low_rank and kind == "prune" and lp.prune_rate:
            zeroed = round(float(lp.prune_rate) * weight.numel())
        dbits = _dtype_bits(weight.dtype)
        terms[name] = {}
        for factorizable in (True, False):
            p_new, b_new = layer_size(d_in, d_out, rank=rank, bits=lp.bits, group_size=lp.group_size,
                                      dtype_bits=dbits, factorizable=factorizable and can_factorize(module),
                                      zeroed=zeroed)
            factorized = (rank is not None and factorizable and can_factorize(module)
                          and factorization_saves(d_in, d_out, rank))
            if not (factorized and users.get(weight.data_ptr(), 1) > 1):
                p_new = p_new - weight.numel()
                b_new = b_new - stored.get(weight.data_ptr(), weight.numel() * dbits)
            terms[name][factorizable] = (p_new, b_new)
    return {"params_before": int(params_before), "bits_before": int(bits_before)}, terms


def _stored_bits(model: nn.Module) -> dict[int, int]:
    """Storage pointer → stored bits of every weight already quantized (a compressed directory loaded again:
    its layers carry a QuantRecord): B bits per weight plus a 16-bit scale per group, not the float dtype
    the dequantized values are held in."""
    out: dict[int, int] = {}
    for mod in model.modules():
        rec = mod.__dict__.get(QUANT_ATTR)
        w = getattr(mod, "weight", None) if rec is not None else None
        if isinstance(w, torch.Tensor) and hasattr(rec, "bits") and hasattr(rec, "scales"):
            out[w.data_ptr()] = int(w.numel()) * int(rec.bits) + SCALE_BITS * int(rec.scales.numel())
    return out


def _size_total(base: dict, terms: dict[str, dict[bool, tuple[int, int]]], keep_dense: Collection[str]) -> dict:
    params_after, bits_after = base["params_before"], base["bits_before"]
    for name, change in terms.items():
        dp, db = change[name not in keep_dense]
        params_after += dp
        bits_after += db
    return {"params_before": base["params_before"], "params_after": int(params_after),
            "bits_before": base["bits_before"], "bits_after": int(bits_after)}


def _weight_users(model: nn.Module) -> dict[int, list[str]]:
    """Storage pointer of every parameter → the names of the modules holding it (tied weights: several)."""
    users: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            users.setdefault(p.data_ptr(), []).append(name)
    return users


# --------------------------------------------------------------------------------------------
# snapshots (undo on failure)


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified ``name`` (works inside ModuleList/Sequential too)."""
    parent, attr = _parent_of(model, name)
    setattr(parent, attr, module)


@dataclass
class _Snapshot:
    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    state: dict[str, torch.Tensor]
    device: torch.device | None
    training: bool
    quant: dict[int, Any] = field(default_factory=dict)
    param_order: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def take(cls, model: nn.Module, name: str, module: nn.Module) -> _Snapshot:
        parent, attr = _parent_of(model, name)
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict(keep_vars=True).items()}
        dev = next((p.device for p in module.parameters()), None)
        quant = {id(m): getattr(m, QUANT_ATTR, None) for m in module.modules()}
        order = {id(m): [n for n, _ in m.named_parameters(recurse=False)] for m in module.modules()}
        return cls(name, parent, attr, module, state, dev, module.training, quant, order)

    def restore(self) -> None:
        module = self.module
        if getattr(self.parent, self.attr, None) is not module:
            setattr(self.parent, self.attr, module)
        for sub in module.modules():  # a pruning reparametrisation left half-way: make it plain first
            for pname, _ in list(sub.named_parameters(recurse=False)):
                if pname.endswith("_orig") and hasattr(sub, pname[:-5] + "_mask"):
                    torch_prune.remove(sub, pname[:-5])
            order = self.param_order.get(id(sub))
            if order and [n for n, _ in sub.named_parameters(recurse=False)] != order:
                params = {n: getattr(sub, n) for n in order if isinstance(getattr(sub, n, None), nn.Parameter)}
                for n, p in params.items():  # re-register in the original order (public API only)
                    delattr(sub, n)
                    sub.register_parameter(n, p)
        if self.device is not None:
            module.to(self.device)
        with torch.no_grad():
            current = module.state_dict(keep_vars=True)
            for k, v in self.state.items():
                if k in current:
                    current[k].data.copy_(v)
        for m in module.modules():
            rec = self.quant.get(id(m))
            if rec is None:
                if QUANT_ATTR in m.__dict__:
                    delattr(m, QUANT_ATTR)
            else:
                setattr(m, QUANT_ATTR, rec)
        module.train(self.training)


# --------------------------------------------------------------------------------------------
# covariances


@dataclass
class _Cov:
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    tokens: int


def _eigenpairs(gram: torch.Tensor, tokens: int) -> _Cov:
    """Eigenpairs of Σ = G/N (float64, descending, eigenvalues clamped at 0)."""
    cov = gram.to(torch.float64) / max(tokens, 1)
    cov = 0.5 * (cov + cov.T)
    try:
        evals, evecs = torch.linalg.eigh(cov)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(cov.cpu())
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    return _Cov(evals.cpu().numpy(), evecs.cpu().numpy().astype(np.float32), tokens)


def _covariances_from_data(model: nn.Module, targets: list[TargetLayer], data: Any,
                           device: torch.device | None) -> dict[str, _Cov]:
    from ..data import Batches, from_iterable
    from ..models import eval_mode, model_device
    from ..probe import run_probe

    batches = data if isinstance(data, Batches) else from_iterable(data)
    original = model_device(model)
    dev = device or original
    moved = dev != original
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(model))  # every submodule's mode is restored in ``finally``
    try:
        if moved:
            model.to(dev)
        probe = run_probe(model, targets, batches, dev, description="covariance")
        by_key: dict[str, _Cov] = {}
        out = {}
        for t in targets:
            key = probe.layer_acc[t.name]
            if key not in by_key:
                acc = probe.accumulators[key]
                if acc.gram is None or acc.tokens == 0:
                    raise InputError(f"layer {t.name} saw no finite features in the data")
                by_key[key] = _eigenpairs(acc.gram, acc.tokens)
            out[t.name] = by_key[key]
    finally:
        if moved:
            model.to(original)
        modes.close()
    return out


def _covariances_from_analysis(analysis: Any, targets: list[TargetLayer]) -> dict[str, Any]:
    out = {}
    for t in targets:
        try:
            group = analysis.group_of(t.name)
        except KeyError:
            raise InputError(f"layer {t.name} has no spectrum in the analysis (analysed without it, or "
                             "saved without spectra); re-run analyze including it") from None
        if int(np.shape(group.eigenvectors)[0]) != t.d_in:
            raise InputError(f"layer {t.name}: the analysis covariance has dimension "
                             f"{np.shape(group.eigenvectors)[0]} but the layer has d_in = {t.d_in} "
                             "(analysis of a different model?)")
        out[t.name] = group
    return out


# --------------------------------------------------------------------------------------------
# apply_


def _as_plan(plan: Plan | dict | str | Path) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, Path)):
        return Plan.load(plan)
    raise InputError(f"plan must be a Plan, a dict or a path, got {type(plan).__name__}")


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    from ..models import resolve_device

    return resolve_device(device)


def apply_(model: nn.Module, plan: Plan | dict | str | Path, analysis: Any = None, data: Any = None, *,
           device: str | torch.device | None = None, quantizer: str | None = None) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it (see the module docstring).

    ``analysis``: an :class:`~specprune.analysis.Analysis` with spectra (covariances of the
    low-rank layers); ``data``: batches (a ``Batches`` or any iterable of tensors / dicts) to
    measure them when no analysis is given; ``device``: where the factorizations (and the probe)
    run — results go back to each module's own device; ``quantizer``: compressor used for
    ``bits`` (default: the one the plan records in ``details["quantizer"]``, else ``rtn``; the one used
    is recorded there). Fills ``plan.size`` (:func:`plan_size`, before the changes),
    resolved ranks, and ``plan.details["applied"]``. On failure the model and plan are unchanged."""
    from .. import registry
    from ..models import unwrap

    if not isinstance(model, nn.Module):
        raise InputError(f"apply_ takes the model as a torch.nn.Module, got {type(model).__name__} (load a "
                         "checkpoint with specprune.models.load_model, or use the CLI)")
    if analysis is not None and not callable(getattr(analysis, "group_of", None)):
        raise InputError(f"apply_ takes the analysis as a specprune Analysis (specprune.analyze, or "
                         f"Analysis.load(DIR)), got {type(analysis).__name__}")
    plan = _as_plan(plan)
    dev = _resolve_device(device)
    wrapper, model = model, unwrap(model)  # names are the model's own; the wrapper holds the same modules
    modules = dict(model.named_modules())
    for name, lp in plan.layers.items():
        lp.validate(name)
    unknown = [n for n in plan.layers if not n or n not in modules]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [n for n in modules if n], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        more = f" ({len(unknown)} unknown layers in all)" if len(unknown) > 1 else ""
        raise InputError(f"plan layer {unknown[0]!r} is not a module of the model{hint}{more}")

    active: dict[str, LayerPlan] = {n: lp for n, lp in plan.layers.items() if not lp.is_noop}
    targets: dict[str, TargetLayer] = {}
    for name in active:
        module = modules[name]
        adapter = adapter_for(module)
        if adapter is None:
            raise InputError(f"plan layer {name!r} is a {type(module).__name__}, which specprune cannot "
                             "compress (Linear, Conv1D, Conv1d/2d or a plugin layer type)")
        targets[name] = TargetLayer(name, module, adapter)

    recorded = plan.details.get("quantizer")
    quantizes = any(lp.bits is not None for lp in active.values())
    if quantizer is None and recorded is not None and quantizes:
        if not isinstance(recorded, str) or not recorded:
            raise InputError(f"the plan's details.quantizer must be a compressor name, got {recorded!r}")
        if recorded != "rtn" and recorded not in {p.name for p in registry.available("compressors")}:
            raise InputError(f"the plan was quantized with {recorded!r} (details.quantizer), which is not installed "
                             "here: install its plugin, or pass quantizer='rtn' (CLI: --backend fake) to use "
                             "specprune's round-to-nearest instead")
    quantizer = quantizer or recorded or "rtn"
    default_quant = get_compressor(quantizer)
    if default_quant.kind != "quantize":
        raise InputError(f"compressor {quantizer!r} is a {default_quant.kind} method, not a quantizer")
    methods: dict[str, Any] = {}
    for lp in active.values():
        if lp.method is not None and lp.method not in methods:
            methods[lp.method] = get_compressor(lp.method)

    holders = _weight_users(model)
    for name, lp in active.items():
        comp = methods.get(lp.method) if lp.method else None
        shared = [n for n in holders.get(targets[name].module.weight.data_ptr(), []) if n != name]
        if shared:
            what = ("factorizing it would untie them and add parameters" if comp is not None and
                    getattr(comp, "low_rank", False) else f"compressing it would change {shared[0]} as well")
            raise InputError(f"plan layer {name}: its weight is shared with {shared[0]} (tied); {what} — leave it "
                             "out of the plan (--exclude)")

    original_layers = {n: replace(lp) for n, lp in plan.layers.items()}
    original_size, original_details = dict(plan.size), dict(plan.details)
    snapshots: list[_Snapshot] = []
    try:
        # ranks ------------------------------------------------------------------------------
        for name, lp in active.items():
            comp = methods.get(lp.method) if lp.method else None
            t = targets[name]
            if comp is not None and getattr(comp, "low_rank", False):
                if lp.rank is None:
                    if lp.prune_rate and lp.prune_rate > 0:
                        lp.rank = rank_for_rate(t.d_in, t.d_out, float(lp.prune_rate))
                        if can_factorize(t.module) and factorization_saves(t.d_in, t.d_out, lp.rank):
                            # the rank removes at least the rate asked for: record what it removes
                            lp.prune_rate = prune_rate_for_rank(t.d_in, t.d_out, lp.rank)
                else:
                    if lp.rank > t.d_in:
                        raise InputError(f"plan layer {name}: rank {lp.rank} exceeds d_in = {t.d_in}")
                    lp.prune_rate = prune_rate_for_rank(t.d_in, t.d_out, lp.rank) \
                        if can_factorize(t.module) else 0.0
            elif lp.rank is not None:
                raise InputError(f"plan layer {name}: method {lp.method!r} does not take a rank")
            if comp is not None and comp.kind == "quantize" and lp.bits is None:
                raise InputError(f"plan layer {name}: {lp.method!r} is a quantizer, not a prune method "
                                 "(a layer using it needs bits)")

        # covariances ------------------------------------------------------------------------
        def needs_cov(name: str) -> bool:
            lp = active[name]
            comp = methods.get(lp.method) if lp.method else None
            if comp is None or not getattr(comp, "needs_covariance", False):
                return False
            return not (getattr(comp, "low_rank", False) and lp.rank is None)

        cov_targets = [targets[n] for n in active if needs_cov(n)]
        covs: dict[str, Any] = {}
        source = "none"
        if cov_targets:
            if analysis is not None:
                covs, source = _covariances_from_analysis(analysis, cov_targets), "analysis"
            elif data is not None:
                covs, source = _covariances_from_data(model, cov_targets, data, dev), "data"
            else:
                source = "identity"

        base, size_terms = _size_terms(model, plan)
        plan.size = _size_total(base, size_terms, ())
        # layers stored quantized already (a compressed model loaded again) that this plan changes without bits:
        # their new weights are kept in floating point, and the quantization is gone
        dequantized = [n for n, lp in active.items() if lp.bits is None and carries_quant_record(targets[n].module)]

        # apply ------------------------------------------------------------------------------
        for name, lp in active.items():
            t = targets[name]
            snap = _Snapshot.take(model, name, t.module)
            snapshots.append(snap)
            comp = methods.get(lp.method) if lp.method else None
            home = snap.device
            moved = dev is not None and home is not None and dev != home
            if moved:
                t.module.to(dev)
            module = t.module
            quant, quant_name = default_quant, quantizer
            if comp is not None and comp.kind == "quantize":
                quant, quant_name = comp, lp.method
            elif comp is not None and not (getattr(comp, "low_rank", False) and lp.rank is None):
                with registry.blame("compressors", lp.method, f" on layer {name}"):
                    result = comp.apply(t, lp, covs.get(name))
                if result is not None and not isinstance(result, nn.Module):
                    raise SpecpruneError(
                        f"{registry.describe('compressors', lp.method)} does not follow the compressor protocol: "
                        f"apply() on layer {name} returned a {type(result).__name__}, not None or an nn.Module")
                if isinstance(result, nn.Module) and result is not module:
                    set_module(model, name, result)
                    module = result
            if lp.bits is not None:
                with registry.blame("compressors", quant_name, f" on layer {name}"):
                    result = quant.apply(TargetLayer(name, module, adapter_for(module)), lp, covs.get(name))
                if result is not None and not isinstance(result, nn.Module):
                    raise SpecpruneError(
                        f"{registry.describe('compressors', quant_name)} does not follow the compressor protocol: "
                        f"apply() on layer {name} returned a {type(result).__name__}, not None or an nn.Module")
                if not carries_quant_record(result if isinstance(result, nn.Module) else module):
                    raise SpecpruneError(
                        f"{registry.describe('compressors', quant_name)} does not follow the compressor protocol: "
                        f"apply() on layer {name} left no QuantRecord (specprune.compress.quantize.QUANT_ATTR), "
                        "so the layer could be neither sized nor saved packed")
            if moved:
                t.module.to(home)  # the original too: it may still be referenced (tied weights)
                if module is not t.module:
                    module.to(home)
        # a low-rank layer left unfactorized (truncated in place, e.g. by a plugin) keeps its dense size
        dense = [n for n, lp in active.items() if lp.rank is not None
                 and not isinstance(model.get_submodule(n), Factorized)]
        if dense:
            plan.size = _size_total(base, size_terms, dense)
        identity_layers = [t.name for t in cov_targets if t.name not in covs]
        plan.details["applied"] = {"covariance": source, "identity_layers": identity_layers}
        if dequantized:
            plan.details["applied"]["dequantized_layers"] = dequantized
            warnings.warn(DequantizedWarning(dequantized_summary(dequantized)), stacklevel=2)
        if quantizer != "rtn" and quantizes:
            plan.details["quantizer"] = quantizer
        else:
            plan.details.pop("quantizer", None)
        if identity_layers:
            warnings.warn(IdentityCovarianceWarning(
                f"{identity_summary(plan, identity_layers)} (e.g. {identity_layers[0]}): they need their input "
                f"covariance and neither analysis= nor data= was given, so Σ = I was used, not what the plan's "
                f"prediction assumes; pass analysis= (from analyze) or data="), stacklevel=2)
    except BaseException:
        for snap in reversed(snapshots):
            snap.restore()
        for n, lp in plan.layers.items():
            orig = original_layers[n]
            for f in fields(LayerPlan):
                setattr(lp, f.name, getattr(orig, f.name))
        plan.size, plan.details = original_size, original_details
        raise
    return wrapper
