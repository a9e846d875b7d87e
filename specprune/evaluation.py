"""Metrics and measured deltas (contract: "Metric and tolerance").

* ``lm-loss`` — causal LMs: mean next-token cross-entropy over counted positions;
  delta = (L̃ − L)/L. Encoder-decoder models are refused: their decoder has no next-token loss
  on the input text (its logits at a position predict that position's token).
* ``task-loss`` — batches with ``labels``: the model's own loss when it returns one, else
  cross-entropy (integer labels) or MSE (float labels) on the output; delta = (L̃ − L)/L.
  For an encoder-decoder model: its teacher-forced cross-entropy of the labels.
* ``output-mse`` — anything else: Σ‖f̃(x) − f(x)‖² / Σ‖f(x)‖² over all counted positions
  (ratio of sums, masked by the attention mask), f = ``logits`` if present, else
  ``last_hidden_state``, else the first tensor of the output. For an encoder-decoder model f is
  the decoder's logits with decoder inputs made from the same text (the model's own right shift,
  see :func:`specprune.data.forward`): the change of its teacher-forced predictions of that text.

Every metric feeds batches the same way (:func:`specprune.data.forward`); task-loss adds the labels.
* ``module:callable`` or a registered metric plugin — ``fn(model, batch, device) -> (sum, count)``; delta = relative change
  of the mean.

An :class:`Evaluator` computes the reference once and then measures any number of compressed
variants against it (what sweeps and calibration need).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batches, forward, takes_labels, to_device
from .distributed import all_reduce_scalars, shard
from .errors import InputError
from .models import eval_mode
from .progress import track

METRICS = ("auto", "lm-loss", "task-loss", "output-mse")


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: logits, else last_hidden_state, else the first."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    values = getattr(out, "values", None)
    if callable(values):
        for v in values():
            if isinstance(v, torch.Tensor):
                return v
    raise InputError(f"cannot find a tensor in the model output ({type(out).__name__})")


def resolve_metric(name: str, model: nn.Module, batches: Batches) -> str:
    """``auto`` → lm-loss for causal LMs, task-loss when batches carry labels, else output-mse."""
    from .models import is_causal_lm, is_encoder_decoder

    name = (name or "auto").strip()
    if name == "auto":
        if is_causal_lm(model) and "input_ids" in batches.batches[0]:
            return "lm-loss"
        if "labels" in batches.batches[0]:
            return "task-loss"
        return "output-mse"
    if name == "lm-loss" and "input_ids" not in batches.batches[0]:
        raise InputError("--metric lm-loss needs token data (input_ids)")
    if name == "lm-loss" and is_encoder_decoder(model):
        raise InputError(f"--metric lm-loss is the next-token loss of a causal language model, and "
                         f"{type(model).__name__} is an encoder-decoder model: use --metric output-mse (its "
                         "decoder's logits, teacher-forced on the same text) or task-loss with labelled data")
    if name == "lm-loss" and not is_causal_lm(model) and lm_head_missing(model):
        raise InputError(f"--metric lm-loss needs a causal language model (next-token logits), and "
                         f"{type(model).__name__} has no language-model head: use --metric output-mse with "
                         "--reference (or task-loss with labelled data)")
    if name == "task-loss" and "labels" not in batches.batches[0]:
        raise InputError("--metric task-loss needs data with labels")
    if name not in METRICS:
        metric_function(name)  # unknown names fail here with a near-match suggestion
    return name


def check_metric(name: str) -> None:
    """Refuse an unknown ``--metric`` up front (before an analysis or a model load that it would otherwise
    fail after): built-in names pass, anything else must resolve to a metric function."""
    name = (name or "auto").strip()
    if name not in METRICS:
        metric_function(name)
    else:
        check_builtin_metric(name)


def check_builtin_metric(name: str) -> None:
    """A built-in metric name that a plugin also registers is an error where it is used, as for every kind
    of plugin (``registry.get`` names both packages); ``auto`` is no registration."""
    from . import registry

    if name != "auto":
        registry.get("metrics", name)


def lm_head_missing(model: nn.Module) -> bool:
    """True for a Hugging Face model without a language-model head (``BertModel``, a classifier):
    it has no next-token logits for lm-loss. Modules that are not HF models are judged by their output
    (see ``_lm_loss_sum``)."""
    getter = getattr(model, "get_output_embeddings", None)
    if getattr(model, "config", None) is None or not callable(getter):
        return False
    try:
        return getter() is None
    except Exception:  # noqa: BLE001 - a model class without the hook: judged by its output
        return False


def _lm_loss_sum(model, batch, device) -> tuple[float, int]:
    b = to_device(batch, device)
    logits = output_tensor(forward(model, b)).float()
    ids = b["input_ids"]
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape) or logits.shape[-1] <= int(ids.max()):
        raise InputError(f"the lm-loss metric needs next-token logits over the vocabulary, and the model's "
                         f"output has shape {tuple(logits.shape)} for token ids of shape {tuple(ids.shape)} "
                         f"up to {int(ids.max())}: use --metric output-mse with --reference")
    mask = b.get("attention_mask", torch.ones_like(ids)).bool()
    lg = logits[:, :-1]
    tgt = ids[:, 1:]
    m = mask[:, 1:] & mask[:, :-1]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    loss = loss.reshape(tgt.shape)[m]
    return float(loss.double().sum()), int(m.sum())


def _task_loss_sum(model, batch, device) -> tuple[float, int]:
    """The task loss of one labelled batch, as (sum, count). The batch reaches the model as in every
    other metric (:func:`specprune.data.forward`: its keys, the dtype cast, one line when it does not
    fit), and the labels too when the forward takes them (:func:`specprune.data.takes_labels`): the loss
    the model returns is then used (mean × samples; for an encoder-decoder model its teacher-forced
    cross-entropy of the labels, decoder inputs being the labels shifted right). Otherwise the output is
    scored: cross-entropy for integer labels, MSE for floating ones."""
    b = to_device(batch, device)
    labels = b["labels"]
    out = forward(model, b, labels=True)
    if takes_labels(model):
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            n = int(labels.shape[0])
            return float(loss.double()) * n, n
    pred = output_tensor(out)
    pred = pred.float()
    try:
        if labels.dtype in (torch.long, torch.int, torch.int32, torch.int64):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= pred.shape[-1]):
                raise InputError(f"class labels must lie in 0..{pred.shape[-1] - 1} (the model's {pred.shape[-1]} "
                                 f"outputs), got {int(labels.min())}..{int(labels.max())}")
            loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), reduction="sum")
            return float(loss.double()), int(labels.numel())
        loss = F.mse_loss(pred, labels.float().reshape(pred.shape), reduction="sum")
    except (ValueError, RuntimeError) as err:  # shapes that do not match: one line, not torch's trace
        raise InputError(f"the labels (shape {tuple(labels.shape)}) do not fit the model's output (shape "
                         f"{tuple(pred.shape)}): {str(err).splitlines()[0][:160]}") from None
    return float(loss.double()), int(labels.shape[0])


def _masked_output(model, batch, device) -> torch.Tensor:
    """The output positions that count, as (positions, features) float32 on CPU."""
    b = to_device(batch, device)
    y = output_tensor(forward(model, b)).float()
    m = b.get("attention_mask")
    if isinstance(m, torch.Tensor) and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(m.shape):
        y = y[m.bool()]
    return y.reshape(y.shape[0], -1).cpu() if y.dim() > 1 else y.reshape(-1, 1).cpu()


def _same_shape(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The measured model's output next to the reference's: the same shape, or one clear line."""
    if tuple(y.shape) != tuple(ref.shape):
        if y.shape[1:] != ref.shape[1:]:
            what = f"{y.shape[1]} values per position against the reference's {ref.shape[1]}"
        else:
            what = f"{y.shape[0]} positions against the reference's {ref.shape[0]}"
        raise InputError(f"the outputs of the model and the reference do not have the same shape ({what}): "
                         "compare a compressed model with the model it was made from (the same architecture)")
    return y


