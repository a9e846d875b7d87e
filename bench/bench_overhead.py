#!/usr/bin/env python
"""Issue 9, targets 1 and 5: what ``analyze`` costs on top of the forward passes it cannot avoid.

    python bench/bench_overhead.py                 # 128 windows x 128 tokens, 3 rounds (~4-8 min on 2 busy cores)
    python bench/bench_overhead.py --quick         # 8 windows, 1 round, first block only, no memory children (<1 min)
    python bench/bench_overhead.py --samples 64 --rounds 5 --json out.json

On all-MiniLM-L6-v2 (``specprune.toy.minilm_dir()``) with the English calibration text of
``specprune.textgen.write_text``, over the *same* batches:

1. **time** — three things alternated A B C A B C ... for ``--rounds`` rounds, medians reported:
   ``plain`` (the model's forward over every batch, inference mode), ``hooked`` (analyze's hooked
   pass, :func:`specprune.probe.run_probe` on the analysed layers) and ``analyze`` (the whole
   :func:`specprune.analysis.analyze`: memory plan, hooked pass, eigensolves, fits). Targets:
   hooked/plain <= 1.5, analyze/plain <= 1.8. ``--token-sample F`` adds the hooked pass and ``analyze``
   with token sampling of the wide inputs (``analyze(token_sample=F)``, :mod:`specprune.probe`), and
   checks its accuracy (with the stated error bounds, b and k* against the exact run). ``--naive`` adds
   the issue's baselines (an ungrouped fp32 and fp64 ``x^T x`` hook on every layer).
2. **where the time goes** — one extra ``analyze`` under cProfile, split into hooked pass / Gram
   updates / eigensolves / fits (frontier least squares) / memory planning / the rest.
3. **accuracy** — the top-k* eigenvalues of every layer against an fp64, all-token reference
   (a float64 ``x^T x`` over every counted token, solved in float64); target: within 5%.
4. **memory** (target 5) — in a fresh subprocess per measurement: peak resident memory (VmHWM, reset
   through /proc/self/clear_refs after loading) during ``analyze`` minus the resident memory after the
   model and data are loaded, against accumulators (sum of 12 d_g^2 over input groups on a CPU: the
   float64 sums and the float32 batch buffers) + solver
   workspace (full eigh: 3 x 8 d_max^2, specprune.memory's constant) + one batch of activations
   (measured in its own subprocess: peak of one plain forward), + 20%.

Prints markdown tables and the ratios; ``--json PATH`` writes everything. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):  # specprune, and bench/_common.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import machine, table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUICK_INCLUDE = [r"re:.*\.layers?\.0\..*"]  # the first transformer block (MiniLM: layer.0, Llama: layers.0)


def proc_status(*keys: str) -> dict[str, int]:
    """Bytes of the given /proc/self/status fields (VmRSS, VmHWM)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mib(n: float) -> float:
    return round(n / 2 ** 20, 1)


LLAMA_SHAPED = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def llama_shaped_dir(minilm: Path) -> Path:
    """A randomly initialised Llama-shaped model (hidden 1024, MLP 2816, 4 layers, grouped-query
    attention) with MiniLM's tokenizer, saved once under $TMPDIR: the layer-width mix of a modern
    decoder (MLP ≈ 2.75× hidden), where the widest Gram is a smaller share of the work than in a BERT
    with a 4× FFN. Random weights: timings only (its spectra mean nothing)."""
    import torch
    import transformers as tf

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "specprune_bench_llama_shaped"
    if (out / "config.json").exists():
        return out
    tok = tf.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **LLAMA_SHAPED))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.replace(out)
    return out


