"""``specprune recommend ANALYSIS_DIR|MODEL --data D --tolerance T --out PLAN``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (ArchOpt, BatchSizeOpt, Ctx, DataOpt, DebugOpt, DeviceOpt, ExcludeOpt, FormatOpt,
                     IncludeOpt, MetricOpt, OutputFormat, OverwriteOpt, QuietOpt, SamplesOpt, SeedOpt, SeqLenOpt,
                     ToleranceOpt, TrustOpt, check_early, command, console, parse_csv_ints)

EPILOG = """Examples:

  specprune recommend analysis/ --data corpus.txt --tolerance 0.02 --out plan.json

  specprune recommend ./my-bert --data corpus.txt --tolerance 0.01 --methods quantize --bits-choices 4,8
"""

MethodsOpt = Annotated[str, typer.Option("--methods", help="What the plan may use: prune, quantize or both.")]
BitsChoicesOpt = Annotated[str, typer.Option("--bits-choices", help="Bit-widths to consider (2..8).")]
GroupSizeOpt = Annotated[Optional[int], typer.Option("--group-size", help="Group size for per-group scales "
                                                     "(0 = per-channel only; default: per-channel and 128).")]
PruneMethodOpt = Annotated[str, typer.Option("--prune-method", help="Low-rank truncation: whitened or spectral.")]
SensitivityOpt = Annotated[str, typer.Option(
    "--sensitivity", help="Per-layer sensitivities: gradient (Gauss–Newton, a few backward passes), probe (one "
                          "layer perturbed at a time), or auto (gradient where defined, else probe).")]



def parse_methods(text: str) -> tuple[str, ...]:
    from ..errors import InputError

    ms = tuple(m.strip() for m in text.split(",") if m.strip())
    if ms == ("both",):
        return ("prune", "quantize")
    bad = [m for m in ms if m not in ("prune", "quantize")]
    if bad or not ms:
        raise InputError(f"--methods takes prune, quantize, prune,quantize or both; got {text!r}")
    return ms


def parse_bits_choices(text: str) -> list[int]:
    """``--bits-choices``: checked before any work is done (2..8, at least one)."""
    from ..errors import InputError

    bits = parse_csv_ints(text, "--bits-choices")
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad or not bits:
        raise InputError(f"--bits-choices takes integers in 2..8, got {text!r}")
    return bits


def group_sizes_from(opt: int | None) -> tuple:
    from ..errors import InputError

    if opt is None:
        return (None, 128)
    if opt < 0:
        raise InputError(f"--group-size must be ≥ 0, got {opt}")
    return (None,) if opt == 0 else (None, opt)


def render_plan(doc: dict) -> None:
    from rich.table import Table

    t = Table(title=f"plan for tolerance {doc['tolerance']:g} ({doc['metric']}): predicted delta "
                    f"{doc['predicted_delta']:.4g} ± {doc['predicted_delta_uncertainty']:.2g}")
    for col in ("layer", "method", "rank", "prune rate", "bits", "group", "predicted δ"):
        t.add_column(col, justify="left" if col in ("layer", "method") else "right")
    for name, lp in doc["layers"].items():
        t.add_row(name, lp["method"] or "–", str(lp["rank"] or "–"), f"{lp['prune_rate']:.0%}",
                  str(lp["bits"] or "–"), str(lp["group_size"] or "–"), f"{lp['predicted_delta']:.2e}")
    console().print(t)
    s = doc.get("size") or {}
    if s:
        console().print(f"size: {s['bits_before'] / 8e6:.2f} MB → {s['bits_after'] / 8e6:.2f} MB "
                        f"({s['bits_after'] / max(s['bits_before'], 1):.1%}), params {s['params_before']:,} → "
                        f"{s['params_after']:,}")


def plan_file(out: str) -> Path:
    """``--out``: a directory (one that exists, or a path ending in a separator) gets ``plan.json`` inside."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / "plan.json"
    return Path(out)


