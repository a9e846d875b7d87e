#!/usr/bin/env python
"""Issue 9, target 3 (and the issue-4 comparison): ``recommend`` against the uniform sweep a team
would run without specprune.

    python bench/bench_sweep.py                 # MiniLM, 64 calibration + 64 held-apart windows (~6-12 min, 2 busy cores)
    python bench/bench_sweep.py --llama         # also the small Llama trained by specprune.toy.train_llama
    python bench/bench_sweep.py --quick         # first block only, 8 + 8 windows, 2% only, 3 settings (<1-2 min)

For each model, over the same analysis (``specprune.analyze`` on the calibration windows; its time is
reported but belongs to neither side):

* **recommend** — :class:`specprune.recommender.Recommender` (per-layer geometry, sensitivities
  — ``--sensitivity``: gradient where defined, the default, or the one-layer probes — and the
  calibration map: what every ``specprune recommend`` call does first) followed
  by ``plan(tolerance)`` for each tolerance (0.5%, 2%, 8%). ``specprune.recommend(analysis, tol, ...)``
  is exactly ``Recommender(...).plan(tol)``, so one CLI call costs ``init + plan(tol)``; both that and
  the shared-init cost of all three tolerances are reported.
* **uniform sweep** — every layer the analysis covers gets the same setting: per-channel RTN bits
  {2,3,4,5,6,8}, or whitened low-rank at rank round(f · min(d_in, d_out)) for f in {90%,80%,…,30%}
  (``Recommender.uniform``'s definition); each is applied for real with
  :func:`specprune.snapshot.apply_temporarily` (the analysis supplies Σ) and measured with one
  :class:`specprune.evaluation.Evaluator` on the held-apart evaluation windows (its reference pass is
  part of the sweep's time).

The two are alternated (A B A B …, ``--rounds``); times are medians. Reported: the time ratio
recommend / sweep (target ≤ 0.1), for each tolerance the best (smallest) uniform setting whose measured
delta meets it and its size against the recommended plan's (``plan_size``'s ``bits_after`` of the
whole model, and the bits of the targeted weights with their scales), the recommended plan's measured
delta on the held-apart windows (≤ 1.25 × tolerance?), and the recommender's prediction
(``Recommender.predict``: per-layer response laws + calibration map) against the measurement for every
uniform setting whose measured delta lies in 0.1%–50%, with the worst ratio. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):  # specprune, and bench/_common.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import machine, table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOLERANCES = (0.005, 0.02, 0.08)
UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
UNIFORM_RANKS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
QUICK_INCLUDE = [r"re:.*\.layers?\.0\..*"]  # first block (BERT: encoder.layer.0, Llama: model.layers.0)


def pct(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


# ----------------------------------------------------------------------------------- pieces
def uniform_plan(rec, setting: dict):
    """A Plan giving every analysed layer the same setting, ranks as in ``Recommender.uniform``."""
    from specprune.plan import LayerPlan, Plan

    layers = {}
    for name, g in rec.geoms.items():
        if setting["kind"] == "bits":
            layers[name] = LayerPlan(bits=int(setting["value"]))
        else:
            rank = max(1, int(round(setting["value"] * min(g.d_in, g.d_out))))
            layers[name] = LayerPlan(method="whitened", rank=rank)
    return Plan(model={}, tolerance=0.0, metric="", layers=layers)


def targeted_bits(rec, plan) -> int:
    """Bits of the targeted weights (scales included) under ``plan`` (the recommender's accounting)."""
    from specprune.recommender import _dtype_bits, weight_bits

    total = 0
    for name, g in rec.geoms.items():
        lp = plan.layers.get(name)
        rank = lp.rank if lp is not None and lp.method is not None else None
        bits = lp.bits if lp is not None else None
        gs = lp.group_size if lp is not None else None
        if rank is not None and rank * (g.d_in + g.d_out) >= g.d_in * g.d_out:
            rank_bits = weight_bits(g.d_in, g.d_out, None, bits, gs, _dtype_bits(g.layer))[0]
        else:
            rank_bits = weight_bits(g.d_in, g.d_out, rank, bits, gs, _dtype_bits(g.layer))[0]
        total += rank_bits
    return total


def settings(quick: bool) -> list[dict]:
    bits = (4, 8) if quick else UNIFORM_BITS
    ranks = (0.5,) if quick else UNIFORM_RANKS
    return ([{"kind": "bits", "value": b, "label": f"int{b} per channel"} for b in bits]
            + [{"kind": "rank", "value": f, "label": f"whitened rank {f:.0%}"} for f in ranks])


def run_recommend(analysis, model, calib, tolerances, sensitivity="auto", verify=None, verify_samples=None):
    from specprune.recommender import Recommender

    t0 = time.perf_counter()
    kw = {} if verify_samples is None else {"verify_samples": verify_samples}
    rec = Recommender(analysis, model, calib, sensitivity=sensitivity, verify_data=verify, **kw)
    init = time.perf_counter() - t0
    plans, plan_s = {}, {}
    for tol in tolerances:
        t = time.perf_counter()
        plans[tol] = rec.plan(tol)
        plan_s[tol] = time.perf_counter() - t
    return rec, plans, init, plan_s


def run_sweep(model, analysis, rec, evalb, sets):
    from specprune.compress.apply import plan_size
    from specprune.evaluation import Evaluator
    from specprune.snapshot import apply_temporarily

    t0 = time.perf_counter()
    held = Evaluator(model, evalb)
    rows = []
    for s in sets:
        plan = uniform_plan(rec, s)
        with apply_temporarily(model, plan, analysis):
            measured = held.delta(model)
        rows.append({**s, "measured": measured, "stderr": held.last_stderr, "plan": plan})
    total = time.perf_counter() - t0
    for r in rows:  # sizes and predictions outside the timed loop
        r["size_bits_after"] = plan_size(model, r["plan"])["bits_after"]
        r["targeted_bits"] = targeted_bits(rec, r["plan"])
        choice = (rec.uniform(bits=r["value"]) if r["kind"] == "bits"
                  else rec.uniform(rank_fraction=r["value"], method="whitened"))
        r["predicted"] = rec.predict(choice)
        del r["plan"]
    return held, rows, total


# ----------------------------------------------------------------------------------- one model
def bench_model(name: str, model_dir: Path, text: Path, args) -> dict:
    from specprune.analysis import analyze
    from specprune.data import load_data
    from specprune.models import load_model
    from specprune.snapshot import apply_temporarily

    loaded = load_model(str(model_dir))
    model = loaded.model.eval()
    seq = args.seq_len or (128 if name == "minilm" else 64)
    calib = load_data([text], loaded.tokenizer, samples=args.samples, seq_len=seq, batch_size=8)
    evalb = load_data([text], loaded.tokenizer, samples=args.eval_samples, seq_len=seq, batch_size=8,
                      split="evaluation")
    # as the CLI does: the recommender verifies on calibration windows held out of the analysis
    verify = load_data([text], loaded.tokenizer, samples=32, seq_len=seq, batch_size=8, offset=args.samples)
    include = QUICK_INCLUDE if args.quick else None
    t = time.perf_counter()
    analysis = analyze(model, calib, include=include)
    analyze_s = time.perf_counter() - t
    tols = (0.02,) if args.quick else tuple(args.tolerances)
    sets = settings(args.quick)
    print(f"\n# {name}: {calib.samples} calibration + {evalb.samples} held-apart windows x {seq} tokens, "
          f"{len(analysis.layers)} layers; analyze {analyze_s:.1f}s", flush=True)

    rec_init, rec_plan, sweep_t = [], {t: [] for t in tols}, []
    rec = plans = sweep_rows = held = None
    for r in range(args.rounds):
        rec, plans, init, plan_s = run_recommend(analysis, model, calib, tols, args.sensitivity, verify,
                                                 args.verify_samples)
        rec_init.append(init)
        for tol in tols:
            rec_plan[tol].append(plan_s[tol])
        held, sweep_rows, sw = run_sweep(model, analysis, rec, evalb, sets)
        sweep_t.append(sw)
        print(f"round {r + 1}: Recommender init {init:.1f}s + plans "
              + ", ".join(f"{pct(t, 1)} {plan_s[t]:.1f}s" for t in tols)
              + f" | sweep ({len(sets)} settings) {sw:.1f}s | load {os.getloadavg()[0]:.1f}", flush=True)
    init_m = statistics.median(rec_init)
    plan_m = {t: statistics.median(v) for t, v in rec_plan.items()}
    sweep_m = statistics.median(sweep_t)

    # the recommended plans on the held-apart windows
    plan_rows = []
    for tol in tols:
        p = plans[tol]
        with apply_temporarily(model, p, analysis):
            measured = held.delta(model)
        ok = [u for u in sweep_rows if u["measured"] <= tol]
        best = min(ok, key=lambda u: u["size_bits_after"]) if ok else None
        plan_rows.append({"tolerance": tol, "predicted": p.predicted_delta, "measured": measured,
                          "within_1.25x": measured <= 1.25 * tol, "bits_after": p.size["bits_after"],
                          "bits_before": p.size["bits_before"], "targeted_bits": targeted_bits(rec, p),
                          "best_uniform": None if best is None else best["label"],
                          "best_uniform_bits_after": None if best is None else best["size_bits_after"],
                          "best_uniform_targeted_bits": None if best is None else best["targeted_bits"],
                          "best_uniform_measured": None if best is None else best["measured"],
                          "recommend_s": init_m + plan_m[tol]})
    worst, worst_setting = 1.0, None
    for u in sweep_rows:
        u["in_range"] = 1e-3 <= u["measured"] <= 0.5
        if u["in_range"] and u["predicted"] > 0:
            rr = u["predicted"] / u["measured"]
            u["pred_over_meas"] = rr
            if max(rr, 1 / rr) > worst:
                worst, worst_setting = max(rr, 1 / rr), u["label"]

    # ---- print
    per_call = {t: init_m + plan_m[t] for t in tols}
    all_tols = init_m + sum(plan_m.values())
    print(f"\n## {name} — time: recommend vs the uniform sweep ({len(sets)} settings, medians of "
          f"{args.rounds} alternated round(s))\n")
    rows = [[f"specprune recommend --tolerance {pct(t, 1)} (init + plan)", f"{per_call[t]:.1f}",
             f"{per_call[t] / sweep_m:.2f}", "<= 0.1", "PASS" if per_call[t] / sweep_m <= 0.1 else "FAIL"]
            for t in tols]
    rows.append([f"Recommender init once + {len(tols)} plans", f"{all_tols:.1f}", f"{all_tols / sweep_m:.2f}", "", ""])
    rows.append(["  of which Recommender init (geometry, sensitivities, map)", f"{init_m:.1f}",
                 f"{init_m / sweep_m:.2f}", "", ""])
    rows.append(["uniform sweep (reference + apply + measure each)", f"{sweep_m:.1f}", "1.00", "", ""])
    rows.append(["(analyze, shared by both)", f"{analyze_s:.1f}", f"{analyze_s / sweep_m:.2f}", "", ""])
    print(table(["what", "median s", "/ sweep", "target", ""], rows))
    rec_details = plans[tols[0]].details
    sens_probes = sum(len(v.get("probes", [])) for v in rec_details.get("sensitivities", {}).values())
    print(f"\n(sensitivities: {rec_details.get('sensitivity')}; {sens_probes} probe points over {len(rec.geoms)} "
          f"layers; calibration points: {len(rec_details.get('calibration_map', {}).get('points', []))})")

    print(f"\n## {name} — recommended plan vs the best uniform setting meeting each tolerance (held-apart windows)\n")
    print(table(["tolerance", "plan predicted", "plan measured", "<= 1.25 tol", "plan bits_after (MiB)",
                 "best uniform", "its measured", "its bits_after (MiB)", "plan / uniform (whole model)",
                 "plan / uniform (targeted weights)", "smaller?"],
                [[pct(p["tolerance"], 1), pct(p["predicted"]), pct(p["measured"]),
                  "yes" if p["within_1.25x"] else "NO", f"{p['bits_after'] / 8 / 2 ** 20:.2f}",
                  p["best_uniform"] or "none meets it", pct(p["best_uniform_measured"]),
                  "–" if p["best_uniform_bits_after"] is None else f"{p['best_uniform_bits_after'] / 8 / 2 ** 20:.2f}",
                  "–" if p["best_uniform_bits_after"] is None else f"{p['bits_after'] / p['best_uniform_bits_after']:.3f}",
                  "–" if p["best_uniform_targeted_bits"] is None
                  else f"{p['targeted_bits'] / p['best_uniform_targeted_bits']:.3f}",
                  "–" if p["best_uniform_bits_after"] is None
                  else ("yes" if p["bits_after"] < p["best_uniform_bits_after"] else "NO")] for p in plan_rows]))

    print(f"\n## {name} — predicted (Recommender.predict) vs measured, every uniform setting\n")
    print(table(["setting", "predicted", "measured (held-apart)", "stderr", "pred / meas", "in 0.1%–50%",
                 "bits_after (MiB)"],
                [[u["label"], pct(u["predicted"]), pct(u["measured"]), pct(u["stderr"]),
                  f"{u['pred_over_meas']:.2f}" if "pred_over_meas" in u else "–",
                  "yes" if u["in_range"] else "no", f"{u['size_bits_after'] / 8 / 2 ** 20:.2f}"]
                 for u in sweep_rows]))
    print(f"\nworst predicted/measured ratio (max of r, 1/r) over settings in range: {worst:.2f}"
          + (f" ({worst_setting})" if worst_setting else ""))
    return {"model": name, "calibration_windows": calib.samples, "eval_windows": evalb.samples, "seq_len": seq,
            "layers": len(analysis.layers), "analyze_s": analyze_s, "recommender_init_s": rec_init,
            "plan_s": {str(k): v for k, v in rec_plan.items()}, "sweep_s": sweep_t,
            "recommend_per_call_s": {str(k): v for k, v in per_call.items()},
            "ratio_per_call": {str(k): v / sweep_m for k, v in per_call.items()},
            "plans": plan_rows, "uniform": sweep_rows, "worst_pred_ratio": worst, "worst_setting": worst_setting}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-apart evaluation windows (default 64)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 128 MiniLM, 64 Llama)")
    ap.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    ap.add_argument("--rounds", type=int, default=2, help="alternated recommend/sweep rounds (default 2)")
    ap.add_argument("--verify-samples", type=int, default=None,
                    help="windows for the recommender's map and verification (default: the recommender's)")
    ap.add_argument("--sensitivity", default="auto", choices=("auto", "gradient", "probe"),
                    help="the recommender's per-layer sensitivities (default auto: gradient where defined)")
    ap.add_argument("--llama", action="store_true", help="also the small Llama (trained once, ~1-2 min, cached)")
    ap.add_argument("--llama-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "specprune_bench_llama")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="first block only, 8 + 8 windows, tolerance 2%%, settings int4/int8/rank 50%%")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples = min(args.samples, 8)
        args.eval_samples = min(args.eval_samples, 8)

    from specprune import progress
    from specprune.textgen import write_text
    from specprune.toy import minilm_dir, train_llama

    progress.set_enabled(False)
    mach = machine()
    print(f"# bench_sweep | machine: {mach.get('cpu')} | nproc {mach['nproc']} | load average at start "
          f"{mach.get('loadavg')}", flush=True)
    text = Path(os.environ.get("TMPDIR", "/tmp")) / "specprune_bench_text.txt"
    if not text.exists():
        write_text(text)
    out = {"machine": mach, "models": []}
    if not args.no_minilm:
        d = minilm_dir()
        if d is None:
            print("all-MiniLM-L6-v2 is not installed: skipped")
        else:
            out["models"].append(bench_model("minilm", d, text, args))
    if args.llama:
        if not (args.llama_dir / "config.json").exists():
            t = time.perf_counter()
            train_llama(args.llama_dir)
            print(f"(trained the small Llama in {time.perf_counter() - t:.0f}s into {args.llama_dir})")
        out["models"].append(bench_model("llama", args.llama_dir, text, args))
    print(f"\nload average at end: {os.getloadavg()}")
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
