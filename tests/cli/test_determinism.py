"""Same inputs and seed → identical JSON, apart from fields named ``seconds`` (contract).

Each pair of runs differs in everything that should not matter: the process (hash seed), the
global torch RNG state, the output path's history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specprune.cli.app import app

REPO = Path(__file__).resolve().parents[2]
FAST = ["--samples", "8", "--seq-len", "32", "--batch-size", "4", "--include", "q_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine (and the result is
    the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def without_seconds(obj):
    """``obj`` with every field named ``seconds`` removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def run_json(*args) -> dict:
    res = CliRunner().invoke(app, [*map(str, args), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_without_seconds_strips_only_seconds():
    doc = {"seconds": 1.5, "a": [{"seconds": 2, "b": 1}], "c": {"seconds_total": 3}}
    assert without_seconds(doc) == {"a": [{"b": 1}], "c": {"seconds_total": 3}}


def test_analyze_twice_same_json(tmp_path, tiny_dirs, small_text_file):
    model = tiny_dirs["llama"]
    torch.manual_seed(1)
    doc1 = run_json("analyze", model, "--data", small_text_file, "--out", tmp_path / "a1", *FAST)
    # the second run in a fresh process, another hash seed, another global RNG state
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "specprune", "analyze", str(model), "--data", str(small_text_file),
                          "--out", str(tmp_path / "a2"), *FAST, "--format", "json"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    doc2 = json.loads(res.stdout)
    assert without_seconds(doc1) == without_seconds(doc2)
    f1 = json.loads((tmp_path / "a1" / "analysis.json").read_text())
    f2 = json.loads((tmp_path / "a2" / "analysis.json").read_text())
    assert "seconds" in f1  # the one field allowed to differ is there, and stripped
    assert without_seconds(f1) == without_seconds(f2)
    assert without_seconds(f1) == without_seconds(doc1)  # stdout and file agree
    assert f1["calibration"]["seed"] == 0 and f1["layers"]


def test_analyze_seed_matters(tmp_path, tiny_dirs, small_text_file):
    """The control: another --seed draws other windows, so the comparison above can fail."""
    model = tiny_dirs["llama"]
    a = run_json("analyze", model, "--data", small_text_file, *FAST)
    b = run_json("analyze", model, "--data", small_text_file, *FAST, "--seed", "1")
    assert without_seconds(a)["layers"] != without_seconds(b)["layers"]


def test_recommend_twice_same_plan(tmp_path, tiny_dirs, small_text_file):
    model = tiny_dirs["llama"]
    docs, files = [], []
    for i, rng in enumerate((0, 987)):
        torch.manual_seed(rng)
        out = tmp_path / f"plan{i}.json"
        docs.append(run_json("recommend", model, "--data", small_text_file, "--tolerance", "0.05",
                             "--out", out, *FAST))
        files.append(json.loads(out.read_text()))
    assert without_seconds(files[0]) == without_seconds(files[1])
    assert without_seconds(docs[0]) == without_seconds(docs[1])
    assert files[0]["layers"] and files[0]["model"]["fingerprint"]


@pytest.mark.parametrize("with_plan", [False, True], ids=["plain", "plan"])
def test_evaluate_twice_same_json(with_plan, tmp_path, tiny_dirs, small_text_file):
    model = tiny_dirs["llama"]
    extra = []
    if with_plan:
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"format": 1, "model": {}, "predicted_delta": 0.01,
                                    "layers": {"model.layers.0.mlp.down_proj": {"bits": 4}}}))
        extra = ["--plan", plan]
    docs = []
    for i in range(2):
        torch.manual_seed(i)
        docs.append(run_json("evaluate", model, "--data", small_text_file, "--samples", "8", "--seq-len", "32",
                             "--out", tmp_path / f"ev{i}.json", *extra))
    assert without_seconds(docs[0]) == without_seconds(docs[1])
    files = [json.loads((tmp_path / f"ev{i}.json").read_text()) for i in range(2)]
    assert without_seconds(files[0]) == without_seconds(files[1])
