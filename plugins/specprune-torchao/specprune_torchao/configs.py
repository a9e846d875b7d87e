"""A torchao workflow config for specprune's integer grid: ``SymmetricWeightOnlyConfig``.

torchao's stock ``IntxWeightOnlyConfig(mapping_type=SYMMETRIC)`` uses the full two's-complement
range [−2^(B−1), 2^(B−1)−1] with s = max|w| / ((2^B − 1)/2), so its grid is finer by a factor
(q_max + ½)/q_max and the positive extreme is clipped by half a step. specprune's contract (and its
packed file format) is the symmetric range ±q_max, q_max = 2^(B−1) − 1, with

    s = max_{j∈group} |w_j| / q_max   (stored in float16, rounded up),   c_j = clamp(round(w_j / s), ±q_max),

exactly :func:`specprune.compress.quantize.quantize_weight`. ``SymmetricWeightOnlyConfig`` gives
torchao those scales (``custom_scale``) and lets torchao's own ``quantize_affine`` produce the
codes into an ``IntxUnpackedToInt8Tensor`` (torchao's weight-only intx tensor; its ``F.linear``
dequantizes per call), so the model runs through torchao and the integers fit specprune's format.
The only possible difference to specprune's RTN codes is torchao computing w·(1/s) instead of w/s:
one ulp, which can flip a value lying exactly on a rounding boundary (measured: none in the tests).

Usage, torchao style::

    from torchao.quantization import quantize_
    from specprune_torchao.configs import SymmetricWeightOnlyConfig
    quantize_(model, SymmetricWeightOnlyConfig(bits=4, group_size=32))

Importing this module imports torchao (one clear error when it is missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specprune.compress.quantize import qmax_for, stored_scales
from specprune.errors import InputError

from ._compat import api

_ao = api()

TORCHAO_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_layout(d_in: int, group_size: int | None, where: str = "") -> tuple[int, int]:
    """(G, groups per row) as specprune defines them (G = min(group_size, d_in); None = per
    channel). torchao blocks must tile the row, so G has to divide d_in."""
    if group_size is None:
        return d_in, 1
    if not isinstance(group_size, int) or group_size <= 0:
        raise InputError(f"group_size must be a positive integer or None, got {group_size!r}")
    g = min(group_size, d_in)
    if d_in % g:
        at = f" {where}" if where else ""
        raise InputError(f"torchao needs the group size to divide d_in: layer{at} has d_in = {d_in}, "
                         f"group_size = {group_size} (use a divisor, per-channel scales, or --backend fake)")
    return g, d_in // g


def specprune_scales(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """specprune's stored scales of a (d_out, d_in) matrix: max|w| per group / q_max, float16
    rounded up (float32 where float16 would overflow), shape (d_out, groups)."""
    d_out, d_in = w.shape
    g, n = group_layout(d_in, group_size)
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    absmax = w.detach().to(cd).reshape(d_out, n, g).abs().amax(dim=-1)
    return stored_scales(absmax, qmax_for(bits))


def symmetric_tensor(w: torch.Tensor, bits: int, group_size: int | None = None,
                     scales: torch.Tensor | None = None) -> torch.Tensor:
    """torchao ``IntxUnpackedToInt8Tensor`` of the (d_out, d_in) matrix ``w`` on specprune's grid.

    ``scales`` (d_out, groups): use these (e.g. recorded by specprune's fake quantization, so the
    codes are recovered exactly); None: computed as specprune does. A zero scale (an all-zero group)
    is given to torchao as 1, which quantizes that group to code 0 as specprune does. Weights in
    float64 are quantized in float32 (torchao's float types are float32/16/bfloat16)."""
    if w.dim() != 2:
        raise InputError(f"expected a (d_out, d_in) weight matrix, got shape {tuple(w.shape)}")
    qmax = qmax_for(bits)
    d_out, d_in = w.shape
    g, n = group_layout(d_in, group_size)
    if scales is None:
        scales = specprune_scales(w, bits, group_size)
    if tuple(scales.shape) != (d_out, n):
        raise InputError(f"scales of shape {tuple(scales.shape)} do not fit a {d_out}×{d_in} matrix with "
                         f"group size {group_size}")
    hp = w.detach() if w.dtype in TORCHAO_FLOAT_DTYPES else w.detach().to(torch.float32)
    s = scales.to(device=hp.device, dtype=torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zero = torch.zeros(d_out, n, dtype=torch.int8, device=hp.device)
    t = _ao.IntxUnpackedToInt8Tensor.from_hp(
        hp, (1, g), getattr(torch, f"int{bits}"), mapping_type=_ao.MappingType.SYMMETRIC,
        intx_choose_qparams_algorithm=None, custom_scale=safe, custom_zero_point=zero)
    if int(t.qdata.abs().max()) > qmax:  # cannot happen with s ≥ max|w|/q_max; guard the contract
        raise InputError(f"torchao produced codes outside ±{qmax} (scales too small for the weights)")
    return t


@dataclass
class SymmetricWeightOnlyConfig(_ao.AOBaseConfig):
    """Weight-only symmetric B-bit quantization (B = 2..8) on specprune's grid (module docstring).

    ``bits``: 2..8; ``group_size``: input columns per scale (None = one scale per output channel);
    ``scales``: fixed (d_out, groups) scales for a single module, None to compute them."""

    bits: int = 4
    group_size: int | None = None
    scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        qmax_for(self.bits)


@_ao.register_quantize_module_handler(SymmetricWeightOnlyConfig)
def _symmetric_weight_only_transform(module: nn.Module, config: SymmetricWeightOnlyConfig, *,
                                     parameter_name: str = "weight") -> nn.Module:
    """torchao handler: replace ``module.weight`` (an ``nn.Linear``'s (out, in) matrix) by its
    torchao tensor, in place."""
    weight = getattr(module, parameter_name, None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InputError(f"SymmetricWeightOnlyConfig needs a 2-D {parameter_name!r} "
                         f"(got {type(module).__name__})")
    t = symmetric_tensor(weight.detach(), config.bits, config.group_size, config.scales)
    setattr(module, parameter_name, nn.Parameter(t, requires_grad=False))
    return module
