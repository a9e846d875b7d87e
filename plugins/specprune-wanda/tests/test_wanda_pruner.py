"""specprune-wanda: the score |W_ij|·‖x_j‖ from the covariance diagonal, per-row counts, the exact
distortion, the compressor through apply_, and `specprune prune --method wanda` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from specprune_wanda import (
    WandaPruner,
    covariance_diagonal,
    prune_counts,
    wanda_delta,
    wanda_distortion,
    wanda_mask,
    wanda_scores,
)
from torch import nn

from specprune.compress.apply import apply_, plan_size
from specprune.plan import LayerPlan, Plan


def _eigenpairs(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of Σ = XᵀX/N as specprune hands them over (descending; float64 / float32)."""
    cov = (x.double().T @ x.double()) / x.shape[0]
    lam, u = torch.linalg.eigh(cov)
    return lam.flip(0).numpy(), u.flip(1).numpy().astype(np.float32)


def _skewed_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1.5, 1.5, d)[torch.randperm(d, generator=g)]
    return torch.randn(n, d, generator=g) * scale


def _plan(names, rate, method):
    return Plan(model={"source": "t", "fingerprint": ""}, tolerance=0.0, metric="none",
                layers={n: LayerPlan(method=method, prune_rate=rate) for n in names})


# --------------------------------------------------------------------------------------------
# the score


def test_covariance_diagonal_and_scores_are_wandas_column_norms():
    x = _skewed_inputs(500, 24)
    lam, u = _eigenpairs(x)
    diag = covariance_diagonal(lam, u)
    assert torch.allclose(diag, (x.double() ** 2).mean(0), rtol=1e-5)
    w = torch.randn(10, 24)
    col_norm = x.double().norm(dim=0)  # ‖X_{:,j}‖₂ over the N tokens, as in the paper
    expected = w.double().abs() * col_norm / np.sqrt(x.shape[0])
    assert torch.allclose(wanda_scores(w, diag), expected, rtol=1e-5)
    assert torch.equal(wanda_scores(w, None), w.double().abs())


def test_per_row_counts_match_rate_and_plan_size():
    torch.manual_seed(0)
    s = torch.rand(7, 20, dtype=torch.float64)
    half = prune_counts(s, 0.5)
    assert half.tolist() == [10] * 7
    c = prune_counts(s, 0.33)  # 46.2 → 46 weights: 6 per row and 4 rows with one more
    assert int(c.sum()) == round(0.33 * 140) and set(c.tolist()) == {6, 7}
    nxt = torch.sort(s, dim=1).values[:, 6]
    assert set(torch.nonzero(c == 7).flatten().tolist()) == set(torch.argsort(nxt)[:4].tolist())
    assert prune_counts(s, 0.0).tolist() == [0] * 7
    with pytest.raises(Exception, match="prune rate"):
        prune_counts(s, 1.0)


def test_mask_drops_the_lowest_scores_in_each_row():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    diag = torch.rand(16, dtype=torch.float64) * 10
    keep = wanda_mask(w, diag, 0.25)
    scores = wanda_scores(w, diag)
    for r in range(6):
        dropped, kept = scores[r][~keep[r]], scores[r][keep[r]]
        assert dropped.numel() == 4 and float(dropped.max()) <= float(kept.min())


def test_distortion_is_the_measured_output_error():
    x = _skewed_inputs(2000, 32, seed=2)
    lam, u = _eigenpairs(x)
    w = torch.randn(12, 32)
    dw = wanda_delta(w, lam, u, 0.5)
    measured = float(((x.double() @ dw.double().T) ** 2).sum(1).mean())
    assert wanda_distortion(w, lam, u, 0.5) == pytest.approx(measured, rel=1e-5)
    assert bool(((dw == 0) | (dw == -w)).all()) and int((dw != 0).sum()) == 12 * 16


# --------------------------------------------------------------------------------------------
# the compressor


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 16))


