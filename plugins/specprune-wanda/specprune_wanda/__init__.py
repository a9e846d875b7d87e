"""specprune-wanda: activation-aware unstructured pruning (Wanda) as a specprune compressor.

``specprune prune MODEL --rate R --method wanda --data TEXT --out DIR`` zeros, in every output row
of every targeted layer, the weights with the lowest |W_ij|·‖x_j‖, with ‖x_j‖ from the diagonal of
the input covariance specprune's probe collects (see :mod:`specprune_wanda.wanda`).
"""

from __future__ import annotations

from .wanda import (
                    WandaPruner,
                    covariance_diagonal,
                    prune_counts,
                    wanda_delta,
                    wanda_distortion,
                    wanda_mask,
                    wanda_scores,
)

__version__ = "0.1.0"

__all__ = [
                    "WandaPruner",
                    "__version__",
                    "covariance_diagonal",
                    "prune_counts",
                    "wanda_delta",
                    "wanda_distortion",
                    "wanda_mask",
                    "wanda_scores",
]
