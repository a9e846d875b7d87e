"""``specprune analyze MODEL... --data D --out DIR``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (ArchOpt, BatchSizeOpt, Ctx, DataOpt, DebugOpt, DeviceOpt, ExcludeOpt, FormatOpt,
                     IncludeOpt, OutputFormat, OverwriteOpt, QuietOpt, SamplesOpt, SeedOpt, SeqLenOpt,
                     TrustOpt, check_early, command, console, existing_path)

EPILOG = """Examples:

  specprune analyze ./my-bert --data corpus.txt --out analysis/

  specprune analyze ckpt-100 ckpt-1000 ckpt-10000 --data text/ --out series/ --format json
"""


def series_steps(models: list[str]) -> tuple[list[int], str | None]:
    """The training step of each checkpoint of a series: the largest number in its directory or file name
    (``checkpoint-1500``, ``step_2000_seed3``), when every name has one and no two are equal; else their
    order 0, 1, 2, … for all of them, with a warning naming why (never a mix of parsed steps and positions)."""
    parsed = [max(map(int, nums)) if (nums := re.findall(r"\d+", Path(m).name)) else None for m in models]
    missing = [m for m, step in zip(models, parsed) if step is None]
    repeated = sorted({step for step in parsed if step is not None and parsed.count(step) > 1})
    if not missing and not repeated:
        return parsed, None
    why = (f"{missing[0]} has no step number in its name" if missing
           else f"step {repeated[0]} appears in more than one checkpoint name")
    return list(range(len(models))), (f"the series' steps are the checkpoints' order 0..{len(models) - 1} ({why}): "
                                       "name them by step (e.g. checkpoint-1500) for k* against training time")


def render_analysis(doc: dict) -> None:
    from rich.table import Table

    cal = doc["calibration"]
    # tensor data (no --seq-len) counts samples, not tokens: each layer's own token count is in the JSON
    seen = f"{cal['tokens']} tokens" if cal.get("seq_len") else f"{cal['samples']} samples"
    t = Table(title=f"{doc['model']['source']}  ·  {seen}", show_lines=False)
    for col in ("layer", "type", "d_in", "d_out", "b", "a", "k*", "k_max", "r*", "eff. rank"):
        t.add_column(col, justify="left" if col in ("layer", "type") else "right", no_wrap=col == "layer")

    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    for lay in doc["layers"]:
        t.add_row(lay["name"], lay["type"], str(lay["d_in"]), str(lay["d_out"]), f(lay["b"]), f(lay["a"]),
                  "none" if lay["k_star"] is None else str(lay["k_star"]), str(lay["k_max"]),
                  f(lay["r_star"], "{:.0%}"), f(lay.get("effective_rank"), "{:.0f}"))
    console().print(t)


def analyze_cmd(
    models: Annotated[list[str], typer.Argument(help="Model(s): HF dir, state dict (+ --arch) or specprune dir. "
                                                "Several = a series (e.g. training checkpoints).")],
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Directory for analysis.json and spectra.")] = None,
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    trust_remote_code: TrustOpt = False,
    device: DeviceOpt = "auto",
    device_map: Annotated[Optional[str], typer.Option(
        "--device-map", help="Dispatch a HF model larger than one device over GPUs/CPU with accelerate: "
                             "auto | balanced | sequential (the model is then never moved).")] = None,
    offload: Annotated[bool, typer.Option(
        "--offload", help="Keep the float64 covariance accumulators in CPU memory (default: only when "
                          "the up-front memory estimate says the GPU is short).")] = False,
    solver: Annotated[str, typer.Option(
        "--solver", help="Eigensolver: auto (randomized top-k for input widths ≥ 8192), full or "
                         "randomized.")] = "auto",
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Modes the randomized solver resolves per layer (default d/8, at least 256); "
                        "the rest is one lumped tail.")] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="Precision of the full eigensolves: auto (float32 for inputs ≥ 1024 wide with "
                            "≥ 2× as many tokens, else float64), float32 or float64.")] = "auto",
    token_sample: Annotated[Optional[float], typer.Option(
        "--token-sample", help="For inputs ≥ 1024 wide, let about this fraction (0–1) of the tokens into "
                               "the covariance, drawn ∝ ‖x‖² and weighted 1/p (unbiased; the Gram work of "
                               "those inputs shrinks in proportion; each such layer is flagged with the "
                               "bound on its top eigenvalues' relative standard error). Default: every "
                               "token.")] = None,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Hook every layer, stream the calibration data, and report each layer's spectrum, power-law
    fits (b, a) and learning frontier k*."""
    run_analyze(models, data, out, samples, seq_len, batch_size, seed, include, exclude, arch,
                trust_remote_code, device, overwrite, fmt, quiet,
                scale={"device_map": device_map, "offload": True if offload else None, "solver": solver,
                       "top_k": top_k, "precision": precision, "token_sample": token_sample})


