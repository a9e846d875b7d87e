"""The torchao quantization backend: a specprune compressor, conversion of quantized models to
torchao tensors for inference, torchao's stock weight-only configs, and torchao checkpoints.

Two representations, one set of integers:

* **Saved / specprune form** (what ``specprune quantize --backend torchao`` and a plan layer with
  ``method: "torchao"`` produce). :class:`TorchaoQuantizer` runs ``torchao.quantization.quantize_``
  with :class:`~specprune_torchao.configs.SymmetricWeightOnlyConfig` on a scratch ``nn.Linear``
  holding the layer's (d_out, d_in) weight matrix, then writes torchao's dequantized weight back
  into the layer (same Parameter, ties kept) and records the scales, exactly as specprune's RTN
  path does. So any layer an adapter can read (Linear, HF Conv1D, Conv1d/2d, factor pairs) works,
  and :func:`specprune.compress.saved.save_compressed` packs torchao's integer codes bit-exactly
  into the portable format (B bits per weight + one float16 scale per group): the directory loads
  with ``specprune.load`` without torchao installed.
* **Runtime / torchao form**. :func:`to_torchao_` turns every quantized ``nn.Linear`` of a model
  (from either backend, or loaded from a saved directory) into torchao ``IntxUnpackedToInt8Tensor``
  weights with the recorded scales — the same integers, now held as int8 and run through torchao's
  linear. :func:`quantize_model_` applies torchao's own stock configs instead
  (``Int8WeightOnlyConfig``; ``IntxWeightOnlyConfig`` for 2–7 bits; ``Int4WeightOnlyConfig`` with the
  tinygemm kernel for 4 bits where the platform has it, i.e. CUDA with compute capability ≥ 8).
  :func:`save_torchao` / :func:`load_torchao` store such a model as a torch checkpoint of torchao
  tensors (readable with ``weights_only=True`` once torchao is imported; not portable without
  torchao, and the sub-byte widths take a full byte per weight there).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specprune.compress.quantize import QUANT_ATTR, QuantRecord, qmax_for, quantizable_modules
from specprune.errors import InputError

from ._compat import api, require_torchao

SCHEMES = ("specprune", "stock")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _configs():
    from . import configs

    return configs


def _scratch_linear(w: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``w`` (d_out, d_in), built on the meta device (no init)."""
    d_out, d_in = w.shape
    lin = nn.Linear(d_in, d_out, bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach(), requires_grad=False)
    return lin


@dataclass
class TorchaoWeight:
    """Integer codes and scales read back from a torchao weight tensor (specprune's layout)."""

    codes: torch.Tensor  # int8 (d_out, d_in)
    scales: torch.Tensor  # (d_out, groups), as torchao holds them
    zero_points: torch.Tensor | None  # (d_out, groups) or None (symmetric)
    group_size: int


def tensor_parts(t: torch.Tensor) -> TorchaoWeight:
    """Codes, scales and zero points of a torchao ``IntxUnpackedToInt8Tensor`` or ``Int8Tensor``."""
    qdata = getattr(t, "qdata", None)
    scale = getattr(t, "scale", None)
    if qdata is None or scale is None or qdata.dim() != 2:
        raise InputError(f"not a torchao intx/int8 weight tensor: {type(t).__name__}")
    d_out, d_in = qdata.shape
    scale = scale.reshape(d_out, -1)
    zp = getattr(t, "zero_point", None)
    zp = None if zp is None or zp.numel() == 0 else zp.reshape(d_out, -1)
    return TorchaoWeight(qdata, scale, zp, d_in // scale.shape[1])


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int | None = None, *,
                    scales: torch.Tensor | None = None, where: str = "") -> torch.Tensor:
    """The torchao tensor of a (d_out, d_in) matrix on specprune's grid, made by
    ``torchao.quantization.quantize_`` with ``SymmetricWeightOnlyConfig`` (see :mod:`.configs`)."""
    cfg = _configs()
    qmax_for(bits)
    cfg.group_layout(w.shape[1], group_size, where)
    hp = w.detach() if w.dtype in cfg.TORCHAO_FLOAT_DTYPES else w.detach().to(torch.float32)
    lin = _scratch_linear(hp.contiguous())
    api().quantize_(lin, cfg.SymmetricWeightOnlyConfig(bits=bits, group_size=group_size, scales=scales),
                    filter_fn=lambda mod, fqn: mod is lin)
    return lin.weight.data


