"""``specprune prune|quantize|apply|compress``: change a copy of the model, save it whole."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (ArchOpt, BatchSizeOpt, Ctx, DataOpt, DebugOpt, DeviceOpt, EvalDataOpt, ExcludeOpt,
                     FormatOpt, IncludeOpt, MetricOpt, OutputFormat, OverwriteOpt, QuietOpt, SamplesOpt, SeedOpt,
                     SeqLenOpt, ToleranceOpt, TrustOpt, check_early, command, console)
from .recommend import (BitsChoicesOpt, GroupSizeOpt, MethodsOpt, PruneMethodOpt, SensitivityOpt, group_sizes_from,
                        parse_bits_choices, parse_methods)

OutOpt = Annotated[Path, typer.Option("--out", help="Directory for the compressed model (must not exist "
                                      "unless --overwrite).")]
PlanOpt = Annotated[Optional[Path], typer.Option("--plan", help="plan.json from recommend (or hand-edited).")]
AnalysisOpt = Annotated[Optional[Path], typer.Option("--analysis", help="Analysis directory supplying the input "
                                                     "covariances (else --data, else identity).")]
ExportOpt = Annotated[Optional[str], typer.Option("--export", help="'dense': also write a plain checkpoint "
                                                  "(dequantized, factors multiplied out).")]
IgnoreFpOpt = Annotated[bool, typer.Option("--ignore-fingerprint", help="Apply a plan made for other weights.")]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help="fake (specprune RTN) | torchao | another installed quantize compressor (default: the "
                      "one a --plan records, else fake)")]


def quantizer_for_backend(backend: str) -> str:
    """The quantize compressor behind ``--backend`` (``fake`` = specprune's RTN fake-quant)."""
    from .. import registry
    from ..compress.apply import get_compressor
    from ..errors import InputError

    if backend in ("fake", "rtn"):
        return "rtn"
    if backend == "torchao" and "torchao" not in {p.name for p in registry.available("compressors")}:
        raise InputError("--backend torchao needs the specprune-torchao plugin: pip install specprune-torchao "
                         "(it installs torchao>=0.15,<0.19)")
    comp = get_compressor(backend)
    if getattr(comp, "kind", None) != "quantize":
        raise InputError(f"--backend {backend!r} is a {getattr(comp, 'kind', '?')} method, not a quantizer")
    return backend

PRUNE_EPILOG = """Examples:

  specprune prune ./my-bert --rate 0.3 --data corpus.txt --out pruned/

  specprune prune ./my-bert --rate 0.5 --method magnitude --out sparse/
"""
QUANT_EPILOG = """Examples:

  specprune quantize ./my-bert --bits 4 --group-size 128 --out int4/

  specprune quantize ./my-bert --plan plan.json --out mixed/
"""
APPLY_EPILOG = """Example:

  specprune apply ./my-bert --plan plan.json --data corpus.txt --out compressed/
"""
COMPRESS_EPILOG = """Example:

  specprune compress ./my-bert --data corpus.txt --tolerance 0.02 --out compressed/ --format json
"""


def _summary(doc: dict) -> None:
    c = console()
    s = doc.get("size") or {}
    c.print(f"wrote {doc['output']}")
    if s:
        c.print(f"size: {s['bits_before'] / 8e6:.2f} MB → {s['bits_after'] / 8e6:.2f} MB "
                f"({s['bits_after'] / max(s['bits_before'], 1):.1%})")
    if doc.get("covariance"):
        c.print(f"input covariance: {doc['covariance']}")


def _export_flag(export: str | None) -> bool:
    from ..errors import InputError

    if export is None:
        return False
    if export != "dense":
        raise InputError(f"--export takes 'dense', got {export!r}")
    return True


def apply_and_save(model_arg: str, plan_or_builder, out: Path, *, arch, trust, data, analysis_dir, samples,
                   seq_len, batch_size, seed, overwrite, export, ignore_fp, fmt, quiet, plan_path=None,
                   quantizer: str | None = None) -> None:
    """Load, build/validate the plan, apply it with the best covariance source, save atomically."""
    import time

    from ..analysis import Analysis
    from ..compress.apply import (DequantizedWarning, IdentityCovarianceWarning, apply_, dequantized_note,
                                  get_compressor, identity_summary, plan_size)
    from ..compress.saved import save_compressed
    from ..errors import InputError, RefusedError
    from ..io import check_output_path, output_dir
    from ..models import fingerprint, load_model
    from ..pipeline import DataSpec

    ctx = Ctx(fmt, quiet)
    t0 = time.perf_counter()
    inputs = [model_arg, *(data or []), *([analysis_dir] if analysis_dir else []),
              *([plan_path] if plan_path else [])]
    check_output_path(out, inputs, overwrite)
    for d in data or []:  # a mistyped path is an error even when this plan needs no calibration data
        if not Path(d).exists():
            raise InputError(f"data not found: {d}")
    dense = _export_flag(export)
    loaded = load_model(model_arg, arch=arch, trust_remote_code=trust)
    plan = plan_or_builder(loaded) if callable(plan_or_builder) else plan_or_builder
    fp = fingerprint(loaded.model)
    if plan.model.get("fingerprint") and plan.model["fingerprint"] != fp and not ignore_fp:
        raise RefusedError("the plan was made for other weights (fingerprint differs); pass "
                           "--ignore-fingerprint to apply it anyway")
    plan.model.setdefault("source", str(model_arg))
    plan.model["fingerprint"] = plan.model.get("fingerprint") or fp
    analysis = Analysis.load(analysis_dir) if analysis_dir else None
    batches = None
    needs_cov = any(lp.method is not None and getattr(get_compressor(lp.method), "needs_covariance", False)
                    for lp in plan.layers.values())
    if analysis is None and data and needs_cov:
        batches = DataSpec(data, None, samples, seq_len, batch_size, seed).calibration(loaded.tokenizer)
    with warnings.catch_warnings():  # the CLI says it in one line (below), not as a Python warning
        warnings.simplefilter("ignore", IdentityCovarianceWarning)
        warnings.simplefilter("ignore", DequantizedWarning)
        apply_(loaded.model, plan, analysis=analysis, data=batches, quantizer=quantizer)
    covariance = (plan.details.get("applied") or {}).get("covariance", "none")
    identity = (plan.details.get("applied") or {}).get("identity_layers") or []
    if identity:
        ctx.warn(f"{identity_summary(plan, identity)} (no --analysis or --data for their input covariance)")
    if (note := dequantized_note(plan)) is not None:
        ctx.warn(note)
    plan.size = plan_size(loaded.model, plan) if not plan.size else plan.size
    with output_dir(out, inputs, overwrite) as tmp:
        save_compressed(loaded.model, plan, tmp, source=loaded, export_dense=dense)
    doc = {"output": str(out), "plan": str(Path(out) / "plan.json"), "size": plan.size,
           "covariance": covariance, "layers": len([1 for lp in plan.layers.values() if not lp.is_noop]),
           "seconds": round(time.perf_counter() - t0, 3)}
    ctx.emit(doc, _summary)


def _uniform_builder(include, exclude, **kw):
    def build(loaded):
        from ..layers import select_layers
        from ..compress.apply import is_low_rank
        from ..compress.prune import is_factor
        from ..errors import InputError
        from ..plan import Plan

        layers = select_layers(loaded.model, include, exclude)
        if kw.get("rate") and is_low_rank(kw.get("method", "spectral")):
            # the factors of an earlier low-rank pruning keep their rank: truncating one again saves nothing
            kept = [lay for lay in layers if not is_factor(lay.module)]
            if layers and not kept:
                raise InputError(f"nothing to prune at low rank: all {len(layers)} targeted layers are factors "
                                 "of an earlier low-rank pruning (prune the original model, or quantize)")
            layers = kept
        return Plan.uniform([lay.name for lay in layers], source=loaded.source, **kw)

    return build


def _plan_for(cmd: str, path: Path, shortcut_opts: dict):
    """The plan of ``prune|quantize --plan PATH``. Options that only shape the --rate/--bits shortcut are
    refused rather than silently ignored, and a plan that also does the other kind of compression is sent to
    ``apply`` (``quantize`` has no covariance source for a whitened truncation, and neither command should
    do what its name says it does not)."""
    from ..compress.apply import get_compressor
    from ..errors import InputError
    from ..plan import Plan

    shortcut = "--rate" if cmd == "prune" else "--bits"
    given = [opt for opt, v in shortcut_opts.items() if v]
    if given:
        raise InputError(f"{'/'.join(given)} goes with {shortcut}, not --plan (a plan sets every layer's "
                         "settings: edit the plan instead)")
    p = Plan.load(path)
    if cmd == "prune":
        other = [n for n, lp in p.layers.items() if lp.bits is not None]
        what, kind = "quantizes", "pruning"
    else:
        other = [n for n, lp in p.layers.items()
                 if lp.method is not None and get_compressor(lp.method).kind != "quantize"]
        what, kind = "prunes", "quantization"
    if other:
        raise InputError(f"{path} also {what} {len(other)} layer(s) (e.g. {other[0]}) and `specprune {cmd}` "
                         f"applies {kind} only; use `specprune apply MODEL --plan {path}` to apply it whole")
    return p


def prune_cmd(
    model: Annotated[str, typer.Argument(help="Model to prune (never modified).")],
    out: OutOpt,
    rate: Annotated[Optional[float], typer.Option("--rate", help="Fraction of each layer's weights removed.")] = None,
    plan: PlanOpt = None,
    method: Annotated[str, typer.Option("--method", help="spectral | whitened | magnitude | plugin name")] = "spectral",
    data: DataOpt = None,
    analysis: AnalysisOpt = None,
    samples: SamplesOpt = 128, seq_len: SeqLenOpt = 128, batch_size: BatchSizeOpt = 8, seed: SeedOpt = 0,
    include: IncludeOpt = None, exclude: ExcludeOpt = None, arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False, export: ExportOpt = None, ignore_fingerprint: IgnoreFpOpt = False,
    overwrite: OverwriteOpt = False, fmt: FormatOpt = OutputFormat.human, quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune every targeted layer by --rate (spectral low-rank by default), or as a plan says."""
    from .. import registry
    from ..errors import InputError

    check_early(None, include, exclude, samples=samples, seq_len=seq_len, batch_size=batch_size)
    if (rate is None) == (plan is None):
        raise InputError("give exactly one of --rate R or --plan PLAN")
    if plan is not None:
        p = _plan_for("prune", plan, {"--method": method != "spectral", "--include": include, "--exclude": exclude})
    else:
        if not 0.0 <= rate < 1.0:
            raise InputError(f"--rate must be in [0, 1), got {rate}")
        registry.get("compressors", method)  # unknown method: one line with a suggestion
        p = _uniform_builder(include, exclude, rate=rate, method=method)
    apply_and_save(model, p, out, arch=arch, trust=trust_remote_code, data=data, analysis_dir=analysis,
                   samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, overwrite=overwrite,
                   export=export, ignore_fp=ignore_fingerprint, fmt=fmt, quiet=quiet, plan_path=plan)


def quantize_cmd(
    model: Annotated[str, typer.Argument(help="Model to quantize (never modified).")],
    out: OutOpt,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Integer width 2..8 for every targeted layer.")] = None,
    plan: PlanOpt = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Columns per scale (0 or default: one "
                                                      "scale per output channel, as for recommend).")] = None,
    backend: BackendOpt = None,
    include: IncludeOpt = None, exclude: ExcludeOpt = None, arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False, export: ExportOpt = None, ignore_fingerprint: IgnoreFpOpt = False,
    overwrite: OverwriteOpt = False, fmt: FormatOpt = OutputFormat.human, quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Round-to-nearest symmetric int-B quantization (per channel or per group), stored packed."""
    from ..errors import InputError

    check_early(None, include, exclude)
    if (bits is None) == (plan is None):
        raise InputError("give exactly one of --bits B or --plan PLAN")
    if plan is not None:
        p = _plan_for("quantize", plan, {"--group-size": group_size is not None, "--include": include,
                                         "--exclude": exclude})
    else:
        if not 2 <= bits <= 8:
            raise InputError(f"--bits must be in 2..8, got {bits}")
        if group_size is not None and group_size < 0:
            raise InputError(f"--group-size must be ≥ 0 (0: one scale per output channel), got {group_size}")
        group_size = group_size or None  # 0 means per channel, as in recommend's --group-size
        p = _uniform_builder(include, exclude, bits=bits, group_size=group_size)
    q = quantizer_for_backend(backend) if backend is not None else None
    apply_and_save(model, p, out, arch=arch, trust=trust_remote_code, data=None, analysis_dir=None, samples=128,
                   seq_len=128, batch_size=8, seed=0, overwrite=overwrite, export=export,
                   ignore_fp=ignore_fingerprint, fmt=fmt, quiet=quiet, plan_path=plan, quantizer=q)


def apply_cmd(
    model: Annotated[str, typer.Argument(help="Model to compress (never modified).")],
    plan: Annotated[Path, typer.Option("--plan", help="plan.json (possibly hand-edited).")],
    out: OutOpt,
    data: DataOpt = None,
    analysis: AnalysisOpt = None,
    samples: SamplesOpt = 128, seq_len: SeqLenOpt = 128, batch_size: BatchSizeOpt = 8, seed: SeedOpt = 0,
    arch: ArchOpt = None, trust_remote_code: TrustOpt = False, export: ExportOpt = None,
    ignore_fingerprint: IgnoreFpOpt = False, backend: BackendOpt = None, overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Apply a plan's pruning and quantization and save the result."""
    from ..plan import Plan

    check_early(None, samples=samples, seq_len=seq_len, batch_size=batch_size)
    q = quantizer_for_backend(backend) if backend is not None else None
    apply_and_save(model, Plan.load(plan), out, arch=arch, trust=trust_remote_code, data=data,
                   analysis_dir=analysis, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   overwrite=overwrite, export=export, ignore_fp=ignore_fingerprint, fmt=fmt, quiet=quiet,
                   plan_path=plan, quantizer=q)


def render_compress(doc: dict) -> None:
    c = console()
    s = doc.get("size") or {}
    c.print(f"[bold]{doc['metric']}[/bold]: predicted delta {doc['predicted_delta']:.3%} "
            f"(± {doc.get('predicted_delta_uncertainty', 0):.2%}), measured {doc['measured_delta']:.3%} "
            f"on {doc.get('eval_windows', '?')} held-apart windows; tolerance {doc.get('tolerance', 0):.2%}")
    if s:
        c.print(f"size: {s['bits_before'] / 8e6:.2f} MB → {s['bits_after'] / 8e6:.2f} MB "
                f"({s['bits_after'] / max(s['bits_before'], 1):.1%})")
    c.print(f"wrote {doc['output']}")
    if doc.get("report"):
        c.print(f"report: {doc['report']}")


def compress_cmd(
    model: Annotated[str, typer.Argument(help="Model to compress (never modified).")],
    out: OutOpt,
    data: DataOpt = None,
    tolerance: ToleranceOpt = 0.02,
    eval_data: EvalDataOpt = None,
    methods: MethodsOpt = "prune,quantize",
    bits_choices: BitsChoicesOpt = "2,3,4,5,6,8",
    group_size: GroupSizeOpt = None,
    prune_method: PruneMethodOpt = "whitened",
    sensitivity: SensitivityOpt = "auto",
    metric: MetricOpt = "auto",
    samples: SamplesOpt = 128, seq_len: SeqLenOpt = 128, batch_size: BatchSizeOpt = 8, seed: SeedOpt = 0,
    include: IncludeOpt = None, exclude: ExcludeOpt = None, arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False, device: DeviceOpt = "auto", export: ExportOpt = None,
    overwrite: OverwriteOpt = False, fmt: FormatOpt = OutputFormat.human, quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """analyze → recommend → apply → evaluate → save. Exit 3 if the measured delta exceeds the tolerance
    by more than the stated uncertainty (output kept and marked)."""
    from ..errors import InputError, ToleranceExceeded
    from ..evaluation import check_metric
    from ..models import load_model
    from ..pipeline import DataSpec, compress
    from ..recommender import check_sensitivity_mode

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
    spec = DataSpec(data, eval_data, samples, seq_len, batch_size, seed)
    inputs = [model, *spec.inputs()]
    from ..io import check_output_path

    check_output_path(out, inputs, overwrite)
    dense = _export_flag(export)
    loaded = load_model(model, arch=arch, trust_remote_code=trust_remote_code)
    try:
        doc = compress(loaded, spec, tolerance, out, include=include, exclude=exclude, device=device,
                       metric=metric, methods=ms, bits_choices=bits, group_sizes=group_sizes,
                       prune_method=prune_method, sensitivity=sensitivity, overwrite=overwrite,
                       export_dense=dense, inputs=inputs,
                       log=ctx.info, warn=ctx.warn)
    except ToleranceExceeded as err:
        ctx.emit(err.result, render_compress)
        raise
    ctx.emit(doc, render_compress)


def register(app: typer.Typer) -> None:
    app.command("prune", epilog=PRUNE_EPILOG)(command(prune_cmd))
    app.command("quantize", epilog=QUANT_EPILOG)(command(quantize_cmd))
    app.command("apply", epilog=APPLY_EPILOG)(command(apply_cmd))
    app.command("compress", epilog=COMPRESS_EPILOG)(command(compress_cmd))
