"""analyze(): probe → spectra, as a plain data object that saves and loads.

``Analysis.save(dir)`` writes ``analysis.json`` (the contract's fields plus diagnostics) and
``spectra.safetensors`` (per input group: eigenvalues in float64 and eigenvectors in float32;
per layer: mode energies), so later stages (recommend, report) never recompute.

Scale (docs/scaling.md): the memory an analysis needs is estimated and checked before any accumulator
exists (:mod:`specprune.memory`; recorded under ``"memory"``); accumulators stay on each layer's device
or, with ``offload``, in CPU memory; groups are solved one at a time on their device (CPU fallback),
wide ones in float32 (:mod:`specprune.solve`).

Truncated spectra. With ``solver="auto"`` (the ``analyze`` command's default) input groups of width
d ≥ ``randomized_threshold`` (8192), with ``solver="randomized"`` every group, are solved for their top
k modes only (:mod:`specprune.randomized`). Such a
group stores k eigenvalues, d × k eigenvectors and the lumped tail mass ``tail_trace = tr Σ − Σ_{j≤k} θ_j``;
its layers store e_1..e_k and the lumped tail energy ``E_tail = tr(W Σ Wᵀ) − Σ_{j≤k} e_j`` (exact total,
computed from the Gram before it is freed), under ``"truncation"`` in analysis.json. How the rest of
the analysis reads a truncated spectrum:

* fits: b and a are fitted over the default range of the k solved modes (k_lo..0.9k), not of d;
* frontier: estimated from the k solved gains, so k* is detectable only up to 0.9k (raise ``top_k``
  when a layer reports no frontier); ``k_max`` stays d_in and ``r_star = 1 − k*/d_in``;
* effective rank: of the spectrum completed by a flat tail (each unsolved mode tail_trace/(d−k)), an
  upper bound on the true one;
* energies: ``LayerAnalysis.energy`` = Σ e_j + E_tail, ``tail_energy[j]`` = Σ_{j'>j} e_j' + E_tail for
  j = 0..k (keeping ≤ k modes always discards the whole lumped tail);
* ``InputGroup.covariance()`` = U_k Θ_k U_kᵀ + σ²(I − U_k U_kᵀ), σ² = tail_trace/(d − k).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import InputError
from .io import dumps, write_atomic
from .layers import TargetLayer, select_layers
from .solve import _covariance_, _eigh, _with_cpu_fallback, error_bound, solve_precision

ANALYSIS_FILE = "analysis.json"
SPECTRA_FILE = "spectra.safetensors"


@dataclass
class LayerAnalysis:
    """One layer's spectrum summary (the analysis.json fields as attributes) and its arrays."""

    name: str
    type: str
    d_in: int
    d_out: int
    tokens: int
    b: float | None
    a: float | None
    k_star: int | None
    k_max: int
    r_star: float | None
    fit: dict
    effective_rank: float | None = None
    input_group: str = ""
    skipped_tokens: int = 0
    flags: list[str] = field(default_factory=list)
    eigenvalues: np.ndarray | None = field(default=None, repr=False)
    mode_energy: np.ndarray | None = field(default=None, repr=False)
    truncation: dict | None = None  # top-k solve: {"modes_solved", "tail_modes", "tail_energy", ...}
    sampling: dict | None = None  # token-sampled input: its group's record (probe.GramAccumulator.sampling)

    def to_dict(self) -> dict:
        d = {"name": self.name, "type": self.type, "d_in": self.d_in, "d_out": self.d_out,
             "tokens": self.tokens, "b": self.b, "a": self.a, "k_star": self.k_star, "k_max": self.k_max,
             "r_star": self.r_star, "effective_rank": self.effective_rank, "fit": self.fit,
             "input_group": self.input_group, "skipped_tokens": self.skipped_tokens, "flags": self.flags}
        if self.truncation is not None:
            d["truncation"] = self.truncation
        if self.sampling:
            d["sampling"] = self.sampling
        return d

    @property
    def lumped_tail_energy(self) -> float:
        """Output energy of the unsolved modes of a truncated spectrum (0 when fully solved)."""
        return float(self.truncation.get("tail_energy") or 0.0) if self.truncation else 0.0

    @property
    def energy(self) -> float:
        """E‖Wx‖² per token (Σ_k e_k, plus the lumped tail of a truncated spectrum)."""
        if self.mode_energy is None:
            return float("nan")
        return float(np.sum(self.mode_energy)) + self.lumped_tail_energy

    @property
    def tail_energy(self) -> np.ndarray:
        """tail_energy[k] = Σ_{k' > k} e_k' (k = 0..d_in): exact cost of keeping the top-k modes; for a
        truncated spectrum k = 0..modes_solved and every entry includes the lumped tail."""
        e = np.asarray(self.mode_energy, dtype=np.float64)
        c = np.concatenate([[0.0], np.cumsum(e)])
        return c[-1] - c + self.lumped_tail_energy


