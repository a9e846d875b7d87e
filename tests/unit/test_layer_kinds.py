"""Layer kinds beyond the usual: convolutions with string padding or unbatched input, and the stock
nn.MultiheadAttention whose out_proj is applied through its weight (never called)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specprune.analysis import analyze
from specprune.errors import InputError
from specprune.layers import ConvAdapter, functional_layer_names, select_layers


def _conv_from_features(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution recomputed from the adapter's patches: features @ Wᵀ, one row per position."""
    cols = ConvAdapter().features(conv, x)
    return cols @ conv.weight.detach().reshape(conv.out_channels, -1).T


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3, padding="same", bias=False), (2, 3, 7, 6)),
    (lambda: nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2), bias=False), (2, 3, 7, 9)),  # even spans
    (lambda: nn.Conv2d(3, 4, 3, padding="valid", stride=2, bias=False), (2, 3, 9, 8)),
    (lambda: nn.Conv1d(3, 4, 4, padding="same", bias=False), (2, 3, 11)),
    (lambda: nn.Conv1d(3, 4, 3, padding="valid", dilation=2, bias=False), (2, 3, 11)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (3, 7, 6)),  # unbatched (C, H, W)
    (lambda: nn.Conv1d(3, 4, 3, padding=2, bias=False), (3, 10)),  # unbatched (C, L)
], ids=["2d-same", "2d-same-even", "2d-valid", "1d-same-even", "1d-valid", "2d-unbatched", "1d-unbatched"])
def test_conv_patches_reproduce_the_convolution(make, shape):
    torch.manual_seed(0)
    conv, x = make(), torch.randn(*shape)
    unbatched = x.dim() == (2 if isinstance(conv, nn.Conv1d) else 3)
    want = conv(x.unsqueeze(0) if unbatched else x).detach()
    if unbatched:
        assert torch.equal(conv(x).detach(), want[0])
    want = want.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)  # (B·positions, C_out)
    assert torch.allclose(_conv_from_features(conv, x), want, atol=1e-5)


def test_string_padding_and_unbatched_convs_analyze():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 4, 2, padding="valid"))
    result = analyze(model, [torch.randn(2, 3, 8, 8) for _ in range(3)])
    assert [lay.tokens for lay in result.layers] == [3 * 2 * 64, 3 * 2 * 49]
    unbatched = analyze(model, [torch.randn(3, 8, 8) for _ in range(3)])
    assert [lay.tokens for lay in unbatched.layers] == [3 * 64, 3 * 49]


def test_multihead_attention_out_proj_is_not_a_target():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
                          nn.Linear(32, 4)).eval()
    assert functional_layer_names(model) == {"1.self_attn.out_proj"}
    names = [t.name for t in select_layers(model)]
    assert names == ["0", "1.linear1", "1.linear2", "2"]
    result = analyze(model, [torch.randn(4, 10, 16) for _ in range(3)])
    assert [lay.name for lay in result.layers] == names and all(lay.tokens == 120 for lay in result.layers)
    with pytest.raises(InputError, match=r"matches no supported layer \(1.self_attn.out_proj is "
                                         r"nn.MultiheadAttention's out_proj"):
        select_layers(model, include=["re:.*out_proj"])
    bare = nn.MultiheadAttention(8, 2)
    assert functional_layer_names(bare) == {"out_proj"}
