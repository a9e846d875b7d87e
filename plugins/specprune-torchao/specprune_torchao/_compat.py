"""Finding torchao: the tested version range, a quiet import, and one clear error when it is missing.

Importing this package never imports torchao (``specprune plugins`` must list the backend even
where torchao is absent); every function that needs it calls :func:`require_torchao` first.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from importlib import metadata
from types import ModuleType, SimpleNamespace

from specprune.errors import SpecpruneError

#: The torchao versions this plugin was tested with (CPU, torch 2.13). Keep in sync with pyproject.toml.
TORCHAO_REQUIREMENT = "torchao>=0.15,<0.19"
TESTED_RANGE = ((0, 15), (0, 19))  # [low, high)
INSTALL_HINT = f"pip install 'specprune-torchao' (or pip install '{TORCHAO_REQUIREMENT}')"

_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
_warned_untested = False


class TorchaoUnavailable(SpecpruneError):
    """torchao is missing, or lacks an API the backend needs: one line with the install hint."""


def torchao_version() -> str | None:
    """The installed torchao version string, or None when it is not installed."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def _version_tuple(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def in_tested_range(version: str) -> bool:
    """Whether ``version`` lies in :data:`TESTED_RANGE`."""
    low, high = TESTED_RANGE
    return low <= _version_tuple(version) < high


def require_torchao() -> ModuleType:
    """Import torchao (its quantization API included) without its import-time log noise, or raise
    :class:`TorchaoUnavailable` naming the tested range. A version outside the range warns once
    and is used if its API fits."""
    global _warned_untested
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _QUIET_LOGGERS)]
    try:
        for lg, _ in saved:  # torchao logs failed optional CUDA extensions at import; not our user's concern
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            import torchao.quantization
    except ImportError as err:
        found = torchao_version()
        what = "is not installed" if found is None else f"{found} failed to import ({err})"
        raise TorchaoUnavailable(f"the torchao backend needs torchao, which {what}: {INSTALL_HINT}") from None
    finally:
        for lg, level in saved:
            lg.setLevel(level)
    version = torchao_version() or getattr(torchao, "__version__", "unknown")
    if not in_tested_range(version) and not _warned_untested:
        _warned_untested = True
        warnings.warn(f"torchao {version} is outside the range specprune-torchao was tested with "
                      f"({TORCHAO_REQUIREMENT})", RuntimeWarning, stacklevel=2)
    return torchao


@functools.cache
def api() -> SimpleNamespace:
    """The torchao objects the backend uses, imported together (one clear error if any is missing)."""
    require_torchao()
    try:
        from torchao.core.config import AOBaseConfig
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor
        from torchao.quantization.transform_module import register_quantize_module_handler
    except ImportError as err:
        raise TorchaoUnavailable(f"torchao {torchao_version()} lacks an API the backend needs ({err}); "
                                 f"{INSTALL_HINT}") from None
    return SimpleNamespace(AOBaseConfig=AOBaseConfig, Int8WeightOnlyConfig=Int8WeightOnlyConfig,
                           IntxWeightOnlyConfig=IntxWeightOnlyConfig, quantize_=quantize_, PerAxis=PerAxis,
                           PerGroup=PerGroup, MappingType=MappingType,
                           IntxUnpackedToInt8Tensor=IntxUnpackedToInt8Tensor,
                           register_quantize_module_handler=register_quantize_module_handler)
