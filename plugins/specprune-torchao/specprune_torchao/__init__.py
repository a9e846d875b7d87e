"""specprune-torchao: a torchao quantization backend for specprune.

* ``specprune quantize MODEL --bits B [--group-size G] --backend torchao --out DIR``, or a plan
  layer with ``"method": "torchao"``: weight-only B-bit (2..8) quantization by torchao on
  specprune's symmetric grid, saved in specprune's packed format (:class:`TorchaoQuantizer`).
* Python: :func:`to_torchao_` (a quantized model → torchao tensors for inference),
  :func:`quantize_model_` (torchao's stock int8 / intx / int4 weight-only configs),
  :func:`save_torchao` / :func:`load_torchao`, and ``configs.SymmetricWeightOnlyConfig`` for
  ``torchao.quantization.quantize_``.

Importing this package does not import torchao; anything that needs it raises
:class:`TorchaoUnavailable` with the install hint when it is missing.
"""

from __future__ import annotations

from ._compat import (
                      TORCHAO_REQUIREMENT,
                      TorchaoUnavailable,
                      in_tested_range,
                      require_torchao,
                      torchao_version,
)
from .backend import (
                      TorchaoQuantizer,
                      TorchaoWeight,
                      int4_kernel_available,
                      load_torchao,
                      quantize_matrix,
                      quantize_model_,
                      save_torchao,
                      stock_config,
                      tensor_parts,
                      to_torchao_,
                      torchao_fake_quantize_,
)

__version__ = "0.1.0"

__all__ = [
                      "TORCHAO_REQUIREMENT",
                      "TorchaoQuantizer",
                      "TorchaoUnavailable",
                      "TorchaoWeight",
                      "__version__",
                      "in_tested_range",
                      "int4_kernel_available",
                      "load_torchao",
                      "quantize_matrix",
                      "quantize_model_",
                      "require_torchao",
                      "save_torchao",
                      "stock_config",
                      "tensor_parts",
                      "to_torchao_",
                      "torchao_fake_quantize_",
                      "torchao_version",
]
