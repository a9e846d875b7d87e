"""specprune-example: a minimal specprune plugin package, one object of each kind it can register.

* ``specprune.evolution``: ``warmup`` — g(λ, t) = C λ^m t^n · t/(t+τ) (:mod:`.evolution`);
* ``specprune.metrics``: ``next-token-error`` — top-1 next-token error rate (:mod:`.metrics`);
* ``specprune.adapters``: ``channel-linear`` — a matrix applied along the channel axis (:mod:`.layers`).

(Compressors are the fourth kind; see the specprune-wanda and specprune-torchao plugins.)
The entry points live in this package's pyproject.toml; docs/plugins.md walks through it.
"""

from __future__ import annotations

from .evolution import Warmup, warmup_factory
from .layers import ChannelLinear, ChannelLinearAdapter
from .metrics import next_token_error

__version__ = "0.1.0"

__all__ = [
           "ChannelLinear",
           "ChannelLinearAdapter",
           "Warmup",
           "__version__",
           "next_token_error",
           "warmup_factory",
]
