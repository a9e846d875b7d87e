"""Temporary, fully undone changes to a user's module (measuring candidate plans)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


_MISSING = object()


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute under which it is held."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


@contextlib.contextmanager
def restored(model: nn.Module, names):
    """Snapshot the modules at ``names`` (object and tensors); on exit put back exactly those
    objects with their original values, whatever happened in between (replacement by factorized
    modules, in-place weight edits, pruning reparametrisations)."""
    from .compress.quantize import QUANT_ATTR

    saved = []
    for n in names:
        parent, attr = parent_of(model, n)
        mod = getattr(parent, attr)
        params = {k: p for k, p in mod.named_parameters(recurse=True)}
        values = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        records = {m: m.__dict__.get(QUANT_ATTR, _MISSING) for m in mod.modules()}
        saved.append((parent, attr, mod, params, values, records))
    try:
        yield model
    finally:
        for parent, attr, mod, params, values, records in saved:
            setattr(parent, attr, mod)
            for m, rec in records.items():  # quantization records describe the weights: restore them too
                if rec is _MISSING:
                    m.__dict__.pop(QUANT_ATTR, None)
                else:
                    m.__dict__[QUANT_ATTR] = rec
            # put the original Parameter objects back (pruning may have swapped them), then values
            for k, p in params.items():
                owner_name, _, pname = k.rpartition(".")
                owner = mod.get_submodule(owner_name) if owner_name else mod
                for extra in (pname + "_orig", pname + "_mask"):
                    owner._parameters.pop(extra, None)
                    owner._buffers.pop(extra, None)
                if owner._parameters.get(pname) is not p:
                    if pname in owner.__dict__:
                        del owner.__dict__[pname]
                    owner._parameters[pname] = p
            with torch.no_grad():
                mod.load_state_dict(values)


@contextlib.contextmanager
def apply_temporarily(model: nn.Module, plan, analysis=None, data=None):
    """Apply ``plan`` in place for the duration of the block, then undo it completely."""
    from .compress.apply import apply_

    names = [n for n, lp in plan.layers.items() if not lp.is_noop]
    with restored(model, names):
        apply_(model, plan, analysis=analysis, data=data)
        yield model
