#!/usr/bin/env python
"""Issue 9, target 4: how the analysis cost scales with tokens, width and depth, with fitted log-log
slopes (expected: 1 in tokens, 2 in width for the Gram accumulation, 3 in width for the full solve,
1 in depth), and the full solve against the cheaper solves where it dominates.

    python bench/bench_scaling.py            # widths 256..4096 (~4-7 min on 2 busy cores)
    python bench/bench_scaling.py --quick    # widths 256..1024, fewer points (<1 min)

Everything is synthetic (nothing is downloaded) and goes through specprune's own code paths:

1. **tokens** — :meth:`specprune.probe.GramAccumulator.update` (float32 xᵀx GEMM + float64 sum) on
   T × d batches, d fixed, T from 1024 to 16384;
2. **width** — the same update at fixed T against d = 256 … 4096, and the solve the analysis runs on a
   d × d Gram (``specprune.solve._eigh``: symmetrise, scale, float64 ``eigh``, descending copy);
3. **solver choices at each width** — full float64 eigh, eigenvalues only (``eigvalsh``), float32 eigh,
   and the randomized top-k (:func:`specprune.randomized.randomized_eigh`, k = d/8) with its error on
   the top k/2 eigenvalues; plus a batched solve (one ``eigh`` on a stack of same-width Grams, as a
   transformer's per-block groups are) against one call per Gram;
4. **depth** — whole :func:`specprune.analysis.analyze` on a stack of L ``Linear(d, d)`` + GELU layers
   (L = 2 … 16), against the plain forward over the same batches.

Each point is the median of ``--repeats`` measurements taken round-robin over the sizes (so that a
burst of load on the shared host spreads over all sizes); slopes are least-squares fits of
log(time) on log(size). Prints markdown; ``--json PATH`` writes the numbers. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
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


def slope(xs, ys) -> float:
    """Least-squares slope of log y on log x."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx if sxx > 0 else float("nan")


def round_robin(points: list, measure, repeats: int) -> dict:
    """{point: median seconds}, measuring every point once per round."""
    ts: dict = {p: [] for p in points}
    for _ in range(repeats):
        for p in points:
            ts[p].append(measure(p))
    return {p: statistics.median(v) for p, v in ts.items()}


def clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------- sections
def gram_time(d: int, tokens: int, reps_inner: int = 1) -> float:
    import torch

    from specprune.probe import GramAccumulator

    x = torch.randn(tokens, d)
    acc = GramAccumulator("x", d, torch.device("cpu"))
    acc.update(x)  # allocates the float64 sum
    with torch.inference_mode():
        return clock(lambda: [acc.update(x) for _ in range(reps_inner)]) / reps_inner