def recommend_cmd(
    target: Annotated[str, typer.Argument(help="An analysis directory (from analyze) or a model.")],
    tolerance: ToleranceOpt = 0.02,
    out: Annotated[Optional[str], typer.Option("--out", help="Where to write plan.json (a file, or a directory: "
                                               "a path ending in '/', or an existing one with --overwrite).")] = None,
    data: DataOpt = None,
    methods: MethodsOpt = "prune,quantize",
    bits_choices: BitsChoicesOpt = "2,3,4,5,6,8",
    group_size: GroupSizeOpt = None,
    prune_method: PruneMethodOpt = "whitened",
    sensitivity: SensitivityOpt = "auto",
    metric: MetricOpt = "auto",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-layer ranks and bit-widths that keep the predicted metric increase under --tolerance at the
    smallest size, with sensitivities calibrated on --data."""
    from ..errors import InputError
    from ..evaluation import check_metric
    from ..io import check_output_path
    from ..pipeline import DataSpec, analysis_or_model, verification_note
    from ..recommender import check_gradient_defined, check_sensitivity_mode, recommend

    ctx = Ctx(fmt, quiet)
    check_early(device, include, exclude, samples=samples, seq_len=seq_len, batch_size=batch_size)
    if not 0 < tolerance < float("inf"):
        raise InputError(f"--tolerance must be a positive finite number (0.02 = 2%), got {tolerance}")
    if prune_method not in ("whitened", "spectral"):
        raise InputError(f"--prune-method must be whitened or spectral, got {prune_method!r}")
    check_sensitivity_mode(sensitivity)
    check_metric(metric)
    ms = parse_methods(methods)
    bits = parse_bits_choices(bits_choices)
    group_sizes = group_sizes_from(group_size)
    spec = DataSpec(data, None, samples, seq_len, batch_size, seed)
    inputs = [target, *(data or [])]
    if out is not None:
        check_output_path(Path(out), inputs, overwrite)  # as evaluate: an existing --out needs --overwrite
        out = plan_file(out)
        check_output_path(out, inputs, overwrite)
    check = None
    if sensitivity == "gradient" and data:  # refused before the analysis, not after it
        def check(model, layers, calib):
            check_gradient_defined(model, layers, metric, calib)
    analysis, loaded = analysis_or_model(target, arch, trust_remote_code, include, exclude, device, spec,
                                         ctx.info, check)
    if loaded.source != str(target):  # an analysis directory: its source model is an input too
        inputs.append(loaded.source)
        if out is not None:
            check_output_path(out, inputs, overwrite)
    calib = spec.calibration(loaded.tokenizer) if data else None
    made_on = analysis.calibration.get("samples")  # a saved analysis may have used more windows than --samples
    verify = spec.verification(loaded.tokenizer, after=made_on if isinstance(made_on, int) else 0) if data else None
    if data:
        ctx.info(verification_note(verify))
    plan = recommend(analysis, tolerance, loaded.model, calib, metric=metric, methods=ms, bits_choices=bits,
                     group_sizes=group_sizes, prune_method=prune_method,
                     source=loaded.source, seed=seed, sensitivity=sensitivity, verify_data=verify)
    from ..distributed import is_main

    if out is not None and is_main():
        plan.save(out, inputs=inputs, overwrite=overwrite)
    doc = plan.to_dict()
    if plan.details.get("sensitivity"):
        ctx.info(f"sensitivities: {plan.details['sensitivity']}")
    if plan.details.get("token_sampled"):
        ts = plan.details["token_sampled"]
        ctx.info(f"the analysis was token-sampled ({ts.get('fraction')} of the tokens for "
                 f"{len(ts.get('layers') or [])} wide layer(s)): their covariances, and the scores and whitened "
                 "truncations made from them, carry that sampling error; the verification measures the plan")
    if plan.details.get("warning"):
        ctx.warn(plan.details["warning"])
    ctx.emit(doc, render_plan)
    if out is not None:
        ctx.info(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("recommend", epilog=EPILOG)(command(recommend_cmd))