@dataclass
class InputGroup:
    """Eigenpairs of one accumulated input covariance (shared by the layers listed)."""

    key: str
    tokens: int
    eigenvalues: np.ndarray = field(repr=False)
    # columns, descending eigenvalue order (d × k; k = d unless truncated)
    eigenvectors: np.ndarray = field(repr=False)
    layers: list[str] = field(repr=False)
    dim: int = 0  # d (0: len(eigenvalues), a full solve)
    tail_trace: float = 0.0  # Σ of the unsolved eigenvalues (truncated solves)
    solver: dict = field(default_factory=dict)  # how the group was solved (method, residuals, …)
    sampling: dict = field(default_factory=dict)  # token sampling (GramAccumulator.sampling); {}: every token

    def __post_init__(self) -> None:
        if not self.dim:
            self.dim = int(np.shape(self.eigenvectors)[0]) if self.eigenvectors is not None \
                else len(self.eigenvalues)

    @property
    def truncated(self) -> bool:
        return len(self.eigenvalues) < self.dim

    @property
    def effective_tokens(self) -> int:
        """Tokens whose features entered the covariance: the kept ones of a sampled group."""
        return int(self.sampling.get("kept_tokens", self.tokens)) if self.sampling else self.tokens

    def covariance(self) -> np.ndarray:
        """Σ = U Λ Uᵀ; for a truncated group U_k Θ_k U_kᵀ + σ²(I − U_k U_kᵀ), σ² = tail_trace/(d − k)."""
        u = self.eigenvectors.astype(np.float64)
        cov = (u * self.eigenvalues) @ u.T
        if self.truncated:
            s2 = self.tail_trace / (self.dim - len(self.eigenvalues))
            cov += s2 * (np.eye(self.dim) - u @ u.T)
        return cov