def test_apply_with_data_prunes_rows_and_beats_magnitude():
    x = _skewed_inputs(512, 48, seed=3)
    batches = list(x.split(64))
    model = _mlp()
    before = model[0].weight.detach().clone()
    plan = _plan(["0", "2"], 0.5, "wanda")
    size = plan_size(model, plan)
    apply_(model, plan, data=batches)
    assert plan.details["applied"]["covariance"] == "data"
    for lin in (model[0], model[2]):
        zeros = (lin.weight == 0).sum(dim=1)
        assert zeros.tolist() == [lin.in_features // 2] * lin.out_features
    assert size["params_after"] == size["params_before"] - (48 * 64 + 64 * 16) // 2
    # the same ΔW the recommender would score, from the layer's own input covariance
    lam, u = _eigenpairs(x)
    cand = WandaPruner().candidate_delta(before, lam, u, 0.5)
    assert torch.equal(model[0].weight.detach() - before, cand)

    ref = _mlp()
    with torch.no_grad():
        y_ref = ref(x)
    errors = {}
    for method in ("wanda", "magnitude"):  # the layer that sees the skewed inputs
        pruned = _mlp()
        apply_(pruned, _plan(["0"], 0.5, method), data=batches)
        with torch.no_grad():
            errors[method] = float(((pruned(x) - y_ref) ** 2).sum() / (y_ref ** 2).sum())
    assert errors["wanda"] < 0.5 * errors["magnitude"]


def test_without_covariance_it_is_rowwise_magnitude():
    model = _mlp()
    w = model[0].weight.detach().clone()
    plan = _plan(["0"], 0.5, "wanda")
    from specprune.compress.apply import IdentityCovarianceWarning

    with pytest.warns(IdentityCovarianceWarning) as caught:  # no data, no analysis: Σ = I, and it says what
        apply_(model, plan)
    msg = str(caught[0].message)
    assert msg.startswith("1 wanda layer(s) scored without input statistics (weight magnitudes alone)"), msg
    assert "SVD" not in msg
    assert plan.details["applied"] == {"covariance": "identity", "identity_layers": ["0"]}
    expected = w * wanda_mask(w, None, 0.5)
    assert torch.equal(model[0].weight.detach(), expected)
    thresh = torch.sort(w.abs(), dim=1).values[:, 24:25]
    assert bool(((model[0].weight == 0) == (w.abs() < thresh)).all())


def test_conv_and_hf_conv1d_layers_go_through_their_adapters():
    from specprune.toy import tiny_model

    gpt2 = tiny_model("gpt2", vocab_size=64, hidden=32)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    apply_(gpt2, _plan(["transformer.h.0.mlp.c_fc"], 0.25, "wanda"), data=[{"input_ids": ids}])
    w = gpt2.transformer.h[0].mlp.c_fc.weight  # Conv1D stores (d_in, d_out): rows of W are its columns
    assert (w == 0).sum(dim=0).tolist() == [8] * w.shape[1]
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    apply_(conv, _plan(["0"], 0.5, "wanda"), data=[torch.randn(2, 3, 8, 8)])
    zeros = (conv[0].weight.reshape(8, -1) == 0).sum(dim=1)  # d_in = 3·3·3 = 27: 108 of 216 → 13 or 14 a row
    assert int(zeros.sum()) == 108 and sorted(zeros.tolist()) == [13] * 4 + [14] * 4


# --------------------------------------------------------------------------------------------
# the CLI, end to end


@pytest.fixture(scope="module")
def skewed_llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama whose RMSNorm gains span two orders of magnitude (outlier-like input channels,
    as in trained LLMs), saved with a tokenizer, and a calibration text."""
    from specprune.textgen import write_text
    from specprune.toy import tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("wanda")
    text = write_text(root / "corpus.txt", max_words=6000)
    tok = train_tokenizer(text.read_text(encoding="utf-8"), vocab_size=300)
    model = tiny_model("llama", vocab_size=len(tok), hidden=64, layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g) * 1.5))
    d = root / "llama"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d, text


def _cli(*args):
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_prune_method_wanda_end_to_end(skewed_llama, tmp_path):
    import specprune
    from specprune.layers import select_layers

    src, text = skewed_llama
    data = ["--data", text, "--samples", "16", "--seq-len", "32"]
    out = {}
    for method in ("wanda", "magnitude"):
        out[method] = tmp_path / method
        res = _cli("prune", src, "--rate", "0.5", "--method", method, *data, "--out", out[method],
                   "--format", "json")
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["size"]["params_after"] < doc["size"]["params_before"]
    plan = json.loads((out["wanda"] / "plan.json").read_text())
    assert {lp["method"] for lp in plan["layers"].values()} == {"wanda"}
    pruned = specprune.load(out["wanda"])
    for t in select_layers(pruned):
        w = t.weight_matrix()
        assert (w == 0).sum(dim=1).tolist() == [t.d_in // 2] * t.d_out, t.name
    errs = {}
    for method in ("wanda", "magnitude"):
        res = _cli("evaluate", out[method], "--reference", src, *data, "--metric", "output-mse",
                   "--format", "json")
        assert res.exit_code == 0, res.stderr
        errs[method] = json.loads(res.stdout)["measured_delta"]
    assert 0 < errs["wanda"] < 0.5 * errs["magnitude"]


def test_cli_unknown_method_suggests_wanda(skewed_llama, tmp_path):
    src, _ = skewed_llama
    res = _cli("prune", src, "--rate", "0.5", "--method", "wandaa", "--out", tmp_path / "x")
    assert res.exit_code == 1 and "did you mean 'wanda'" in res.stderr
