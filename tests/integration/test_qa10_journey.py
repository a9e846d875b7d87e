"""QA journey on tiny GPT-2 (Conv1D) and Llama (GQA): regressions found by driving the CLI as a user.

* ``prune|quantize --plan`` did whatever the plan said: ``quantize --plan`` of a recommend plan also pruned
  (with a plain SVD, as quantize has no --data/--analysis), ``prune --plan`` also quantized, and
  ``--group-size`` / ``--method`` / ``--include`` given with ``--plan`` were silently ignored.
* An unknown ``--metric`` was refused only after the whole analysis (``compress``) or the model load.
* ``evaluate --reference`` with other weights than the plan was made for compared the plan's prediction
  with a delta against another model, without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli_run, one_error_line, tree_hash

GPT2_LAYERS = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                   "mlp.c_proj")]


run = cli_run


def write_plan(path: Path, *, method=None, rank=None, bits=None) -> Path:
    layer = {"method": method, "prune_rate": 0.0, "rank": rank, "bits": bits, "group_size": None,
             "predicted_delta": 0.0}
    doc = {"format": 1, "model": {"source": "gpt2"}, "tolerance": 0.02, "metric": "lm-loss", "calibrated": True,
           "predicted_delta": 0.001, "predicted_delta_uncertainty": 0.001,
           "layers": {n: dict(layer) for n in GPT2_LAYERS}, "size": {}}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("cmd, plan_kw, what", [
    ("quantize", {"method": "whitened", "rank": 8, "bits": 4}, "also prunes 8 layer(s)"),
    ("quantize", {"method": "spectral", "rank": 8}, "also prunes 8 layer(s)"),
    ("prune", {"method": "spectral", "rank": 8, "bits": 4}, "also quantizes 8 layer(s)"),
    ("prune", {"bits": 4}, "also quantizes 8 layer(s)"),
])
def test_prune_quantize_plan_of_the_other_kind_is_refused(cmd, plan_kw, what, tiny_dirs, tmp_path):
    plan = write_plan(tmp_path / "plan.json", **plan_kw)
    before = tree_hash(tiny_dirs["gpt2"]), tree_hash(plan)
    code, out, err = run(cmd, tiny_dirs["gpt2"], "--plan", plan, "--out", tmp_path / "out")
    msg = one_error_line(err)
    assert code == 1 and out == "" and what in msg and "specprune apply" in msg, msg
    assert not (tmp_path / "out").exists() and (tree_hash(tiny_dirs["gpt2"]), tree_hash(plan)) == before


@pytest.mark.parametrize("cmd, extra, opt", [
    ("quantize", ["--group-size", "32"], "--group-size"),
    ("quantize", ["--include", "c_fc"], "--include"),
    ("prune", ["--method", "magnitude"], "--method"),
    ("prune", ["--exclude", "c_fc"], "--exclude"),
])
def test_shortcut_options_with_plan_are_refused_not_ignored(cmd, extra, opt, tiny_dirs, tmp_path):
    kw = {"bits": 4} if cmd == "quantize" else {"method": "spectral", "rank": 8}
    plan = write_plan(tmp_path / "plan.json", **kw)
    code, _, err = run(cmd, tiny_dirs["gpt2"], "--plan", plan, *extra, "--out", tmp_path / "out")
    msg = one_error_line(err)
    assert code == 1 and msg.startswith(f"{opt} goes with") and "--plan" in msg, msg
    assert not (tmp_path / "out").exists()


def test_prune_and_quantize_plans_of_their_own_kind_still_apply(tiny_dirs, tmp_path):
    for cmd, kw in (("quantize", {"bits": 4}), ("prune", {"method": "spectral", "rank": 8})):
        plan = write_plan(tmp_path / f"{cmd}.json", **kw)
        code, out, err = run(cmd, tiny_dirs["gpt2"], "--plan", plan, "--out", tmp_path / cmd, "--format", "json")
        assert code == 0, err
        assert json.loads(out)["layers"] == len(GPT2_LAYERS)
        saved = json.loads((tmp_path / cmd / "plan.json").read_text())
        assert all((lp["bits"] is None) == (cmd == "prune") for lp in saved["layers"].values())
        assert all((lp["rank"] is None) == (cmd == "quantize") for lp in saved["layers"].values())


@pytest.mark.parametrize("cmd", ["compress", "recommend", "evaluate"])
def test_unknown_metric_is_refused_before_any_work(cmd, tiny_dirs, text_file, tmp_path):
    args = {"compress": ["compress", tiny_dirs["gpt2"], "--out", tmp_path / "out"],
            "recommend": ["recommend", tiny_dirs["gpt2"], "--out", tmp_path / "plan.json"],
            "evaluate": ["evaluate", tiny_dirs["gpt2"], "--out", tmp_path / "out"]}[cmd]
    code, out, err = run(*args, "--data", text_file, "--metric", "bogus", *FAST)
    msg = one_error_line(err)  # no "analysing: ..." progress before it: nothing was analysed
    assert code == 1 and out == "" and "bogus" in msg, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "plan.json").exists()


def test_evaluate_says_when_the_reference_is_not_the_plans_source(tiny_dirs, text_file, tmp_path):
    code, _, err = run("quantize", tiny_dirs["gpt2"], "--bits", "8", "--out", tmp_path / "q", "--quiet")
    assert code == 0, err
    code, out, err = run("evaluate", tmp_path / "q", "--reference", tiny_dirs["llama"], "--data", text_file,
                         *FAST, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert "fingerprints differ" in (doc.get("reference_note") or ""), doc
    code, out, err = run("evaluate", tmp_path / "q", "--reference", tiny_dirs["gpt2"], "--data", text_file,
                         *FAST, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["reference_note"] is None


def test_evaluate_drops_the_prediction_of_a_plan_edited_after_it(tiny_dirs, text_file, tmp_path):
    """A plan.json whose layers were edited by hand after recommend no longer carries that prediction: evaluate
    shows none (with a note) rather than the recommended plan's."""
    from specprune.plan import Plan, settings_digest

    plan = Plan.from_dict(json.loads(write_plan(tmp_path / "p.json", bits=4).read_text()))
    plan.details["predicted_settings"] = settings_digest(plan.layers)  # as recommend records it
    plan.save(tmp_path / "p.json")
    code, _, err = run("apply", tiny_dirs["gpt2"], "--plan", tmp_path / "p.json", "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    code, out, err = run("evaluate", tmp_path / "a", "--reference", tiny_dirs["gpt2"], "--data", text_file,
                         *FAST, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["predicted_delta"] == 0.001
    doc = json.loads((tmp_path / "a" / "plan.json").read_text())
    doc["layers"][GPT2_LAYERS[0]]["bits"] = 8
    (tmp_path / "a" / "plan.json").write_text(json.dumps(doc))
    code, out, err = run("evaluate", tmp_path / "a", "--reference", tiny_dirs["gpt2"], "--data", text_file,
                         *FAST, "--format", "json")
    assert code == 0, err
    res = json.loads(out)
    assert res["predicted_delta"] is None
    assert "edited after recommend predicted" in res["prediction_note"]


def test_quantize_group_size_zero_means_per_channel_as_in_recommend(tiny_dirs, tmp_path):
    a, b = tmp_path / "zero", tmp_path / "default"
    assert run("quantize", tiny_dirs["gpt2"], "--bits", "4", "--group-size", "0", "--out", a, "--quiet")[0] == 0
    assert run("quantize", tiny_dirs["gpt2"], "--bits", "4", "--out", b, "--quiet")[0] == 0
    pa, pb = (json.loads((d / "plan.json").read_text())["layers"] for d in (a, b))
    assert pa == pb and all(lp["group_size"] is None for lp in pa.values())
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
