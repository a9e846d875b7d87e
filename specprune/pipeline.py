"""The stages chained: what the CLI commands and the demo share.

Data handling follows the contract: calibration windows and held-apart evaluation windows
come from the same shuffled window set (see :mod:`specprune.data`), so evaluation text is
never seen by calibration unless ``--eval-data`` says otherwise.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .analysis import Analysis, analyze, undersampled_note
from .data import Batches, load_data
from .errors import InputError, ToleranceExceeded
from .evaluation import Evaluator
from .layers import select_layers
from .models import LoadedModel, load_model, other_weights


MIN_VERIFY_WINDOWS = 8  # fewer windows beyond the calibration sample: the recommender verifies in-sample


def verification_note(verify: Batches | None) -> str:
    """The log line that says where plans are verified."""
    if verify is not None:
        return "verifying on calibration windows held out of the analysis"
    return (f"verifying on the analysis' own windows (the data holds fewer than {MIN_VERIFY_WINDOWS} more): "
            "predictions of truncations are in-sample and optimistic")


@dataclass
class DataSpec:
    data: list[str] | None
    eval_data: list[str] | None = None
    samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0

    def calibration(self, tokenizer) -> Batches:
        if not self.data:
            raise InputError("no calibration data: pass --data FILE_OR_DIR")
        return load_data(self.data, tokenizer, samples=self.samples, seq_len=self.seq_len,
                         batch_size=self.batch_size, seed=self.seed, split="calibration")

    def verification(self, tokenizer, windows: int = 32, after: int = 0) -> Batches | None:
        """Up to ``windows`` (and no more than ``samples``: the same cost as verifying on the calibration
        windows) calibration-split windows after the ``samples`` that calibrate, disjoint from them and from
        the held-apart ones: the recommender measures its map and plans there, out of the analysis' sample.
        None when the data holds fewer than that or :data:`MIN_VERIFY_WINDOWS` more. ``after``: skip at least
        that many windows (a saved analysis made on more windows than ``samples``)."""
        if not self.data:
            return None
        want = min(windows, self.samples)
        b = load_data(self.data, tokenizer, samples=want, seq_len=self.seq_len, batch_size=self.batch_size,
                      seed=self.seed, split="calibration", offset=max(self.samples, after))
        return b if b.samples >= min(MIN_VERIFY_WINDOWS, want) else None

    def evaluation(self, tokenizer) -> Batches:
        if self.eval_data:
            return load_data(self.eval_data, tokenizer, samples=self.samples, seq_len=self.seq_len,
                             batch_size=self.batch_size, seed=self.seed, split="all")
        if not self.data:
            raise InputError("no evaluation data: pass --data (25% held apart) or --eval-data")
        return load_data(self.data, tokenizer, samples=self.samples, seq_len=self.seq_len,
                         batch_size=self.batch_size, seed=self.seed, split="evaluation")

    def inputs(self) -> list[str]:
        return [*(self.data or []), *(self.eval_data or [])]


def source_model(analysis: Analysis, what: str = "the analysis", arch=None, trust: bool = False) -> LoadedModel:
    """The model an analysis was made on, loaded from its recorded source; refused when the weights
    there are no longer those the analysis saw (fingerprints differ)."""
    src = analysis.model.get("source")
    if not src or not Path(src).exists():
        in_memory = src == analysis.model.get("architecture")  # analyze(model) without source=: no path
        raise InputError(f"{what} was made on an in-memory model ({src}), which only you hold: pass it "
                         "(recommend(analysis, tolerance, model=...)), or analyze with source=PATH"
                         if in_memory else f"{what} names source model {src!r}, which is not found: pass the model")
    loaded = load_model(src, arch=arch, trust_remote_code=trust)
    if other_weights(analysis.model.get("fingerprint"), loaded.model):
        raise InputError(f"{what} was made for other weights than those now at {src} "
                         "(fingerprints differ); re-run specprune analyze on the model")
    return loaded


def analysis_or_model(target: str, arch, trust, include, exclude, device, spec: DataSpec,
                      log=lambda m: None, check=None) -> tuple[Analysis, LoadedModel]:
    """``recommend ANALYSIS_DIR|MODEL``: load a saved analysis (and its source model) or analyze.
    ``check(model, layers, calibration)``, when given, runs before an analysis is made (to refuse early)."""
    p = Path(target)
    if p.is_dir() and (p / "analysis.json").exists():
        analysis = Analysis.load(p)
        return analysis, source_model(analysis, f"the analysis in {target}", arch, trust)
    loaded = load_model(target, arch=arch, trust_remote_code=trust)
    calib = spec.calibration(loaded.tokenizer)
    if check is not None:
        check(loaded.model, select_layers(loaded.model, include=include, exclude=exclude), calib)
    log(f"analysing {target}: {calib.samples} windows, {calib.tokens} tokens")
    analysis = analyze(loaded.model, calib, include=include, exclude=exclude, device=device, source=loaded.source)
    return analysis, loaded


def compress(loaded: LoadedModel, spec: DataSpec, tolerance: float, out: str | Path, *,
             include=None, exclude=None, device=None, metric="auto", methods=("prune", "quantize"),
             bits_choices=(2, 3, 4, 5, 6, 8), group_sizes=(None, 128), prune_method="whitened",
             sensitivity="auto", overwrite=False, export_dense=False, inputs=(), log=lambda m: None, warn=None,
             report=True) -> dict:
    """analyze → recommend → apply → evaluate → save, into ``out`` (atomically). Returns the
    contract's compress JSON; raises :class:`ToleranceExceeded` (exit 3) after saving when the
    measured delta exceeds the tolerance by more than the stated uncertainty. ``warn`` receives the
    recommender's warning when no allocation met the target on the calibration windows (``log`` when
    not given). ``report``: also write the figures and the report of all of it into ``OUT/report``."""
    warn = warn or log
    from .compress.apply import DequantizedWarning, apply_, dequantized_note
    from .compress.saved import save_compressed
    from .io import check_output_path, dumps, output_dir
    from .recommender import check_gradient_defined, recommend
    from .report.document import HTML_FILE

    t0 = time.perf_counter()
    check_output_path(out, inputs, overwrite)
    calib = spec.calibration(loaded.tokenizer)
    evalb = spec.evaluation(loaded.tokenizer)
    verify = spec.verification(loaded.tokenizer)
    if sensitivity == "gradient":  # refused before the analysis, not after it
        check_gradient_defined(loaded.model, select_layers(loaded.model, include=include, exclude=exclude),
                               metric, calib)
    log(f"analysing: {calib.samples} calibration windows, {calib.tokens} tokens")
    analysis = analyze(loaded.model, calib, include=include, exclude=exclude, device=device,
                       source=loaded.source)
    note = undersampled_note(analysis)
    if note:
        warn(note)
    log(f"recommending; {verification_note(verify)}")
    plan = recommend(analysis, tolerance, loaded.model, calib, metric=metric, methods=methods,
                     bits_choices=bits_choices, group_sizes=group_sizes, prune_method=prune_method,
                     source=loaded.source, seed=spec.seed, sensitivity=sensitivity, verify_data=verify)
    log(f"sensitivities: {plan.details.get('sensitivity')}")
    if plan.details.get("warning"):
        warn(plan.details["warning"])
    evaluator = Evaluator(loaded.model, evalb, metric)  # reference before the model changes
    log(f"applying the plan (predicted delta {plan.predicted_delta:.4g})")
    with warnings.catch_warnings():  # said in one line below
        warnings.simplefilter("ignore", DequantizedWarning)
        apply_(loaded.model, plan, analysis=analysis)
    if (note := dequantized_note(plan)) is not None:
        warn(note)
    ev = evaluator.evaluation(loaded.model, predicted_delta=plan.prediction)
    ev.size = plan.size
    within = ev.measured_delta <= tolerance + plan.predicted_delta_uncertainty
    with output_dir(out, inputs, overwrite) as tmp:
        analysis.save(tmp / "analysis")
        save_compressed(loaded.model, plan, tmp, source=loaded, export_dense=export_dense)
        ev.plan = str(Path(out) / "plan.json")
        ev.output = str(Path(out))
        ev.seconds = time.perf_counter() - t0
        if report:
            ev.extra["report"] = str(Path(out) / "report" / HTML_FILE)
        ev.extra.update({"tolerance": tolerance, "within_tolerance": bool(within),
                         "predicted_delta_uncertainty": plan.predicted_delta_uncertainty,
                         "eval_windows": evalb.samples, "calibration_windows": calib.samples})
        (tmp / "evaluation.json").write_text(dumps(ev.to_dict()), encoding="utf-8")
        if not within:
            (tmp / "TOLERANCE_EXCEEDED").write_text(
                f"measured delta {ev.measured_delta:.6g} > tolerance {tolerance:g} + uncertainty "
                f"{plan.predicted_delta_uncertainty:.3g}\n", encoding="utf-8")
        if report:
            log("report")
            _report_into(tmp, tmp / "report", Path(out).absolute())
    result = ev.to_dict()
    if not within:
        err = ToleranceExceeded(
            f"measured delta {ev.measured_delta:.4g} exceeds the tolerance {tolerance:g} by more than the "
            f"stated uncertainty {plan.predicted_delta_uncertainty:.3g}; output kept in {out} and marked "
            "TOLERANCE_EXCEEDED")
        err.result = result
        raise err
    return result


def _report_into(source: Path, out: Path, final: Path) -> None:
    """The report of everything in ``source`` (analysis, plan, evaluation) written into ``out``, a new
    directory inside it: part of the same atomic output, so no separate output guard is needed. ``source``
    is the output's temporary directory; the report names its inputs where they will be, under ``final``."""
    import warnings

    from .report.document import build_report, collect

    inputs = collect([source])
    for kind in ("analysis", "series", "plan", "evaluation", "sweep"):
        path = getattr(inputs, kind + "_path")
        if path is not None and Path(path).is_relative_to(source):
            setattr(inputs, kind + "_path", final / Path(path).relative_to(source))
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # matplotlib layout/glyph warnings are not the user's
        build_report(inputs, out)
