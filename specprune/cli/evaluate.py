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


def render_evaluation(doc: dict) -> None:
    c = console()
    c.print(f"metric: {doc['metric']}")
    c.print(f"reference: {doc['reference_value']:.6g}   value: {doc['value']:.6g}")
    line = f"measured delta: {doc['measured_delta']:.4%}"
    if doc.get("predicted_delta") is not None:
        line += f"   predicted: {doc['predicted_delta']:.4%}"
    c.print(line)


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
    from ..evaluation import Evaluator
    from ..io import check_output_path, dumps, write_atomic
    from ..models import load_model, resolve_device
    from ..pipeline import DataSpec
    from ..plan import Plan

    ctx = Ctx(fmt, quiet)
    check_early(device, samples=samples, seq_len=seq_len, batch_size=batch_size)
    t0 = time.perf_counter()
    inputs = [model, *(data or []), *(eval_data or []), *([reference] if reference else []),
              *([plan] if plan else [])]
    out_file = None
    if out is not None:
        check_output_path(out, inputs, overwrite)  # the contract: an existing --out needs --overwrite
        out_file = Path(out) / "evaluation.json" if (Path(out).is_dir() or not Path(out).suffix) else Path(out)
        check_output_path(out_file, inputs, overwrite)
    loaded = load_model(model, arch=arch, trust_remote_code=trust_remote_code)
    ref = load_model(reference, arch=arch, trust_remote_code=trust_remote_code) if reference else None
    tok = loaded.tokenizer or (ref.tokenizer if ref else None)
    spec = DataSpec(data, eval_data, samples, seq_len, batch_size, seed)
    batches = spec.evaluation(tok)
    dev = resolve_device(device)
    if ref is not None:
        ref.model.to(dev)
    loaded.model.to(dev)
    pred = None
    plan_path = None
    if plan is not None:
        pred = Plan.load(plan).predicted_delta
        plan_path = str(plan)
    elif (Path(model) / "plan.json").is_file():
        pred = Plan.load(Path(model) / "plan.json").predicted_delta
        plan_path = str(Path(model) / "plan.json")
    if ref is not None:
        ev = Evaluator(ref.model, batches, metric, dev).evaluation(loaded.model, predicted_delta=pred)
    else:
        evaluator = Evaluator(loaded.model, batches, metric, dev)
        if evaluator.metric == "output-mse":
            raise InputError("output-mse needs --reference (the uncompressed model) to compare against")
        from ..evaluation import Evaluation

        ev = Evaluation(evaluator.metric, evaluator.reference_value, evaluator.reference_value, 0.0, pred)
    ev.plan = plan_path
    if plan_path:
        ev.size = Plan.load(plan_path).size
    ev.seconds = time.perf_counter() - t0
    ev.extra["eval_windows"] = batches.samples
    doc = ev.to_dict()
    from ..distributed import is_main

    if out_file is not None and is_main():
        write_atomic(out_file, dumps(doc), inputs=inputs, overwrite=overwrite)
    ctx.emit(doc, render_evaluation)


def register(app: typer.Typer) -> None:
    app.command("evaluate", epilog=EPILOG)(command(evaluate_cmd))