def torchao_fake_quantize_(module: nn.Module, bits: int, group_size: int | None = None,
                           where: str = "") -> TorchaoWeight:
    """Quantize ``module``'s weight with torchao on specprune's grid and leave it in specprune's
    form: the weight holds torchao's dequantization (in place, own dtype) and the float16 scales are
    recorded as :class:`~specprune.compress.quantize.QuantRecord`, so saving packs torchao's codes.

    Returns the codes and scales torchao produced."""
    from specprune.layers import adapter_for

    adapter = adapter_for(module)
    if adapter is None:
        raise InputError(f"cannot quantize a {type(module).__name__}: no layer adapter reads its weight")
    w = adapter.weight_matrix(module)
    cfg = _configs()
    cfg.group_layout(w.shape[1], group_size, where)
    scales = cfg.specprune_scales(w, bits, group_size)
    t = quantize_matrix(w, bits, group_size, scales=scales, where=where)
    deq = t.dequantize()
    adapter.set_weight_matrix(module, deq.to(device=w.device))
    setattr(module, QUANT_ATTR, QuantRecord(bits, group_size, scales.detach().to("cpu")))
    return tensor_parts(t)


class TorchaoQuantizer:
    """The ``torchao`` compressor (kind ``quantize``): ``--backend torchao``, or a plan layer with
    ``"method": "torchao"`` and ``bits``. Quantizes each layer (both factors of a factorized one)
    with torchao to ``bits`` 2..8, per output channel or per ``group_size`` columns, on specprune's
    symmetric grid, leaving the layer in specprune's savable form (see the module docstring). A group
    size must divide the layer's d_in (torchao's blocks tile each row); larger means per channel.

    Instantiating it checks that torchao is importable and raises one clear error otherwise."""

    name = "torchao"
    kind = "quantize"
    needs_covariance = False
    low_rank = False

    def __init__(self) -> None:
        require_torchao()
        api()

    def apply(self, layer, layer_plan, covariance=None) -> None:
        if layer_plan.bits is None:
            return
        for sub in quantizable_modules(layer.module):
            torchao_fake_quantize_(sub, int(layer_plan.bits), layer_plan.group_size, where=layer.name)


# --------------------------------------------------------------------------------------------
# runtime form


def _selected_linears(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear]:
    mods = dict(model.named_modules())
    if names is None:
        return {n: m for n, m in mods.items() if isinstance(m, nn.Linear)}
    out = {}
    for n in names:
        if n not in mods:
            raise InputError(f"{n!r} is not a module of the model")
        if not isinstance(mods[n], nn.Linear):
            raise InputError(f"{n!r} is a {type(mods[n]).__name__}; torchao's weight-only tensors run in "
                             "nn.Linear layers only")
        out[n] = mods[n]
    return out


def _is_torchao_tensor(t: torch.Tensor) -> bool:
    return type(t).__module__.startswith("torchao.")