analyze_cmd = command(analyze_cmd)


def run_analyze(models, data, out, samples, seq_len, batch_size, seed, include, exclude, arch, trust,
                device, overwrite, fmt, quiet, scale: dict | None = None):
    from ..analysis import analyze, sampling_note, undersampled_note
    from ..data import load_data
    from ..errors import InputError
    from ..io import check_output_path, output_dir
    from ..models import load_model

    ctx = Ctx(fmt, quiet)
    check_early(device, include, exclude, samples=samples, seq_len=seq_len, batch_size=batch_size)
    if not data:
        raise InputError("analyze needs calibration data: --data FILE_OR_DIR")
    if out is not None:
        check_output_path(out, [*models, *data], overwrite)
    scale = dict(scale or {})
    device_map = scale.pop("device_map", None)
    if "precision" in scale:  # option values, before the model is loaded
        from ..solve import solve_precision

        solve_precision(1, 1, scale["precision"])
    if scale.get("token_sample") is not None:
        from ..probe import check_sample

        check_sample(scale["token_sample"], "--token-sample")
    for m in models:  # a series' missing checkpoint is refused before the ones ahead of it are analysed
        existing_path(m, "model")
    results, warnings = [], []  # warned once every model is analysed: a refused input stays one error line
    for i, m in enumerate(models):
        loaded = load_model(m, arch=arch, trust_remote_code=trust, device_map=device_map)
        batches = load_data(data, loaded.tokenizer, samples=samples, seq_len=seq_len, batch_size=batch_size,
                            seed=seed)
        ctx.info(f"analysing {m}: {batches.samples} windows, {batches.tokens} tokens")
        # in a series the warnings of each checkpoint must say which one they are about (json mode shows no
        # "analysing" line between them)
        who = f"{m}: " if len(models) > 1 else ""
        res = analyze(loaded.model, batches, include=include, exclude=exclude, device=device, source=loaded.source,
                      log=ctx.info, **scale)
        results.append((m, res))
        if batches.samples < samples:
            unit = "windows" if batches.seq_len else "samples"
            warnings.append(f"{who}--samples {samples} asked for more {unit} than the data's calibration share "
                            f"holds ({batches.samples}; a quarter is kept apart for evaluation): analysed "
                            f"{batches.samples}")
        if (sampled := sampling_note(res)) is not None:
            ctx.info(sampled)
        elif scale.get("token_sample") is not None:
            from ..probe import SAMPLE_MIN_WIDTH

            warnings.append(f"{who}--token-sample {scale['token_sample']} sampled nothing: no input is "
                            f"{SAMPLE_MIN_WIDTH} or more wide, so every token entered the covariances")
        note = undersampled_note(res)
        if note:
            warnings.append(who + note)
    steps, steps_note = series_steps(models) if len(models) > 1 else ([0], None)
    if steps_note:
        warnings.append(steps_note)
    for w in warnings:
        ctx.warn(w)
    docs = [r.to_dict() for _, r in results]
    from ..distributed import is_main

    if out is not None and is_main():
        with output_dir(out, [*models, *data], overwrite) as tmp:
            if len(results) == 1:
                results[0][1].save(tmp)
            else:
                series = []
                for i, (m, r) in enumerate(results):
                    sub = f"{i:03d}-{Path(m).name}"
                    r.save(tmp / sub)
                    series.append({"model": str(m), "dir": sub, "step": steps[i]})
                from ..io import dumps

                (tmp / "series.json").write_text(dumps({"series": series}), encoding="utf-8")
    if len(docs) == 1:
        ctx.emit(docs[0], render_analysis)
    else:
        ctx.emit({"series": docs}, lambda d: [render_analysis(x) for x in d["series"]])
    if out is not None:
        ctx.info(f"wrote {out}")
