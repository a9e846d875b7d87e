"""Replay the unchanged beginning of a model while one layer is perturbed.

The per-layer sensitivity probes (:mod:`specprune.sensitivity`) change one layer at a time and run the
whole model on the same few windows, several times per layer. Every block that finished *before* the
perturbed layer first ran computes exactly what it computed unperturbed, so its output can be replayed
instead of recomputed: on a transformer with L blocks that saves about (L−1)/2L of the probes' forward
cost. The outputs are identical, not approximate: they are the ones the same code produced on the same
inputs in a recording pass.

- **Blocks**: the children of the ``nn.ModuleList`` that holds target layers in the most children (the
  ``encoder.layer`` / ``model.layers`` / ``transformer.h`` of a HF model). Models without one get no
  replay (everything is recomputed, as before).
- **Which blocks**: those whose forward *completed* before the layer was first called in the recording
  pass (causality: their outputs cannot depend on it), excluding the block that contains it. A layer
  whose weight is shared with another module (tied embeddings) is never replayed around.
- **Recording**: one unperturbed pass over the probe windows stores each block's outputs in call order;
  at most ``max_bytes`` (default 1 GiB) — beyond that the replay is switched off, as it is when a block
  carries forward hooks of its own (they would run again on a replayed output) or returns something
  other than tensors and plain tuples/lists of them.
- **Replay**: inside :meth:`PrefixReplay.skipping`, each skipped block's ``forward`` returns its next
  recorded output (tensors cloned, so nothing downstream can alter the record); the original forward is
  restored on exit whatever happens. One ``skipping`` block must cover exactly one pass over the same
  windows in the same order as the recording.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layers import TargetLayer

DEFAULT_MAX_BYTES = 1 << 30


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _replayable(obj: Any) -> bool:
    """Tensors, None and (nested) plain tuples/lists of them: what can be replayed safely."""
    if obj is None or isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return all(_replayable(o) for o in obj)
    return False


def find_blocks(model: nn.Module, layer_names: list[str]) -> tuple[str, list[nn.Module]] | None:
    """(name, children) of the ModuleList holding target layers in the most children, or None."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        prefix = f"{name}." if name else ""
        hit = {n[len(prefix):].split(".", 1)[0] for n in layer_names if n.startswith(prefix)}
        covered = sum(1 for i in range(len(mod)) if str(i) in hit)
        if covered >= 2 and (best is None or covered > best[0]):
            best = (covered, name, list(mod))
    return None if best is None else (best[1], best[2])


class PrefixReplay:
    """Record block outputs once, then replay the blocks that precede a perturbed layer."""

    def __init__(self, model: nn.Module, layers: list[TargetLayer], max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.layers = {lay.name: lay for lay in layers}
        found = find_blocks(model, list(self.layers))
        self.blocks: list[nn.Module] = found[1] if found else []
        self.max_bytes = max_bytes
        # a hook someone else put on a block would run again on the replayed output: no replay then
        self.enabled = bool(self.blocks) and not any(
            blk._forward_hooks or blk._forward_pre_hooks for blk in self.blocks)
        self._records: list[list[Any]] = [[] for _ in self.blocks]
        self._before: dict[str, list[int]] = {}  # layer → indices of blocks done before its first call
        self.bytes = 0

    @contextlib.contextmanager
    def recording(self):
        """Run one unperturbed pass over the probe windows inside this block."""
        if not self.enabled:
            yield
            return
        done: set[int] = set()
        handles = []

        def block_hook(i: int) -> Callable:
            def hook(_mod, _args, out):
                if not self.enabled:
                    return
                if not _replayable(out):
                    self.enabled = False
                    return
                self.bytes += _nbytes(out)
                if self.bytes > self.max_bytes:
                    self.enabled = False
                    return
                self._records[i].append(out)
                done.add(i)
            return hook

        def layer_hook(name: str) -> Callable:
            def hook(_mod, _args):
                if name not in self._before:
                    self._before[name] = sorted(done)
            return hook

        try:
            for i, blk in enumerate(self.blocks):
                handles.append(blk.register_forward_hook(block_hook(i)))
            for name, lay in self.layers.items():
                handles.append(lay.module.register_forward_pre_hook(layer_hook(name)))
            yield
        finally:
            for h in handles:
                h.remove()
        if not self.enabled:
            self._records = [[] for _ in self.blocks]
            self.bytes = 0
            return
        # tied weights: a layer whose weight another module also uses may change what came before
        owners: dict[int, int] = {}
        for mod in self.model.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        for name, lay in self.layers.items():
            w = getattr(lay.module, "weight", None)
            if isinstance(w, torch.Tensor) and owners.get(id(w), 0) > 1:
                self._before[name] = []
            else:  # never replay the block that holds the layer itself
                inside = {i for i, blk in enumerate(self.blocks)
                          if any(m is lay.module for m in blk.modules())}
                self._before[name] = [i for i in self._before.get(name, []) if i not in inside]

    def skipped(self, name: str) -> list[int]:
        """Indices of the blocks replayed while layer ``name`` is perturbed."""
        return list(self._before.get(name, [])) if self.enabled else []

    @contextlib.contextmanager
    def skipping(self, name: str):
        """Replay the blocks before layer ``name`` for one pass over the recorded windows."""
        idx = self.skipped(name)
        saved = []
        try:
            for i in idx:
                blk = self.blocks[i]
                saved.append((blk, blk.__dict__.get("forward")))
                blk.forward = self._replayer(i)
            yield
        finally:
            for blk, fwd in saved:
                if fwd is None:
                    del blk.forward
                else:
                    blk.forward = fwd

    def _replayer(self, i: int) -> Callable:
        records = self._records[i]
        state = {"n": 0}

        def forward(*_args, **_kwargs):
            k = state["n"]
            if k >= len(records):
                raise RuntimeError(f"block {i} was called more often than in the recording pass")
            state["n"] = k + 1
            return _clone(records[k])

        return forward
