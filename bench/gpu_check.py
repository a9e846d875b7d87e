#!/usr/bin/env python
"""GPU check for specprune's scale paths (issue 7): one short, self-contained run.

    python bench/gpu_check.py                 # on a CUDA machine, ~3–5 minutes (budget: --budget 270)
    python bench/gpu_check.py --cpu-smoke     # anywhere: tiny sizes, CUDA parts skipped, < 1 minute

What it measures (nothing is downloaded; models are built from shapes in plain torch):

1. hooked vs plain forward — a BERT-base-size encoder (d 768, 12 blocks, MLP 3072) and a Llama-1B-size
   decoder (d 2048, 16 blocks, gated MLP 8192, GQA 32/8 heads, 32000-word head), fp32 and bf16, 4096
   tokens per batch: seconds per batch without hooks, with specprune's SpectrumProbe, the ratio, and the
   probe's measured peak memory against specprune.memory's estimate;
2. full ``eigh`` (float64) on the GPU vs the CPU for d = 1024 / 4096 / 8192, and their agreement;
3. randomized top-k (k = d/8, l = 2k, 4 power iterations) vs the full GPU solve at d = 8192 / 16384:
   time, max/mean relative eigenvalue error, error over the top k/2, largest principal angle, tail error;
4. equality checks: ``analyze`` on CUDA vs CPU (fp32), a bf16 model on CUDA, offloaded accumulators vs
   on-device, TF32 off during accumulation and restored after.

Prints markdown tables (for docs/benchmarks.md) and writes ``gpu_check.json`` to ``$OUT`` (or ``--out``).
Sections that would overrun the time budget are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the working tree's specprune, installed or not


# ------------------------------------------------------------------------------------ synthetic models
class Block(nn.Module):
    """A pre-norm transformer block: BERT-style (GELU MLP, bidirectional) or Llama-style (SiLU-gated
    MLP, causal, grouped-query attention)."""

    def __init__(self, d: int, ffn: int, heads: int, kv_heads: int, llama: bool):
        super().__init__()
        self.heads, self.kv_heads, self.llama = heads, kv_heads, llama
        hd = d // heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=not llama)
        self.k_proj = nn.Linear(d, kv_heads * hd, bias=not llama)
        self.v_proj = nn.Linear(d, kv_heads * hd, bias=not llama)
        self.o_proj = nn.Linear(d, d, bias=not llama)
        if llama:
            self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=not llama)
        self.down_proj = nn.Linear(ffn, d, bias=not llama)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n1(x)
        hd = d // self.heads
        q = self.q_proj(h).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, hd).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.llama)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        m = F.silu(self.gate_proj(h)) * self.up_proj(h) if self.llama else F.gelu(self.up_proj(h))
        return x + self.down_proj(m)


class Net(nn.Module):
    """Blocks on input embeddings (batches carry ``input``: (B, T, d)), optional output head."""

    def __init__(self, d: int, layers: int, ffn: int, heads: int, kv_heads: int, llama: bool, vocab: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, ffn, heads, kv_heads, llama) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False) if vocab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else x


MODELS = {
    "bert-base-size": {"d": 768, "layers": 12, "ffn": 3072, "heads": 12, "kv_heads": 12, "llama": False},
    "llama-1b-size": {"d": 2048, "layers": 16, "ffn": 8192, "heads": 32, "kv_heads": 8, "llama": True,
                      "vocab": 32000},
}
SMOKE_MODELS = {
    "bert-tiny": {"d": 128, "layers": 2, "ffn": 512, "heads": 4, "kv_heads": 4, "llama": False},
    "llama-tiny": {"d": 128, "layers": 2, "ffn": 384, "heads": 4, "kv_heads": 2, "llama": True, "vocab": 512},
}


# ------------------------------------------------------------------------------------ helpers
class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def power_law_cov(d: int, b: float, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """Q diag(k^-b) Qᵀ in float64 with Haar-random Q (QR of a Gaussian), built on ``dev``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(d, d, generator=g, dtype=torch.float64).to(dev)
    q, _ = torch.linalg.qr(z)
    lam = torch.arange(1, d + 1, dtype=torch.float64, device=dev) ** (-b)
    return (q * lam) @ q.T


def md_table(rows: list[dict], cols: list[str]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.3f}"
        return "–" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def gib(n: float) -> float:
    return n / float(1 << 30)


