#!/usr/bin/env python
"""Issue 9, target 3: the recommender's per-layer sensitivities against depth — gradient (Gauss–Newton
scores from 16 random-cotangent backward passes per window, :mod:`specprune.curvature`) against the
one-layer-at-a-time probes (:func:`specprune.sensitivity.measure_sensitivities`, prefix replay included).

    python bench/bench_sensitivity.py            # random BERT encoders, hidden 256, depth 2/4/8/12 (~3-5 min)
    python bench/bench_sensitivity.py --quick    # depth 1 and 2, hidden 64 (<1 min)

For each depth: the same random BertModel (output-mse metric), 4 windows × 128 random tokens (what
``recommend`` probes on for output-mse), the analysis' spectra for the layer geometry; both methods
score the same seven perturbations of every layer (int-5 and int-2 noise, two truncations). The two
are alternated (``--rounds``, medians). Printed: seconds per method, their ratio, the per-layer
agreement (geometric mean and log-sd of gradient / probe quantization sensitivities) and the fitted
log-log slope of each method's time against depth (the probes are expected to grow faster than
linearly — each layer's probes run the layers after it — the gradient passes linearly). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import machine, table


def one_depth(depth: int, hidden: int, rounds: int, seq: int) -> dict:
    import numpy as np
    import torch

    from specprune import curvature
    from specprune.analysis import analyze
    from specprune.data import from_iterable
    from specprune.evaluation import Evaluator
    from specprune.recommender import Recommender
    from specprune.sensitivity import measure_sensitivities
    from specprune.toy import tiny_model

    model = tiny_model("bert", layers=depth, hidden=hidden)
    gen = torch.Generator().manual_seed(0)
    windows = [{"input_ids": torch.randint(5, 2048, (4, seq), generator=gen),
                "attention_mask": torch.ones(4, seq, dtype=torch.long)} for _ in range(4)]
    calib = from_iterable(windows)  # 16 windows for the spectra
    analysis = analyze(model, calib)
    rec = Recommender(analysis, model, None)  # geometry only
    probe_windows = from_iterable(windows[:1])  # the 4 windows recommend probes on
    times = {"gradient": [], "probe": []}
    sens = {}
    for _ in range(rounds):
        t = time.perf_counter()
        sens["gradient"] = curvature.gradient_sensitivities(rec.layers, rec.geoms, probe_windows.batches,
                                                            "output-mse", model, "whitened")[0]
        times["gradient"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ev = Evaluator(model, probe_windows)
        sens["probe"] = measure_sensitivities(rec.layers, rec.geoms, ev, model, "whitened")
        times["probe"].append(time.perf_counter() - t)
    ratios = [sens["gradient"][n].quant / sens["probe"][n].quant for n in sens["probe"]
              if n in sens["gradient"] and sens["probe"][n].quant > 1e-9]
    logs = np.log(ratios)
    return {"depth": depth, "layers": len(rec.layers), "gradient_s": statistics.median(times["gradient"]),
            "probe_s": statistics.median(times["probe"]), "agree_gmean": float(math.exp(logs.mean())),
            "agree_logsd": float(logs.std())}


def slope(xs, ys) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="depth 1 and 2, hidden 64, one round")
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.hidden, args.rounds, args.seq_len = [1, 2], 64, 1, 32

    from specprune import progress

    progress.set_enabled(False)
    mach = machine()
    print(f"# bench_sensitivity | machine: {mach.get('cpu')} | nproc {mach['nproc']} | torch threads "
          f"{mach.get('torch_threads')} | load average at start {mach.get('loadavg')}", flush=True)
    rows = []
    for d in args.depths:
        r = one_depth(d, args.hidden, args.rounds, args.seq_len)
        rows.append(r)
        print(f"depth {d}: {r['layers']} layers, gradient {r['gradient_s']:.2f}s, probe {r['probe_s']:.2f}s",
              flush=True)
    print()
    print(table(["depth", "layers", "gradient s", "probe s", "probe / gradient", "gradient/probe per layer "
                 "(geo. mean)", "log-sd"],
                [[r["depth"], r["layers"], f"{r['gradient_s']:.2f}", f"{r['probe_s']:.2f}",
                  f"{r['probe_s'] / r['gradient_s']:.1f}", f"{r['agree_gmean']:.2f}", f"{r['agree_logsd']:.2f}"]
                 for r in rows]))
    if len(rows) >= 2:
        depths = [r["depth"] for r in rows]
        print(f"\nlog-log slope against depth: gradient {slope(depths, [r['gradient_s'] for r in rows]):.2f}, "
              f"probe {slope(depths, [r['probe_s'] for r in rows]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
