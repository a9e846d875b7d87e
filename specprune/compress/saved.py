"""Saved compressed models: write a directory, read it back without running anything it names.

Layout of a directory written by :func:`save_compressed`:

* ``model.safetensors`` — every tensor of the model's state dict, except that a fake-quantized
  weight ``K`` is stored as ``K::codes`` (its B-bit integer codes bit-packed into uint8, see
  :mod:`specprune.compress.pack`: an int4 weight takes half a byte) and ``K::scales`` (float16,
  one per output channel or group), and a factorized layer ``N`` is stored as its two factors
  ``N.first.weight`` / ``N.second.weight`` (+ ``N.second.bias``). Tensors shared by several names
  (tied embeddings) are stored once; the other names are listed as aliases.
* ``plan.json`` — the plan that was applied.
* ``specprune.json`` — format version, specprune version, the source (path, kind, architecture
  class / ``--arch`` callable, dtype), a per-layer summary (``layers``: module type, factorized
  rank, bits, group size, dtype) and how to rebuild: the factorized layers (rank, shapes,
  original module type) and the quantized tensors (bits, group size, matrix shape, layout,
  parameter shape, dtype), plus ``aliases`` of tied tensors.
* for Hugging Face sources: the original ``config.json`` and tokenizer files
  (tokenizer*, vocab*, merges.txt, special_tokens_map.json, …). The config gets one key more, a
  ``quantization_config`` without a ``quant_method`` (see :data:`HF_REFUSAL`), which makes
  ``transformers``' ``from_pretrained`` on the directory raise instead of quietly loading: it cannot
  read the packed codes and the factors, and without the marker it puts randomly initialised weights
  in their place with no more than a logged load report. The source's own ``quantization_config``, if
  it had one, is kept inside the marker and put back by the loader; ``AutoConfig`` and
  ``AutoTokenizer`` read the directory as before.
* with ``export_dense=True``: ``dense/``, a plain checkpoint with the dequantized weights and the
  factors multiplied back into the original module shapes (HF: ``save_pretrained``, so
  ``from_pretrained`` loads it as is; otherwise a state dict ``model.safetensors`` for ``--arch``).

Loading (:func:`load_saved`, :func:`load`): HF sources are rebuilt from the saved config (marker
removed; directories written before it existed have none) with the transformers class *named* in
specprune.json (looked up as an attribute of ``transformers``; configs that need remote code are
refused, trust_remote_code is never used); non-HF sources need
``arch`` given explicitly by the caller — nothing named inside a received directory is imported.
Then the factorized layers are put in place, the codes are unpacked and dequantized to the source
dtype, and the state dict is loaded. The module comes back in eval mode on CPU, with the
quantization scales recorded on its modules so that saving it again packs the same codes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InputError, RefusedError
from ..io import dumps
from ..layers import ConvAdapter, HFConv1DAdapter, LinearAdapter, adapter_for
from .pack import pack_codes, unpack_codes
from .prune import Factorized
from .quantize import QUANT_ATTR, QuantizedWeight, QuantRecord, codes_with_scales, quantize_weight

if TYPE_CHECKING:
    from ..models import LoadedModel

SAVED_FORMAT = 1
SPEC_FILE = "specprune.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
DENSE_DIR = "dense"
CODES_SUFFIX = "::codes"
SCALES_SUFFIX = "::scales"
HF_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece*.model",
                    "*.tiktoken", "chat_template*", "preprocessor_config.json")
# The config.json marker. transformers (5.x; checked on 5.24) raises ValueError("The model's quantization config
# from the arguments has no `quant_method` attribute ...") from from_pretrained when the config's quantization_config
# lacks quant_method, before it reads any weight (the MLX community checkpoints trip on the same check); an *unknown*
# quant_method would only log a warning and load random weights. That exception's text is fixed, so the marker
# carries ours for whoever opens config.json to see why.
HF_MARKER_KEY = "quantization_config"
HF_MARKER_FIELD = "specprune"
HF_ORIGINAL_FIELD = "original_quantization_config"
HF_REFUSAL = ("this directory was written by specprune: its model.safetensors holds packed integer codes and "
              "low-rank factors that transformers' from_pretrained cannot read (it would load random weights in "
              "their place), so this quantization_config makes it refuse. Load the directory with "
              "specprune.load(DIR), or load its dense/ export (written with --export dense, or "
              "save_compressed(..., export_dense=True)) with from_pretrained as is.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"{SPEC_FILE}: unknown dtype {name!r}")
    return dt


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most floating-point parameters have (float32 for a model without any)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _source_info(source: Any, model: nn.Module) -> dict:
    """Normalise ``source`` (LoadedModel, dict, path or None) to the specprune.json source entry."""
    from ..models import LoadedModel

    info: dict = {"path": type(model).__name__, "kind": "module", "arch": None, "hf_dir": None}
    if isinstance(source, LoadedModel):
        info.update(path=source.source, kind=source.kind, arch=source.arch,
                    hf_dir=str(source.hf_dir) if source.hf_dir else None)
        if source.kind == "specprune":  # re-compressing a compressed model: keep the original source
            inner = (source.info or {}).get("source") or {}
            info.update(path=inner.get("path", source.source), kind=inner.get("kind", "specprune"),
                        arch=source.arch or inner.get("arch"))
        info["tokenizer"] = source.tokenizer
    elif isinstance(source, dict):
        info.update({k: v for k, v in source.items() if k in ("path", "kind", "arch", "hf_dir", "tokenizer")})
        if "source" in source and "path" not in source:
            info["path"] = source["source"]
    elif isinstance(source, (str, Path)):
        info["path"] = str(source)
        if Path(source).is_dir() and (Path(source) / "config.json").is_file():
            info.update(kind="hf", hf_dir=str(source))
    elif source is not None:
        raise InputError(f"source must be a LoadedModel, a dict or a path, got {type(source).__name__}")
    if info.get("arch") is not None and not isinstance(info["arch"], str):
        info["arch"] = getattr(info["arch"], "__module__", "?") + ":" + getattr(info["arch"], "__qualname__", "?")
    return info


def _weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _quantized_tensors(model: nn.Module) -> dict[str, tuple[QuantizedWeight, dict]]:
    """For every module carrying a quantization record: its codes/scales and rebuild metadata."""
    out = {}
    for name, mod in model.named_modules():
        rec = mod.__dict__.get(QUANT_ATTR)
        if not isinstance(rec, QuantRecord):
            continue
        adapter = adapter_for(mod)
        if adapter is None:
            continue
        w = adapter.weight_matrix(mod)
        if isinstance(adapter, HFConv1DAdapter):
            layout = "conv1d-hf"
        elif isinstance(adapter, (LinearAdapter, ConvAdapter)) or torch.equal(
                w, mod.weight.detach().reshape(w.shape)):
            layout = "matrix"
        else:  # a plugin layer type with its own weight layout: stored unpacked, as it is
            continue
        qw = codes_with_scales(w, rec.bits, rec.group_size, rec.scales)
        requantized = False
        cd = torch.float64 if w.dtype == torch.float64 else torch.float32
        if not torch.equal(qw.dequantize(cd).to(device=w.device, dtype=w.dtype), w):
            # the weights changed after fake quantization (e.g. fine-tuned): quantize them afresh
            qw = quantize_weight(w, rec.bits, rec.group_size)
            requantized = True
        meta = {"bits": rec.bits, "group_size": rec.group_size, "matrix": list(w.shape),
                "layout": layout, "shape": list(mod.weight.shape), "dtype": _dtype_name(mod.weight.dtype),
                "scale_dtype": _dtype_name(qw.scales.dtype), "requantized": requantized}
        out[_weight_key(name)] = (qw, meta)
    return out


def _copy_hf_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in HF_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copyfile(f, dst / f.name)
                copied.append(f.name)
    return copied


def _write_hf_files(model: nn.Module, info: dict, out: Path) -> list[str]:
    copied: list[str] = []
    hf_dir = Path(info["hf_dir"]) if info.get("hf_dir") else None
    if hf_dir is not None and hf_dir.is_dir():
        copied = _copy_hf_files(hf_dir, out)
    if "config.json" not in copied:
        model.config.save_pretrained(str(out))
        copied.append("config.json")
    tok = info.get("tokenizer")
    if tok is not None and not any(n.startswith(("tokenizer", "vocab")) for n in copied):
        tok.save_pretrained(str(out))
        copied.append("tokenizer (saved)")
    return copied


def _is_marker(qc: Any) -> bool:
    return isinstance(qc, dict) and HF_MARKER_FIELD in qc and "quant_method" not in qc


def _read_json_object(f: Path) -> dict:
    """A JSON object from ``f`` (InputError, one line, when it is unreadable or not an object)."""
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{f} is not readable JSON (corrupted?): {err}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{f} is not a JSON object")
    return doc


def _mark_hf_config(out: Path) -> None:
    """Add the refusal marker to ``out/config.json`` (key order and everything else kept), keeping a
    quantization_config the source had inside it; a marker already there (re-compressing a compressed
    directory) is replaced, its original kept."""
    f = out / "config.json"
    raw = _read_json_object(f)
    original = raw.get(HF_MARKER_KEY)
    if _is_marker(original):
        original = original.get(HF_ORIGINAL_FIELD)
    marker: dict = {HF_MARKER_FIELD: HF_REFUSAL}
    if original is not None:
        marker[HF_ORIGINAL_FIELD] = original
    raw[HF_MARKER_KEY] = marker
    f.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def _unmark_config(config: Any) -> None:
    """Remove the refusal marker from a loaded transformers config (restoring the source's own
    quantization_config): the rebuilt model's config then describes the source, so that its
    ``save_pretrained`` (the dense export included) writes a config from_pretrained loads."""
    qc = getattr(config, HF_MARKER_KEY, None)
    if not _is_marker(qc):
        return
    if qc.get(HF_ORIGINAL_FIELD) is not None:
        setattr(config, HF_MARKER_KEY, qc[HF_ORIGINAL_FIELD])
    else:
        delattr(config, HF_MARKER_KEY)


def _state_for_file(model: nn.Module, quantized: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (quantized weights packed) and aliases name → canonical name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        if t.numel() and ident in first_of:
            aliases[key] = first_of[ident]
            continue
        first_of[ident] = key
        if key in quantized:
            qw, _ = quantized[key]
            tensors[key + CODES_SUFFIX] = pack_codes(qw.codes, qw.bits)
            tensors[key + SCALES_SUFFIX] = qw.scales.detach().to("cpu").contiguous()
            continue
        c = t.to("cpu").contiguous()
        sptr = c.untyped_storage().data_ptr() if c.numel() else None
        if sptr is not None and (sptr in storages or c.untyped_storage().nbytes() != c.numel() * c.element_size()):
            c = c.clone()
            sptr = c.untyped_storage().data_ptr()
        if sptr is not None:
            storages.add(sptr)
        tensors[key] = c
    return tensors, aliases


def _check_rebuildable(model: nn.Module, plan: Any) -> None:
    """Refuse, before anything is written, a planned layer that a compressor replaced by a module :func:`load`
    cannot rebuild: loading makes the model from its config or ``--arch`` and puts back only specprune's
    :class:`Factorized` layers, so any other replacement (say an ``nn.Sequential`` from a plugin) would be
    saved under names the rebuilt model does not have."""
    from ..layers import adapter_for

    layers = plan.layers if hasattr(plan, "layers") else (plan or {}).get("layers") or {}
    modules = dict(model.named_modules())
    for name in layers:
        mod = modules.get(name)
        if mod is None or isinstance(mod, Factorized) or adapter_for(mod) is not None:
            continue
        raise InputError(f"layer {name} was replaced by a {type(mod).__name__}, which specprune cannot rebuild when "
                         "the model is loaded; a compressor must change the weights in place or return a "
                         "specprune Factorized module (specprune.compress.prune.factorize_module)")


def save_compressed(model: nn.Module, plan: Any, out_dir: str | Path, *, source: Any = None,
                    export_dense: bool = False) -> Path:
    """Write the compressed ``model`` (after :func:`~specprune.compress.apply.apply_`) and ``plan``
    into the existing directory ``out_dir`` (normally the temporary directory of
    :func:`specprune.io.output_dir`). ``source``: the :class:`~specprune.models.LoadedModel` it came
    from (or a dict with ``path``/``kind``/``arch``/``hf_dir``, or a path); HF models get their
    config and tokenizer files copied. Returns ``out_dir``."""
    from safetensors.torch import save_file

    from .. import __version__

    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"output directory {out_dir} does not exist")
    _check_rebuildable(model, plan)
    info = _source_info(source, model)
    hf = _is_hf_model(model)
    quantized = _quantized_tensors(model)
    factorized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Factorized):
            factorized[name] = dict(mod.spec(), dtype=_dtype_name(mod.second.weight.dtype))
    tensors, aliases = _state_for_file(model, quantized)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "specprune_format": str(SAVED_FORMAT)})

    plan_doc = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan or {})
    (out / PLAN_FILE).write_text(dumps(plan_doc), encoding="utf-8")

    copied = _write_hf_files(model, info, out) if hf else []
    if hf:
        _mark_hf_config(out)
    architecture = type(model).__name__
    applied = (plan_doc.get("details") or {}).get("applied") or {}
    modules = dict(model.named_modules())
    layer_summary = {}
    for name, lp in (plan_doc.get("layers") or {}).items():
        mod = modules.get(name)
        if mod is None or not isinstance(lp, dict):
            continue
        weight = mod.second.weight if isinstance(mod, Factorized) else getattr(mod, "weight", None)
        layer_summary[name] = {"type": type(mod).__name__, "factorized_rank": mod.rank if isinstance(mod, Factorized)
                               else None, "bits": lp.get("bits"), "group_size": lp.get("group_size"),
                               "dtype": _dtype_name(weight.dtype) if weight is not None else None}
    spec = {
        "format": SAVED_FORMAT,
        "specprune_version": __version__,
        "source": {"path": str(info["path"]), "kind": info["kind"], "hf": hf, "architecture": architecture,
                   "arch": info.get("arch"), "dtype": _dtype_name(model_dtype(model))},
        "layers": layer_summary,
        "factorized": factorized,
        "quantized": {k: meta for k, (_, meta) in quantized.items()},
        "aliases": aliases,
        "files": sorted(copied),
        "covariance": applied.get("covariance"),
        "dense_export": bool(export_dense),
    }
    (out / SPEC_FILE).write_text(dumps(spec), encoding="utf-8")
    if export_dense:
        export_dense_checkpoint(model, out / DENSE_DIR, hf=hf, hf_files_from=out if hf else None)
    return out


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.detach().to("cpu").contiguous().clone()
    return sd


def export_dense_checkpoint(model: nn.Module, out: Path, *, hf: bool, hf_files_from: Path | None = None) -> Path:
    """Write a plain checkpoint of ``model`` into ``out`` (created): factorized layers multiplied out
    into their original module type (temporarily swapped in, then put back), quantized weights as
    their dequantized values. HF models via ``save_pretrained`` (+ tokenizer files), others as a
    ``model.safetensors`` state dict."""
    from safetensors.torch import save_file

    from .apply import set_module

    out.mkdir(parents=True, exist_ok=False)
    swapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Factorized)]
    try:
        for name, mod in swapped:
            set_module(model, name, mod.to_dense())
        if hf:
            from transformers.utils import logging as hf_logging

            _unmark_config(model.config)  # a module built from a marked config by hand: dense/ must load
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # library code: no progress output of its own
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.save_pretrained(str(out), safe_serialization=True)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            if hf_files_from is not None:
                for f in sorted(hf_files_from.iterdir()):
                    if f.is_file() and f.name not in (WEIGHTS_FILE, SPEC_FILE, PLAN_FILE, "config.json") \
                            and not (out / f.name).exists():
                        shutil.copyfile(f, out / f.name)
        else:
            save_file(_dense_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    finally:
        for name, mod in swapped:
            set_module(model, name, mod)
    return out


# --------------------------------------------------------------------------------------------
# loading


def read_spec(d: Path) -> dict:
    """The validated specprune.json of a directory written by :func:`save_compressed` (InputError if absent
    or malformed)."""
    f = d / SPEC_FILE
    if not f.is_file():
        raise InputError(f"{d} is not a specprune model directory (no {SPEC_FILE})")
    spec = _read_json_object(f)
    if spec.get("format") != SAVED_FORMAT:
        raise InputError(f"{f}: unsupported format {spec.get('format')!r} (this specprune reads {SAVED_FORMAT})")
    for key, typ in (("source", dict), ("factorized", dict), ("quantized", dict), ("aliases", dict)):
        if not isinstance(spec.get(key), typ):
            raise InputError(f"{f}: field {key!r} is missing or malformed")
    return spec


def _build_hf(d: Path, architecture: str, dtype: torch.dtype) -> nn.Module:
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{d} was saved from a Hugging Face model but has no config.json")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{cfg_file} is not readable JSON (corrupted?): {err}") from None
    if isinstance(raw, dict) and raw.get("auto_map"):
        raise RefusedError(f"{d}: the config needs remote code (auto_map); specprune never runs code from a "
                           "received directory — pass arch= to build the module yourself")
    cls = getattr(transformers, str(architecture), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise InputError(f"{d}: architecture {architecture!r} is not a transformers model class; "
                         "pass arch= to build the module yourself")
    try:
        config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise InputError(f"cannot read the config in {d}: {str(err).splitlines()[0]}") from None
    _unmark_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(config, dtype=dtype)
    return model.to(dtype)


def _build_arch(arch: str | Callable[[], nn.Module]) -> nn.Module:
    from ..models import import_callable

    builder = import_callable(arch) if isinstance(arch, str) else arch
    if not callable(builder):
        raise InputError(f"arch must be 'module:callable' or a callable, got {type(arch).__name__}")
    try:
        model = builder()
    except Exception as err:  # noqa: BLE001 - the user's builder may raise anything: report it in one line
        raise InputError(f"arch {arch!r} failed to build the model: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"arch {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _unpacked_state(spec: dict, raw: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    quant = spec["quantized"]
    for key, meta in quant.items():
        try:
            bits, group, (d_out, d_in) = int(meta["bits"]), meta["group_size"], meta["matrix"]
            shape, dtype, layout = list(meta["shape"]), _dtype_from(meta["dtype"]), meta["layout"]
            packed, scales = raw[key + CODES_SUFFIX], raw[key + SCALES_SUFFIX]
        except KeyError as err:
            raise InputError(f"{where}: quantized tensor {key} is incomplete (missing {err}; corrupted?)") from None
        except (TypeError, ValueError):
            raise InputError(f"{where}: quantized tensor {key} has malformed metadata in {SPEC_FILE}") from None
        codes = unpack_codes(packed, bits, d_out * d_in).reshape(d_out, d_in)
        if group is not None:
            group = int(group)
        n_groups = 1 if group is None else -(-d_in // min(group, d_in))
        if tuple(scales.shape) != (d_out, n_groups):
            raise InputError(f"{where}: scales of {key} have shape {tuple(scales.shape)}, expected "
                             f"{(d_out, n_groups)} (corrupted?)")
        w = QuantizedWeight(codes, scales, bits, group).dequantize(
            torch.float64 if dtype == torch.float64 else torch.float32)
        w = w.T if layout == "conv1d-hf" else w.reshape(shape)
        sd[key] = w.to(dtype).contiguous()
    for key, t in raw.items():
        if key.endswith((CODES_SUFFIX, SCALES_SUFFIX)):
            if key.rsplit("::", 1)[0] not in quant:
                raise InputError(f"{where}: tensor {key} has no entry in {SPEC_FILE} (corrupted?)")
            continue
        sd[key] = t
    return sd


def load_saved(path: str | Path, arch: str | Callable[[], nn.Module] | None = None) -> LoadedModel:
    """Read a directory written by :func:`save_compressed` into a
    :class:`~specprune.models.LoadedModel` of kind ``"specprune"`` (module in eval mode, on CPU)."""
    from ..models import LoadedModel, load_tokenizer, read_state_dict
    from .apply import set_module

    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load takes the path of a compressed directory, got {type(path).__name__}")
    d = Path(path)
    spec = read_spec(d)
    src = spec["source"]
    wf = d / WEIGHTS_FILE
    if not wf.is_file():
        raise InputError(f"{d} has no {WEIGHTS_FILE}")
    raw = read_state_dict(wf)
    try:
        dtype = _dtype_from(src.get("dtype", "float32"))
    except InputError:
        raise InputError(f"{d / SPEC_FILE}: bad source dtype {src.get('dtype')!r}") from None
    hf = bool(src.get("hf"))
    if arch is not None:
        model = _build_arch(arch)
    elif hf:
        model = _build_hf(d, str(src.get("architecture")), dtype)
    else:
        hint = f" (it was built with --arch {src['arch']})" if src.get("arch") else ""
        raise InputError(f"{d} was compressed from a non-Hugging Face model{hint}: pass --arch module:callable "
                         "(Python: arch=) explicitly; nothing named inside a received directory is imported")
    modules = dict(model.named_modules())
    for name, fspec in spec["factorized"].items():
        if name not in modules:
            raise InputError(f"{d}: factorized layer {name} does not exist in the rebuilt model "
                             "(wrong architecture?)")
        try:
            fdtype = _dtype_from(fspec.get("dtype", _dtype_name(dtype)))
            new = Factorized.from_spec(fspec, dtype=fdtype)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{d}: malformed factorized entry for {name} in {SPEC_FILE}: {err}") from None
        set_module(model, name, new)
    sd = _unpacked_state(spec, raw, d)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:
        raise InputError(f"{d}: weights do not fit the rebuilt model: {str(err).splitlines()[0]}") from None
    aliases = spec["aliases"]
    missing = [k for k in missing if k not in aliases]
    if unexpected:
        raise InputError(f"{d}: {len(unexpected)} stored tensor(s) do not fit the rebuilt model "
                         f"(e.g. {unexpected[0]}; wrong architecture?)")
    if missing:
        raise InputError(f"{d}: {len(missing)} tensor(s) of the model are missing from {WEIGHTS_FILE} "
                         f"(e.g. {missing[0]}; corrupted or wrong architecture?)")
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, canonical in aliases.items():  # ties the architecture does not restore itself
            if key in current and canonical in sd and current[key].data_ptr() != current[canonical].data_ptr():
                current[key].data.copy_(sd[canonical])
        for key, t in sd.items():  # per-tensor dtypes of mixed-precision models
            if key in current and current[key].dtype != t.dtype and current[key].is_floating_point():
                current[key].data = current[key].data.to(t.dtype)
    for key, meta in spec["quantized"].items():
        mod_name = key[:-len(".weight")] if key.endswith(".weight") else ""
        mod = model.get_submodule(mod_name)
        scales = raw[key + SCALES_SUFFIX]
        setattr(mod, QUANT_ATTR, QuantRecord(int(meta["bits"]), meta["group_size"], scales))
    model.to("cpu")
    model.eval()
    tok = load_tokenizer(d) if hf else None
    arch_name = arch if isinstance(arch, str) else (src.get("arch") if arch is None else
                                                     getattr(arch, "__module__", "?") + ":"
                                                     + getattr(arch, "__qualname__", "?"))
    return LoadedModel(model, str(d), "specprune", tokenizer=tok, hf_dir=d if hf else None, arch=arch_name,
                       info={"architecture": src.get("architecture"), "source": src, "specprune": spec})


def save(model: nn.Module, plan: Any, out: str | os.PathLike, *, source: Any = None, export_dense: bool = False,
         overwrite: bool = False) -> Path:
    """``specprune.save``: write ``model`` (compressed by :func:`~specprune.compress.apply.apply_` with
    ``plan``) as a directory :func:`load` reads — the layout of ``specprune apply --out`` — whole or not at
    all: it is built in a temporary directory beside ``out`` and renamed into place. An existing ``out`` is
    replaced only with ``overwrite``, and never one that holds or lies inside ``source`` (the model it came
    from: a :class:`~specprune.models.LoadedModel`, a path, or None; an HF source's config and tokenizer
    files are copied). ``export_dense`` also writes ``dense/``, a plain checkpoint HF tools load as is.
    Returns ``out``."""
    from ..io import output_dir
    from ..plan import Plan

    if not isinstance(model, nn.Module):
        raise InputError(f"save takes the model as a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, (Plan, dict)):
        raise InputError(f"save takes the plan that was applied (a Plan or its dict), got {type(plan).__name__}")
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike)):
        raise InputError(f"save takes the output directory as a path, got {type(out).__name__}")
    from ..models import LoadedModel

    src = source.source if isinstance(source, LoadedModel) else source
    inputs = [src] if isinstance(src, (str, os.PathLike)) and Path(src).exists() else []
    with output_dir(out, inputs, overwrite) as tmp:
        save_compressed(model, plan, tmp, source=source, export_dense=export_dense)
    return Path(out)


def load(path: str | Path, arch: str | Callable[[], nn.Module] | None = None) -> nn.Module:
    """``specprune.load``: the compressed module in eval mode on CPU, weights dequantized to the
    source dtype. A non-HF source needs ``arch`` ('module:callable' or a callable) given explicitly."""
    return load_saved(path, arch=arch).model