# ------------------------------------------------------------------------------------ sections
def _overhead_one(dev: torch.device, name: str, cfg: dict, dtype: torch.dtype, tokens: int, seq: int,
                  reps: int) -> dict:
    from specprune.layers import select_layers
    from specprune.memory import estimate_analysis_memory
    from specprune.probe import SpectrumProbe, tf32_disabled

    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the device: a 1B-parameter init on the host takes long
        model = Net(**cfg)
    model = model.to(dtype).eval()
    layers = select_layers(model)
    x = torch.randn(tokens // seq, seq, cfg["d"], device=dev, dtype=dtype)
    batch = {"input": x}
    peak = None
    with torch.inference_mode():
        plain = timed(lambda: model(x), dev, reps)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        probe = SpectrumProbe(model, layers)

        def hooked():
            probe.set_batch(batch)
            model(x)

        with tf32_disabled(), probe:
            hooked()  # the first batch allocates the accumulators
            sync(dev)
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev) - base
            hook_t = timed(hooked, dev, reps, warmup=0)
    groups = dict(probe.layer_acc)
    acc_bytes = sum(a.gram.numel() * 8 for a in probe.results().values() if a.gram is not None)
    est = estimate_analysis_memory(layers, groups=groups, device=dev, batch_tokens=tokens)
    return {"model": name, "dtype": str(dtype).replace("torch.", ""), "tokens/batch": tokens,
            "layers": len(layers), "groups": len(set(groups.values())),
            "plain_s": plain, "hooked_s": hook_t, "ratio": hook_t / plain, "tokens_per_s_hooked": tokens / hook_t,
            "acc_GiB": gib(acc_bytes), "est_acc_GiB": gib(est.accumulators),
            "peak_GiB": None if peak is None else gib(peak),
            "est_peak_GiB": gib(est.accumulators + est.batch_gram + est.activations)}


def forward_overhead(dev: torch.device, models: dict, dtypes, tokens: int, seq: int, budget: Budget,
                     reps: int, reserve: float) -> list[dict]:
    """Plain forward vs forward with the probe attached, per model and dtype; the probe's peak memory
    (accumulators + one batch) against specprune.memory's estimate of the same components."""
    rows = []
    for name, cfg in models.items():
        for dtype in dtypes:
            if budget.left < reserve:
                rows.append({"model": name, "dtype": str(dtype).replace("torch.", ""), "note": "skipped: budget"})
                continue
            rows.append(_overhead_one(dev, name, cfg, dtype, tokens, seq, reps))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _eigh_one(dev: torch.device, d: int, budget: Budget, cpu_rate: float) -> dict:
    a = power_law_cov(d, 1.0, dev)
    row: dict = {"d": d}
    ev_g = None
    if dev.type == "cuda":
        ev_g = torch.linalg.eigh(a)[0]  # the first call includes cusolver's setup: time a second one
        row["gpu_s"] = timed(lambda: torch.linalg.eigh(a), dev, reps=1, warmup=0)
    cpu_needed = d**3 / cpu_rate  # rough seconds
    if budget.left > 2 * cpu_needed + 10:
        ac = a.cpu()
        t = time.perf_counter()
        ev_c = torch.linalg.eigh(ac)[0]
        row["cpu_s"] = time.perf_counter() - t
        if ev_g is not None:
            row["gpu_vs_cpu_max_rel"] = float(((ev_g.cpu() - ev_c).abs() / ev_c.abs().max()).max())
            row["speedup"] = row["cpu_s"] / row["gpu_s"]
    else:
        row["note"] = "cpu skipped: budget"
    return row


def eigh_gpu_vs_cpu(dev: torch.device, dims, budget: Budget, reserve: float) -> list[dict]:
    """Full float64 eigh on ``dev`` vs on the CPU; agreement as max |Δλ| / λ_max."""
    rows = []
    cpu_rate = 4096**3 / 8.0  # ~8 s for d = 4096 on a 16-core host (scaled by d³)
    for d in dims:
        if budget.left < reserve:
            rows.append({"d": d, "note": "skipped: budget"})
            continue
        rows.append(_eigh_one(dev, d, budget, cpu_rate))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _randomized_one(dev: torch.device, d: int, b: float) -> dict:
    from specprune.randomized import compare_to_full, default_top_k, randomized_eigh

    a = power_law_cov(d, b, dev)
    k = default_top_k(d)
    randomized_eigh(a[:256, :256], 16)  # warm the kernels
    sync(dev)
    t = time.perf_counter()
    res = randomized_eigh(a, k, seed=0)
    sync(dev)
    t_r = time.perf_counter() - t
    t = time.perf_counter()
    ev, vec = torch.linalg.eigh(a)
    sync(dev)
    t_f = time.perf_counter() - t
    err = compare_to_full(a, res, full=(ev.flip(0), vec.flip(1)))
    return {"d": d, "k": k, "b": b, "randomized_s": t_r, "full_s": t_f, "speedup": t_f / t_r,
            "rel_eig_max": err.rel_eig_max, "rel_eig_mean": err.rel_eig_mean, "rel_eig_top_half": err.rel_eig_half,
            "sin_theta_top_half": err.sin_theta_half, "tail_rel": err.tail_rel,
            "max_rel_residual": res.max_relative_residual}


