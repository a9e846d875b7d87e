"""``specprune evaluate MODEL [--reference MODEL] --data D``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (ArchOpt, BatchSizeOpt, Ctx, DataOpt, DebugOpt, DeviceOpt, EvalDataOpt, FormatOpt,
                     MetricOpt, OutputFormat, OverwriteOpt, QuietOpt, SamplesOpt, SeedOpt, SeqLenOpt, TrustOpt,
                     check_early, command, console)

EPILOG = """Examples:

  specprune evaluate compressed/ --reference ./my-bert --data corpus.txt

  specprune evaluate ./my-llama --data text/ --metric lm-loss --format json
"""


# evaluate's JSON keys beyond the contract's that some runs leave out: always written, null when they do not apply
STABLE_KEYS = ("reference", "reference_source", "reference_note", "prediction_note", "measured_delta_stderr")


def render_evaluation(doc: dict) -> None:
    from ..evaluation import value_labels

    c = console()
    c.print(f"metric: {doc['metric']}", highlight=False)
    if doc.get("reference"):
        recorded = doc.get("reference_source") == "specprune.json"
        how = " (the source recorded in specprune.json)" if recorded else ""
        c.print(f"reference model: {doc['reference']}{how}", highlight=False, markup=False, soft_wrap=True)
    ref_label, value_label = value_labels(str(doc["metric"]))
    c.print(f"{ref_label}: {doc['reference_value']:.6g}   {value_label}: {doc['value']:.6g}", highlight=False)
    line = f"measured delta: {doc['measured_delta']:.4%}"
    if doc.get("reference") is None and "reference" in doc:
        line = "measured delta: not measured (no reference model)"
    if doc.get("predicted_delta") is not None:
        line += f"   predicted: {doc['predicted_delta']:.4%}"
    c.print(line)
    for key in ("reference_note", "prediction_note"):
        if doc.get(key):
            c.print(f"note: {doc[key]}", highlight=False, markup=False, soft_wrap=True)


def recorded_source(model: str) -> tuple[Path | None, str | None]:
    """The source model a specprune-written directory records in its specprune.json: (path, None)
    when it is found (an absolute path, or one relative to the directory), else (None, why not);
    (None, None) when ``model`` is not such a directory (or its specprune.json is unreadable: loading
    the model reports that)."""
    import os

    from ..compress.saved import SPEC_FILE, read_spec
    from ..errors import InputError

    spec_file = Path(model) / SPEC_FILE
    if not spec_file.is_file():
        return None, None
    try:
        src = read_spec(Path(model))["source"].get("path")
    except InputError:
        return None, None
    if not isinstance(src, str) or not src.strip():
        return None, f"{spec_file} records no source model"
    path = Path(src)
    found = path if path.is_absolute() else Path(os.path.normpath(Path(model) / path))
    if not found.exists():
        return None, f"the source model recorded in {spec_file} ({src}) is not found"
    return found, None


def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="The model to measure (e.g. a compressed directory).")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="Uncompressed reference model.")] = None,
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Plan whose prediction to compare with.")] = None,
    metric: MetricOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write evaluation.json here (file or dir).")] = None,
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure the metric on held-apart windows of --data (or --eval-data) and its delta against
    --reference; with a compressed directory its own plan's prediction is shown beside it."""
    import time

    from ..errors import InputError
    from ..evaluation import Evaluator, check_metric
    from ..io import check_output_path, dumps, write_atomic
    from ..models import load_model, resolve_device
    from ..pipeline import DataSpec
    from ..plan import Plan

    ctx = Ctx(fmt, quiet)
    check_early(device, samples=samples, seq_len=seq_len, batch_size=batch_size)
    check_metric(metric)
    t0 = time.perf_counter()
    # Without --reference, a compressed directory is measured against the source model it records.
    auto_ref, ref_note = (None, None) if reference else recorded_source(model)
    inputs = [model, *(data or []), *(eval_data or []), *([reference] if reference else []),
              *([plan] if plan else []), *([auto_ref] if auto_ref else [])]
    out_file = None
    if out is not None:
        check_output_path(out, inputs, overwrite)  # the contract: an existing --out needs --overwrite
        out_file = Path(out) / "evaluation.json" if (Path(out).is_dir() or not Path(out).suffix) else Path(out)
        check_output_path(out_file, inputs, overwrite)
    loaded = load_model(model, arch=arch, trust_remote_code=trust_remote_code)
    ref = load_model(reference, arch=arch, trust_remote_code=trust_remote_code) if reference else None
    if auto_ref is not None:
        ref, ref_note = _load_recorded(auto_ref, model, arch)
        if ref is None:
            auto_ref = None
    tok = loaded.tokenizer or (ref.tokenizer if ref else None)
    spec = DataSpec(data, eval_data, samples, seq_len, batch_size, seed)
    batches = spec.evaluation(tok)
    dev = resolve_device(device)
    if ref is not None:
        ref.model.to(dev)
    loaded.model.to(dev)
    plan_path = str(plan) if plan is not None else \
        str(Path(model) / "plan.json") if (Path(model) / "plan.json").is_file() else None
    the_plan = Plan.load(plan_path) if plan_path else None
    pred = the_plan.prediction if the_plan is not None else None
    pred_note = None
    if the_plan is not None and the_plan.edited:
        pred_note = (f"the plan's layer settings were edited after recommend predicted "
                     f"{the_plan.predicted_delta:.4g} for it: that prediction is not this plan's, so there is none to "
                     "compare with")
    if reference and the_plan is not None and ref is not None:
        ref_note = _other_reference(ref.model, the_plan, reference) or ref_note
    evaluator = Evaluator(ref.model if ref is not None else loaded.model, batches, metric, dev)
    if pred is not None and the_plan.metric not in ("auto", evaluator.metric):  # another quantity's prediction
        pred_note = (f"the plan predicts the {the_plan.metric} delta, not {evaluator.metric}: no prediction to "
                     "compare with")
        pred = None
    if ref is not None:
        ev = evaluator.evaluation(loaded.model, predicted_delta=pred)
    else:
        if evaluator.metric == "output-mse":
            why = f" ({ref_note})" if ref_note else ""
            raise InputError(f"output-mse needs --reference (the uncompressed model) to compare against{why}")
        from ..evaluation import Evaluation

        ev = Evaluation(evaluator.metric, evaluator.reference_value, evaluator.reference_value, 0.0, pred)
        ref_note = ((ref_note + "; ") if ref_note else "") + (
            "no reference model was measured: reference_value is the model's own value and measured_delta "
            "is 0 by definition; pass --reference MODEL to measure the delta")
    ev.extra["reference"] = str(reference) if reference else (str(auto_ref) if auto_ref else None)
    if auto_ref is not None:
        ev.extra["reference_source"] = "specprune.json"
    if ref_note:
        ev.extra["reference_note"] = ref_note
    if pred_note:
        ev.extra["prediction_note"] = pred_note
    ev.plan = plan_path
    if the_plan is not None:
        ev.size = the_plan.size
    else:  # no plan: the model as it is, before = after
        from ..compress.apply import plan_size
        from ..plan import Plan

        ev.size = plan_size(loaded.model, Plan(model={}, tolerance=0.0, metric=evaluator.metric, layers={}))
    ev.seconds = time.perf_counter() - t0
    ev.extra["eval_windows"] = batches.samples
    for key in STABLE_KEYS:  # the same keys with or without --reference, a plan or notes (null: not applicable)
        ev.extra.setdefault(key, None)
    doc = ev.to_dict()
    from ..distributed import is_main

    if out_file is not None and is_main():
        write_atomic(out_file, dumps(doc), inputs=inputs, overwrite=overwrite)
    ctx.emit(doc, render_evaluation)