class LMLoss:
    """Built-in ``lm-loss`` metric: mean next-token cross-entropy (registered as a metric plugin)."""

    name = "lm-loss"

    def __call__(self, model, batch, device=None) -> tuple[float, int]:
        return _lm_loss_sum(model, batch, device)


class TaskLoss:
    """Built-in ``task-loss`` metric: the model's loss on labelled batches."""

    name = "task-loss"

    def __call__(self, model, batch, device=None) -> tuple[float, int]:
        return _task_loss_sum(model, batch, device)


class OutputMSE:
    """Built-in ``output-mse`` marker: relative output MSE against the reference (handled by Evaluator)."""

    name = "output-mse"


def metric_function(name: str) -> Callable:
    """A (sum, count) metric by name: ``module:callable`` or a registered metric plugin. Plugin metrics
    are callables ``fn(model, batch, device) -> (sum, count)``; the delta is the relative change of the
    mean sum/count against the reference model."""
    from . import registry
    from .models import import_callable

    if ":" in name:
        fn = import_callable(name, "--metric")
    else:
        obj = registry.get("metrics", name)
        with registry.blame("metrics", name):  # a plugin's __init__ raising: one line naming it
            fn = obj() if isinstance(obj, type) else obj
    if not callable(fn):
        raise InputError(f"metric {name!r} is not callable")
    _check_signature(fn, name)
    return fn


