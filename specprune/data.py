"""Calibration and evaluation data.

Text (``.txt``, ``.jsonl`` with a ``text`` field, or directories of them) is tokenized with
the model's tokenizer into one token stream and cut into non-overlapping windows of
``seq_len`` tokens (special tokens such as [CLS]/[SEP] included in the count). The windows
are shuffled once with ``seed``; 25% of them (at least one) are held apart for evaluation
and ``samples`` windows are drawn, without replacement, from the rest for calibration.
Tensor files (``.pt``/``.safetensors`` holding ``input`` and optional ``labels``, or a
``.npy`` array) serve non-text models; from Python any iterable of batches (tensors or dicts
of tensors) works. A batch is always a dict; ``attention_mask`` marks the positions that
count (padding is masked and never enters a covariance or a metric). Tokens are counted as the
positions a sequence model sees: ``input_ids`` or ``inputs_embeds`` (or a 3-D ``input``, samples ×
positions × features) count samples × positions, any other input (features, images) one per sample.
How a batch reaches the model (keys as keyword arguments, ``labels`` kept for the metrics, decoder
inputs for encoder-decoder models) is described in :func:`model_arguments` and :func:`forward`.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import InputError

TEXT_SUFFIXES = (".txt", ".jsonl")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")
EVAL_FRACTION = 0.25


@dataclass
class Batches:
    """A list of batches (dicts of tensors) and how they were made."""

    batches: list[dict[str, torch.Tensor]]
    samples: int
    seq_len: int | None
    seed: int
    sources: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def tokens(self) -> int:
        """Positions that count (attention mask), over all batches."""
        return sum(count_tokens(b) for b in self.batches)

    def describe(self) -> dict:
        return {"tokens": self.tokens, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that count in one batch (see the module docstring): the attention mask's sum, else
    samples × positions of token inputs, else one per sample of the first input tensor."""
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return int(batch["attention_mask"].sum())
    for key in ("input_ids", "inputs_embeds", "input"):
        x = batch.get(key)
        if isinstance(x, torch.Tensor):
            sequence = (key == "input_ids" and x.dim() > 1) or (key == "inputs_embeds" and x.dim() == 3) \
                or (key == "input" and x.dim() == 3)
            return int(x.shape[0] * (x.shape[1] if sequence else 1)) if x.dim() else 1
    x = _first_input(batch)
    return int(x.shape[0]) if x is not None and x.dim() else 0


