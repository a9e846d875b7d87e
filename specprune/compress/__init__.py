"""Compression: apply a plan (low-rank / magnitude pruning, RTN quantization) and save/load the result.

* :mod:`.quantize` — symmetric round-to-nearest int2..int8, per channel or per group;
* :mod:`.prune` — ``spectral`` and ``whitened`` low-rank truncation, ``magnitude`` pruning,
  factorized modules, rank ↔ prune-rate conversion;
* :mod:`.apply` — ``apply_(model, plan)`` in place with undo on failure, ``plan_size``;
* :mod:`.saved` — ``save_compressed`` / ``load_saved`` / ``load`` (packed integer weights);
* :mod:`.pack` — bit packing of B-bit codes.

Submodules are imported on first use, so ``import specprune.compress`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = [
    "Factorized",
    "FactorizedConv",
    "FactorizedLinear",
    "QuantizedWeight",
    "apply_",
    "layer_size",
    "load",
    "load_saved",
    "plan_size",
    "prune_rate_for_rank",
    "quantization_error",
    "quantize_weight",
    "rank_for_rate",
    "save_compressed",
    "spectral_factors",
    "whitened_factors",
    "whitened_singular_values",
]

_WHERE = {
    "apply_": "apply", "plan_size": "apply", "layer_size": "apply",
    "save_compressed": "saved", "load_saved": "saved", "load": "saved",
    "quantize_weight": "quantize", "quantization_error": "quantize", "QuantizedWeight": "quantize",
    "rank_for_rate": "prune", "prune_rate_for_rank": "prune", "spectral_factors": "prune",
    "whitened_factors": "prune", "whitened_singular_values": "prune", "FactorizedLinear": "prune",
    "FactorizedConv": "prune", "Factorized": "prune",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'specprune.compress' has no attribute {name!r}")