def _check_signature(fn: Callable, name: str) -> None:
    """A metric is called as ``fn(model, batch, device)``: a callable that cannot take those three
    arguments is refused before any work (a failure inside it is the callable's own error)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: checked by the call
        return
    try:
        sig.bind(None, None, None)
    except TypeError as err:
        raise InputError(f"--metric {name} must take (model, batch, device) and return (sum, count); "
                         f"it cannot be called that way ({err})") from None


def _sum_count(result: Any, name: str) -> tuple[float, int]:
    """A custom metric's ``(sum, count)`` as numbers, or one clear line saying what it returned."""
    def number(v) -> float | None:
        if isinstance(v, torch.Tensor):
            return float(v.detach().double().cpu()) if v.numel() == 1 else None
        if isinstance(v, bool):
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    if isinstance(result, torch.Tensor):
        got = f"a tensor of shape {tuple(result.shape)}"
    elif isinstance(result, (tuple, list)):
        got = f"a {type(result).__name__} of {len(result)}"
        if len(result) == 2:
            s, n = number(result[0]), number(result[1])
            if s is not None and n is not None and n == int(n) and n >= 0:
                return s, int(n)
            got = f"({', '.join(_brief(v) for v in result)})"
    else:
        got = _brief(result)
    raise InputError(f"--metric {name} must return (sum, count): two numbers, the count a whole number "
                     f"≥ 0; it returned {got}")


def _brief(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}" if v.numel() != 1 else repr(float(v))
    text = repr(v)
    return text if len(text) <= 60 else f"a {type(v).__name__}"


