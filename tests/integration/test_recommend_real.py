"""The product's promise on real checkpoints (issue 4): plans meet their tolerance on held-apart text,
predictions agree with measurements, and the recommended plan is smaller than the best uniform
setting that meets the same tolerance. Runs on the pretrained all-MiniLM-L6-v2 and on a small Llama
trained in the session."""

from __future__ import annotations

import math

import pytest

from specprune.analysis import analyze
from specprune.data import load_data
from specprune.evaluation import Evaluator
from specprune.models import load_model
from specprune.recommender import Recommender, _dtype_bits, weight_bits
from specprune.snapshot import apply_temporarily

TOLERANCES = (0.005, 0.02, 0.08)
UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
UNIFORM_RANKS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def plan_weight_bits(rec: Recommender, plan) -> int:
    total = 0
    for name, lp in plan.layers.items():
        g = rec.geoms[name]
        total += weight_bits(g.d_in, g.d_out, lp.rank, lp.bits, lp.group_size, _dtype_bits(g.layer))[0]
    return total


def run_case(model_dir, text_file, seq_len, eval_samples=48):
    loaded = load_model(str(model_dir))
    calib = load_data([text_file], loaded.tokenizer, samples=64, seq_len=seq_len, batch_size=8)
    evalb = load_data([text_file], loaded.tokenizer, samples=eval_samples, seq_len=seq_len, batch_size=8,
                      split="evaluation")
    analysis = analyze(loaded.model, calib)
    rec = Recommender(analysis, loaded.model, calib)
    held = Evaluator(loaded.model, evalb)
    report = {"plans": [], "uniform": []}
    for tol in TOLERANCES:
        plan = rec.plan(tol)
        with apply_temporarily(loaded.model, plan, analysis):  # the real apply path
            measured = held.delta(loaded.model)
        report["plans"].append({"tolerance": tol, "predicted": plan.predicted_delta, "measured": measured,
                                "bits": plan_weight_bits(rec, plan)})
    for b in UNIFORM_BITS:
        choice = rec.uniform(bits=b)
        report["uniform"].append({"setting": f"int{b}", "predicted": rec.predict(choice),
                                  "measured": rec.measure(choice, held), "bits": rec.size_bits(choice)})
    for f in UNIFORM_RANKS:
        choice = rec.uniform(rank_fraction=f)
        report["uniform"].append({"setting": f"rank {f:.0%}", "predicted": rec.predict(choice),
                                  "measured": rec.measure(choice, held), "bits": rec.size_bits(choice)})
    return report


def check(report, capsys=None):
    lines = []
    worst = 1.0
    for p in report["plans"]:
        tol = p["tolerance"]
        assert p["measured"] <= 1.25 * tol, f"plan for {tol:.1%} measured {p['measured']:.3%}"
        best = [u for u in report["uniform"] if u["measured"] <= tol]
        if best:
            smallest = min(u["bits"] for u in best)
            assert p["bits"] < smallest, f"plan for {tol:.1%}: {p['bits']} bits vs best uniform {smallest}"
        if p["measured"] > 1e-3:
            r = p["predicted"] / p["measured"]
            worst = max(worst, r, 1 / r)
        lines.append(f"plan {tol:.1%}: predicted {p['predicted']:.4%} measured {p['measured']:.4%} "
                     f"bits {p['bits']}")
    for u in report["uniform"]:
        if 1e-3 <= u["measured"] <= 0.5:
            r = u["predicted"] / u["measured"]
            worst = max(worst, r, 1 / r)
            assert 0.5 <= r <= 2.0, f"{u['setting']}: predicted {u['predicted']:.4%} measured {u['measured']:.4%}"
        lines.append(f"{u['setting']}: predicted {u['predicted']:.4%} measured {u['measured']:.4%}")
    print("\n".join(lines) + f"\nworst predicted/measured ratio {worst:.2f}")
    assert math.isfinite(worst) and worst <= 2.0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_minilm_recommend_meets_tolerance_and_beats_uniform(minilm_dir, text_file):
    check(run_case(minilm_dir, text_file, 128))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_llama_recommend_meets_tolerance_and_beats_uniform(trained_llama, text_file):
    # next-token cross-entropy is a noisy metric: all ~500 held-apart windows keep the sampling error
    # of a 0.1% delta near ±15%, so the factor-2 check tests the prediction, not the noise
    check(run_case(trained_llama, text_file, 64, eval_samples=512))
