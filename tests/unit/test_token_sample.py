"""Token sampling of wide inputs (``analyze(token_sample=…)``, :mod:`specprune.probe`): the inclusion
probabilities, an unbiased Gram whose spread respects the stated bound, reproducible draws, and what an
analysis records (sampled groups only, saved and loaded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specprune.analysis import Analysis, analyze, sampling_note, undersampled_note
from specprune.errors import InputError
from specprune.probe import (
    GramAccumulator,
    check_sample,
    inclusion_scale,
    relative_se_bound,
)
from specprune.toy import WideMLP


@pytest.mark.parametrize("budget", [1.0, 10.0, 37.5, 90.0])
def test_inclusion_scale_spends_the_budget(budget):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(100, generator=g) ** 6  # a few large norms that must be capped at p = 1
    s[:5] = 0.0  # zero-norm tokens are never drawn (they add nothing to the Gram)
    c = inclusion_scale(s, budget)
    p = (c * s.double()).clamp(max=1.0)
    assert float(p.sum()) == pytest.approx(budget, rel=1e-9)
    assert float(p[:5].sum()) == 0.0
    if budget >= 37.5:
        assert int((p == 1).sum()) > 0  # capping happened


def test_inclusion_scale_keeps_everything_when_the_budget_covers_it():
    s = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert inclusion_scale(s, 3.0) == math.inf and inclusion_scale(s, 10.0) == math.inf
    assert math.isfinite(inclusion_scale(s, 2.5))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", 5e-324, 1e-7])
def test_check_sample_refuses_what_is_not_a_fraction(bad):
    with pytest.raises(InputError, match=r"token_sample must be a fraction in \[1e-06, 1\]"):
        check_sample(bad)


def test_check_sample_one_means_every_token():
    from fractions import Fraction

    assert check_sample(None) is None and check_sample(1) is None and check_sample(1.0) is None
    assert check_sample(0.25) == 0.25 and check_sample(np.float32(0.5)) == 0.5
    assert check_sample(Fraction(1, 2)) == 0.5 and check_sample(np.int64(1)) is None


def _features(n: int = 2000, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1.5, d)
    x = torch.randn(n, d, generator=g) * scale
    x[::50] *= 8.0  # rare high-norm tokens (as [CLS] rows are)
    return x


def test_sampled_gram_is_unbiased_and_within_its_stated_spread():
    x = _features()
    exact = (x.double().T @ x.double())
    v = torch.linalg.eigh(exact).eigenvectors[:, -1]  # the top direction
    grams, quads, scales, kept = [], [], [], []
    for seed in range(200):
        acc = GramAccumulator("k", x.shape[1], torch.device("cpu"), sample=0.3, seed=seed)
        for part in x.split(500):
            acc.update(part)
        acc.finalize()
        grams.append(acc.gram)
        quads.append(float(v @ acc.gram @ v))
        scales.append(acc.max_variance)
        kept.append(acc.kept_tokens)
        assert acc.tokens == x.shape[0]
    mean = torch.stack(grams).mean(0)
    # unbiased: the mean of 200 draws sits within a few of its standard errors of the exact Gram
    sd = torch.stack(grams).std(0) / math.sqrt(len(grams))
    assert float(((mean - exact).abs() / (sd + 1e-12)).max()) < 5.0
    assert np.mean(kept) == pytest.approx(0.3 * x.shape[0], rel=0.02)
    # the stated bound: Var(vᵀĜv) ≤ V · vᵀGv, V = max over batches of 1/c − min ‖x‖² of the uncertain tokens
    var_bound = float(v @ exact @ v) * max(scales)
    assert np.var(quads) <= 1.1 * var_bound
    assert np.var(quads) > 0  # it really sampled


def test_same_seed_same_draw_other_seed_other_draw():
    x = _features()

    def gram(seed):
        acc = GramAccumulator("k", x.shape[1], torch.device("cpu"), sample=0.5, seed=seed)
        acc.update(x)
        acc.finalize()
        return acc.gram

    assert torch.equal(gram(3), gram(3))
    assert not torch.equal(gram(3), gram(4))


def test_analyze_samples_only_wide_inputs_and_records_it(tmp_path):
    torch.manual_seed(1)
    batches = [torch.randn(1024, 48) * torch.logspace(0, -1, 48) for _ in range(8)]  # 8192 tokens
    model = WideMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = analyze(model, batches, precision="float64")
    sampled = analyze(model, batches, precision="float64", token_sample=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    up, down = sampled.groups["up"], sampled.groups["down"]
    assert up.sampling == {} and not any(f.startswith("sampled") for f in sampled.layer("up").flags)
    np.testing.assert_array_equal(up.eigenvalues, exact.groups["up"].eigenvalues)  # 48 wide: every token
    info = down.sampling
    assert info["fraction"] == 0.5 and info["tokens"] == 8192 == down.tokens
    assert 0.45 * 8192 < info["kept_tokens"] < 0.55 * 8192 and info["variance_factor"] > 0
    flag = next(f for f in sampled.layer("down").flags if f.startswith("sampled"))
    assert f"{info['kept_tokens']} of 8192 tokens" in flag and "relative standard error is at most" in flag
    # the top eigenvalues: within a few stated standard errors of the all-token ones
    ref = exact.groups["down"].eigenvalues[:10]
    got = down.eigenvalues[:10]
    for lam_ref, lam in zip(ref, got):
        assert abs(lam / lam_ref - 1) < 4 * relative_se_bound(info, float(lam_ref))
    assert np.abs(got / ref - 1).max() < 0.1
    # reproducible, and saved and loaded with the analysis
    again = analyze(model, batches, precision="float64", token_sample=0.5)
    np.testing.assert_array_equal(again.groups["down"].eigenvalues, down.eigenvalues)
    sampled.save(tmp_path / "a")
    back = Analysis.load(tmp_path / "a")
    assert back.groups["down"].sampling == info and back.groups["up"].sampling == {}
    assert back.layer("down").flags == sampled.layer("down").flags
    # and analysis.json says so in fields, not only in words
    doc = sampled.to_dict()
    assert doc["calibration"]["token_sample"] == 0.5 and "token_sample" not in exact.to_dict()["calibration"]
    by = {lay["name"]: lay for lay in doc["layers"]}
    assert by["down"]["sampling"] == info and "sampling" not in by["up"]
    assert back.layer("down").sampling == info and back.calibration["token_sample"] == 0.5


def test_sampling_counts_kept_tokens_for_the_undersampled_flag():
    torch.manual_seed(2)
    batches = [torch.randn(1024, 48) for _ in range(5)]  # 5120 tokens: 5 per dimension, 1.25 once sampled
    model = WideMLP()
    assert not any(f.startswith("undersampled") for f in analyze(model, batches).layer("down").flags)
    sampled = analyze(model, batches, token_sample=0.25)
    assert any(f.startswith("undersampled") for f in sampled.layer("down").flags)
    kept = sampled.groups["down"].effective_tokens
    assert kept == sampled.groups["down"].sampling["kept_tokens"] < 2048
    assert f"down: {kept} for 1024" in undersampled_note(sampled)
    note = sampling_note(sampled)
    assert note.startswith(f"token sampling: 1 input(s) ≥ 1024 wide kept {kept} of 5120 tokens")
    assert sampling_note(analyze(model, batches)) is None


def test_fits_stop_at_the_rank_of_the_kept_tokens():
    """Sampling keeps fewer rows than the 1024-wide input has dimensions: the Gram's rank is the kept
    count, and the fits, the frontier and the undersampled flag stop there, not at the tokens seen."""
    torch.manual_seed(3)
    batches = [torch.randn(1024, 48) for _ in range(2)]  # 2048 tokens seen, ≈ 410 kept at 0.2
    sampled = analyze(WideMLP(), batches, token_sample=0.2)
    group, lay = sampled.groups["down"], sampled.layer("down")
    kept = group.effective_tokens
    assert kept < group.dim < group.tokens
    assert lay.fit["b"]["k_hi"] <= kept and lay.fit["a"]["k_hi"] <= kept
    assert lay.fit["frontier"]["n_modes"] <= kept
    assert any(f"rank ≤ {kept}, so the fits stop there" in f for f in lay.flags), lay.flags


def test_analyze_refuses_a_bad_fraction_before_any_work():
    with pytest.raises(InputError, match="token_sample must be a fraction"):
        analyze(WideMLP(), [torch.randn(8, 48)], token_sample=2)


def test_a_sampled_input_that_kept_no_token_is_refused():
    """A tiny fraction of a few tokens can keep none: an all-zero covariance must not pass for a spectrum."""
    torch.manual_seed(3)
    batches = [torch.randn(16, 48) for _ in range(2)]
    with pytest.raises(InputError, match=r"layer down: token sampling kept none of its 32 tokens; raise "
                                         r"--token-sample or calibrate on more tokens"):
        analyze(WideMLP(), batches, token_sample=1e-6)


def test_the_bound_vanishes_when_every_token_is_kept_for_certain():
    """Tokens kept with probability 1 add no error: a fraction just under 1 states a bound near 0 (the
    earlier bound, Σ(vᵀx)²/c over every token, stated 100% for an exact Gram)."""
    torch.manual_seed(4)
    batches = [torch.randn(256, 48) for _ in range(4)]
    a = analyze(WideMLP(), batches, token_sample=0.99999999)
    info = a.groups["down"].sampling
    assert info["kept_tokens"] >= info["tokens"] - 1
    lam = float(a.groups["down"].eigenvalues[0])
    assert relative_se_bound(info, lam) < 1e-3
    flag = next(f for f in a.layer("down").flags if f.startswith("sampled"))
    assert "0.99999999 asked" in flag


def test_a_recommendation_from_a_sampled_analysis_says_so():
    import specprune

    torch.manual_seed(5)
    batches = [torch.randn(512, 48) for _ in range(6)]
    model = WideMLP().eval()
    a = analyze(model, batches, token_sample=0.5)
    plan = specprune.recommend(a, 0.05, model=model, data=batches)
    assert plan.details["token_sampled"] == {"fraction": 0.5, "layers": ["down"]}
    exact = specprune.recommend(analyze(model, batches), 0.05, model=model, data=batches)
    assert "token_sampled" not in exact.details
