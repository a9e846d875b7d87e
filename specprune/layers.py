"""Target layers: which modules specprune analyses and how it reads them.

An adapter knows one family of layer types: how to read the weight as a (d_out, d_in)
matrix W acting on input features x (y = W x), how to write it back, and how to turn the
input a forward hook sees into a (tokens, d_in) feature matrix.

* ``nn.Linear``: x is the last dimension of the input.
* HF ``Conv1D`` (GPT-2): ``weight`` is stored (d_in, d_out); W = weightᵀ.
* ``nn.Conv1d/2d``: features are the unfolded patches the convolution sees (same kernel,
  stride, padding and dilation, zero-padding included), so d_in = C_in/groups · ∏kernel.
  For ``groups > 1`` every group's patches are pooled as extra samples of one
  (C_in/groups · ∏kernel)-dimensional space and W stacks the groups' output rows; that is
  exact for groups = 1 and the usual pooled approximation otherwise.

Selection follows the contract: every supported layer except an output head whose weight
is tied to an input embedding; ``include``/``exclude`` patterns are a qualified name, a
dotted suffix, or ``re:REGEX`` (``re.fullmatch``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


class LinearAdapter:
    """``nn.Linear`` (and subclasses such as NonDynamicallyQuantizableLinear)."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def d_in(self, module) -> int:
        return module.in_features

    def d_out(self, module) -> int:
        return module.out_features

    def weight_matrix(self, module) -> torch.Tensor:
        return module.weight.detach()

    def set_weight_matrix(self, module, w: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype).reshape(module.weight.shape))

    def features(self, module, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    token_shaped = True  # input is (..., d_in): attention masks over the leading dims apply


class HFConv1DAdapter(LinearAdapter):
    """transformers' ``Conv1D`` (GPT-2 family): y = x @ weight + bias, weight is (d_in, d_out)."""

    name = "conv1d-hf"

    def matches(self, module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")

    def d_in(self, module) -> int:
        return module.weight.shape[0]

    def d_out(self, module) -> int:
        return module.weight.shape[1]

    def weight_matrix(self, module) -> torch.Tensor:
        return module.weight.detach().t()

    def set_weight_matrix(self, module, w: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(w.t().to(module.weight.dtype))


class ConvAdapter:
    """``nn.Conv1d`` / ``nn.Conv2d`` through their unfolded input patches."""

    name = "conv"
    token_shaped = False

    def matches(self, module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))

    def d_in(self, module) -> int:
        return module.weight[0].numel()  # C_in/groups · ∏kernel

    def d_out(self, module) -> int:
        return module.out_channels

    def weight_matrix(self, module) -> torch.Tensor:
        return module.weight.detach().reshape(module.out_channels, -1)

    def set_weight_matrix(self, module, w: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype).reshape(module.weight.shape))

    def features(self, module, x: torch.Tensor) -> torch.Tensor:
        """The patches the convolution multiplies, one row per output position (and group). Unbatched input
        ((C, L) or (C, H, W), which the convolution accepts) is one sample; ``padding='valid'`` is no padding,
        ``'same'`` PyTorch's split of d·(k−1) per side (the odd one on the right)."""
        one_d = isinstance(module, nn.Conv1d)
        if x.dim() == (2 if one_d else 3):
            x = x.unsqueeze(0)
        if one_d:
            x = x.unsqueeze(2)
            k, s, d = (1, module.kernel_size[0]), (1, module.stride[0]), (1, module.dilation[0])
        else:
            k, s, d = module.kernel_size, module.stride, module.dilation
        if module.padding_mode != "zeros":
            raise InputError(f"padding_mode={module.padding_mode!r} convolutions are not supported")
        sides = _conv_padding(module.padding, k, d, one_d)
        if all(lo == hi for lo, hi in sides):
            p = tuple(lo for lo, _ in sides)
        else:  # 'same' with an even span: unfold pads symmetrically, so pad first (last dimension first)
            x = F.pad(x, [v for lo_hi in reversed(sides) for v in lo_hi])
            p = (0, 0)
        cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s)  # (B, C*kk, L)
        g = module.groups
        bsz, ckk, length = cols.shape
        cols = cols.reshape(bsz, g, ckk // g, length).permute(0, 1, 3, 2)
        return cols.reshape(-1, ckk // g)


def _conv_padding(padding, kernel: tuple, dilation: tuple, one_d: bool) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dimension of the 2-D view (a Conv1d's height is 1)."""
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        spans = [dl * (kk - 1) for kk, dl in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in spans]
    pads = (0, padding[0]) if one_d else tuple(padding)
    return [(int(v), int(v)) for v in pads]


_BUILTIN = (HFConv1DAdapter(), LinearAdapter(), ConvAdapter())


class _AdapterList(list):
    """What :func:`adapters` returns: the adapters, plus ``plugins``: id(adapter) → its entry-point name
    for the plugin ones (so that :func:`adapter_for` can skip one whose ``matches`` raises)."""

    plugins: dict[int, str]


def _plugin_failure(name: str, err: Exception, during: str) -> str:
    """The warning for a plugin adapter skipped because ``during`` raised: the registry's one format for
    every skipped plugin, the same as for one that fails to import."""
    from . import registry

    return registry.skip_message("adapters", name, f"failed in {during}: {type(err).__name__}: {err}")


def adapters() -> list:
    """Built-in adapters first (most specific first), then plugin adapters. A plugin adapter that fails
    to load, or whose class cannot be instantiated, warns once and is skipped."""
    from . import registry

    out = _AdapterList(_BUILTIN)
    out.plugins = {}
    names = {a.name for a in out}
    for name, obj in registry.load_all("adapters").items():
        if name in names:
            continue
        if isinstance(obj, type):
            try:
                obj = obj()
            except Exception as err:  # noqa: BLE001 - plugin code: warn and skip, as for a failed import
                registry.disable("adapters", name, _plugin_failure(name, err, "__init__()"))
                continue
        out.append(obj)
        out.plugins[id(obj)] = name
    return out


def adapter_for(module: nn.Module, adapter_list: Sequence | None = None):
    """The first adapter whose ``matches(module)`` is true, or None. A plugin adapter whose ``matches``
    raises is skipped from then on, with one warning naming it and its package (once per adapter, not
    per module)."""
    from . import registry

    if adapter_list is None:
        adapter_list = adapters()
    plugins = getattr(adapter_list, "plugins", {})
    for a in adapter_list:
        name = plugins.get(id(a))
        if name is None:
            if a.matches(module):
                return a
            continue
        if registry.is_disabled("adapters", name):
            continue
        try:
            hit = bool(a.matches(module))
        except Exception as err:  # noqa: BLE001 - plugin code: warn once and skip the adapter
            registry.disable("adapters", name, _plugin_failure(name, err, "matches()"))
            continue
        if hit:
            return a
    return None


@dataclass
class TargetLayer:
    """A selected layer: qualified name, module, and its adapter."""

    name: str
    module: nn.Module
    adapter: object

    @property
    def type(self) -> str:
        return type(self.module).__name__

    @property
    def d_in(self) -> int:
        return self.adapter.d_in(self.module)

    @property
    def d_out(self) -> int:
        return self.adapter.d_out(self.module)

    def weight_matrix(self) -> torch.Tensor:
        return self.adapter.weight_matrix(self.module)


def pattern_matches(pattern: str, name: str) -> bool:
    """Contract rule: exact name or dotted suffix; ``re:REGEX`` with re.fullmatch."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as err:
            raise InputError(f"bad layer pattern {pattern!r}: {err}") from None
    return name == pattern or name.endswith("." + pattern)


def tied_head_names(model: nn.Module) -> set[str]:
    """Names of Linear layers whose weight is an input embedding's weight (tied output heads)."""
    emb_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.data_ptr() in emb_ptrs}


def functional_layer_names(model: nn.Module) -> set[str]:
    """Names of supported layers that their parent applies through their weights, never by calling them,
    so no hook sees their input: ``nn.MultiheadAttention.out_proj`` (``F.multi_head_attention_forward`` reads
    its weight; the stock ``nn.Transformer*`` layers hold one each). They are never targets."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear)}


def _patterns(patterns, what: str) -> list[str]:
    """``include``/``exclude`` as a list of strings: one string is one pattern (not its characters)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns] if patterns else []
    try:
        out = list(patterns)
    except TypeError:
        raise InputError(f"{what} takes layer patterns (a string or a list of strings), got "
                         f"{type(patterns).__name__}") from None
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise InputError(f"{what} takes layer patterns (a string or a list of strings), got an item "
                         f"{bad[0]!r} of type {type(bad[0]).__name__}")
    return out


def select_layers(model: nn.Module, include: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None) -> list[TargetLayer]:
    """Supported layers of ``model`` in ``named_modules`` order, filtered by the patterns (each a list of
    patterns, or one pattern as a string)."""
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    tied = tied_head_names(model)
    functional = functional_layer_names(model)
    adapter_list = adapters()
    out = []
    for name, module in model.named_modules():
        if not name or name in functional:
            continue
        a = adapter_for(module, adapter_list)
        if a is None:
            continue
        if include:
            if not any(pattern_matches(p, name) for p in include):
                continue
        elif name in tied:
            continue
        if any(pattern_matches(p, name) for p in exclude):
            continue
        out.append(TargetLayer(name, module, a))
    for p in include:
        if not any(pattern_matches(p, t.name) for t in out):
            hidden = sorted(n for n in functional if pattern_matches(p, n))
            raise InputError(f"--include {p!r} matches no supported layer" + (
                f" ({hidden[0]} is nn.MultiheadAttention's out_proj, which it applies through its weight: "
                "no hook sees its input)" if hidden else ""))
    if not out:
        raise InputError("the model has no supported layers to analyse (Linear, Conv1D, Conv1d/2d)"
                         + (" after --include/--exclude" if include or exclude else ""))
    return out