def to_torchao_(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Convert every fake-quantized ``nn.Linear`` (one carrying specprune's quantization record: from
    the rtn or torchao backend, or from ``specprune.load``) to a torchao weight tensor with the
    recorded bits, group size and scales — the same integers, held as int8 — in place.

    ``names``: only these layers. Returns the converted layer names (layers whose group size does not
    divide d_in, and non-Linear layers, are left as they are when ``names`` is None)."""
    cfg = _configs()
    done = []
    for name, mod in _selected_linears(model, names).items():
        rec = mod.__dict__.get(QUANT_ATTR)
        if not isinstance(rec, QuantRecord) or _is_torchao_tensor(mod.weight):
            if names is not None:
                raise InputError(f"layer {name!r} is not quantized by specprune (no quantization record)")
            continue
        try:
            cfg.group_layout(mod.in_features, rec.group_size, name)
        except InputError:
            if names is not None:
                raise
            continue
        api().quantize_(mod, cfg.SymmetricWeightOnlyConfig(bits=rec.bits, group_size=rec.group_size,
                                                           scales=rec.scales),
                        filter_fn=lambda m, fqn, target=mod: m is target)
        mod.__dict__.pop(QUANT_ATTR, None)
        done.append(name)
    return done


def int4_kernel_available(device: torch.device | str) -> bool:
    """Whether torchao's packed int4 weight-only kernel (tinygemm) runs on ``device``: CUDA with
    compute capability ≥ 8 (with torchao 0.18 on an x86 CPU every int4 packing format fails:
    tinygemm needs CUDA, plain_int32 needs XPU/NPU, plain and preshuffled need mslk)."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8


def stock_config(bits: int, group_size: int | None, d_in: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """torchao's own weight-only config for B bits: ``Int8WeightOnlyConfig`` (8 bits),
    ``Int4WeightOnlyConfig`` with the tinygemm int4 kernel (4 bits, bfloat16, group size 32..256,
    where :func:`int4_kernel_available`), else ``IntxWeightOnlyConfig`` (symmetric over the full
    [−2^(B−1), 2^(B−1)−1], per channel or per group)."""
    ao = api()
    qmax_for(bits)
    if bits == 8:
        gran = {} if group_size is None else {"granularity": ao.PerGroup(group_size)}
        return ao.Int8WeightOnlyConfig(version=2, **gran)
    if (bits == 4 and group_size in INT4_KERNEL_GROUPS and dtype == torch.bfloat16
            and int4_kernel_available(device)):
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    gran = ao.PerAxis(0) if group_size is None else ao.PerGroup(group_size)
    return ao.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=gran,
                                   mapping_type=ao.MappingType.SYMMETRIC)


def quantize_model_(model: nn.Module, bits: int, group_size: int | None = None, *,
                    names: Iterable[str] | None = None, scheme: str = "stock") -> list[str]:
    """Quantize ``nn.Linear`` layers in place to torchao tensors (the runtime form).

    ``scheme="stock"``: torchao's own configs (:func:`stock_config`; not storable in specprune's
    packed format, whose integers are symmetric in ±q_max); ``"specprune"``: specprune's grid
    (:class:`~specprune_torchao.configs.SymmetricWeightOnlyConfig`). ``names``: the layers (default:
    every Linear except an output head tied to the input embeddings). Returns the names quantized."""
    from specprune.layers import tied_head_names

    if scheme not in SCHEMES:
        raise InputError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    chosen = _selected_linears(model, names)
    if names is None:
        tied = tied_head_names(model)
        chosen = {n: m for n, m in chosen.items() if n not in tied}
    cfg_mod = _configs()
    done = []
    for name, mod in chosen.items():
        if _is_torchao_tensor(mod.weight):
            continue
        if scheme == "specprune":
            cfg = cfg_mod.SymmetricWeightOnlyConfig(bits=bits, group_size=group_size)
        else:
            cfg = stock_config(bits, group_size, mod.in_features, mod.weight.device, mod.weight.dtype)
        cfg_mod.group_layout(mod.in_features, group_size, name)
        api().quantize_(mod, cfg, filter_fn=lambda m, fqn, target=mod: m is target)
        mod.__dict__.pop(QUANT_ATTR, None)
        done.append(name)
    return done


def save_torchao(model: nn.Module, path: str | os.PathLike) -> Path:
    """``torch.save`` the state dict with its torchao tensors (atomically). Reading it back needs
    torchao (see :func:`load_torchao`)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, p)
    return p


def load_torchao(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_torchao` checkpoint into ``model`` (same architecture), assigning the
    torchao tensors in place; read with ``weights_only=True`` (torchao registers its tensor types
    as safe)."""
    require_torchao()
    try:
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(f"cannot read torchao checkpoint {path}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    try:
        model.load_state_dict(sd, assign=True)
    except RuntimeError as err:
        raise InputError(f"{path} does not fit the model: {str(err).splitlines()[0]}") from None
    return model
