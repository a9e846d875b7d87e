"""Loading models the contract's way, never running code the user did not ask for.

* a Hugging Face directory (config.json + weights), loaded locally with its task head
  (the architecture named in the config, else ``AutoModel``); ``trust_remote_code`` is off
  unless asked;
* a ``.safetensors`` / ``.pt`` / ``.pth`` state dict plus ``arch="module:callable"``;
  ``.pt`` files load with ``torch.load(weights_only=True)`` — arbitrary pickles are refused;
* a directory written by specprune (``specprune.json`` inside);
* any ``nn.Module`` from Python.
"""

from __future__ import annotations

import contextlib

import hashlib
import importlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, RefusedError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class LoadedModel:
    """A model with what specprune learned while loading it."""

    model: nn.Module
    source: str
    kind: str  # "hf" | "state_dict" | "specprune" | "module"
    tokenizer: Any = None
    hf_dir: Path | None = None
    arch: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_causal_lm(self) -> bool:
        return is_causal_lm(self.model)


def is_causal_lm(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or []
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel") or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs if a == name)


def is_encoder_decoder(model) -> bool:
    """True for a Hugging Face encoder-decoder model (T5, BART, Marian, Whisper: ``config.is_encoder_decoder``),
    whose decoder needs inputs of its own (see :func:`specprune.data.forward`)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def import_callable(spec: str, option: str = "--arch"):
    """Import ``module:callable`` named explicitly by the user (``option``: the flag that named it, for
    the messages — ``--arch``, ``--metric``)."""
    mod_name, _, attr = str(spec).partition(":")
    if not mod_name.strip() or not attr.strip():
        raise InputError(f"{option} must be 'module:callable', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except (ImportError, ValueError) as err:
        raise InputError(f"cannot import {mod_name!r} for {option}: {err}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{mod_name!r} has no attribute {attr!r} (from {option} {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{option} {spec} is not callable")
    return obj


def unpickling_reason(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal (which global it blocked), not its
    generic preamble about the PyTorch 2.6 default."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln[:200]
    return (lines[0] if lines else type(err).__name__)[:200]


def check_readable(path: str | os.PathLike, what: str = "") -> None:
    """Fail with one clear line when ``path`` (a file, or a directory's listing) cannot be read,
    instead of a library's misleading "not found" further down."""
    p = Path(path)
    try:
        if p.is_dir():
            os.listdir(p)
        else:
            with open(p, "rb"):
                pass
    except OSError as err:
        raise InputError(f"cannot read {what + ' ' if what else ''}{path}: "
                         f"{err.strerror or type(err).__name__}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pt/.pth/.bin file; pickles run no code (weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file not found: {path}")
    check_readable(p)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise InputError(f"{path} is not a readable safetensors file (corrupted or truncated?): "
                             f"{err}") from None
    if p.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise RefusedError(
                f"refusing to load {path}: it is a pickle that needs arbitrary code to load "
                f"(torch.load weights_only=True rejected it: {unpickling_reason(err)}); save a plain "
                "state dict or safetensors instead") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
            # a file that is neither a zip nor a legacy pickle reaches the unpickler as garbage (KeyError: 101)
            why = str(err).splitlines()[0] if str(err) and not isinstance(err, (KeyError, IndexError)) else \
                "neither a zip archive nor a legacy pickle"
            raise InputError(f"{path} is not a readable PyTorch file (corrupted or truncated?): {why}") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputError(f"{path} does not hold a state dict of tensors")
        return obj
    raise InputError(f"unsupported weights file {path}: expected .safetensors, .pt or .pth")


def quiet_transformers() -> None:
    """No progress bars or advisory logs from transformers on specprune's output streams."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_hf(path: Path, trust_remote_code: bool, dtype=None, device_map: str | dict | None = None) -> LoadedModel:
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel

    quiet_transformers()

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}/config.json is not readable JSON: {err}") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise RefusedError(f"{path} needs its own Python code (auto_map in config.json); "
                           "pass --trust-remote-code if you trust it")
    has_weights = any((path / n).exists() for n in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
        "pytorch_model.bin.index.json"))
    if not has_weights:
        raise InputError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")):
            check_readable(f)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                            local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise InputError(f"cannot read the config of {path}: {str(err).splitlines()[0]}") from None
    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    cls = cls or AutoModel
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = _check_device_map(device_map)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, loading = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise RefusedError(f"refusing to load the weights in {path}: a pickle that needs arbitrary code "
                           f"to load (torch.load weights_only=True rejected it: {unpickling_reason(err)}); "
                           "convert them to safetensors from a trusted environment") from None
    except SafetensorError as err:
        raise InputError(f"the weights in {path} are not a readable safetensors file (corrupted or "
                         f"truncated?): {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load the model in {path}: {msg}") from None
    missing = sorted((loading or {}).get("missing_keys") or [])
    if missing:
        raise InputError(f"{path}: {len(missing)} weight(s) of {type(model).__name__} are missing from the checkpoint "
                         f"(e.g. {missing[0]}) and would be random; refusing a partly random model")
    tok = load_tokenizer(path, trust_remote_code)
    model.eval()
    return LoadedModel(model, str(path), "hf", tokenizer=tok, hf_dir=path,
                       info={"architecture": type(model).__name__})


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The directory's tokenizer, or None if it has none (text data then fails with a clear error)."""
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                              "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_device_map(device_map: str | dict) -> str | dict:
    """A ``device_map`` for ``from_pretrained``: "auto" / "balanced" / "sequential" or an explicit
    {module: device} dict; it needs accelerate, which places each block on a GPU (then CPU, then disk)
    without ever materialising the whole model on one device."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise InputError("--device-map needs the accelerate package (pip install accelerate)") from None
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise InputError(f"--device-map must be auto, balanced, balanced_low_0 or sequential, got {device_map!r}")
    return device_map


def load_model(source, arch: str | None = None, trust_remote_code: bool = False,
               dtype: torch.dtype | None = None, device_map: str | dict | None = None) -> LoadedModel:
    """Load any MODEL argument of the contract (see module docstring). Nothing is modified.

    ``device_map`` (Hugging Face directories only; sharded ``model.safetensors.index.json``
    checkpoints included): dispatch the model over the available devices with accelerate, for models
    larger than one device; specprune then never moves it (see :func:`specprune.analysis.analyze`)."""
    from .heap import settle

    loaded = _load_model(source, arch, trust_remote_code, dtype, device_map)
    settle()  # the CLI process only: imports and weights leave the cycle collector's view
    return loaded


def _load_model(source, arch: str | None, trust_remote_code: bool, dtype: torch.dtype | None,
                device_map: str | dict | None) -> LoadedModel:
    if device_map is not None and not (isinstance(source, (str, os.PathLike)) and Path(source).is_dir()
                                       and (Path(source) / "config.json").exists()
                                       and not (Path(source) / "specprune.json").exists()):
        raise InputError("--device-map applies to Hugging Face model directories only")
    if isinstance(source, nn.Module):
        source.eval()
        return LoadedModel(source, type(source).__name__, "module")
    path = Path(source)
    if not path.exists():
        raise InputError(f"model not found: {source}")
    check_readable(path, "model")
    path = Path(os.path.abspath(path))  # recorded as the source: found again from any directory
    if path.is_dir():
        if (path / "specprune.json").exists():
            from .compress.saved import load_saved

            return load_saved(path, arch=arch)
        if (path / "config.json").exists():
            return _load_hf(path, trust_remote_code, dtype, device_map)
        if (path / "series.json").exists():  # analyze's output for several checkpoints
            subs = sorted(p.name for p in path.iterdir() if (p / "analysis.json").exists())
            raise InputError(f"{source} holds a series of {len(subs)} analyses (series.json), not one model: pass one "
                             f"of its directories, e.g. {Path(source) / subs[0] if subs else source}")
        raise InputError(f"{source} is not a model directory (no config.json or specprune.json)")
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise InputError(f"unsupported model file {source}: expected a HF directory, "
                         ".safetensors, .pt or .pth")
    if not arch:
        raise InputError(f"{source} is a state dict: pass --arch module:callable to build the module")
    state = read_state_dict(path)
    builder = import_callable(arch)
    try:
        model = builder()
    except Exception as err:
        raise InputError(f"--arch {arch} failed to build the model: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{source} does not fit --arch {arch}: {' '.join(str(err).split())[:400]}") from None
    model.eval()
    return LoadedModel(model, str(path), "state_dict", arch=arch)


def num_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def unwrap(model):
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, so that layer names are those of the model itself (a
    plan made on a wrapped model then applies to the saved checkpoint) and hooks see eager modules."""
    for _ in range(8):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block (no dropout, BatchNorm statistics frozen), and every
    submodule's own ``training`` flag restored afterwards — also a BatchNorm the caller froze inside a
    model in train mode."""
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        if flags and any(flag for _, flag in flags):
            model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes, dtypes and bytes: identifies the weights a
    plan was made for."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def other_weights(recorded: str | None, model: nn.Module) -> bool:
    """True when a fingerprint was recorded (for a plan or an analysis) and ``model``'s weights are not those;
    False when none was recorded (nothing to compare with)."""
    return bool(recorded) and recorded != fingerprint(model)


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda:i`` is checked to exist."""
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise InputError(f"--device must be auto, cpu, cuda or cuda:i, got {spec!r}")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