@dataclass
class Analysis:
    """Result of :func:`analyze` for one model."""

    model: dict
    calibration: dict
    layers: list[LayerAnalysis]
    groups: dict[str, InputGroup]
    specprune_version: str = __version__
    seconds: float = 0.0
    memory: dict = field(default_factory=dict)  # the memory estimate the run was planned with

    def __repr__(self) -> str:
        frontier = sum(lay.k_star is not None for lay in self.layers)
        return (f"Analysis({self.model.get('source', '?')!r}: {len(self.layers)} layers in {len(self.groups)} input "
                f"groups, {self.calibration.get('tokens', '?')} tokens, k* found in {frontier})")

    def layer(self, name: str) -> LayerAnalysis:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def group_of(self, name: str) -> InputGroup:
        return self.groups[self.layer(name).input_group]

    def to_dict(self) -> dict:
        d = {"specprune_version": self.specprune_version, "model": self.model,
             "calibration": self.calibration, "layers": [lay.to_dict() for lay in self.layers],
             "seconds": round(self.seconds, 3)}
        if self.memory:
            d["memory"] = self.memory
        return d

    @property
    def truncated(self) -> bool:
        """True when some group was solved for its top modes only (see the module docstring)."""
        return any(g.truncated for g in self.groups.values())

    def require_full_spectra(self, purpose: str) -> None:
        """Raise :class:`InputError` when a group was truncated: ``purpose`` (e.g. "recommend") needs
        every mode's eigenvector."""
        cut = [g for g in self.groups.values() if g.truncated]
        if cut:
            g = cut[0]
            raise InputError(f"{purpose} needs full spectra but {len(cut)} input group(s) were solved for their "
                             f"top modes only (e.g. {g.key}: {len(g.eigenvalues)} of {g.dim}); re-run analyze "
                             "with --solver full")

    def save(self, directory: str | Path) -> Path:
        """Write analysis.json and spectra.safetensors into ``directory`` (created if needed)."""
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for key, g in self.groups.items():
            arrays[f"group.{key}.eigenvalues"] = np.ascontiguousarray(g.eigenvalues, dtype=np.float64)
            arrays[f"group.{key}.eigenvectors"] = np.ascontiguousarray(g.eigenvectors, dtype=np.float32)
        for lay in self.layers:
            arrays[f"layer.{lay.name}.mode_energy"] = np.ascontiguousarray(lay.mode_energy, dtype=np.float64)
        meta = {"groups": json.dumps({k: _group_meta(g) for k, g in self.groups.items()})}
        tmp = d / f".{SPECTRA_FILE}.tmp"
        save_file(arrays, str(tmp), metadata=meta)
        tmp.replace(d / SPECTRA_FILE)
        write_atomic(d / ANALYSIS_FILE, dumps(self.to_dict()))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Analysis:
        """Read a directory written by :meth:`save` (no recomputation)."""
        from safetensors import safe_open

        d = Path(directory)
        jf = d / ANALYSIS_FILE
        if not jf.is_file():
            raise InputError(f"{directory} holds no {ANALYSIS_FILE}")
        try:
            doc = json.loads(jf.read_text(encoding="utf-8"))
            layers_doc = doc["layers"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{jf} is not a specprune analysis: {err}") from None
        sf = d / SPECTRA_FILE
        arrays: dict[str, np.ndarray] = {}
        groups_meta: dict = {}
        if sf.is_file():
            try:
                with safe_open(str(sf), framework="numpy") as fh:
                    groups_meta = json.loads((fh.metadata() or {}).get("groups", "{}"))
                    for k in fh.keys():
                        arrays[k] = fh.get_tensor(k)
            except Exception as err:
                raise InputError(f"{sf} is not readable (corrupted?): {err}") from None
        groups = {}
        for key, meta in groups_meta.items():
            groups[key] = InputGroup(key, int(meta["tokens"]), arrays[f"group.{key}.eigenvalues"],
                                     arrays[f"group.{key}.eigenvectors"], list(meta["layers"]),
                                     dim=int(meta.get("dim", 0)), tail_trace=float(meta.get("tail_trace", 0.0)),
                                     solver=dict(meta.get("solver", {})), sampling=dict(meta.get("sampling", {})))
        layers = []
        fields = set(LayerAnalysis.__dataclass_fields__) - {"eigenvalues", "mode_energy"}
        required = {k for k, f in LayerAnalysis.__dataclass_fields__.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        def bad(why: str) -> InputError:
            return InputError(f"{jf} is not a specprune analysis: {why}")

        if not isinstance(layers_doc, list):
            raise bad(f"'layers' must be a list of layer objects, got {type(layers_doc).__name__}")
        for key in ("model", "calibration", "memory"):
            if not isinstance(doc.get(key, {}), dict):
                raise bad(f"'{key}' must be an object, got {type(doc[key]).__name__}")
        for i, ld in enumerate(layers_doc):
            if not isinstance(ld, dict):
                raise bad(f"layer entry {i} is not an object")
            if not required <= set(ld):
                raise bad(f"layer entry {i} lacks {', '.join(sorted(required - set(ld))[:5])}")
            if (why := _layer_field_error(ld)) is not None:
                raise bad(f"layer entry {i}: {why}")
            kw = {k: v for k, v in ld.items() if k in fields}
            lay = LayerAnalysis(**kw)
            lay.mode_energy = arrays.get(f"layer.{lay.name}.mode_energy")
            g = groups.get(lay.input_group)
            lay.eigenvalues = g.eigenvalues if g is not None else None
            layers.append(lay)
        return cls(doc.get("model", {}), doc.get("calibration", {}), layers, groups,
                   doc.get("specprune_version", __version__), float(doc.get("seconds", 0.0)),
                   memory=dict(doc.get("memory", {})))

    @property
    def has_spectra(self) -> bool:
        return bool(self.groups) and all(lay.mode_energy is not None for lay in self.layers)


_LAYER_TYPES = {"name": (str,), "type": (str,), "d_in": (int,), "d_out": (int,), "tokens": (int,),
                "k_max": (int,), "b": (int, float, type(None)), "a": (int, float, type(None)),
                "k_star": (int, type(None)), "r_star": (int, float, type(None)), "fit": (dict,),
                "input_group": (str,), "skipped_tokens": (int,), "flags": (list,),
                "truncation": (dict, type(None)), "sampling": (dict, type(None))}


def _layer_field_error(ld: dict) -> str | None:
    """What is wrong with a layer entry's field types (None when nothing is)."""
    for key, types in _LAYER_TYPES.items():
        if key in ld and (isinstance(ld[key], bool) or not isinstance(ld[key], types)):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "int": "an integer",
                                                                "float": "a number", "dict": "an object",
                                                                "list": "a list"}[t.__name__] for t in types)
            return f"'{key}' must be {want}, got {json.dumps(ld[key])[:40]}"
    return None


def _group_meta(g: InputGroup) -> dict:
    meta = {"tokens": g.tokens, "layers": g.layers}
    if g.truncated or g.solver:
        meta.update(dim=g.dim, tail_trace=g.tail_trace, solver=g.solver)
    if g.sampling:
        meta["sampling"] = g.sampling
    return meta