def setup(samples: int, seq_len: int, batch_size: int, text: Path | None, model_kind: str = "minilm"):
    """(loaded model, calibration batches, text path) — model in eval mode, progress bars off."""
    from specprune import progress
    from specprune.data import load_data
    from specprune.models import load_model
    from specprune.textgen import write_text
    from specprune.toy import minilm_dir

    progress.set_enabled(False)
    d = minilm_dir()
    if d is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (specprune.toy.minilm_dir() is None)")
    if model_kind == "llama-shaped":
        d = llama_shaped_dir(d)
    if text is None:
        text = Path(os.environ.get("TMPDIR", "/tmp")) / "specprune_bench_text.txt"
        if not text.exists():
            write_text(text)
    loaded = load_model(str(d))
    batches = load_data([text], loaded.tokenizer, samples=samples, seq_len=seq_len, batch_size=batch_size)
    loaded.model.eval()
    return loaded, batches, text


# ----------------------------------------------------------------------------------- the timed passes
def plain_pass(model, batches) -> None:
    import torch

    from specprune.data import forward

    with torch.inference_mode():
        for b in batches.batches:
            forward(model, b)


def hooked_pass(model, layers, batches, token_sample=None) -> None:
    from specprune.probe import run_probe

    run_probe(model, layers, batches.batches, sample=token_sample)


def analyze_pass(model, batches, include, token_sample=None):
    from specprune.analysis import analyze

    return analyze(model, batches, include=include, token_sample=token_sample)


