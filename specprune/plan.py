"""Plan / LayerPlan: what to do to each layer, and what specprune predicts it will cost.

A plan is plain, versioned JSON (``format: 1``) that a user can edit by hand and
``specprune apply`` applies. Per layer:

* ``method``: the pruning method (``spectral``, ``whitened``, ``magnitude`` or a plugin
  compressor), or null for no pruning;
* ``prune_rate``: fraction of the layer's weight parameters removed (for a low-rank
  factorization 1 − k(d_in + d_out)/(d_in·d_out), floored at 0; for unstructured methods the
  fraction of weights zeroed);
* ``rank``: kept rank k for low-rank methods (null = not factorized);
* ``bits``: integer width 2..8 of symmetric round-to-nearest quantization, integers in
  ±(2^(B−1)−1), or null to keep the dtype; ``group_size``: input columns per scale (null = one
  scale per output channel);
* ``predicted_delta``: the layer's additive share of the model-level prediction.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .io import dumps, read_json_doc, write_atomic

PLAN_FORMAT = 1
BITS_RANGE = (2, 8)


def _finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _integer(v) -> bool:
    """An integer and not a bool (JSON ``true`` would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def settings_digest(layers: dict) -> str:
    """A digest of what a plan does to each layer (method, rank — or the rate while no rank is resolved —,
    bits, group size; LayerPlans or their JSON dicts): the recommender records it with its prediction, so that
    a plan edited by hand afterwards is known not to be the plan that was predicted."""
    import hashlib

    rows = []
    for name in sorted(layers):
        lp = layers[name]
        get = lp.get if isinstance(lp, dict) else (lambda k, lp=lp: getattr(lp, k, None))
        rank, rate = get("rank"), get("prune_rate") or 0.0
        cut = rank if rank is not None else (round(float(rate), 9) if _finite_number(rate) and rate else None)
        rows.append([str(name), get("method"), cut, get("bits"), get("group_size")])
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def edited_since_prediction(doc: dict) -> bool:
    """True for a plan (JSON dict) whose layer settings differ from those its prediction was made for."""
    made = (doc.get("details") or {}).get("predicted_settings") if isinstance(doc, dict) else None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    return isinstance(made, str) and isinstance(layers, dict) and made != settings_digest(layers)


@dataclass
class LayerPlan:
    method: str | None = None
    prune_rate: float = 0.0
    rank: int | None = None
    bits: int | None = None
    group_size: int | None = None
    predicted_delta: float = 0.0

    @property
    def is_noop(self) -> bool:
        return self.method is None and self.bits is None and not self.prune_rate

    def validate(self, name: str) -> None:
        if self.bits is not None:
            if not _integer(self.bits) or not BITS_RANGE[0] <= self.bits <= BITS_RANGE[1]:
                raise InputError(f"plan layer {name}: bits must be an integer in 2..8 or null, got {self.bits!r}")
        if self.group_size is not None and (not _integer(self.group_size) or self.group_size <= 0):
            raise InputError(f"plan layer {name}: group_size must be a positive integer or null")
        if not _finite_number(self.prune_rate) or not 0.0 <= float(self.prune_rate) < 1.0:
            raise InputError(f"plan layer {name}: prune_rate must be in [0, 1), got {self.prune_rate!r}")
        if self.rank is not None and (not _integer(self.rank) or self.rank <= 0):
            raise InputError(f"plan layer {name}: rank must be a positive integer or null")
        if self.method is None and (self.rank is not None or self.prune_rate):
            raise InputError(f"plan layer {name}: prune_rate/rank given without a method")
        if self.method is not None and not isinstance(self.method, str):
            raise InputError(f"plan layer {name}: method must be a string or null")
        if not _finite_number(self.predicted_delta):
            raise InputError(f"plan layer {name}: predicted_delta must be a finite number")


@dataclass
class Plan:
    """A per-layer compression plan with its prediction (contract: plan.json)."""

    model: dict
    tolerance: float
    metric: str
    layers: dict[str, LayerPlan]
    calibrated: bool = False
    predicted_delta: float = 0.0
    predicted_delta_uncertainty: float = 0.0
    size: dict = field(default_factory=dict)
    format: int = PLAN_FORMAT
    details: dict = field(default_factory=dict)  # how the prediction was made (free-form, documented)

    def to_dict(self) -> dict:
        return {"format": self.format, "model": self.model, "tolerance": self.tolerance, "metric": self.metric,
                "calibrated": self.calibrated, "predicted_delta": self.predicted_delta,
                "predicted_delta_uncertainty": self.predicted_delta_uncertainty,
                "layers": {n: asdict(lp) for n, lp in self.layers.items()}, "size": self.size,
                "details": self.details}

    def __repr__(self) -> str:
        """One line: the prediction, what the plan does and its size (``to_dict()`` holds everything; the
        dataclass repr printed ``details``, kilobytes of it)."""
        quantized = sum(lp.bits is not None for lp in self.layers.values())
        pruned = sum(lp.method is not None for lp in self.layers.values())
        def num(v, spec: str) -> str:  # a hand-built plan may hold anything: repr must not raise
            return format(v, spec) if _finite_number(v) else repr(v)

        pred = "none" if self.prediction is None else \
            f"{num(self.predicted_delta, '.4g')} ± {num(self.predicted_delta_uncertainty, '.2g')}"
        size = ""
        if isinstance(self.size, dict) and self.size.get("bits_before") and "bits_after" in self.size:
            size = f", bits {self.size['bits_before']} → {self.size['bits_after']}"
        return (f"Plan(metric={self.metric!r}, tolerance={num(self.tolerance, 'g')}, predicted_delta={pred}, "
                f"calibrated={self.calibrated}, layers={len(self.layers)} ({pruned} pruned, {quantized} quantized)"
                f"{size})")

    def save(self, path: str | Path, inputs=(), overwrite: bool = True) -> Path:
        if Path(path).is_dir():
            raise InputError(f"{path} is a directory: give the plan file's path (e.g. {Path(path) / 'plan.json'})")
        return write_atomic(path, dumps(self.to_dict()), inputs=inputs, overwrite=overwrite)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "plan") -> "Plan":
        if not isinstance(doc, dict):
            raise InputError(f"{where} is not a JSON object")
        if doc.get("format") != PLAN_FORMAT:
            raise InputError(f"{where}: unsupported plan format {doc.get('format')!r} (expected {PLAN_FORMAT})")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, dict):
            raise InputError(f"{where}: 'layers' must be an object of layer name → settings")
        layers = {}
        known = set(LayerPlan.__dataclass_fields__)
        for name, ld in layers_doc.items():
            if not isinstance(ld, dict):
                raise InputError(f"{where}: layer {name} must be an object")
            unknown = set(ld) - known
            if unknown:
                raise InputError(f"{where}: layer {name} has unknown field(s) {', '.join(sorted(unknown))}")
            lp = LayerPlan(**ld)
            lp.validate(name)
            layers[name] = lp
        numbers = {}
        for key in ("tolerance", "predicted_delta", "predicted_delta_uncertainty"):
            v = doc.get(key, 0.0)
            if not _finite_number(v):
                raise InputError(f"{where}: {key} must be a finite number, got {v!r}")
            numbers[key] = float(v)
        if not all(isinstance(doc.get(k) or {}, dict) for k in ("model", "size", "details")):
            raise InputError(f"{where}: 'model', 'size' and 'details' must be objects")
        return cls(model=dict(doc.get("model") or {}), tolerance=numbers["tolerance"],
                   # a plan without a prediction of its own (hand-written) predicts nothing: metric "none"
                   metric=str(doc.get("metric", "auto" if "predicted_delta" in doc else "none")),
                   layers=layers, calibrated=bool(doc.get("calibrated", False)),
                   predicted_delta=numbers["predicted_delta"],
                   predicted_delta_uncertainty=numbers["predicted_delta_uncertainty"],
                   size=dict(doc.get("size") or {}), details=dict(doc.get("details") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        doc = read_json_doc(path, "plan.json", "plan")
        return cls.from_dict(doc, str(path))

    @property
    def edited(self) -> bool:
        """True when the layer settings differ from those the recommender predicted (edited by hand)."""
        return edited_since_prediction({"details": self.details, "layers": self.layers})

    @property
    def prediction(self) -> float | None:
        """The predicted delta, or None for a plan that made no prediction (metric "none": the ``--rate`` /
        ``--bits`` shortcuts and hand-written plans) or whose layers were edited after it (:attr:`edited`:
        the prediction is of the plan as recommended, not of this one)."""
        return None if self.metric == "none" or self.edited else self.predicted_delta

    @classmethod
    def uniform(cls, layer_names, *, rate: float | None = None, bits: int | None = None,
                group_size: int | None = None, method: str = "spectral", source: str = "",
                fingerprint: str = "") -> "Plan":
        """The same setting on every named layer (``--rate``/``--bits`` shortcuts). For low-rank
        methods ``rate`` is turned into a rank per layer by :func:`specprune.compress.apply.apply_`."""
        if rate is not None and (not _finite_number(rate) or not 0.0 <= rate < 1.0):
            raise InputError(f"--rate must be in [0, 1), got {rate}")
        if bits is not None and (not _integer(bits) or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]):
            raise InputError(f"--bits must be in 2..8, got {bits}")
        layers = {n: LayerPlan(method=method if rate else None, prune_rate=float(rate or 0.0), bits=bits,
                               group_size=group_size if bits else None) for n in layer_names}
        return cls(model={"source": source, "fingerprint": fingerprint}, tolerance=0.0, metric="none",
                   layers=layers)
