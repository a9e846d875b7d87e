"""Symmetric round-to-nearest (RTN) integer quantization of weight matrices, B = 2..8 bits.

For a weight matrix W (d_out × d_in, y = W x) and a group of G consecutive input columns of one
output row (G = d_in, i.e. one group per row, when ``group_size`` is None: per-channel scales):

    q_max = 2^(B−1) − 1,       s = max_{j∈group} |w_j| / q_max,
    c_j   = clamp(round(w_j / s), −q_max, q_max),       ŵ_j = s · c_j,

so the integers are symmetric (the level −2^(B−1) is never used) and |ŵ_j − w_j| ≤ s/2.
When d_in is not a multiple of G the last group of each row is shorter: the matrix is padded
logically with zero columns (which cannot change a max |w|) and the padding is dropped again.
A group with max |w| = 0 gets s = 0 and codes 0, so it dequantizes to exact zeros (no NaN).

Scales are stored in float16 (the contract counts one 16-bit scale per group or channel). The
float16 scale is rounded *up* (to the next representable value when rounding to nearest went
down), so max|w|/s ≤ q_max still holds and every code stays in range; the only effect is a grid
coarser by at most one float16 ulp (relative 2^-11 for normal values). The codes are computed
with that stored scale, so dequantization from the saved file reproduces the fake-quantized
weights exactly. Only if a scale does not fit float16 does the layer fall back to float32 scales:
one that overflows (|w| > 65504·q_max), or a nonzero one below 2^-17 (a group's max |w| < 2^-17·q_max,
e.g. 9.7e-4 at int8), where float16's subnormal spacing 2^-24 would coarsen the grid by more than 2^-7
and, further down, by as much as the scale itself: int8 weights of std 1e-7 kept 6 of their 127 levels
and those of std 1e-8 were zeroed (99% error). Subnormal scales above that bound (int8 groups with max
|w| in 1e-3..8e-3 are ordinary) cost at most 0.8% more RMS error and stay 16-bit. A layer with float32
scales takes 16 bits per scale more than ``plan.size`` counts.

``quantization_error`` returns ΔW = Ŵ − W with the same arithmetic and no Python loop over rows, so
the recommender can score tr(ΔW Σ ΔWᵀ) for many candidates cheaply.

Fake quantization (:func:`fake_quantize_`) writes Ŵ back into the module in its own dtype and
records the float16 scales on the module (attribute ``specprune_quant``) so that
:mod:`specprune.compress.saved` can re-derive the integer codes exactly and pack them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

QUANT_ATTR = "specprune_quant"
SCALE_DTYPE = torch.float16
#: Nonzero scales below this fall back to float32 (float16's subnormal spacing 2^-24 would make them coarse).
SCALE_FLOOR = 2.0 ** -17


def qmax_for(bits: int) -> int:
    """Largest code magnitude 2^(B−1) − 1 of symmetric B-bit quantization."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise InputError(f"bits must be an integer in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _group(d_in: int, group_size: int | None) -> tuple[int, int]:
    """(G, number of groups per row)."""
    if group_size is None:
        return max(d_in, 1), 1
    if not isinstance(group_size, int) or group_size <= 0:
        raise InputError(f"group_size must be a positive integer or None, got {group_size!r}")
    g = min(group_size, max(d_in, 1))
    return g, -(-d_in // g)


def _grouped(w: torch.Tensor, g: int, n_groups: int) -> torch.Tensor:
    """(d_out, d_in) → (d_out, n_groups, G), zero-padded on the right."""
    d_out, d_in = w.shape
    pad = n_groups * g - d_in
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(d_out, n_groups, g)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def stored_scales(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scales s = absmax/q_max as stored: float16 rounded up (float32 if any overflows float16 or
    lies below :data:`SCALE_FLOOR`, see the module docstring)."""
    s = absmax.to(torch.float32) / qmax
    s16 = s.to(SCALE_DTYPE)
    if not torch.isfinite(s16).all() or bool(((s > 0) & (s < SCALE_FLOOR)).any()):
        return s
    low = s16.to(torch.float32) < s
    if low.any():
        try:
            up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
        except RuntimeError:  # no half-precision nextafter on this device: the scales are small
            up = torch.nextafter(s16.cpu(), torch.full((), float("inf"), dtype=s16.dtype)).to(s16.device)
        s16 = torch.where(low, up, s16)
    return s16


@dataclass
class QuantizedWeight:
    """Integer codes and scales of one quantized (d_out, d_in) matrix.

    ``codes``: int8 (d_out, d_in) in ±q_max; ``scales``: (d_out, n_groups) float16 (float32 on
    overflow); ``group_size``: None = per output channel."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = s · c per group, computed in float32 (float64 if asked) and cast to ``dtype``."""
        d_out, d_in = self.codes.shape
        g, n_groups = _group(d_in, self.group_size)
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        c = _grouped(self.codes.to(cd), g, n_groups)
        w = (c * self.scales.to(device=c.device, dtype=cd).reshape(d_out, n_groups, 1))
        return w.reshape(d_out, n_groups * g)[:, :d_in].to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric RTN quantization of a (d_out, d_in) matrix (see the module docstring)."""
    qmax = qmax_for(bits)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a (d_out, d_in) matrix, got shape {tuple(w.shape)}")
    d_out, d_in = w.shape
    g, n_groups = _group(d_in, group_size)
    wg = _grouped(w.detach().to(_compute_dtype(w)), g, n_groups)
    scales = stored_scales(wg.abs().amax(dim=-1), qmax)
    codes = _codes(wg, scales, qmax)
    return QuantizedWeight(codes.reshape(d_out, n_groups * g)[:, :d_in].to(torch.int8).contiguous(),
                           scales, bits, group_size)


def _codes(wg: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    s = scales.to(device=wg.device, dtype=wg.dtype).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(wg / safe).clamp_(-qmax, qmax)


def quantization_error(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """ΔW = Ŵ − W (float32, or float64 for a float64 input), same shape and device as ``w``.

    Vectorised over all rows and groups; the recommender scores tr(ΔW Σ ΔWᵀ) with it."""
    qmax = qmax_for(bits)
    if w.dim() != 2:
        raise ValueError(f"quantization_error expects a (d_out, d_in) matrix, got shape {tuple(w.shape)}")
    d_out, d_in = w.shape
    g, n_groups = _group(d_in, group_size)
    wg = _grouped(w.detach().to(_compute_dtype(w)), g, n_groups)
    scales = stored_scales(wg.abs().amax(dim=-1), qmax)
    deq = _codes(wg, scales, qmax) * scales.to(device=wg.device, dtype=wg.dtype).unsqueeze(-1)
    return (deq - wg).reshape(d_out, n_groups * g)[:, :d_in]


def codes_with_scales(w: torch.Tensor, bits: int, group_size: int | None,
                      scales: torch.Tensor) -> QuantizedWeight:
    """Codes of ``w`` on a given scale grid (used to recover the integers of an already
    fake-quantized weight from its recorded scales: round(ŵ/s) = c exactly, even after ŵ was
    rounded to bf16/fp16, because |c|·2^-9 < 1/2 for |c| ≤ 127)."""
    qmax = qmax_for(bits)
    d_out, d_in = w.shape
    g, n_groups = _group(d_in, group_size)
    if tuple(scales.shape) != (d_out, n_groups):
        raise InputError(f"scales of shape {tuple(scales.shape)} do not fit a {d_out}×{d_in} matrix "
                         f"with group size {group_size}")
    wg = _grouped(w.detach().to(_compute_dtype(w)), g, n_groups)
    codes = _codes(wg, scales, qmax)
    return QuantizedWeight(codes.reshape(d_out, n_groups * g)[:, :d_in].to(torch.int8).contiguous(),
                           scales, bits, group_size)


@dataclass
class QuantRecord:
    """What fake quantization left on a module: enough to re-derive codes exactly at save time."""

    bits: int
    group_size: int | None
    scales: torch.Tensor  # (d_out, n_groups), stored dtype, CPU


def quantizable_modules(module: nn.Module) -> list[nn.Module]:
    """The weight-bearing modules to quantize: both factors of a factorized layer, else itself."""
    from .prune import Factorized

    if isinstance(module, Factorized):
        return [module.first, module.second]
    return [module]


def fake_quantize_(module: nn.Module, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Replace the module's weight by its RTN dequantization (in the weight's own dtype, in place)
    and record the scales on the module. Supports Linear, HF Conv1D and Conv1d/2d (any module a
    layer adapter reads as a (d_out, d_in) matrix)."""
    from ..layers import adapter_for

    adapter = adapter_for(module)
    if adapter is None:
        raise InputError(f"cannot quantize a {type(module).__name__}: no layer adapter reads its weight")
    w = adapter.weight_matrix(module)
    qw = quantize_weight(w, bits, group_size)
    adapter.set_weight_matrix(module, qw.dequantize(torch.float64 if w.dtype == torch.float64
                                                    else torch.float32).to(w.device))
    setattr(module, QUANT_ATTR, QuantRecord(bits, group_size, qw.scales.detach().to("cpu")))
    return qw


class RTNQuantizer:
    """The ``rtn`` compressor: fake-quantize a layer (both factors when it is factorized) to
    ``layer_plan.bits`` with ``layer_plan.group_size`` (see :mod:`specprune.compress.apply` for the
    compressor protocol)."""

    name = "rtn"
    kind = "quantize"
    needs_covariance = False
    low_rank = False

    def apply(self, layer, layer_plan, covariance=None) -> None:
        if layer_plan.bits is None:
            return
        for sub in quantizable_modules(layer.module):
            fake_quantize_(sub, int(layer_plan.bits), layer_plan.group_size)
        return