def _first_input(batch: dict) -> torch.Tensor | None:
    """The first tensor of a batch that the model reads (not its labels or a mask), for counts and messages."""
    return next((v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"
                 and not k.endswith("mask")), None)


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` (symlinked directories not followed). Unlike ``Path.rglob``, a
    directory that cannot be read is an error, not silently skipped data."""
    def unreadable(err: OSError):
        raise InputError(f"cannot read data directory {err.filename}: {err.strerror or err}")

    for dirpath, _dirs, files in os.walk(root, onerror=unreadable):
        for name in files:
            f = Path(dirpath) / name
            if f.is_file():
                yield f


def _collect_files(paths: Sequence[str | os.PathLike], suffixes) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise InputError(f"data not found: {p}")
        if path.is_dir():
            found = sorted(f for f in _walk(path) if f.suffix in suffixes)
            if not found:
                other = TEXT_SUFFIXES if suffixes == TENSOR_SUFFIXES else TENSOR_SUFFIXES
                if suffixes in (TEXT_SUFFIXES, TENSOR_SUFFIXES) and len(paths) > 1 \
                        and any(f.suffix in other for f in _walk(path)):
                    raise InputError(_mixed_message(next(q for q in paths if Path(q) != path), p))
                hint = ""
                if suffixes == TEXT_SUFFIXES and any(f.suffix.lower() in TENSOR_SUFFIXES for f in _walk(path)):
                    hint = " (a directory is read as text; pass tensor files themselves: --data a.pt --data b.pt)"
                elif any(f.suffix.lower() in suffixes and f.suffix not in suffixes for f in _walk(path)):
                    hint = f" (suffixes are lower case: {', '.join(suffixes)})"
                raise InputError(f"data directory {p} holds no {'/'.join(suffixes)} files{hint}")
            files.extend(found)
        elif path.suffix in suffixes:
            files.append(path)
        else:
            also = f", or tensors ({', '.join(TENSOR_SUFFIXES)})" if suffixes == TEXT_SUFFIXES else ""
            case = " (suffixes are lower case)" if path.suffix.lower() in (*TEXT_SUFFIXES, *TENSOR_SUFFIXES) else ""
            raise InputError(f"unsupported data file {p}: expected {', '.join(suffixes)} or a directory{also}{case}")
    return files


def is_text_data(paths: Sequence[str | os.PathLike]) -> bool:
    """True when the paths are text (files or directories of .txt/.jsonl)."""
    for p in paths:
        path = Path(p)
        if path.is_file() and path.suffix in TENSOR_SUFFIXES:
            return False
    return True


def _mixed_message(a, b) -> str:
    return (f"text and tensor data cannot be mixed ({a}, {b}): give either text files (.txt/.jsonl) or "
            "tensor files (.pt/.safetensors/.npy), not both")


def check_not_mixed(paths: Sequence[str | os.PathLike]) -> None:
    """Text files and tensor files named together are refused with one clear line (a text model
    cannot use tensors, and tensors carry no text)."""
    text = [p for p in paths if Path(p).suffix in TEXT_SUFFIXES and Path(p).is_file()]
    tensors = [p for p in paths if Path(p).suffix in TENSOR_SUFFIXES and Path(p).is_file()]
    if text and tensors:
        raise InputError(_mixed_message(text[0], tensors[0]))


MAX_SEED = 2 ** 64 - 1


def check_seed(seed) -> None:
    """``--seed``: an integer in 0..2**64 - 1 (what numpy and torch generators accept)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"--seed must be an integer, got {seed!r}")
    if seed < 0:
        raise InputError(f"--seed must be ≥ 0, got {seed}")
    if seed > MAX_SEED:
        raise InputError(f"--seed must be below 2**64, got {seed}")


def read_texts(paths: Sequence[str | os.PathLike], what: str = "calibration text") -> list[str]:
    """Documents from .txt files (one per file) and .jsonl lines (the ``text`` field). ``what`` names
    the data in the error for empty text ("calibration text", "evaluation text (--eval-data)")."""
    docs: list[str] = []
    for f in _collect_files(paths, TEXT_SUFFIXES):
        try:
            raw = f.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (Windows tools) is dropped
        except UnicodeDecodeError as err:
            raise InputError(f"{f} is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None
        except OSError as err:
            raise InputError(f"cannot read {f}: {err.strerror or err}") from None
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{f}:{i} is not valid JSON: {err.msg}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputError(f"{f}:{i} has no string 'text' field")
                docs.append(obj["text"])
        else:
            docs.append(raw)
    if not any(d.strip() for d in docs):
        raise InputError(f"the {what} is empty")
    return docs


def tokenize_stream(tokenizer, docs: Sequence[str]) -> list[int]:
    """One token stream (no special tokens); paragraphs are tokenized separately to stay fast and
    below the tokenizer's length warnings."""
    ids: list[int] = []
    paragraphs = [p for d in docs for p in d.split("\n\n") if p.strip()]
    chunk = 256
    for i in range(0, len(paragraphs), chunk):
        enc = tokenizer(paragraphs[i:i + chunk], add_special_tokens=False, return_attention_mask=False,
                        verbose=False)
        for seq in enc["input_ids"]:
            ids.extend(seq)
    return ids


def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] … [SEP], <s> …), found by
    encoding the same text with and without special tokens. (transformers 5 tokenizers no longer
    have ``build_inputs_with_special_tokens``; this works with every version.)"""
    probe = "specprune calibration"
    try:
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    except (TypeError, ValueError, KeyError, AttributeError):
        return [], []
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i:i + n] == plain:
            return full[:i], full[i + n:]
    return [], []


def text_windows(tokenizer, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """All non-overlapping windows of the stream, each ``seq_len`` tokens with specials added."""
    if seq_len <= 0:
        raise InputError(f"--seq-len must be positive, got {seq_len}")
    if tokenizer is None:
        raise InputError("text data needs a tokenizer, and the model has none (add tokenizer files to "
                         "the model directory or use tensor data)")
    prefix, suffix = special_template(tokenizer)
    n_special = len(prefix) + len(suffix)
    body = seq_len - n_special
    if body <= 0:
        raise InputError(f"--seq-len {seq_len} leaves no room next to {n_special} special tokens")
    ids = tokenize_stream(tokenizer, docs)
    n = len(ids) // body
    if n < 1:
        raise InputError(f"the text is too short: {len(ids)} tokens make no window of {seq_len} "
                         f"(need at least {body} tokens)")
    rows = []
    for i in range(n):
        piece = ids[i * body:(i + 1) * body]
        rows.append(prefix + piece + suffix)
    return torch.tensor(rows, dtype=torch.long)


def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``n`` windows once; (calibration pool, held-apart evaluation windows).
    With a single window both use it (nothing can be held apart)."""
    perm = np.random.default_rng(seed).permutation(n)
    if n < 2:
        return perm, perm
    n_eval = max(1, int(round(EVAL_FRACTION * n)))
    return perm[n_eval:], perm[:n_eval]


def _batched(x: torch.Tensor, batch_size: int, extra: dict[str, torch.Tensor] | None = None,
             key: str = "input_ids") -> list[dict[str, torch.Tensor]]:
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        b = {key: x[i:i + batch_size]}
        if key == "input_ids":
            b["attention_mask"] = torch.ones_like(b[key])
        for k, v in (extra or {}).items():
            b[k] = v[i:i + batch_size]
        out.append(b)
    return out


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """``input`` (and optional ``labels``) from .pt / .safetensors / .npy."""
    if path.suffix == ".npy":
        try:
            arr = np.load(str(path), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise InputError(f"cannot read {path} as a numpy array: {err}") from None
        return {"input": torch.from_numpy(np.ascontiguousarray(arr))}
    from .models import read_state_dict

    tensors = read_state_dict(path)
    if "input" not in tensors:
        raise InputError(f"{path} holds no 'input' tensor (found: {', '.join(sorted(tensors)) or 'none'})")
    out = {"input": tensors["input"]}
    if "labels" in tensors:
        out["labels"] = tensors["labels"]
    return out


def load_data(paths: Sequence[str | os.PathLike], tokenizer=None, *, samples: int = 128, seq_len: int = 128,
              batch_size: int = 8, seed: int = 0, split: str = "calibration", offset: int = 0) -> Batches:
    """Batches for ``split`` = "calibration" (drawn from the non-held-apart windows), "evaluation"
    (the held-apart windows) or "all" (every window, e.g. for --eval-data). ``offset`` skips the split's
    first windows: ``samples`` windows at offset ``s`` are disjoint from the ``s`` windows at offset 0
    (the selection is a prefix of one seeded shuffle); none may be left (``samples`` is then 0)."""
    if samples <= 0:
        raise InputError(f"--samples must be positive, got {samples}")
    if seq_len <= 0:
        raise InputError(f"--seq-len must be positive, got {seq_len}")
    check_seed(seed)
    if not paths:
        raise InputError("no data given (--data)")
    names = [str(p) for p in paths]
    check_not_mixed(paths)
    evaluation_only = split == "all"  # --eval-data
    if is_text_data(paths):
        what = "evaluation text (--eval-data)" if evaluation_only else "calibration text"
        windows = text_windows(tokenizer, read_texts(paths, what), seq_len)
        return _label(_select(windows, {}, "input_ids", samples, batch_size, seed, split, seq_len, names, offset))
    tensors: dict[str, list[torch.Tensor]] = {}
    for f in _collect_files(paths, TENSOR_SUFFIXES):
        for k, v in read_tensor_file(f).items():
            tensors.setdefault(k, []).append(v)
    try:
        merged = {k: torch.cat(v) for k, v in tensors.items()}
    except RuntimeError as err:
        raise InputError(f"tensor data files do not fit together: {str(err).splitlines()[0]}") from None
    x = merged.pop("input")
    if x.shape[0] == 0:
        raise InputError("the evaluation tensor data (--eval-data) is empty" if evaluation_only
                         else "the tensor data is empty")
    if "labels" in merged and merged["labels"].shape[0] != x.shape[0]:
        raise InputError("'labels' and 'input' have different numbers of samples")
    return _label(_select(x, merged, "input", samples, batch_size, seed, split, None, names, offset))


def _select(x, extra, key, samples, batch_size, seed, split, seq_len, names, offset=0) -> Batches:
    n = x.shape[0]
    take = slice(offset, offset + samples)
    if split == "all":
        idx = np.random.default_rng(seed).permutation(n)[take]
    else:
        calib, held = split_indices(n, seed)
        idx = held[take] if split == "evaluation" else calib[take]
    idx_t = torch.as_tensor(np.sort(idx) if split == "evaluation" else idx, dtype=torch.long)
    sel = x[idx_t]
    ext = {k: v[idx_t] for k, v in extra.items()}
    return Batches(_batched(sel, batch_size, ext, key), int(sel.shape[0]), seq_len, seed, names)


def from_iterable(data: Iterable[Any], seed: int = 0) -> Batches:
    """Wrap any iterable of batches (tensors or dicts of tensors) from the Python API."""
    if isinstance(data, Batches):
        return data
    if data is None:
        raise InputError("no data: pass an iterable of batches (tensors or dicts of tensors)")
    if isinstance(data, (torch.Tensor, dict)):  # one batch, not an iterable of rows or keys
        data = [data]
    try:
        items = iter(data)
    except TypeError:
        raise InputError(f"data must be an iterable of batches (tensors or dicts of tensors), got "
                         f"{type(data).__name__}") from None
    batches: list[dict[str, torch.Tensor]] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            batches.append({"input": item})
        elif isinstance(item, dict):
            if not any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in item.values()):
                raise InputError(f"a data batch (dict) must hold tensors, got keys {sorted(map(str, item))[:5]} "
                                 "without one")
            ids, mask = item.get("input_ids"), item.get("attention_mask")
            if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.shape != mask.shape:
                raise InputError(f"a data batch's attention_mask has shape {tuple(mask.shape)}, its input_ids "
                                 f"{tuple(ids.shape)}: they must match (one mask entry per token)")
            batches.append(dict(item))
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            b = {"input": item[0]}
            if len(item) > 1 and isinstance(item[1], torch.Tensor):
                b["labels"] = item[1]
            batches.append(b)
        else:
            raise InputError(f"a data batch must be a tensor or a dict of tensors, got {type(item).__name__}")
    if not batches:
        raise InputError("the data iterable is empty")
    samples = sum(int(next(v for v in b.values() if isinstance(v, torch.Tensor) and v.dim() >= 1).shape[0])
                  for b in batches)
    seq = None
    if "input_ids" in batches[0] and batches[0]["input_ids"].dim() == 2:
        seq = int(batches[0]["input_ids"].shape[1])
    return Batches(batches, samples, seq, seed, ["<python iterable>"])


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# Where batches came from, for the message when they do not fit the model: the tensor every batch of
# a Batches is a view of (id → (weak reference, file names)); nothing is attached to the batches.
_ORIGINS: dict[int, tuple[weakref.ref, str]] = {}
# Input layouts each model has already run (model → {signature}): only the first batch of a layout
# is checked, so a failure later in a run is not mistaken for data that does not fit.
_FITTED: weakref.WeakKeyDictionary[Any, set] = weakref.WeakKeyDictionary()


def _label(batches: Batches) -> Batches:
    """Remember the files ``batches`` were read from (see :func:`forward`)."""
    first = batches.batches[0] if batches.batches else {}
    x = first.get("input_ids", first.get("input"))
    if isinstance(x, torch.Tensor):
        base = x._base if x._base is not None else x
        for key in [k for k, (ref, _) in _ORIGINS.items() if ref() is None]:
            del _ORIGINS[key]
        _ORIGINS[id(base)] = (weakref.ref(base), ", ".join(batches.sources))
    return batches


def _origin(batch: dict) -> str | None:
    x = batch.get("input_ids", batch.get("input"))
    if not isinstance(x, torch.Tensor):
        return None
    base = x._base if x._base is not None else x
    entry = _ORIGINS.get(id(base))
    return entry[1] if entry is not None and entry[0]() is base else None


def _signature(batch: dict, labels: bool = False) -> tuple:
    """The input layout of a batch: every key the model may be given, with its per-sample shape and dtype
    (``labels`` only when they are given to the model)."""
    return tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) if isinstance(v, torch.Tensor) else
                        (k, type(v).__name__, "") for k, v in batch.items() if k != "labels" or labels))


def position_limit(model) -> tuple[int, str] | None:
    """The most positions a model with learned absolute position embeddings accepts, and the config
    field that says so (``max_position_embeddings``, ``n_positions``); None for models without such a
    limit (rotary or relative positions run past it, and modules without a config have none)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if any(getattr(cfg, k, None) for k in ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim",
                                           "alibi", "relative_attention_num_buckets")):
        return None
    if str(getattr(cfg, "position_embedding_type", "absolute") or "absolute") != "absolute":
        return None
    for key in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, key
    return None


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _model_float_dtype(model) -> torch.dtype | None:
    params = getattr(model, "parameters", None)
    if params is None:
        return None
    try:
        return next((p.dtype for p in params() if p.is_floating_point()), None)
    except (TypeError, RuntimeError):
        return None


def _is_float_input(key: str, value) -> bool:
    """Floating data the model reads: every floating tensor but ``labels`` (the metric's, compared in
    float32) and masks (``attention_mask``, ``decoder_attention_mask``: which positions count)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and key != "labels" \
        and not key.endswith("mask")


def _as_model_dtype(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real floating data in another floating dtype than the model's weights (numpy's float64 arrays
    for a float32 model, float32 data for a bfloat16 one) is cast to the weights' dtype, as a copy; token
    ids, masks, labels and complex data are left as they are."""
    want = _model_float_dtype(model)
    if want is None:
        return batch
    if not any(_is_float_input(k, v) and v.dtype != want for k, v in batch.items()):
        return batch
    return {k: (v.to(want) if _is_float_input(k, v) else v) for k, v in batch.items()}


@dataclass(frozen=True)
class _Parameters:
    """What a model's ``forward`` takes: its parameter names, whether it takes any keyword (``**kwargs``)
    and the name of its first positional parameter (where an ``input`` tensor goes)."""

    names: frozenset
    any_keyword: bool
    first: str | None


def _parameters(model) -> _Parameters | None:
    """The parameters of ``model.forward`` (of the callable itself when it is not a module); None when
    they cannot be read (a builtin): every key is then passed and the call decides."""
    import inspect

    from .models import unwrap

    model = unwrap(model)  # DataParallel / torch.compile pass every argument on to the module inside
    fn = getattr(model, "forward", model) if isinstance(model, torch.nn.Module) else model
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    kw = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return _Parameters(frozenset(p.name for p in params if p.kind in kw),
                       any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params),
                       next((p.name for p in params if p.kind in positional), None))


def takes_labels(model) -> bool:
    """True when the model's forward names a ``labels`` parameter (a Hugging Face task head, a module
    that computes its own loss): only such a model is given the batch's labels (see :func:`model_arguments`)."""
    params = _parameters(model)
    return params is not None and "labels" in params.names


def model_arguments(model, batch: dict, labels: bool = False, where: str = "the data") -> tuple[tuple, dict]:
    """The positional and keyword arguments ``model`` is called with for ``batch``.

    An ``input`` tensor (tensor files, plain tensors and ``(input, labels)`` tuples from Python) goes
    first, positionally; every other key goes as a keyword argument of the same name — the way Hugging
    Face models take ``input_ids``, ``pixel_values``, ``decoder_input_ids``, ``inputs_embeds`` or
    ``input_features``, and a ``forward(x, y)`` takes a batch ``{"x": ..., "y": ...}``. A forward with
    ``**kwargs`` takes every key. Two keys are special:

    * ``labels`` belong to the metrics and are given to the model only with ``labels=True`` (the
      task-loss metric) and when its forward names a ``labels`` parameter (:func:`takes_labels`);
    * ``attention_mask`` is specprune's own record of the positions that count (padding never enters a
      covariance or a metric): it is given to a forward that takes it and otherwise kept for that use
      only, so a module without a mask parameter still runs on padded batches.

    Any other key the forward cannot take is refused, with one line naming it: dropping data silently
    would measure the model on other inputs than the user gave (``where`` names the data in that line)."""
    params = _parameters(model)
    args = (batch["input"],) if "input" in batch else ()
    kwargs = {}
    unknown = []
    for k, v in batch.items():
        if k == "input":
            continue
        if k == "labels":
            if labels and params is not None and "labels" in params.names:
                kwargs[k] = v
            continue
        if params is None or params.any_keyword or k in params.names:
            kwargs[k] = v
        elif k != "attention_mask":
            unknown.append(k)
    if unknown and params is not None:
        names = sorted(params.names - ({params.first} if args else set()))
        takes = f"its parameters are {', '.join(names)}" if names else "it takes no keyword arguments"
        what = "key" if len(unknown) == 1 else "keys"
        raise InputError(f"{where} has the batch {what} {', '.join(map(repr, unknown))}, which "
                         f"{type(model).__name__}.forward does not take ({takes}): name the batch keys after "
                         "the forward's parameters, or leave the others out")
    return args, kwargs


def _call(model, batch: dict[str, torch.Tensor], labels: bool = False):
    args, kwargs = model_arguments(model, batch, labels)
    return model(*args, **kwargs)


DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def _with_decoder_inputs(model, batch: dict) -> dict:
    """For a Hugging Face encoder-decoder model (``config.is_encoder_decoder``: T5, BART, Marian,
    Whisper, …) a batch without decoder inputs gets ``decoder_input_ids`` made the way the model makes
    them from ``labels`` when it trains: its own right shift (``prepare_decoder_input_ids_from_labels``,
    T5's ``_shift_right``: the decoder start token, then the sequence less its last token). The sequence
    shifted is the batch's 2-D integer ``labels`` when it has them (the targets the task-loss metric
    scores, so calibration sees the same decoder inputs), else its token ids (``input_ids`` or an integer
    ``input``): the decoder then reads the same text the encoder reads, teacher-forced, and its logits
    at each position predict that position's token. A model without such a shift method is left to make
    its own (BART derives them from ``input_ids``). The batch itself is not modified."""
    from .models import is_encoder_decoder, unwrap

    inner = unwrap(model)
    if not is_encoder_decoder(inner) or any(k in batch for k in DECODER_INPUT_KEYS):
        return batch
    source = None
    for key in ("labels", "input_ids", "input"):
        v = batch.get(key)
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() and not v.is_complex():
            source = v
            break
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    shift_right = getattr(inner, "_shift_right", None)
    if source is None or not (callable(prepare) or callable(shift_right)):
        return batch
    try:
        dec = prepare(labels=source) if callable(prepare) else shift_right(source)
    except (ValueError, RuntimeError, TypeError, AttributeError) as err:
        raise InputError(f"cannot make decoder inputs for the encoder-decoder model {type(inner).__name__} "
                         f"from its token ids ({type(err).__name__}: {_short(err)}): give decoder_input_ids "
                         "(or labels) in each batch") from None
    return {**batch, "decoder_input_ids": dec}


def forward(model, batch: dict[str, torch.Tensor], device=None, *, labels: bool = False):
    """Run the model on a batch: an ``input`` tensor positionally, every other key as a keyword argument
    (:func:`model_arguments`; ``labels`` too with ``labels=True``, for the task-loss metric), and decoder
    inputs made for encoder-decoder models that have none (:func:`_with_decoder_inputs`).

    The first batch of each input layout is checked: token windows longer than the model's learned
    position embeddings, or data the model cannot take (wrong shape, wrong kind), fail with one line
    naming the data instead of the framework's internal error. Floating data in another floating
    dtype than the model's weights is cast to theirs first (:func:`_as_model_dtype`)."""
    origin_batch = batch
    if device is not None:
        batch = to_device(batch, device)
    batch = _with_decoder_inputs(model, _as_model_dtype(model, batch))
    try:
        seen = _FITTED.setdefault(model, set())
    except TypeError:  # a callable that cannot be weakly referenced: run unchecked
        return _call(model, batch, labels)
    sig = _signature(batch, labels)
    if sig in seen:
        return _call(model, batch, labels)
    ids = batch.get("input_ids")
    limit = position_limit(model)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and limit is not None and ids.shape[1] > limit[0]:
        raise InputError(f"windows of {ids.shape[1]} tokens are longer than the model accepts ({limit[0]} "
                         f"positions, {limit[1]} in its config): pass --seq-len {limit[0]} or less")
    origin = _origin(origin_batch)
    where = f"the data in {origin}" if origin else "the data"
    args, kwargs = model_arguments(model, batch, labels, where)  # keys the model cannot take: refused here
    try:
        out = model(*args, **kwargs)
    except (RuntimeError, IndexError, ValueError, TypeError, AttributeError) as err:
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err):
            raise
        x = batch.get("input", batch.get("input_ids", _first_input(batch)))
        shape = f" (a batch of shape {tuple(x.shape)})" if isinstance(x, torch.Tensor) else ""
        why = f"{type(err).__name__}: {_short(err)}"
        from .models import is_encoder_decoder, unwrap

        hint = ""
        if is_encoder_decoder(unwrap(model)) and not any(k in batch for k in DECODER_INPUT_KEYS):
            hint = " (an encoder-decoder model needs decoder inputs: give decoder_input_ids or labels in each batch)"
        raise InputError(f"{where}{shape} does not fit the model: {why}{hint}") from err
    seen.add(sig)
    return out


def attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return m if isinstance(m, torch.Tensor) else None