def _output_energy(w: torch.Tensor, cov: torch.Tensor, rows: int | None = None) -> float:
    """tr(W Σ Wᵀ) = E‖W x‖², in float64 on Σ's device, a block of W's rows at a time."""
    rows = rows or max(1, (256 << 20) // (8 * max(cov.shape[0], 1)))
    total = 0.0
    for i in range(0, w.shape[0], rows):
        wc = w[i:i + rows].to(cov.device, torch.float64)
        total += float(((wc @ cov) * wc).sum())
    return total


def _topk(gram: torch.Tensor, tokens: int, k: int, device: torch.device | None, members: list[TargetLayer],
          seed: int) -> tuple[Any, dict[str, float]]:
    """Randomized top-k solve of Σ = G/N on ``device`` (CPU fallback), plus every member layer's exact
    output energy tr(W Σ Wᵀ) from the same Σ before it is freed."""
    from .randomized import randomized_eigh

    def solve(cov: torch.Tensor):
        res = randomized_eigh(cov, k, seed=seed)
        energies = {}
        for lay in members:
            with _materialized(lay):
                energies[lay.name] = _output_energy(lay.weight_matrix().detach(), cov)
        return res, energies

    with torch.inference_mode():
        return _with_cpu_fallback(solve, _covariance_(gram, tokens, device))


@contextlib.contextmanager
def _materialized(layer: TargetLayer):
    """A layer whose weights accelerate keeps offloaded (``meta`` in place) gets them back for the block."""
    w = getattr(layer.module, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type == "meta":
        try:
            from accelerate.utils import align_module_device
        except ImportError:
            raise InputError(f"layer {layer.name} has its weights offloaded but accelerate is not "
                             "installed") from None
        with align_module_device(layer.module, torch.device("cpu")):
            yield
    else:
        yield


def _mode_gains(w: torch.Tensor, u: torch.Tensor, chunk_bytes: int = 64 << 20) -> tuple[np.ndarray, float]:
    """(‖W u_k‖² for every column u_k of U, ‖W‖_F²), summed in float64, a block of W's rows at a time, so
    that a wide output layer (a vocabulary projection) never has a float64 copy of all of W or of W U.
    The products W U are in U's precision: float64, or float32 for eigenvectors from a float32 solve
    (accurate to ~1e-6 themselves; half the time, which counts on a vocabulary head)."""
    rows = max(1, chunk_bytes // (u.element_size() * max(u.shape[0], u.shape[1], 1)))
    gain = torch.zeros(u.shape[1], dtype=torch.float64)
    w_sq = 0.0
    for i in range(0, w.shape[0], rows):
        wc = w[i:i + rows].to("cpu", u.dtype)
        gain += (wc @ u).square_().sum(0, dtype=torch.float64)
        w_sq += float(wc.square().sum(dtype=torch.float64))
    return gain.numpy(), w_sq


def summarize_layers(items: Sequence[tuple[TargetLayer, InputGroup, int, float | None]],
                     ) -> list[LayerAnalysis]:
    """Spectrum, fits and frontier of each ``(layer, group, skipped, total_energy)`` from its input group's
    eigenpairs (a truncated group: see the module docstring; ``total_energy`` = tr(W Σ Wᵀ), else the
    lumped covariance model's): the mode gains one layer at a time, then every layer's fits together
    (their frontier screenings in one batch, :meth:`LayerSpectrum.from_eigen_many`)."""
    from .progress import track
    from .spectra import LayerSpectrum

    gains = []
    for layer, group, *_ in track(items, "fits"):
        # in the solve's precision (float32 solves: float32 products)
        dtype = torch.float32 if group.solver.get("precision") == "float32" else torch.float64
        u = torch.as_tensor(group.eigenvectors, dtype=dtype)
        with _materialized(layer):
            gains.append(_mode_gains(layer.weight_matrix().detach(), u))
    specs = LayerSpectrum.from_eigen_many([
        {"eigenvalues": group.eigenvalues, "mode_energy": group.eigenvalues * gain, "tokens": group.tokens,
         "kept_tokens": group.effective_tokens, "d_out": layer.d_out, "mode_gain": gain} for (layer, group, *_), (gain, _) in zip(items, gains)])
    return [_layer_analysis(*item, gain, w_sq, spec) for item, (gain, w_sq), spec in zip(items, gains, specs)]


# fewer calibration tokens per input dimension than this: the layer is flagged "undersampled" (sampled
# eigenvalues spread, Marchenko–Pastur, and the fitted b comes out steeper: synthetic d = 256, b = 2 gave
# +1.5% at 10 tokens per dimension, +10% at 2, +29% at 1)
UNDERSAMPLED_PER_DIM = 4


def undersampled_note(analysis: "Analysis") -> str | None:
    """One line naming the layers flagged undersampled (None when none is)."""
    low = [lay for lay in analysis.layers if any(f.startswith("undersampled") for f in lay.flags)]
    if not low:
        return None
    def seen(lay: LayerAnalysis) -> int:
        g = analysis.groups.get(lay.input_group)
        return g.effective_tokens if g is not None else lay.tokens

    worst = min(low, key=lambda lay: seen(lay) / max(lay.d_in, 1))
    # --seq-len adds tokens only to text windows (tensor data has none), and only to layers that read every
    # position (a pooler reads one per window): more windows help every layer
    how = "--samples, --seq-len" if analysis.calibration.get("seq_len") else "--samples"
    return (f"{len(low)} layer(s) saw fewer than {UNDERSAMPLED_PER_DIM} calibration tokens per input dimension (e.g. "
            f"{worst.name}: {seen(worst)} for {worst.d_in}): their fitted exponents come out steeper than the "
            f"spectrum's (b +10% at 2 per dimension); calibrate on more tokens ({how})")


def _worst_sampling_se(sampling: dict, eigenvalues: np.ndarray, k_star: int | None) -> tuple[int, float]:
    """How many top eigenvalues the sampling bound covers (k*, else 10) and their worst bound: the
    smallest of them's, as the bound falls with λ (eigenvalues descend)."""
    from .probe import relative_se_bound

    lam = np.asarray(eigenvalues, dtype=np.float64)[:int(k_star or 10)]
    return len(lam), relative_se_bound(sampling, float(lam[-1])) if lam.size else 0.0


def sampling_flag(sampling: dict, eigenvalues: np.ndarray, k_star: int | None) -> str:
    """The "sampled" flag of a layer whose input tokens were importance-sampled: how many entered, and the
    bound on the relative standard error of its top-k* eigenvalues (top 10 without a frontier)."""
    k, worst = _worst_sampling_se(sampling, eigenvalues, k_star)
    return (f"sampled: {sampling.get('kept_tokens')} of {sampling.get('tokens')} tokens entered the covariance "
            f"(norm² importance sampling, {sampling.get('fraction'):.12g} asked); the top {k} eigenvalues' "
            f"relative standard error is at most {worst:.1%}")


def sampling_note(analysis: "Analysis") -> str | None:
    """One line on token sampling (None when no group was sampled): the groups, the tokens they kept, and
    the worst stated bound over their layers' top eigenvalues."""
    groups = [g for g in analysis.groups.values() if g.sampling]
    if not groups:
        return None
    worst = max(_worst_sampling_se(analysis.groups[lay.input_group].sampling, lay.eigenvalues, lay.k_star)[1]
                for lay in analysis.layers if analysis.groups[lay.input_group].sampling)
    kept = sum(g.effective_tokens for g in groups)
    seen = sum(g.tokens for g in groups)
    return (f"token sampling: {len(groups)} input(s) ≥ 1024 wide kept {kept} of {seen} tokens ({kept / seen:.0%}); "
            f"their top eigenvalues' relative standard error is at most {worst:.1%} (stated bound)")


def _layer_analysis(layer: TargetLayer, group: InputGroup, skipped: int, total_energy: float | None,
                    gain: np.ndarray, w_sq: float, spec) -> LayerAnalysis:
    from .randomized import flat_tail_effective_rank

    s = spec.summary_dict()
    flags = []
    if skipped:
        flags.append(f"nonfinite: {skipped} tokens with NaN/Inf features were left out")
    seen = group.effective_tokens
    if seen < UNDERSAMPLED_PER_DIM * group.dim:
        flags.append(f"undersampled: {seen} tokens for {group.dim} input dimensions "
                     f"({seen / max(group.dim, 1):.2g} per dimension): the fitted b is biased upward"
                     + (f"; its covariance has rank ≤ {seen}, so the fits stop there"
                        if seen < group.dim else ""))
    if group.sampling:
        flags.append(sampling_flag(group.sampling, group.eigenvalues, s["k_star"]))
    truncation = None
    k_max, r_star, eff_rank = s["k_max"], s["r_star"], s.get("effective_rank")
    if group.truncated:
        k, d = len(group.eigenvalues), group.dim
        solved = float(np.sum(group.eigenvalues * gain))
        if total_energy is None:  # lumped model: σ² (‖W‖² − ‖W U_k‖²)
            s2 = group.tail_trace / (d - k)
            total_energy = solved + s2 * max(w_sq - float(gain.sum()), 0.0)
        tail_e = max(float(total_energy) - solved, 0.0)
        k_max = d
        r_star = None if s["k_star"] is None else 1.0 - s["k_star"] / d
        eff_rank = flat_tail_effective_rank(group.eigenvalues, group.tail_trace, d - k)
        truncation = {"modes_solved": k, "tail_modes": d - k, "tail_eigenvalue_sum": group.tail_trace,
                      "tail_energy": tail_e, "total_energy": float(total_energy), "solver": group.solver}
        share = tail_e / total_energy if total_energy > 0 else 0.0
        res = group.solver.get("max_relative_residual")
        flags.append(f"truncated: top {k} of {d} input modes solved ({group.solver.get('method', 'randomized')}"
                     + (f", max relative residual {res:.1e}" if res is not None else "")
                     + f"); the other {d - k} modes are one lumped tail holding {share:.2%} of the output energy")
    return LayerAnalysis(
        name=layer.name, type=layer.type, d_in=layer.d_in, d_out=layer.d_out, tokens=group.tokens,
        b=s["b"], a=s["a"], k_star=s["k_star"], k_max=k_max, r_star=r_star, fit=s["fit"],
        effective_rank=eff_rank, input_group=group.key, skipped_tokens=skipped,
        flags=flags, eigenvalues=group.eigenvalues, mode_energy=np.asarray(spec.mode_energy),
        truncation=truncation, sampling=dict(group.sampling) or None)


def _dispatched(model: nn.Module) -> bool:
    """True for a model placed by accelerate / ``from_pretrained(device_map=...)``: it must not be moved."""
    return bool(getattr(model, "hf_device_map", None)) or hasattr(model, "_hf_hook")


def _input_device(model: nn.Module) -> torch.device:
    """Where a dispatched model takes its inputs: the device of its first mapped module (the
    embeddings), or the first GPU of the map when that module is offloaded to disk."""
    dmap = getattr(model, "hf_device_map", None) or {}
    devices = []
    for v in dmap.values():
        if isinstance(v, int):
            devices.append(torch.device("cuda", v))
        elif isinstance(v, (str, torch.device)) and str(v) not in ("disk", "meta"):
            devices.append(torch.device(v))
    if devices:
        first = devices[0]
        gpus = [d for d in devices if d.type == "cuda"]
        return first if first.type != "cpu" or not gpus else gpus[0]
    from .models import model_device

    dev = model_device(model)
    return dev if dev.type != "meta" else torch.device("cpu")


def _param_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of parameters and buffers not yet on ``device`` (what ``model.to(device)`` brings there)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.device == device:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _plan_memory(model, layers, batches, device: torch.device, dispatched: bool, moving: bool,
                 offload: bool | None, check: bool, solver_kw: dict, log) -> tuple[bool, dict]:
    """Estimate the memory the analysis needs before anything is allocated (per device of a
    dispatched model), decide on offloading and check it fits (module :mod:`specprune.memory`).
    The input groups (which layers share an accumulator) come from one forward of a single ≤ 8-token
    sample, so the accumulator count is exact; if that trial forward fails, every layer counts alone
    (an upper bound)."""
    from .data import count_tokens
    from .memory import by_device, estimate_analysis_memory, fmt_bytes, free_memory, plan_memory
    from .models import model_device
    from .probe import discover_input_groups

    batch_tokens = max((count_tokens(b) for b in batches.batches), default=0)
    per = by_device(layers) if dispatched else {device: layers}
    weights = _param_bytes(model, device) if moving else 0

    def plan(groups):
        kw = {"groups": groups, "batch_tokens": batch_tokens, **solver_kw}
        if not check:
            return [estimate_analysis_memory(lays, offload=bool(offload) and d.type == "cuda", device=d,
                                             weights=weights, **kw) for d, lays in per.items()]
        ests = [plan_memory(lays, d, offload=offload, weights=weights, **kw) for d, lays in per.items()]
        if len(ests) > 1:
            off = any(e.offload for e in ests)
            if off and not all(e.offload for e in ests if e.device != "cpu"):
                ests = [plan_memory(lays, d, offload=True, **kw) for d, lays in per.items()]
            host = sum(e.host_bytes for e in ests if e.device != "cpu")
            free_host = free_memory("cpu")
            if free_host is not None and host > free_host:
                raise InputError(f"the analysis needs about {fmt_bytes(host)} of host memory over "
                                 f"{len(ests)} devices but {fmt_bytes(free_host)} is available; analyse fewer "
                                 "layers at a time with --include/--exclude")
        return ests

    groups = None
    try:
        groups = discover_input_groups(model, layers, batches.batches[0],
                                       _input_device(model) if dispatched else model_device(model))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, InputError) as err:
        if log is not None:
            log(f"memory: input groups not found by a trial forward ({type(err).__name__}); "
                "the estimate counts every layer on its own (an upper bound)")
    ests = plan(groups)  # raises when the analysis cannot fit
    use_offload = any(e.offload for e in ests)
    if log is not None:
        for e in ests:
            log(e.describe())
    if len(ests) == 1:
        return use_offload, ests[0].to_dict()
    return use_offload, {"offload": use_offload, "upper_bound": any(e.upper_bound for e in ests),
                         "devices": [e.to_dict() for e in ests]}


def _fingerprint(model: nn.Module) -> str | None:
    """The weights' fingerprint (``recommend ANALYSIS_DIR`` checks it against the source it loads), or None
    for a model with weights offloaded to the meta device (nothing to hash in this process)."""
    from .models import fingerprint

    if any(t.device.type == "meta" for t in model.state_dict().values()):
        return None
    return fingerprint(model)


def _all_reduce_gram(gram: torch.Tensor) -> None:
    """Sum a Gram over ranks in place; an offloaded (CPU) Gram under NCCL travels through the GPU in
    row blocks of ≤ 256 MiB."""
    from .distributed import all_reduce_, is_distributed

    if not is_distributed():
        return
    import torch.distributed as dist

    if gram.device.type == "cpu" and dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        rows = max(1, (256 << 20) // (8 * gram.shape[1]))
        for i in range(0, gram.shape[0], rows):
            blk = gram[i:i + rows].to(dev)
            all_reduce_(blk)
            gram[i:i + rows].copy_(blk.cpu())
        return
    all_reduce_(gram)


def analyze(model: nn.Module, data: Any, *, include: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None, device: str | torch.device | None = None,
            source: str | None = None, tokenizer=None, samples: int = 128, seq_len: int = 128,
            batch_size: int = 8, seed: int = 0, offload: bool | None = None, solver: str = "full",
            top_k: int | None = None, randomized_threshold: int | None = None, precision: str = "auto",
            token_sample: float | None = None, memory_check: bool = True,
            log: Callable[[str], None] | None = None) -> Analysis:
    """Hook ``model``'s layers, stream ``data`` through it, and return every layer's spectrum.

    ``data``: a :class:`~specprune.data.Batches`, an iterable of batches (tensors or dicts), or
    paths to text/tensor files (then ``tokenizer``, ``samples``, ``seq_len``, ``batch_size``,
    ``seed`` apply). The model's outputs and parameters are unchanged; hooks are always removed.

    Scale options (docs/scaling.md): ``device`` — where the model runs (a model dispatched with a
    ``device_map`` is never moved; each accumulator then lives on its layer's device); ``offload`` —
    float64 accumulators in CPU memory (None: only when the memory estimate says the device is short);
    ``solver`` — ``full`` (the default here: recommend, apply and compress need every mode), ``auto``
    (randomized top-``top_k`` for input widths ≥ ``randomized_threshold``, 8192; the default of the
    ``specprune analyze`` command) or ``randomized`` (every group); ``precision`` — of the full solves:
    ``auto`` (float32 for inputs ≥ 1024 wide with ≥ 2d tokens, else float64; :mod:`specprune.solve`),
    ``float32`` or ``float64``; ``token_sample`` — a fraction in [1e-6, 1): inputs ≥ 1024 wide keep about that
    share of their tokens, drawn with probability ∝ ‖x‖² and weighted 1/p (an unbiased covariance at that
    share of the Gram work; each such group records ``sampling`` and its layers a "sampled" flag with the
    bound on their top eigenvalues' relative standard error: :mod:`specprune.probe`; None, the default:
    every token); ``memory_check`` — estimate and check memory up front (the estimate is recorded in
    ``Analysis.memory``); ``log`` — receives one-line status messages.
    """
    from .data import Batches, check_seed, from_iterable, load_data
    from .distributed import all_reduce_scalars, is_distributed, rank, shard, solve_on_main
    from .memory import choose_solver
    from .models import eval_mode, model_device, num_parameters, resolve_device, unwrap
    from .probe import check_sample, run_probe
    from .progress import track
    from .randomized import DEFAULT_THRESHOLD

    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"analyze takes the model as a torch.nn.Module, got {type(model).__name__} (load a "
                         "checkpoint with specprune.models.load_model, or use the CLI)")
    model = unwrap(model)
    if isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and data
                                          and isinstance(data[0], (str, Path))):
        paths = [data] if isinstance(data, (str, Path)) else list(data)
        batches = load_data(paths, tokenizer, samples=samples, seq_len=seq_len, batch_size=batch_size,
                            seed=seed)
    else:
        batches = from_iterable(data, seed) if not isinstance(data, Batches) else data
    layers = select_layers(model, include, exclude)
    threshold = DEFAULT_THRESHOLD if randomized_threshold is None else int(randomized_threshold)
    solver_kw = {"solver": solver, "top_k": top_k, "threshold": threshold}
    choose_solver(1, solver, top_k, threshold)  # validate the options before any work
    solve_precision(1, 1, precision)
    token_sample = check_sample(token_sample)
    check_seed(seed)
    dispatched = _dispatched(model)
    original = model_device(model)
    if dispatched:
        dev = None
        target = _input_device(model)
        if device is not None and log is not None:
            log("the model is dispatched with a device map: it stays where it is (--device is ignored)")
    else:
        dev = resolve_device(device) if device is not None and not isinstance(device, torch.device) else device
        if dev is not None and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        target = dev or original
    moved = dev is not None and dev != original
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(model))  # every submodule's mode is restored in ``finally``
    members: dict[str, list[TargetLayer]] = {}
    try:
        use_offload, memory = _plan_memory(model, layers, batches, target, dispatched, moved, offload,
                                           memory_check, solver_kw, log)
        if moved:
            model.to(dev)
        probe = run_probe(model, layers, shard(batches.batches), target, offload=use_offload,
                          sample=token_sample, seed=seed + 7919 * rank())  # each rank its own draws
        accs = probe.results()
        for lay in layers:
            members.setdefault(probe.layer_acc[lay.name], []).append(lay)
        if is_distributed():
            for key in sorted(accs):  # same order on every rank
                acc = accs[key]
                if acc.gram is None:
                    acc.gram = torch.zeros(acc.d, acc.d, dtype=torch.float64,
                                           device="cpu" if acc.offload else acc.device)
                _all_reduce_gram(acc.gram)
                acc.tokens, acc.skipped_tokens, acc.kept_tokens = (
                    int(v) for v in all_reduce_scalars(acc.tokens, acc.skipped_tokens, acc.kept_tokens))
                if acc.sample is not None:
                    (acc.max_variance,) = all_reduce_scalars(acc.max_variance, op="max")
        groups: dict[str, InputGroup] = {}
        skipped: dict[str, int] = {}
        energies: dict[str, float] = {}
        for key, acc in track(list(accs.items()), "eigensolves"):
            if acc.gram is None or acc.tokens == 0:
                raise InputError(f"layer {key} saw no finite features (all NaN/Inf, too large for a float32 Gram "
                                 "(|x| > 1.8e19), or no tokens)")
            if acc.kept_tokens == 0:
                raise InputError(f"layer {key}: token sampling kept none of its {acc.tokens} tokens; raise "
                                 "--token-sample or calibrate on more tokens")
            how, k = choose_solver(acc.d, **solver_kw)
            if how == "full":
                prec = solve_precision(acc.d, acc.kept_tokens, precision)
                # under torch.distributed rank 0 solves and broadcasts (every rank holds the same Gram)
                evals, evecs = solve_on_main(
                    lambda acc=acc, prec=prec: _eigh(acc.gram, acc.tokens, acc.device, prec), acc.d)
                top = float(evals[0]) if len(evals) else 0.0
                info = {} if prec == "float64" else {"method": "eigh", "precision": prec,
                                                      "eigenvalue_error_bound": error_bound(acc.d, top, prec)}
                groups[key] = InputGroup(key, acc.tokens, evals, evecs, list(acc.layers), solver=info,
                                         sampling=acc.sampling)
            else:
                res, en = _topk(acc.gram, acc.tokens, k, acc.device, members[key], seed)
                energies.update(en)
                groups[key] = InputGroup(key, acc.tokens, res.eigenvalues.cpu().numpy(),
                                         res.eigenvectors.cpu().numpy(), list(acc.layers), dim=acc.d,
                                         tail_trace=res.tail_trace, solver=res.describe(), sampling=acc.sampling)
            skipped[key] = acc.skipped_tokens
            acc.gram = None  # free as we go: one accumulator's solve at a time
        out_layers = summarize_layers([(lay, groups[probe.layer_acc[lay.name]],
                                        skipped[probe.layer_acc[lay.name]], energies.get(lay.name))
                                       for lay in layers])
    finally:
        if moved:
            model.to(original)
        modes.close()
    calib = batches.describe()
    if token_sample is not None:
        calib["token_sample"] = token_sample
    info = {"source": source or type(model).__name__, "num_parameters": num_parameters(model),
            "architecture": type(model).__name__, "fingerprint": _fingerprint(model)}
    return Analysis(info, calib, out_layers, groups, seconds=time.perf_counter() - t0, memory=memory)