def _other_reference(ref_model, plan, reference: str) -> str | None:
    """A note when --reference has other weights than the model the plan was made for (its fingerprint):
    the delta is then measured against another model, not against the uncompressed source, and the
    plan's prediction is no forecast of it."""
    from ..models import other_weights

    if not other_weights(plan.model.get("fingerprint"), ref_model):
        return None
    return (f"--reference {reference} has other weights than the model the plan was made for (fingerprints "
            "differ): the measured delta is against another model than the uncompressed source, and the "
            "prediction does not forecast it")


def _load_recorded(source: Path, model: str, arch):
    """Load the recorded source as the reference: (LoadedModel, None), or (None, why not). Nothing
    named in a received directory runs: remote code stays off, and only the user's own --arch builds a
    non-Hugging Face source. A source whose weights differ from those the plan was made for (its
    fingerprint) is not used."""
    from ..errors import SpecpruneError
    from ..models import load_model, other_weights
    from ..plan import Plan

    recorded = f"the source model {source} recorded in {Path(model) / 'specprune.json'}"
    try:
        ref = load_model(source, arch=arch, trust_remote_code=False)
    except SpecpruneError as err:
        return None, f"{recorded} cannot be loaded: {err}"
    plan_file = Path(model) / "plan.json"
    try:
        made_for = Plan.load(plan_file).model.get("fingerprint") if plan_file.is_file() else None
    except SpecpruneError:
        made_for = None
    if other_weights(made_for, ref.model):
        return None, f"{recorded} has other weights than the model was compressed from (fingerprints differ)"
    return ref, None


def register(app: typer.Typer) -> None:
    app.command("evaluate", epilog=EPILOG)(command(evaluate_cmd))
