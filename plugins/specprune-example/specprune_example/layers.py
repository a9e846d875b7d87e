"""A layer type and its adapter, so specprune can analyse and compress it.

``ChannelLinear`` applies one matrix along dim 1 of (batch, channels, length) tensors — a 1×1
convolution kept as a (d_out, d_in) matrix, common in audio and time-series models:

    y[b, :, l] = W x[b, :, l] + bias.

An adapter tells specprune how to read such a layer (Linear, Conv1D and Conv adapters are
built in): ``matches`` the module type; ``d_in``/``d_out``; ``weight_matrix`` as (d_out, d_in)
with y = W x; ``set_weight_matrix`` to write one back (same dtype, in place); and ``features``,
which turns the input the forward hook sees into the (tokens, d_in) rows whose covariance Σ is
measured — here every (batch, position) pair is one token. ``token_shaped = False`` because the
channel axis is not last, so attention masks over the leading dimensions do not apply.

Registered as ``channel-linear`` (entry-point group ``specprune.adapters``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ChannelLinear(nn.Module):
    """y[b, :, l] = W x[b, :, l] + bias for inputs of shape (batch, in_channels, length)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("oi,bil->bol", self.weight, x)
        return y if self.bias is None else y + self.bias[:, None]


class ChannelLinearAdapter:
    """specprune adapter for :class:`ChannelLinear` (see the module docstring)."""

    name = "channel-linear"
    token_shaped = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ChannelLinear)

    def d_in(self, module: ChannelLinear) -> int:
        return module.in_channels

    def d_out(self, module: ChannelLinear) -> int:
        return module.out_channels

    def weight_matrix(self, module: ChannelLinear) -> torch.Tensor:
        return module.weight.detach()

    def set_weight_matrix(self, module: ChannelLinear, w: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype).reshape(module.weight.shape))

    def features(self, module: ChannelLinear, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, -1).reshape(-1, module.in_channels)