class NaiveHooks:
    """The issue's baseline: every layer accumulates x^T x of its own input (no sharing), in ``dtype``."""

    def __init__(self, layers, dtype):
        self.layers, self.dtype, self.grams, self.handles, self.mask = layers, dtype, {}, [], None

    def __enter__(self):
        import torch

        for lay in self.layers:
            def hook(mod, args, name=lay.name, adapter=lay.adapter):
                x = args[0]
                if self.mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                    x = x[self.mask]
                f = adapter.features(mod, x).to(self.dtype)
                g = f.t() @ f
                if name in self.grams:
                    self.grams[name] += g
                else:
                    self.grams[name] = g.to(torch.float64)
            self.handles.append(lay.module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def naive_pass(model, layers, batches, dtype) -> None:
    import torch

    from specprune.data import forward

    with NaiveHooks(layers, dtype) as hk, torch.inference_mode():
        for b in batches.batches:
            m = b.get("attention_mask")
            hk.mask = m.bool() if m is not None else None
            forward(model, b)


# ----------------------------------------------------------------------------------- accuracy
def reference_eigenvalues(model, analysis, layers_by_name, batches) -> dict:
    """Per input group: eigenvalues (descending) of the fp64, all-token covariance."""
    import numpy as np
    import torch

    from specprune.data import forward

    grams, counts, handles, state = {}, {}, [], {"mask": None}
    for key in analysis.groups:
        lay = layers_by_name[key]

        def hook(mod, args, key=key, adapter=lay.adapter):
            x = args[0]
            m = state["mask"]
            if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m]
            f = adapter.features(mod, x).to(torch.float64)
            grams[key] = grams.get(key, 0) + f.t() @ f
            counts[key] = counts.get(key, 0) + f.shape[0]
        handles.append(lay.module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches.batches:
                m = b.get("attention_mask")
                state["mask"] = m.bool() if m is not None else None
                forward(model, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, g in grams.items():
        cov = g / counts[key]
        cov = 0.5 * (cov + cov.T)
        out[key] = np.sort(torch.linalg.eigvalsh(cov).clamp_min(0).numpy())[::-1]
    return out


def eigen_accuracy(analysis, ref: dict) -> dict:
    """Max relative error of the top-k* eigenvalues per layer (k* None: top 10), worst over layers."""
    import numpy as np

    rows, worst, worst_layer = [], 0.0, None
    no_kstar = 0
    for lay in analysis.layers:
        g = analysis.groups[lay.input_group]
        k = lay.k_star
        if k is None:
            no_kstar += 1
            k = 10
        k = min(int(k), len(g.eigenvalues))
        r = ref[lay.input_group][:k]
        a = np.asarray(g.eigenvalues[:k], dtype=np.float64)
        err = float(np.max(np.abs(a - r) / np.maximum(r, 1e-300))) if k else 0.0
        rows.append({"layer": lay.name, "k": k, "k_star": lay.k_star, "max_rel_err": err})
        if err >= worst:
            worst, worst_layer = err, lay.name
    return {"worst_rel_err": worst, "worst_layer": worst_layer, "layers_without_k_star": no_kstar,
            "layers": rows}


def sampled_accuracy(model, batches, include, ts: float, exact, ref: dict) -> dict:
    """Target 1's accuracy for ``analyze(token_sample=ts)``: its top-k* eigenvalues against the reference
    (worst over layers, and over the sampled layers with their stated bounds), and its b and k* against
    the exact analysis."""
    from specprune.probe import relative_se_bound

    a = analyze_pass(model, batches, include, ts)
    acc = eigen_accuracy(a, ref)
    rows = []
    for lay, ex in zip(a.layers, exact.layers):
        g = a.groups[lay.input_group]
        if not g.sampling:
            continue
        k = min(int(lay.k_star or 10), len(g.eigenvalues))
        err = next(r["max_rel_err"] for r in acc["layers"] if r["layer"] == lay.name)
        bound = max(relative_se_bound(g.sampling, float(v)) for v in g.eigenvalues[:k])
        rows.append({"layer": lay.name, "kept": g.sampling["kept_tokens"], "tokens": g.sampling["tokens"],
                     "k": k, "err": err, "bound_1se": bound, "b": lay.b, "b_exact": ex.b,
                     "k_star": lay.k_star, "k_star_exact": ex.k_star})
    print(f"\n## Target 1 — analyze(token_sample={ts:g}): top-k* eigenvalues against the fp64, all-token "
          "reference\n")
    print(table(["layers", "worst max rel. error", "worst layer", "target", ""],
                [[len(acc["layers"]), f"{acc['worst_rel_err']:.2e}", acc["worst_layer"], "< 5%",
                  "PASS" if acc["worst_rel_err"] < 0.05 else "FAIL"]]))
    print("\nsampled layers (the bound is the stated first-order relative standard error, at most):\n")
    print(table(["layer", "tokens kept", "top k", "max rel. error", "stated bound", "b (exact)", "k* (exact)"],
                [[r["layer"], f"{r['kept']} of {r['tokens']}", r["k"], f"{r['err']:.2%}", f"{r['bound_1se']:.1%}",
                  f"{r['b']:.3f} ({r['b_exact']:.3f})", f"{r['k_star']} ({r['k_star_exact']})"] for r in rows]))
    return {"fraction": ts, "worst_rel_err": acc["worst_rel_err"], "worst_layer": acc["worst_layer"],
            "sampled_layers": rows}


# ----------------------------------------------------------------------------------- profile breakdown
PHASES = [  # (label, function names whose cumulative time counts; first found wins)
    ("hooked pass (run_probe)", ["run_probe"]),
    ("  of which Gram updates (hook work)", ["update"]),
    ("eigensolves", ["_eigh", "_topk"]),
    ("fits (summarize_layers)", ["summarize_layers"]),
    ("  of which spectra fits (all layers, one batch)", ["run_steps"]),
    ("memory plan (incl. trial forward)", ["_plan_memory"]),
]


def profile_breakdown(model, batches, include) -> tuple[float, list[dict], str]:
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    analyze_pass(model, batches, include)
    pr.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(pr)
    by_name: dict[str, float] = {}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        if "specprune" in fname or func.startswith("<built-in method torch"):
            by_name[func] = max(by_name.get(func, 0.0), ct)
    eigh_builtin = sum(ct for (f, _l, func), (_a, _b, _c, ct, _d) in st.stats.items()
                       if "linalg_eigh" in func or "linalg_eigvalsh" in func)
    rows = []
    for label, names in PHASES:
        sec = next((by_name[n] for n in names if n in by_name), None)
        rows.append({"phase": label, "seconds": sec, "share": None if sec is None else sec / total})
    rows.append({"phase": "  LAPACK eigh itself", "seconds": eigh_builtin, "share": eigh_builtin / total})
    import io

    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    return total, rows, buf.getvalue()


# ----------------------------------------------------------------------------------- memory children
def memory_child(args) -> dict:
    """Runs in a fresh process: ``--child activations`` or ``--child analyze``."""
    import torch

    loaded, batches, _ = setup(args.samples, args.seq_len, args.batch_size, args.text, args.model)
    model = loaded.model
    include = QUICK_INCLUDE if args.quick else args.include
    gc.collect()
    base = proc_status("VmRSS")["VmRSS"]
    ok = reset_peak()
    out = {"rss_after_load": base, "peak_reset": ok}
    if args.child == "activations":
        from specprune.data import forward

        with torch.inference_mode():
            forward(model, batches.batches[0])
        out["peak_delta"] = proc_status("VmHWM")["VmHWM"] - base
        out["batch_tokens"] = int(batches.batches[0]["attention_mask"].sum())
    else:
        # phase peaks: the hooked pass (VmHWM when run_probe returns, then reset) and the rest
        import specprune.probe as sp_probe

        real_run_probe = sp_probe.run_probe

        def traced_run_probe(*a, **kw):
            res = real_run_probe(*a, **kw)
            st = proc_status("VmHWM", "VmRSS")
            out["pass_peak_delta"] = st["VmHWM"] - base
            out["rss_after_pass"] = st["VmRSS"] - base
            reset_peak()
            return res

        sp_probe.run_probe = traced_run_probe
        try:
            a = analyze_pass(model, batches, include)
        finally:
            sp_probe.run_probe = real_run_probe
        out["solve_peak_delta"] = proc_status("VmHWM")["VmHWM"] - base
        out["peak_delta"] = max(out.get("pass_peak_delta", 0), out["solve_peak_delta"])
        out["groups"] = {k: int(g.dim) for k, g in a.groups.items()}
        out["library_estimate"] = a.memory
    return out


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    if args.text:
        cmd += ["--text", str(args.text)]
    cmd += ["--model", args.model]
    for p in args.include or []:
        cmd += ["--include", p]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _lib_peak(est) -> str:
    """specprune.memory's estimated peak from Analysis.memory, in MiB."""
    try:
        b = est["bytes"]
        return f"{mib(b['host_peak'] if est.get('device') == 'cpu' else b['device_peak'])} MiB " \
               f"(accumulators {mib(b['accumulators'])}, activations {mib(b['activations'])}, " \
               f"eigensolve {mib(b['eigensolve'])}, eigenvectors {mib(b['eigenvectors'])}, " \
               f"batch Gram {mib(b['batch_gram'])})"
    except (KeyError, TypeError):
        return "n/a"


def memory_section(args) -> dict:
    act = run_child("activations", args)
    ana = run_child("analyze", args)
    dims = list(ana["groups"].values())
    acc = sum((8 + 4) * d * d for d in dims)  # float64 sum + the CPU's float32 batch buffer (specprune.probe)
    work = 3 * 8 * max(dims) ** 2  # specprune.memory.EIGH_WORKSPACE (full solve)
    results = sum(8 * d * d for d in dims)  # eigenvectors kept as float64 (d x d per group)
    bound = 1.2 * (acc + work + act["peak_delta"])
    return {"peak_minus_loaded": ana["peak_delta"], "pass_peak": ana.get("pass_peak_delta"),
            "rss_after_pass": ana.get("rss_after_pass"), "solve_fit_peak": ana.get("solve_peak_delta"),
            "accumulators": acc, "solver_workspace": work,
            "one_batch_activations": act["peak_delta"], "eigenvectors_kept": results,
            "bound_1.2x": bound, "ratio_to_bound": ana["peak_delta"] / bound,
            "pass": ana["peak_delta"] <= bound, "library_estimate": ana.get("library_estimate"),
            "peak_reset_worked": ana["peak_reset"] and act["peak_reset"]}


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of plain/hooked/analyze")
    ap.add_argument("--model", choices=["minilm", "llama-shaped"], default="minilm",
                    help="all-MiniLM-L6-v2 (default) or a random Llama-shaped model (hidden 1024, MLP 2816, "
                         "4 layers; timings only)")
    ap.add_argument("--include", action="append", help="analyse only these layers (as specprune --include)")
    ap.add_argument("--text", type=Path, help="calibration text (default: specprune.textgen.write_text)")
    ap.add_argument("--naive", action="store_true", help="also time the issue's naive fp32/fp64 hooks")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the fp64 all-token reference")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    ap.add_argument("--quick", action="store_true",
                    help="8 windows, 1 round, first block's layers only, no memory children")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every pass (default: torch's, = cores); "
                                                "1 avoids OpenMP barrier stalls on a host shared with other jobs")
    ap.add_argument("--token-sample", type=float, metavar="F",
                    help="also time (and check the accuracy of) analyze(token_sample=F): inputs >= 1024 wide "
                         "keep about F of their tokens, norm^2 importance sampled")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--child", choices=["activations", "analyze"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        if args.samples == 128:
            args.samples = 8
        args.rounds = 1
        args.no_memory = True
    if args.child:
        print(json.dumps(memory_child(args)))
        return 0

    import torch

    from specprune.layers import select_layers

    include = QUICK_INCLUDE if args.quick and not args.include else args.include
    mach = machine()
    loaded, batches, text = setup(args.samples, args.seq_len, args.batch_size, args.text, args.model)
    args.text = text
    model = loaded.model
    layers = select_layers(model, include)
    all_layers = {lay.name: lay for lay in select_layers(model)}
    name = "all-MiniLM-L6-v2" if args.model == "minilm" else "Llama-shaped (random, hidden 1024, MLP 2816, 4 layers)"
    print(f"# bench_overhead: {name}, {batches.samples} windows x {args.seq_len} tokens "
          f"({batches.tokens} tokens, {len(batches)} batches), {len(layers)} layers analysed"
          + (" [quick: first block only]" if args.quick else ""), flush=True)
    print(f"machine: {mach.get('cpu')} | nproc {mach['nproc']} | torch threads {mach['torch_threads']} | "
          f"load average at start {mach.get('loadavg')}", flush=True)

    # warm-up: allocator and oneDNN primitives, and analyze's lazy imports (scipy.optimize, ...) on a
    # one-batch, one-layer run, so that no timed call pays a first-call cost
    plain_pass(model, batches)
    from specprune.data import Batches

    one = Batches(batches.batches[:1], 1, batches.seq_len, batches.seed, batches.sources)
    analyze_pass(model, one, [layers[0].name])
    things = [("plain", lambda: plain_pass(model, batches)),
              ("hooked", lambda: hooked_pass(model, layers, batches)),
              ("analyze", lambda: analyze_pass(model, batches, include))]
    ts = args.token_sample
    if ts is not None:
        things += [(f"hooked, sampled {ts:g}", lambda: hooked_pass(model, layers, batches, ts)),
                   (f"analyze, sampled {ts:g}", lambda: analyze_pass(model, batches, include, ts))]
    if args.naive:
        things += [("naive fp32 hook", lambda: naive_pass(model, layers, batches, torch.float32)),
                   ("naive fp64 hook", lambda: naive_pass(model, layers, batches, torch.float64))]
    times: dict[str, list[float]] = {k: [] for k, _ in things}
    ratios: dict[str, list[float]] = {k: [] for k, _ in things}
    for r in range(args.rounds):
        this = {}
        for name, fn in things:
            gc.collect()
            t = time.perf_counter()
            fn()
            this[name] = time.perf_counter() - t
            times[name].append(this[name])
        for name in this:
            ratios[name].append(this[name] / this["plain"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in this.items())
              + f" | load {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_ratio = {k: statistics.median(v) for k, v in ratios.items()}
    targets = {"hooked": 1.5, "analyze": 1.8}
    rows = []
    for name, _ in things:
        tgt = targets.get(name.split(",")[0])
        rows.append([name, f"{med[name]:.2f}", f"{med[name] / med['plain']:.2f}", f"{med_ratio[name]:.2f}",
                     "" if tgt is None else f"<= {tgt}", "" if tgt is None else
                     ("PASS" if med_ratio[name] <= tgt else "FAIL")])
    print("\n## Target 1 — time against the plain forward (same batches, alternated)\n")
    print(table(["pass", "median s", "ratio of medians", "median of per-round ratios", "target", ""], rows))
    results = {"machine": mach, "config": {"samples": batches.samples, "seq_len": args.seq_len,
                                           "batch_size": args.batch_size, "tokens": batches.tokens,
                                           "rounds": args.rounds, "layers": len(layers), "quick": args.quick},
               "seconds": times, "median_seconds": med, "median_ratio": med_ratio}

    if not args.no_profile:
        total, prof, top = profile_breakdown(model, batches, include)
        print(f"\n## Where analyze's time goes (one run under cProfile, {total:.2f}s; "
              f"plain forward median {med['plain']:.2f}s)\n")
        print(table(["phase", "seconds", "share of analyze", "x plain forward"],
                    [[p["phase"], "n/a" if p["seconds"] is None else f"{p['seconds']:.2f}",
                      "" if p["share"] is None else f"{p['share']:.0%}",
                      "" if p["seconds"] is None else f"{p['seconds'] / med['plain']:.2f}"] for p in prof]))
        print("\nTop functions by own time:\n```\n" + "\n".join(top.strip().splitlines()[-16:]) + "\n```")
        results["profile"] = {"total": total, "phases": prof}

    if not args.no_accuracy:
        a = analyze_pass(model, batches, include)
        ref = reference_eigenvalues(model, a, all_layers, batches)
        acc = eigen_accuracy(a, ref)
        print("\n## Target 1 — top-k* eigenvalues against the fp64, all-token reference\n")
        print(table(["layers", "without k* (top 10 used)", "worst max rel. error", "worst layer", "target", ""],
                    [[len(acc["layers"]), acc["layers_without_k_star"], f"{acc['worst_rel_err']:.2e}",
                      acc["worst_layer"], "< 5%", "PASS" if acc["worst_rel_err"] < 0.05 else "FAIL"]]))
        results["accuracy"] = acc
        if ts is not None:
            results["accuracy_sampled"] = sampled_accuracy(model, batches, include, ts, a, ref)

    if not args.no_memory:
        mem = memory_section(args)
        print("\n## Target 5 — peak memory during analyze, above the loaded model\n")
        print(table(["peak - loaded MiB", "accumulators", "solver workspace", "one batch activations",
                     "bound (x1.2)", "peak / bound", "", "eigenvectors kept (not in bound)"],
                    [[mib(mem["peak_minus_loaded"]), mib(mem["accumulators"]), mib(mem["solver_workspace"]),
                      mib(mem["one_batch_activations"]), mib(mem["bound_1.2x"]), f"{mem['ratio_to_bound']:.2f}",
                      "PASS" if mem["pass"] else "FAIL", mib(mem["eigenvectors_kept"])]]))
        print(f"\nby phase (MiB above the loaded model): peak during the hooked pass {mib(mem['pass_peak'] or 0)}, "
              f"resident when it returns {mib(mem['rss_after_pass'] or 0)}, peak during solves + fits "
              f"{mib(mem['solve_fit_peak'] or 0)}; specprune.memory's own estimate: "
              f"{_lib_peak(mem['library_estimate'])}")
        if not mem["peak_reset_worked"]:
            print("(VmHWM could not be reset: the peak includes loading)")
        results["memory"] = mem

    print(f"\nload average at end: {os.getloadavg()}")
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
