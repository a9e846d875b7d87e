"""A saved analysis names its source model by an absolute path and its weights' fingerprint:
``recommend ANALYSIS_DIR`` works from any directory and refuses weights the analysis was not made for."""

from __future__ import annotations

import json
import shutil

from conftest import tree_hash
from typer.testing import CliRunner

from specprune.cli.app import app

FAST = ["--samples", "8", "--seq-len", "32", "--batch-size", "4", "--include", "query"]


def run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.stdout, res.stderr


def test_relative_source_is_recorded_absolute(tmp_path, tiny_dirs, text_file, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_dirs["bert"], work / "bert")
    monkeypatch.chdir(work)
    code, _, err = run("analyze", "bert", "--data", text_file, "--out", tmp_path / "an", *FAST, "--quiet")
    assert code == 0, err
    model = json.loads((tmp_path / "an" / "analysis.json").read_text())["model"]
    assert model["source"] == str(work / "bert") and model["fingerprint"].startswith("sha256:")
    monkeypatch.chdir(tmp_path)  # elsewhere: the analysis still finds its model
    code, out, err = run("recommend", tmp_path / "an", "--data", text_file, "--tolerance", "0.05",
                         *FAST, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["model"]["fingerprint"] == model["fingerprint"]


def test_other_weights_at_the_source_are_refused(tmp_path, tiny_dirs, text_file):
    src = tmp_path / "bert"
    shutil.copytree(tiny_dirs["bert"], src)
    code, _, err = run("analyze", src, "--data", text_file, "--out", tmp_path / "an", *FAST, "--quiet")
    assert code == 0, err
    shutil.rmtree(src)
    shutil.copytree(tiny_dirs["gpt2"], src)  # another model where the analysed one was
    before = tree_hash(tmp_path / "an")
    code, _, err = run("recommend", tmp_path / "an", "--data", text_file, "--tolerance", "0.05",
                       "--out", tmp_path / "plan.json", *FAST, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "made for other weights" in err and not (tmp_path / "plan.json").exists()
    assert tree_hash(tmp_path / "an") == before


def test_a_checkpoint_missing_weights_is_refused(tmp_path, tiny_dirs, text_file):
    """transformers would initialise the missing tensors at random and carry on; specprune refuses."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "partial"
    shutil.copytree(tiny_dirs["bert"], src)
    state = load_file(src / "model.safetensors")
    kept = {k: v for k, v in state.items() if ".layer.1." not in k}
    assert len(kept) < len(state)
    save_file(kept, src / "model.safetensors", metadata={"format": "pt"})
    before = tree_hash(src)
    for args in (["analyze", src, "--data", text_file, *FAST],
                 ["evaluate", src, "--reference", tiny_dirs["bert"], "--data", text_file, *FAST[:6]]):
        code, _, err = run(*args, "--quiet")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "missing from the checkpoint" in err and ".layer.1." in err
    assert tree_hash(src) == before


def test_malformed_device_specs_are_named_as_such():
    import pytest

    from specprune.errors import InputError
    from specprune.models import resolve_device

    for spec in ("", "cuda:x", "cuda:1:2", "gpu"):
        with pytest.raises(InputError, match="--device must be auto, cpu, cuda or cuda:i"):
            resolve_device(spec)
    assert resolve_device(None).type in ("cpu", "cuda") and resolve_device(" CPU ").type == "cpu"