def spd(d: int, seed: int = 0):
    """A d × d Gram with a power-law spectrum (λ_i ∝ i^-1.2), like a layer input's."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.2
    return (q * lam) @ q.T


def solve_times(d: int, repeats: int, with_topk: bool = True) -> dict:
    """Medians (round-robin) of the solver variants at width d, plus the top-k error."""
    import torch

    from specprune.solve import _eigh
    from specprune.randomized import randomized_eigh

    a = spd(d)
    ref = torch.linalg.eigvalsh(a).flip(0)
    k = max(1, d // 8)
    variants = {
        "analysis _eigh (fp64, vectors)": lambda: _eigh(a.clone(), 1),
        "eigvalsh (fp64, values only)": lambda: torch.linalg.eigvalsh(a),
        "eigh float32": lambda: torch.linalg.eigh(a.float()),
    }
    if with_topk:
        variants["randomized top-k (k=d/8)"] = lambda: randomized_eigh(a, k)
    out = round_robin(list(variants), lambda name: clock(variants[name]), repeats)
    err = None
    if with_topk:
        res = randomized_eigh(a, k)
        top = res.eigenvalues[: k // 2].cpu()
        err = float(((top - ref[: k // 2]).abs() / ref[: k // 2]).max())
    ev32 = torch.linalg.eigvalsh(a.float()).double().flip(0)
    err32_top = float(((ev32[:k] - ref[:k]).abs() / ref[:k]).max())
    return {"times": out, "topk_err_top_half": err, "fp32_err_top_k": err32_top, "k": k}


def batched_vs_loop(d: int, n: int, repeats: int) -> dict:
    import torch

    mats = torch.stack([spd(d, s) for s in range(n)])

    def loop():
        for i in range(n):
            torch.linalg.eigh(mats[i])

    def batched():
        torch.linalg.eigh(mats)

    t = round_robin(["loop", "batched"], lambda w: clock(loop if w == "loop" else batched), repeats)
    return {"d": d, "n": n, **t}


class Stack:
    """L × (Linear(d, d) + GELU), input (batch, seq, d)."""

    def __new__(cls, depth: int, d: int):
        import torch
        from torch import nn

        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(d, d), nn.GELU()]
        return nn.Sequential(*layers).eval()


def depth_times(depths, d: int, tokens: int, batch_tokens: int, repeats: int) -> dict:
    import torch

    from specprune import progress
    from specprune.analysis import analyze
    from specprune.layers import select_layers
    from specprune.probe import run_probe

    progress.set_enabled(False)
    nb = max(1, tokens // batch_tokens)
    batches = [{"input": torch.randn(1, batch_tokens, d)} for _ in range(nb)]
    models = {L: Stack(L, d) for L in depths}

    def plain(L):
        with torch.inference_mode():
            for b in batches:
                models[L](b["input"])

    def hooked(L):
        run_probe(models[L], select_layers(models[L]), batches)

    def whole(L):
        analyze(models[L], batches, memory_check=False)

    whole(depths[0])  # warm-up: lazy imports
    fns = {"plain": plain, "hooked": hooked, "analyze": whole}
    points = [(L, w) for L in depths for w in fns]
    t = round_robin(points, lambda p: clock(lambda: fns[p[1]](p[0])), repeats)
    return {L: {w: t[(L, w)] for w in fns} for L in depths}


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-width", type=int, default=4096)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, = cores)")
    ap.add_argument("--quick", action="store_true", help="widths to 1024, fewer points, 1 repeat")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    if args.quick:
        args.repeats = 1
        args.max_width = min(args.max_width, 1024)
    if args.threads:
        torch.set_num_threads(args.threads)
    mach = machine()
    print(f"# bench_scaling | {mach.get('cpu')} | nproc {mach['nproc']} | torch threads {mach['torch_threads']} | "
          f"load average at start {mach.get('loadavg')}", flush=True)
    out: dict = {"machine": mach}
    torch.manual_seed(0)

    # 1. tokens
    d_tok = 512 if args.quick else 1024
    toks = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    t_tok = round_robin(toks, lambda T: gram_time(d_tok, T), args.repeats)
    s_tok = slope(toks, [t_tok[T] for T in toks])
    print(f"\n## Gram accumulation against tokens (d = {d_tok})\n")
    print(table(["tokens", "seconds", "ns per token·d²"],
                [[T, f"{t_tok[T]:.4f}", f"{1e9 * t_tok[T] / (T * d_tok * d_tok):.3f}"] for T in toks]))
    print(f"\nfitted slope in tokens: {s_tok:.2f} (expected 1)", flush=True)
    out["tokens"] = {"d": d_tok, "seconds": t_tok, "slope": s_tok}

    # 2. width: accumulation and the analysis' solve
    widths = [w for w in (256, 512, 1024, 2048, 4096) if w <= args.max_width]
    T = 4096
    t_acc = round_robin(widths, lambda d: gram_time(d, T), args.repeats)
    solves = {}
    for d in widths:
        solves[d] = solve_times(d, args.repeats if d <= 2048 else 1, with_topk=d >= 512)
        print(f"(width {d}: solves done, load {os.getloadavg()[0]:.1f})", flush=True)
    t_solve = {d: solves[d]["times"]["analysis _eigh (fp64, vectors)"] for d in widths}
    s_acc = slope(widths, [t_acc[d] for d in widths])
    big = [d for d in widths if d >= 512] or widths
    s_solve = slope(big, [t_solve[d] for d in big])
    print(f"\n## Gram accumulation ({T} tokens) and full solve against width\n")
    print(table(["d", "accumulate s", "solve s (_eigh)", "solve / accumulate",
                 "tokens at which accumulation = solve"],
                [[d, f"{t_acc[d]:.4f}", f"{t_solve[d]:.3f}", f"{t_solve[d] / t_acc[d]:.1f}",
                  f"{T * t_solve[d] / t_acc[d]:.0f}"] for d in widths]))
    print(f"\nfitted slopes: accumulation {s_acc:.2f} (expected 2), full solve {s_solve:.2f} "
          f"(expected 3; fitted over d >= {big[0]})", flush=True)
    out["width"] = {"tokens": T, "accumulate": t_acc, "solve": t_solve, "slope_accumulate": s_acc,
                    "slope_solve": s_solve}

    # 3. solver choices
    names = list(solves[widths[-1]]["times"])
    print("\n## Solver choices against width (seconds; top-k error: max relative error of the top k/2 "
          "eigenvalues on a power-law spectrum)\n")
    rows = []
    for d in widths:
        ts = solves[d]["times"]
        rows.append([d] + [f"{ts[n]:.3f}" if n in ts else "–" for n in names]
                    + ["–" if solves[d]["topk_err_top_half"] is None else f"{solves[d]['topk_err_top_half']:.1e}",
                       f"{solves[d]['fp32_err_top_k']:.1e}"])
    print(table(["d"] + names + ["top-k err", "fp32 err (top d/8)"], rows))
    slopes_v = {n: slope(big, [solves[d]["times"][n] for d in big if n in solves[d]["times"]])
                for n in names if all(n in solves[d]["times"] for d in big)}
    print("\nfitted slopes (d >= %d): " % big[0] + ", ".join(f"{n}: {s:.2f}" for n, s in slopes_v.items()))
    out["solvers"] = {d: solves[d] for d in widths}
    bat = [batched_vs_loop(384, 24, args.repeats), batched_vs_loop(1024, 8 if not args.quick else 4, args.repeats)]
    print("\n## One batched eigh vs one call per Gram\n")
    print(table(["d", "Grams", "loop s", "batched s", "loop / batched"],
                [[b["d"], b["n"], f"{b['loop']:.3f}", f"{b['batched']:.3f}", f"{b['loop'] / b['batched']:.2f}"]
                 for b in bat]), flush=True)
    out["batched"] = bat

    # 4. depth
    depths = [2, 4] if args.quick else [2, 4, 8, 16]
    d_dep = 256 if args.quick else 512
    tokens = 4096 if args.quick else 8192
    dep = depth_times(depths, d_dep, tokens, 1024, args.repeats)
    s_plain = slope(depths, [dep[L]["plain"] for L in depths])
    s_hook = slope(depths, [dep[L]["hooked"] for L in depths])
    s_whole = slope(depths, [dep[L]["analyze"] for L in depths])
    print(f"\n## Depth: stacks of Linear({d_dep}, {d_dep}) + GELU, {tokens} tokens\n")
    print(table(["depth", "plain forward s", "hooked pass s", "analyze s", "hooked / plain", "analyze / plain",
                 "(analyze - hooked) per layer s"],
                [[L, f"{dep[L]['plain']:.3f}", f"{dep[L]['hooked']:.3f}", f"{dep[L]['analyze']:.3f}",
                  f"{dep[L]['hooked'] / dep[L]['plain']:.1f}", f"{dep[L]['analyze'] / dep[L]['plain']:.1f}",
                  f"{(dep[L]['analyze'] - dep[L]['hooked']) / L:.3f}"] for L in depths]))
    print(f"\nfitted slopes in depth: plain {s_plain:.2f}, hooked {s_hook:.2f}, analyze {s_whole:.2f} (expected 1)")
    out["depth"] = {"d": d_dep, "tokens": tokens, "times": dep, "slope_plain": s_plain, "slope_hooked": s_hook,
                    "slope_analyze": s_whole}

    print(f"\nload average at end: {os.getloadavg()}")
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
