#!/usr/bin/env python
"""Issue 9, target 2: ``specprune analyze`` as a whole process against a whole process running
WeightWatcher's ``analyze()`` on the same model (weights only, no data), alternated in one run.

    pip install --no-deps weightwatcher powerlaw pandas     # keeps the installed torch; or into a
    pip install --no-deps --target /tmp/ww_site weightwatcher powerlaw pandas   # side directory:
    python bench/bench_weightwatcher.py --ww-path /tmp/ww_site          # 3 pairs, ~4-6 min on 2 busy cores
    python bench/bench_weightwatcher.py --quick --ww-path /tmp/ww_site  # 1 pair, 8 windows (~1 min)

The two commands, each timed from process start to exit (imports, model load and writing included):

* specprune: ``python -m specprune analyze MINILM --data TEXT --samples 64 --seq-len 128 --out DIR --format json``
  (load, calibrate on 64 windows x 128 tokens, solve, fit, write analysis.json + spectra);
* WeightWatcher: ``python -c "import weightwatcher as ww; from transformers import AutoModel;
  ww.WeightWatcher(model=AutoModel.from_pretrained(MINILM)).analyze()"`` (its default analysis: ESD of
  every layer's weight, power-law fits).

They run one after the other, A B A B ..., ``--repeats`` times; the report gives every time, the
medians, the ratio of medians and the median of the per-pair ratios (target: specprune / WW <= 1).
Also measured once each (same alternation): the bare ``import`` cost of both tools, so the reader
can see how much of either process is start-up. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):  # specprune, and bench/_common.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import machine, table


def timed(cmd: list[str], env: dict, label: str) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return dt


def specprune_cmd() -> list[str]:
    """``python -m specprune`` of this working tree (PYTHONPATH is set to the repository in ``main``), so
    the measured code is the checkout's even when another copy is installed."""
    return [sys.executable, "-m", "specprune"]


WW_SCRIPT = ("import weightwatcher as ww\n"
             "from transformers import AutoModel\n"
             "m = AutoModel.from_pretrained({model!r})\n"
             "df = ww.WeightWatcher(model=m).analyze()\n"
             "print(len(df))\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="alternated pairs (default 3)")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows for specprune (default 64)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ww-path", help="a directory to put on PYTHONPATH for weightwatcher "
                                      "(when it is installed with pip --target)")
    ap.add_argument("--no-imports", action="store_true", help="skip the bare-import measurement")
    ap.add_argument("--quick", action="store_true", help="1 pair, 8 windows, no import measurement")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
        if args.samples == 64:
            args.samples = 8
        args.no_imports = True

    from specprune.textgen import write_text
    from specprune.toy import minilm_dir

    model = minilm_dir()
    if model is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (specprune.toy.minilm_dir() is None)")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ww_env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.ww_path:
        ww_env["PYTHONPATH"] = os.pathsep.join([args.ww_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import weightwatcher, sys; print(weightwatcher.__version__)"],
                           env=ww_env, capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit("weightwatcher is not importable: pip install --no-deps weightwatcher powerlaw pandas "
                 "(or with --target DIR and pass --ww-path DIR)\n" + probe.stderr[-800:])
    ww_version = probe.stdout.strip().splitlines()[-1]
    import torch

    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ww_"))
    text = tmp / "text.txt"
    write_text(text)
    ww_cmd = [sys.executable, "-c", WW_SCRIPT.format(model=str(model))]
    print(f"# bench_weightwatcher: all-MiniLM-L6-v2, specprune {args.samples} windows x {args.seq_len} tokens "
          f"vs WeightWatcher {ww_version} (weights only); torch {torch.__version__}", flush=True)
    print(f"machine: {mach.get('cpu')} | nproc {mach['nproc']} | load average at start {mach.get('loadavg')}",
          flush=True)

    sp_times, ww_times, ratios = [], [], []
    for i in range(args.repeats):
        out = tmp / f"analysis_{i}"
        sp = timed(specprune_cmd() + ["analyze", str(model), "--data", str(text), "--samples", str(args.samples),
                                      "--seq-len", str(args.seq_len), "--out", str(out), "--format", "json"],
                   env, "specprune analyze")
        ww = timed(ww_cmd, ww_env, "weightwatcher")
        sp_times.append(sp)
        ww_times.append(ww)
        ratios.append(sp / ww)
        print(f"pair {i + 1}: specprune {sp:.1f}s, weightwatcher {ww:.1f}s, ratio {sp / ww:.2f} "
              f"| load {os.getloadavg()[0]:.1f}", flush=True)
    imports = {}
    if not args.no_imports:
        imports["specprune (import specprune.analysis, transformers)"] = timed(
            [sys.executable, "-c", "import specprune.analysis, specprune.cli.app, transformers"], env, "import")
        imports["weightwatcher (import weightwatcher, transformers)"] = timed(
            [sys.executable, "-c", "import weightwatcher, transformers"], ww_env, "import")
    ms, mw = statistics.median(sp_times), statistics.median(ww_times)
    mr = statistics.median(ratios)
    print("\n## Target 2 — whole process: specprune analyze vs WeightWatcher analyze()\n")
    print(table(["process", "runs (s)", "median s"],
                [["specprune analyze", ", ".join(f"{t:.1f}" for t in sp_times), f"{ms:.1f}"],
                 ["weightwatcher analyze()", ", ".join(f"{t:.1f}" for t in ww_times), f"{mw:.1f}"]]))
    print(f"\nratio of medians specprune/WW = {ms / mw:.2f}; median of per-pair ratios = {mr:.2f}; "
          f"target <= 1: {'PASS' if mr <= 1.0 else 'FAIL'}")
    if imports:
        print("\nStart-up alone (one bare import each):\n")
        print(table(["imports", "s"], [[k, f"{v:.1f}"] for k, v in imports.items()]))
    print(f"\nload average at end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "weightwatcher": ww_version, "samples": args.samples,
                                         "specprune_s": sp_times, "weightwatcher_s": ww_times,
                                         "ratio_of_medians": ms / mw, "median_ratio": mr, "imports_s": imports,
                                         "loadavg_end": list(os.getloadavg())}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
