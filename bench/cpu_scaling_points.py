#!/usr/bin/env python
"""Measured points for docs/scaling.md's time and memory model, on whatever CPU runs it.

    python bench/cpu_scaling_points.py            # ~2–4 minutes on 2 cores
    python bench/cpu_scaling_points.py --big      # adds d = 4096 solves (~+2 minutes)

1. Gram accumulation (specprune.probe.GramAccumulator.update: float32 GEMM xᵀx + float64 add) per
   batch, against width d (tokens fixed) and against tokens (d fixed): the model says tokens·d² MACs;
2. full float64 eigh against d (model: ∝ d³);
3. randomized top-k (k = d/8) against the full solve: time and error;
4. peak resident memory of ``analyze`` on a wide two-layer model against specprune.memory's estimate.

Times are the minimum of a few repeats (the host may be shared). Prints markdown, writes JSON to
``$OUT``/``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def best_of(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def gram_points() -> list[dict]:
    from specprune.probe import GramAccumulator

    rows = []
    for d, tokens in [(256, 4096), (512, 4096), (1024, 4096), (2048, 4096), (4096, 4096),
                      (1024, 1024), (1024, 16384)]:
        x = torch.randn(tokens, d)
        acc = GramAccumulator("x", d, torch.device("cpu"))
        acc.update(x)  # allocate
        t = best_of(lambda: acc.update(x))  # noqa: B023 - called at once
        macs = tokens * d * d
        rows.append({"what": "gram", "d": d, "tokens": tokens, "seconds": t, "GMAC/s": macs / t / 1e9})
    return rows


def eigh_points(big: bool) -> list[dict]:
    from specprune.solve import _eigh

    rows = []
    for d in [256, 512, 1024, 2048] + ([4096] if big else []):
        x = torch.randn(2 * d, d, dtype=torch.float64)
        g = x.T @ x

        def solve():
            _eigh(g.clone(), 2 * d)  # noqa: B023 - called at once

        t = best_of(solve, reps=1 if d >= 2048 else 3)
        rows.append({"what": "eigh", "d": d, "seconds": t, "seconds/d^3*1e9": t / d**3 * 1e9})
    return rows


def randomized_points(big: bool) -> list[dict]:
    from specprune.randomized import compare_to_full, default_top_k, randomized_eigh

    rows = []
    for d in [1024, 2048] + ([4096] if big else []):
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
        a = (q * lam) @ q.T
        k = default_top_k(d)
        t_r = best_of(lambda: randomized_eigh(a, k), reps=1)  # noqa: B023
        t0 = time.perf_counter()
        ev, vec = torch.linalg.eigh(a)
        t_f = time.perf_counter() - t0
        res = randomized_eigh(a, k)
        err = compare_to_full(a, res, full=(ev.flip(0), vec.flip(1)))
        rows.append({"what": "randomized", "d": d, "k": k, "randomized_s": t_r, "full_s": t_f,
                     "rel_eig_max": err.rel_eig_max, "rel_eig_top_half": err.rel_eig_half,
                     "sin_theta_top_half": err.sin_theta_half, "tail_rel": err.tail_rel,
                     "max_rel_residual": res.max_relative_residual})
    return rows


def _hwm() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def memory_point(d: int = 2048) -> dict:
    """analyze() of Linear(d, d) → Linear(d, d): peak RSS growth vs the estimate's host peak."""
    from specprune.analysis import analyze
    from specprune.data import Batches

    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(16, 16)).eval()  # warm-up: lazy imports (scipy) are not the analysis's
    analyze(small, Batches([{"input": torch.randn(64, 16)}], 64, None, 0))
    model = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)).eval()
    batches = Batches([{"input": torch.randn(1024, d)} for _ in range(4)], 4096, None, 0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return {"what": "memory", "note": "cannot reset VmHWM here"}
    base = _rss()
    res = analyze(model, batches, memory_check=True)
    peak = _hwm() - base
    est = res.memory["bytes"]
    return {"what": "memory", "d": d, "measured_peak_MiB": peak / 2**20, "estimate_MiB": est["device_peak"] / 2**20,
            "accumulators_MiB": est["accumulators"] / 2**20, "eigensolve_MiB": est["eigensolve"] / 2**20,
            "eigenvectors_MiB": est["eigenvectors"] / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    report["memory"] = memory_point()
    report["gram"] = gram_points()
    report["eigh"] = eigh_points(args.big)
    report["randomized"] = randomized_points(args.big)
    report["seconds"] = time.perf_counter() - t0
    for key in ("gram", "eigh", "randomized"):
        rows = report[key]
        cols = list(rows[0])
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        print()
    print(json.dumps(report["memory"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_scaling_points.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
