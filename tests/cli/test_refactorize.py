"""A directory written by a low-rank ``prune`` is a valid MODEL for every command: its factor layers
(``first`` / ``second`` of a factorized layer) are quantized or left alone, never factorized again
(that would nest factorizations the saved format cannot describe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli_run, tree_hash

from specprune.compress.prune import FactorizedLinear, can_factorize

run = cli_run


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_dirs, text_file) -> Path:
    out = tmp_path_factory.mktemp("refactor") / "pruned"
    code, _, err = run("prune", tiny_dirs["bert"], "--rate", "0.5", "--data", text_file, "--out", out, *FAST,
                       "--quiet")
    assert code == 0, err
    return out


def test_factors_are_not_factorizable():
    f = FactorizedLinear(16, 12, 4)
    assert not can_factorize(f.first) and not can_factorize(f.second)
    assert can_factorize(torch.nn.Linear(16, 12))


def test_prune_rate_on_a_pruned_model_says_why_nothing_is_left(pruned, text_file, tmp_path):
    before = tree_hash(pruned)
    code, _, err = run("prune", pruned, "--rate", "0.5", "--data", text_file, "--out", tmp_path / "again", *FAST,
                       "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "factors of an earlier low-rank pruning" in err
    assert not (tmp_path / "again").exists() and tree_hash(pruned) == before


def test_compress_and_quantize_a_pruned_model(pruned, text_file, tmp_path):
    before = tree_hash(pruned)
    code, out, err = run("compress", pruned, "--data", text_file, "--tolerance", "0.05", "--out", tmp_path / "c",
                         *FAST, "--format", "json")
    assert code in (0, 3), err
    doc = json.loads(out)
    assert doc["size"]["params_after"] <= doc["size"]["params_before"]
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert all(lp["rank"] is None for name, lp in plan["layers"].items()
               if name.endswith((".first", ".second"))), plan["layers"]
    code, _, err = run("quantize", pruned, "--bits", "4", "--out", tmp_path / "q", "--quiet")
    assert code == 0, err
    assert tree_hash(pruned) == before


def test_a_hand_written_rank_on_a_factor_is_applied_inside_the_factor(pruned, text_file, tmp_path):
    plan = json.loads((pruned / "plan.json").read_text())
    name = next(n for n in plan["layers"] if n.endswith("intermediate.dense")) + ".first"
    hand = {"format": 1, "model": {"source": str(pruned), "fingerprint": ""}, "tolerance": 0.0,
            "metric": "none", "layers": {name: {"method": "whitened", "rank": 2}}}
    (tmp_path / "plan.json").write_text(json.dumps(hand))
    code, _, err = run("apply", pruned, "--plan", tmp_path / "plan.json", "--data", text_file,
                       "--out", tmp_path / "a", *FAST, "--quiet", "--ignore-fingerprint")
    assert code == 0, err
    import specprune

    m = specprune.load(tmp_path / "a")
    w = m.get_submodule(name).weight.detach()
    assert isinstance(m.get_submodule(name), torch.nn.Linear)  # still one dense factor, not nested
    assert int(torch.linalg.matrix_rank(w.double(), rtol=1e-6)) <= 2


def test_a_tied_head_is_not_factorized(tiny_dirs, text_file, tmp_path):
    """GPT-2's lm_head shares the embedding matrix: factorizing it would untie the two and add parameters."""
    code, _, err = run("prune", tiny_dirs["gpt2"], "--rate", "0.5", "--include", "lm_head", "--data", text_file,
                       "--out", tmp_path / "p", *FAST, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "shared with transformer.wte" in err and not (tmp_path / "p").exists()


def test_a_tied_head_is_not_quantized_and_plans_keep_it(tiny_dirs, text_file, tmp_path):
    """Quantizing GPT-2's tied lm_head would quantize the input embedding too (and the saved directory held
    the shared matrix dense under the embedding's name while listing lm_head as quantized: unloadable). It is
    refused like factorizing; a recommendation over an analysis that includes it keeps it."""
    code, _, err = run("quantize", tiny_dirs["gpt2"], "--bits", "4", "--include", "lm_head", "--out", tmp_path / "q",
                       "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "shared with transformer.wte (tied); compressing it would change transformer.wte as well" in err
    assert not (tmp_path / "q").exists()
    from specprune.analysis import analyze
    from specprune.compress.apply import apply_
    from specprune.data import load_data
    from specprune.models import load_model
    from specprune.recommender import Recommender

    loaded = load_model(str(tiny_dirs["gpt2"]))
    calib = load_data([text_file], loaded.tokenizer, samples=8, seq_len=32, batch_size=4)
    analysis = analyze(loaded.model, calib, include=["lm_head", "transformer.h.0.mlp.c_fc"])
    rec = Recommender(analysis, loaded.model, calib, verify_samples=4)
    assert rec.details["kept_shared"] == ["lm_head"] and len(rec.options["lm_head"]) == 1
    assert rec.uniform(bits=4)["lm_head"].bits is None
    plan = rec.plan(0.5)
    assert plan.layers["lm_head"].bits is None and plan.layers["lm_head"].rank is None
    apply_(loaded.model, plan, analysis)
