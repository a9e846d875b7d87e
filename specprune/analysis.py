"""analyze(): probe → spectra, as a plain data object that saves and loads.

``Analysis.save(dir)`` writes ``analysis.json`` (the contract's fields plus diagnostics) and
``spectra.safetensors`` (per input group: eigenvalues in float64 and eigenvectors in float32;
per layer: mode energies), so later stages (recommend, report) never recompute.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import InputError
from .io import dumps, write_atomic
from .layers import TargetLayer, select_layers

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

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "d_in": self.d_in, "d_out": self.d_out,
                "tokens": self.tokens, "b": self.b, "a": self.a, "k_star": self.k_star, "k_max": self.k_max,
                "r_star": self.r_star, "effective_rank": self.effective_rank, "fit": self.fit,
                "input_group": self.input_group, "skipped_tokens": self.skipped_tokens, "flags": self.flags}

    @property
    def energy(self) -> float:
        """E‖Wx‖² per token (Σ_k e_k)."""
        return float(np.sum(self.mode_energy)) if self.mode_energy is not None else float("nan")

    @property
    def tail_energy(self) -> np.ndarray:
        """tail_energy[k] = Σ_{k' > k} e_k' (k = 0..d_in): exact cost of keeping the top-k modes."""
        e = np.asarray(self.mode_energy, dtype=np.float64)
        c = np.concatenate([[0.0], np.cumsum(e)])
        return c[-1] - c


@dataclass
class InputGroup:
    """Eigenpairs of one accumulated input covariance (shared by the layers listed)."""

    key: str
    tokens: int
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray  # columns, descending eigenvalue order
    layers: list[str]

    def covariance(self) -> np.ndarray:
        u = self.eigenvectors.astype(np.float64)
        return (u * self.eigenvalues) @ u.T


@dataclass
class Analysis:
    """Result of :func:`analyze` for one model."""

    model: dict
    calibration: dict
    layers: list[LayerAnalysis]
    groups: dict[str, InputGroup]
    specprune_version: str = __version__
    seconds: float = 0.0

    def layer(self, name: str) -> LayerAnalysis:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def group_of(self, name: str) -> InputGroup:
        return self.groups[self.layer(name).input_group]

    def to_dict(self) -> dict:
        return {"specprune_version": self.specprune_version, "model": self.model,
                "calibration": self.calibration, "layers": [lay.to_dict() for lay in self.layers],
                "seconds": round(self.seconds, 3)}

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
        meta = {"groups": json.dumps({k: {"tokens": g.tokens, "layers": g.layers} for k, g in self.groups.items()})}
        tmp = d / f".{SPECTRA_FILE}.tmp"
        save_file(arrays, str(tmp), metadata=meta)
        tmp.replace(d / SPECTRA_FILE)
        write_atomic(d / ANALYSIS_FILE, dumps(self.to_dict()))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Analysis":
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
                                     arrays[f"group.{key}.eigenvectors"], list(meta["layers"]))
        layers = []
        fields = set(LayerAnalysis.__dataclass_fields__) - {"eigenvalues", "mode_energy"}
        for ld in layers_doc:
            kw = {k: v for k, v in ld.items() if k in fields}
            lay = LayerAnalysis(**kw)
            lay.mode_energy = arrays.get(f"layer.{lay.name}.mode_energy")
            g = groups.get(lay.input_group)
            lay.eigenvalues = g.eigenvalues if g is not None else None
            layers.append(lay)
        return cls(doc.get("model", {}), doc.get("calibration", {}), layers, groups,
                   doc.get("specprune_version", __version__), float(doc.get("seconds", 0.0)))

    @property
    def has_spectra(self) -> bool:
        return bool(self.groups) and all(lay.mode_energy is not None for lay in self.layers)


def _eigh(gram: torch.Tensor, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of Σ = G/N in float64, descending; on the accumulator's device when it is a GPU
    (CPU fallback if the device solver fails)."""
    cov = gram / max(tokens, 1)
    cov = 0.5 * (cov + cov.T)
    try:
        evals, evecs = torch.linalg.eigh(cov)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(cov.cpu())
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    return evals.cpu().numpy(), evecs.cpu().numpy()


def summarize_layer(layer: TargetLayer, group: InputGroup, skipped: int = 0) -> LayerAnalysis:
    """Spectrum, fits and frontier of one layer from its input group's eigenpairs."""
    from .spectra import LayerSpectrum

    w = layer.weight_matrix().detach().to("cpu", torch.float64)
    wu = w @ torch.as_tensor(group.eigenvectors, dtype=torch.float64)
    gain = wu.pow(2).sum(0).numpy()  # ‖W u_k‖²
    spec = LayerSpectrum.from_eigen(group.eigenvalues, group.eigenvalues * gain, tokens=group.tokens,
                                    d_out=layer.d_out, mode_gain=gain)
    s = spec.summary_dict()
    flags = []
    if skipped:
        flags.append(f"nonfinite: {skipped} tokens with NaN/Inf features were left out")
    return LayerAnalysis(
        name=layer.name, type=layer.type, d_in=layer.d_in, d_out=layer.d_out, tokens=group.tokens,
        b=s["b"], a=s["a"], k_star=s["k_star"], k_max=s["k_max"], r_star=s["r_star"], fit=s["fit"],
        effective_rank=s.get("effective_rank"), input_group=group.key, skipped_tokens=skipped,
        flags=flags, eigenvalues=group.eigenvalues, mode_energy=np.asarray(spec.mode_energy))


def analyze(model: nn.Module, data: Any, *, include: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None, device: str | torch.device | None = None,
            source: str | None = None, tokenizer=None, samples: int = 128, seq_len: int = 128,
            batch_size: int = 8, seed: int = 0) -> Analysis:
    """Hook ``model``'s layers, stream ``data`` through it, and return every layer's spectrum.

    ``data``: a :class:`~specprune.data.Batches`, an iterable of batches (tensors or dicts), or
    paths to text/tensor files (then ``tokenizer``, ``samples``, ``seq_len``, ``batch_size``,
    ``seed`` apply). The model's outputs and parameters are unchanged; hooks are always removed.
    """
    from .data import Batches, from_iterable, load_data
    from .distributed import all_reduce_, all_reduce_scalars, is_distributed, shard
    from .models import model_device, num_parameters, resolve_device
    from .probe import run_probe
    from .progress import track

    t0 = time.perf_counter()
    if isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and data
                                          and isinstance(data[0], (str, Path))):
        paths = [data] if isinstance(data, (str, Path)) else list(data)
        batches = load_data(paths, tokenizer, samples=samples, seq_len=seq_len, batch_size=batch_size,
                            seed=seed)
    else:
        batches = from_iterable(data, seed) if not isinstance(data, Batches) else data
    layers = select_layers(model, include, exclude)
    dev = resolve_device(device) if device is not None and not isinstance(device, torch.device) else device
    original = model_device(model)
    moved = dev is not None and dev != original
    was_training = model.training
    model.eval()
    try:
        if moved:
            model.to(dev)
        probe = run_probe(model, layers, shard(batches.batches), dev or original)
        accs = probe.results()
        if is_distributed():
            for key in sorted(accs):  # same order on every rank
                acc = accs[key]
                if acc.gram is None:
                    acc.gram = torch.zeros(acc.d, acc.d, dtype=torch.float64, device=dev or original)
                all_reduce_(acc.gram)
                acc.tokens, acc.skipped_tokens = (int(v) for v in all_reduce_scalars(acc.tokens,
                                                                                     acc.skipped_tokens))
        groups: dict[str, InputGroup] = {}
        skipped: dict[str, int] = {}
        for key, acc in track(list(accs.items()), "eigensolves"):
            if acc.gram is None or acc.tokens == 0:
                raise InputError(f"layer {key} saw no finite features (all NaN/Inf or no tokens)")
            evals, evecs = _eigh(acc.gram, acc.tokens)
            groups[key] = InputGroup(key, acc.tokens, evals, evecs, list(acc.layers))
            skipped[key] = acc.skipped_tokens
            acc.gram = None  # free as we go: one accumulator's solve at a time
        out_layers = [summarize_layer(lay, groups[probe.layer_acc[lay.name]],
                                      skipped[probe.layer_acc[lay.name]])
                      for lay in track(layers, "fits")]
    finally:
        if moved:
            model.to(original)
        model.train(was_training)
    calib = batches.describe()
    info = {"source": source or type(model).__name__, "num_parameters": num_parameters(model),
            "architecture": type(model).__name__}
    return Analysis(info, calib, out_layers, groups, seconds=time.perf_counter() - t0)