@dataclass
class Evaluation:
    """evaluation.json (contract fields plus extras)."""

    metric: str
    reference_value: float
    value: float
    measured_delta: float
    predicted_delta: float | None = None
    plan: str | None = None
    output: str | None = None
    size: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"metric": self.metric, "reference_value": self.reference_value, "value": self.value,
             "measured_delta": self.measured_delta, "predicted_delta": self.predicted_delta,
             "plan": self.plan, "output": self.output, "size": self.size}
        d.update(self.extra)
        d["seconds"] = round(self.seconds, 3)
        return d

    def save(self, path, overwrite: bool = True):
        """Write evaluation.json (whole or not at all); a directory gets ``evaluation.json`` inside it."""
        from pathlib import Path

        from .io import dumps, write_atomic

        p = Path(path)
        return write_atomic(p / "evaluation.json" if p.is_dir() else p, dumps(self.to_dict()), overwrite=overwrite)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "evaluation") -> Evaluation:
        """The inverse of :meth:`to_dict` (fields beyond the contract's go back to ``extra``), each field
        checked: one line naming the first that is wrong."""
        from .plan import _finite_number

        if not isinstance(doc, dict):
            raise InputError(f"{where} is not a JSON object")
        if not isinstance(doc.get("metric"), str):
            raise InputError(f"{where}: 'metric' must be a string, got {doc.get('metric')!r}")
        nums = {}
        for key in ("reference_value", "value", "measured_delta", "predicted_delta"):
            v = doc.get(key)
            if v is None and key == "predicted_delta":
                nums[key] = None
                continue
            if not _finite_number(v):
                raise InputError(f"{where}: {key!r} must be a finite number, got {v!r}")
            nums[key] = float(v)
        for key in ("plan", "output"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise InputError(f"{where}: {key!r} must be a string or null, got {doc[key]!r}")
        if not isinstance(doc.get("size") or {}, dict):
            raise InputError(f"{where}: 'size' must be an object")
        seconds = doc.get("seconds", 0.0)
        known = {"metric", "plan", "output", "size", "seconds", *nums}
        return cls(doc["metric"], nums["reference_value"], nums["value"], nums["measured_delta"],
                   nums["predicted_delta"], doc.get("plan"), doc.get("output"), dict(doc.get("size") or {}),
                   float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0.0,
                   {k: v for k, v in doc.items() if k not in known})

    @classmethod
    def load(cls, path) -> Evaluation:
        """Read an evaluation.json (or the one inside a directory) written by :meth:`save` or the CLI."""
        from .io import read_json_doc

        return cls.from_dict(read_json_doc(path, "evaluation.json", "evaluation"), str(path))


def value_labels(metric: str) -> tuple[str, str]:
    """What ``reference_value`` and ``value`` are, in words, for human output: for output-mse they are two
    different quantities (the reference output's energy and the compressed output's error), not one
    metric before and after."""
    if metric == "output-mse":
        return "reference output energy (mean ‖f(x)‖² per position)", "output error (mean ‖f̃(x) − f(x)‖² per position)"
    return f"reference {metric}", f"compressed {metric}"


class Evaluator:
    """Reference statistics computed once; ``delta(model)`` measures a variant against them.

    Per-batch numbers are kept so every measurement also has a standard error: the delta is a
    ratio of sums δ = Σ_b a_b / Σ_b r_b (output-mse: a_b = Σ‖f̃ − f‖², r_b = Σ‖f‖²; losses:
    a_b = L̃_b − L_b, r_b = L_b as sums), whose ratio-estimator standard error is
    sqrt(B/(B−1) · Σ_b (a_b − δ r_b)²) / Σ_b r_b over the B batches.
    """

    def __init__(self, reference: nn.Module, batches: Batches, metric: str = "auto", device=None,
                 description: str = "reference"):
        self.batches = batches
        self._mine = shard(batches.batches, allow_empty=True)  # this rank's share under torch.distributed
        self.device = device
        self.metric = resolve_metric(metric, reference, batches)
        self._custom: Callable | None = None
        if self.metric not in METRICS:
            self._custom = metric_function(self.metric)
        else:
            check_builtin_metric(self.metric)
        self._ref_outputs: list[torch.Tensor] = []
        self.last_stderr: float = float("nan")
        with torch.inference_mode(), eval_mode(reference):  # no dropout; the caller's modes come back
            if self.metric == "output-mse":
                parts = []
                for b in track(self._mine, description):
                    y = _masked_output(reference, b, device)
                    self._ref_outputs.append(y)
                    parts.append((float(y.double().pow(2).sum()), int(y.shape[0])))
            else:
                parts = [self._sum(reference, b) for b in track(self._mine, description)]
        self._ref_parts = parts
        total, count = all_reduce_scalars(sum(p[0] for p in parts), sum(p[1] for p in parts))
        if count == 0:
            raise InputError("the evaluation data has no counted positions")
        self.count = count
        self.reference_sum = total
        self.reference_value = total / count
        if not math.isfinite(self.reference_value):
            if self._custom is not None:
                raise InputError(f"the reference {self.metric} is {self.reference_value}: the metric function "
                                 f"{self.metric!r} returned a non-finite (sum, count) on this data (check the "
                                 "metric, and the data for NaN or Inf values)")
            raise InputError(f"the reference {self.metric} is {self.reference_value}: the model's outputs on this "
                             "data are not finite — check the data for NaN or Inf values (analyze leaves such "
                             "batches out; a metric cannot)")
        if self.reference_value == 0:
            raise InputError(f"the reference {self.metric} is 0: a relative delta is undefined (check the data "
                             "and the model)")

    def _sum(self, model, batch) -> tuple[float, int]:
        if self._custom is not None:
            from . import registry

            with registry.blame("metrics", self.metric):  # a plugin metric raising names itself
                out = self._custom(model, to_device(batch, self.device), self.device)
            return _sum_count(out, self.metric)
        if self.metric == "lm-loss":
            return _lm_loss_sum(model, batch, self.device)
        return _task_loss_sum(model, batch, self.device)

    def _parts(self, model, description: str) -> list[float]:
        """Per-batch numerators a_b (see class docstring)."""
        if self.metric == "lm-loss" and lm_head_missing(model):
            raise InputError(f"the model ({type(model).__name__}) has no language-model head, unlike the "
                             "reference: lm-loss cannot compare them; compare a compressed model with the "
                             "model it was made from (the same architecture)")
        with torch.inference_mode(), eval_mode(model):
            if self.metric == "output-mse":
                return [float((_same_shape(_masked_output(model, b, self.device), ref).double()
                               - ref.double()).pow(2).sum())
                        for b, ref in zip(track(self._mine, description), self._ref_outputs)]
            return [self._sum(model, b)[0] - r[0] for b, r in zip(track(self._mine, description),
                                                                   self._ref_parts)]

    def delta(self, model: nn.Module, description: str = "evaluation") -> float:
        """Relative delta against the reference; its standard error is left in ``last_stderr``."""
        a = self._parts(model, description)
        r = [p[0] for p in self._ref_parts]
        (num,) = all_reduce_scalars(sum(a))
        d = num / self.reference_sum if self.metric == "output-mse" else num / abs(self.reference_sum)
        # batch counts and residuals summed over ranks: the same standard error as one process
        nb, resid = all_reduce_scalars(len(a), sum((ai - d * ri) ** 2 for ai, ri in zip(a, r)))
        nb = int(round(nb))
        if nb > 1:
            self.last_stderr = float((nb / (nb - 1) * resid) ** 0.5 / abs(self.reference_sum))
        else:
            self.last_stderr = float("nan")
        return float(d)

    def value_from_delta(self, delta: float) -> float:
        """The metric's value for a measured delta (output-mse: mean ‖f̃ − f‖² per position)."""
        if self.metric == "output-mse":
            return delta * self.reference_value
        return self.reference_value * (1.0 + delta) if self.reference_value > 0 else \
            self.reference_value + delta * abs(self.reference_value)

    def value(self, model: nn.Module, description: str = "evaluation") -> float:
        return self.value_from_delta(self.delta(model, description))

    def evaluation(self, model: nn.Module, predicted_delta: float | None = None, **extra) -> Evaluation:
        t0 = time.perf_counter()
        d = self.delta(model)
        ev = Evaluation(self.metric, float(self.reference_value), float(self.value_from_delta(d)), float(d),
                        predicted_delta, seconds=time.perf_counter() - t0, **extra)
        ev.extra["measured_delta_stderr"] = self.last_stderr if self.last_stderr == self.last_stderr else None
        return ev


def evaluate(model: nn.Module, data, reference: nn.Module | None = None, metric: str = "auto",
             device=None, predicted_delta: float | None = None) -> Evaluation:
    """Measure ``model`` on ``data``; with ``reference`` the delta is against it, else the delta is 0
    (the model is its own reference) and ``value`` is the metric itself."""
    from .data import from_iterable

    for what, m in (("model", model), ("reference", reference)):
        if m is not None and not isinstance(m, nn.Module):
            raise InputError(f"evaluate takes the {what} as a torch.nn.Module, got {type(m).__name__}")
    if predicted_delta is not None:
        if isinstance(predicted_delta, bool) or not isinstance(predicted_delta, numbers.Real) \
                or not math.isfinite(predicted_delta):
            raise InputError(f"predicted_delta must be a finite number or None, got {predicted_delta!r}")
        predicted_delta = float(predicted_delta)
    batches = data if isinstance(data, Batches) else from_iterable(data)
    t0 = time.perf_counter()
    ev = Evaluator(reference if reference is not None else model, batches, metric, device)
    if reference is None:
        own = 0.0 if ev.metric == "output-mse" else float(ev.reference_value)
        out = Evaluation(ev.metric, float(ev.reference_value), own, 0.0, predicted_delta)
    else:
        out = ev.evaluation(model, predicted_delta)
    out.seconds = time.perf_counter() - t0
    return out