def randomized_vs_full(dev: torch.device, dims, budget: Budget, reserve: float, b: float = 1.0) -> list[dict]:
    """Randomized top-k (defaults of specprune.randomized) against the full solve on the same device."""
    rows = []
    for d in dims:
        if budget.left < reserve:
            rows.append({"d": d, "note": "skipped: budget"})
            continue
        rows.append(_randomized_one(dev, d, b))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def cuda_equality(dev: torch.device, budget: Budget) -> list[dict]:
    """analyze() on CUDA vs CPU, bf16 on CUDA, offload vs on-device, TF32 restored."""
    from specprune.analysis import analyze
    from specprune.data import Batches

    checks = []

    def model_and_data(dtype=torch.float32):
        torch.manual_seed(0)
        m = Net(**SMOKE_MODELS["llama-tiny"]).eval().to(dtype)
        g = torch.Generator().manual_seed(1)
        data = Batches([{"input": torch.randn(4, 64, 128, generator=g).to(dtype)} for _ in range(4)], 16, 64, 0)
        return m, data

    m, data = model_and_data()
    ref = analyze(m, data, device="cpu")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seen = []
        h = m.blocks[0].q_proj.register_forward_pre_hook(
            lambda mod, a: seen.append(torch.backends.cuda.matmul.allow_tf32))
        cu = analyze(m, data, device="cuda")
        h.remove()
        checks.append({"check": "TF32 off during accumulation, restored after",
                       "ok": bool(seen) and not any(seen) and torch.backends.cuda.matmul.allow_tf32 is True})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev

    def max_rel(a, b, k=None):
        worst = 0.0
        for la, lb in zip(a.layers, b.layers):
            x, y = la.eigenvalues[:k], lb.eigenvalues[:k]
            worst = max(worst, float(abs(x - y).max() / abs(x).max()))
        return worst

    err = max_rel(ref, cu)
    checks.append({"check": "analyze cuda vs cpu (fp32), max |Δλ|/λ_max", "value": err, "ok": err < 1e-4})
    off = analyze(m, data, device="cuda", offload=True)
    err = max_rel(cu, off)
    checks.append({"check": "offloaded vs on-device accumulators, max |Δλ|/λ_max", "value": err,
                   "ok": err < 1e-9 and off.memory.get("offload") is True})
    mb, datab = model_and_data(torch.bfloat16)
    bf = analyze(mb, datab, device="cuda")
    err = max_rel(ref, bf, k=8)
    checks.append({"check": "bf16 model on cuda vs fp32 cpu (top 8 modes), max |Δλ|/λ_max", "value": err,
                   "ok": err < 0.05})
    return checks


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, CUDA parts skipped")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json ($OUT)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU smoke test", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    budget = Budget(args.budget if not smoke else min(args.budget, 50.0))
    reserve = 3.0 if smoke else 30.0  # a section starts only with this many seconds left
    report: dict = {"mode": "cpu-smoke" if smoke else "gpu",
                    "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
                    "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "sections": {}}
    print(f"# specprune gpu_check ({report['mode']}) — {report['device']}, torch {report['torch']}\n")

    sections = [
        ("forward_overhead", "Hooked vs plain forward",
         lambda: forward_overhead(dev, SMOKE_MODELS if smoke else MODELS,
                                  [torch.float32] if smoke else [torch.float32, torch.bfloat16],
                                  512 if smoke else 4096, 64 if smoke else 512, budget, 2 if smoke else args.reps,
                                  reserve),
         ["model", "dtype", "tokens/batch", "layers", "groups", "plain_s", "hooked_s", "ratio",
          "tokens_per_s_hooked", "acc_GiB", "est_acc_GiB", "peak_GiB", "est_peak_GiB", "note"]),
        ("eigh", "Full eigh (float64): device vs CPU",
         lambda: eigh_gpu_vs_cpu(dev, [256, 512] if smoke else [1024, 4096, 8192], budget, reserve),
         ["d", "gpu_s", "cpu_s", "speedup", "gpu_vs_cpu_max_rel", "note"]),
        ("randomized", "Randomized top-k (k = d/8) vs full solve",
         lambda: randomized_vs_full(dev, [1024] if smoke else [8192, 16384], budget, reserve),
         ["d", "k", "randomized_s", "full_s", "speedup", "rel_eig_max", "rel_eig_mean", "rel_eig_top_half",
          "sin_theta_top_half", "tail_rel", "max_rel_residual", "note"]),
    ]
    if not smoke:
        sections.append(("equality", "CUDA results vs CPU", lambda: cuda_equality(dev, budget),
                         ["check", "value", "ok"]))
    failed = False
    for key, title, fn, cols in sections:
        t = time.perf_counter()
        try:
            rows = fn()
            report["sections"][key] = {"rows": rows, "seconds": time.perf_counter() - t}
            print(f"## {title}\n\n{md_table(rows, cols)}\n")
            if key == "equality" and not all(r.get("ok") for r in rows):
                failed = True
        except Exception as err:  # noqa: BLE001 - a failing section is reported, the others still run
            failed = True
            report["sections"][key] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            print(f"## {title}\n\nFAILED: {type(err).__name__}: {err}\n", file=sys.stdout)
        sys.stdout.flush()
    report["seconds"] = budget.seconds - budget.left
    print(f"total {report['seconds']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
