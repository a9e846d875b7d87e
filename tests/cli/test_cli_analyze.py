"""`specprune analyze` from the command line: HF directories, state dicts with --arch, tensor data,
series, and the real all-MiniLM-L6-v2 on locally generated English text."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import tree_hash
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from specprune.analysis import Analysis
from specprune.cli.app import app

runner = CliRunner()


def _run(args):
    res = runner.invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_analyze_tiny_hf_dirs_json_and_saved(kind, tiny_dirs, small_text_file, tmp_path):
    before = tree_hash(tiny_dirs[kind])
    out = tmp_path / "a"
    code, stdout, _ = _run(["analyze", str(tiny_dirs[kind]), "--data", str(small_text_file), "--samples", "8",
                            "--seq-len", "32", "--out", str(out), "--format", "json"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["calibration"] == {"tokens": 8 * 32, "samples": 8, "seq_len": 32, "seed": 0}
    assert doc["model"]["num_parameters"] > 0
    for lay in doc["layers"]:
        assert set(lay) >= {"name", "type", "d_in", "d_out", "tokens", "b", "a", "k_star", "k_max", "r_star",
                            "fit"}
        assert lay["k_max"] == lay["d_in"]
        assert lay["r_star"] is None or 0 <= lay["r_star"] < 1
    saved = Analysis.load(out)
    assert [lay.name for lay in saved.layers] == [lay["name"] for lay in doc["layers"]]
    assert (out / "spectra.safetensors").is_file()
    assert tree_hash(tiny_dirs[kind]) == before


def test_analyze_state_dict_with_arch_and_tensor_data(tmp_path):
    from specprune.toy import build_cnn

    model = build_cnn()
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    data = tmp_path / "images.pt"
    torch.save({"input": torch.randn(16, 3, 8, 8)}, str(data))
    code, stdout, stderr = _run(["analyze", str(weights), "--arch", "specprune.toy:build_cnn", "--data", str(data),
                                 "--batch-size", "4", "--format", "json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert {lay["name"] for lay in doc["layers"]} == {"conv1", "conv2", "conv3", "conv1d", "fc"}
    assert doc["calibration"]["seq_len"] is None


def test_analyze_series_writes_one_analysis_per_checkpoint(tiny_dirs, small_text_file, tmp_path):
    out = tmp_path / "series"
    code, stdout, _ = _run(["analyze", str(tiny_dirs["bert"]), str(tiny_dirs["llama"]), "--data",
                            str(small_text_file), "--samples", "4", "--seq-len", "32", "--out", str(out),
                            "--format", "json"])
    assert code == 0
    doc = json.loads(stdout)
    assert len(doc["series"]) == 2
    series = json.loads((out / "series.json").read_text())["series"]
    assert [s["dir"] for s in series] == ["000-bert", "001-llama"]
    for s in series:
        assert (out / s["dir"] / "analysis.json").is_file()
    # the series directory is not one model: recommend says which directories to pass
    code, _, err = _run(["recommend", str(out), "--tolerance", "0.05"])
    assert code == 1
    assert f"holds a series of 2 analyses (series.json), not one model: pass one of its directories, e.g. " \
           f"{out / '000-bert'}" in err


def test_analyze_human_table_lists_layers(tiny_dirs, small_text_file):
    code, stdout, _ = _run(["analyze", str(tiny_dirs["bert"]), "--data", str(small_text_file), "--samples", "4",
                            "--seq-len", "32"])
    assert code == 0
    assert "encoder.layer.0.attention.self.query" in stdout and "k_max" in stdout


@pytest.mark.slow
def test_real_minilm_analyzes_from_the_cli(minilm_dir, text_file, tmp_path):
    """The pretrained all-MiniLM-L6-v2, generated English text, every Linear layer reported."""
    from transformers import AutoModel

    out = tmp_path / "minilm"
    proc = subprocess.run([sys.executable, "-m", "specprune", "analyze", str(minilm_dir), "--data", str(text_file),
                           "--samples", "32", "--out", str(out), "--format", "json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [lay["name"] for lay in doc["layers"]] == linears and len(linears) == 37
    assert doc["calibration"]["tokens"] == 32 * 128
    assert all(lay["b"] is not None and lay["b"] > 0 for lay in doc["layers"])
    assert (out / "analysis.json").is_file()


def test_undersampled_layers_are_flagged_and_warned(tiny_dirs, small_text_file, tmp_path):
    """A layer that saw fewer than 4 tokens per input dimension (here BERT's pooler: one [CLS] token per
    window) is flagged in analysis.json and named in one warning line: its fitted b is biased upward."""
    from specprune.analysis import UNDERSAMPLED_PER_DIM

    code, stdout, stderr = _run(["analyze", str(tiny_dirs["bert"]), "--data", str(small_text_file), "--samples", "8",
                                 "--seq-len", "32", "--format", "json"])
    assert code == 0
    doc = json.loads(stdout)
    for lay in doc["layers"]:
        flagged = any(f.startswith("undersampled:") for f in lay["flags"])
        assert flagged == (lay["tokens"] < UNDERSAMPLED_PER_DIM * lay["d_in"]), lay["name"]
    assert any(f.startswith("undersampled: 8 tokens for ") for f in next(
        lay for lay in doc["layers"] if lay["name"] == "pooler.dense")["flags"])
    warned = [ln for ln in stderr.splitlines() if ln.startswith("specprune: warning: ")]
    assert len(warned) == 1 and "fewer than 4 calibration tokens per input dimension" in warned[0], stderr



def test_analyze_token_sample_flags_the_wide_input_only(tmp_path):
    from specprune.toy import build_wide_mlp

    torch.manual_seed(0)
    weights = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in build_wide_mlp().state_dict().items()}, str(weights))
    data = tmp_path / "x.pt"
    torch.save({"input": torch.randn(4096, 48)}, str(data))
    args = ["analyze", str(weights), "--arch", "specprune.toy:build_wide_mlp", "--data", str(data),
            "--samples", "4096", "--batch-size", "1024", "--format", "json", "--out", str(tmp_path / "a")]
    code, stdout, stderr = _run([*args, "--token-sample", "0.5"])
    assert code == 0, stderr
    flags = {lay["name"]: lay["flags"] for lay in json.loads(stdout)["layers"]}
    assert not any(f.startswith("sampled") for f in flags["up"])
    (flag,) = [f for f in flags["down"] if f.startswith("sampled")]
    kept, seen = (int(v) for v in re.match(r"sampled: (\d+) of (\d+) tokens entered the covariance", flag).groups())
    assert 0.4 * seen < kept < 0.6 * seen
    assert Analysis.load(tmp_path / "a").groups["down"].sampling["fraction"] == 0.5
    code, _, stderr = _run([a for a in args if a not in ("--format", "json", "--out", str(tmp_path / "a"))]
                           + ["--token-sample", "0.5"])
    assert code == 0, stderr
    assert re.search(r"token sampling: 1 input\(s\) ≥ 1024 wide kept \d+ of 3072 tokens \(\d+%\); their top "
                     r"eigenvalues' relative standard error is at most [\d.]+% \(stated bound\)", stderr)
    assert "sampled nothing" not in stderr
    # nothing 1024 wide: the option does nothing, and says so
    code, _, stderr = _run([a for a in args if a not in ("--format", "json", "--out", str(tmp_path / "a"))]
                           + ["--token-sample", "0.5", "--include", "up"])
    assert code == 0, stderr
    assert "--token-sample 0.5 sampled nothing: no input is 1024 or more wide, so every token entered" in stderr


def test_tensor_data_with_positions_counts_every_position(tmp_path):
    """A 3-D ``input`` (samples × positions × features): the calibration's token count is what the layers
    saw, samples × positions (it sizes the memory plan's batch too)."""
    from specprune.toy import build_wide_mlp

    weights = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in build_wide_mlp().state_dict().items()}, str(weights))
    data = tmp_path / "seq.pt"
    torch.save({"input": torch.randn(64, 8, 48)}, str(data))
    code, stdout, stderr = _run(["analyze", str(weights), "--arch", "specprune.toy:build_wide_mlp", "--data",
                                 str(data), "--format", "json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    samples = doc["calibration"]["samples"]
    assert doc["calibration"]["tokens"] == samples * 8
    assert {lay["tokens"] for lay in doc["layers"]} == {samples * 8}


@pytest.mark.parametrize("kind", ["wrong-width", "one-dim", "complex", "not-a-torch-file"])
def test_tensor_data_that_does_not_fit_is_one_line(kind, tmp_path):
    """Data the model cannot take: one error line naming the problem, and no Python warning before it (the
    probe checks a batch's features before it computes anything with them)."""
    from specprune.toy import build_wide_mlp

    weights = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in build_wide_mlp().state_dict().items()}, str(weights))
    data = tmp_path / "x.pt"
    if kind == "not-a-torch-file":
        data.write_text("hello")
    else:
        x = {"wrong-width": torch.randn(64, 47), "one-dim": torch.randn(64),
             "complex": torch.randn(64, 48, dtype=torch.complex64)}[kind]
        torch.save({"input": x}, str(data))
    proc = subprocess.run([sys.executable, "-m", "specprune", "analyze", str(weights), "--arch",
                           "specprune.toy:build_wide_mlp", "--data", str(data), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specprune: error: "), proc.stderr
    expect = {"wrong-width": "layer up got features of shape (8, 47), but it takes 48 real input features",
              "one-dim": "but it takes 48 real input features per token",
              "complex": "layer up got complex features",
              "not-a-torch-file": "is not a readable PyTorch file (corrupted or truncated?): neither a zip"}[kind]
    assert expect in lines[0]


def test_series_steps_are_parsed_for_all_or_the_order_for_all():
    from specprune.cli.analyze import series_steps

    assert series_steps(["runs/checkpoint-100", "runs/step_2000_seed3", "ckpt-1000-v2"]) == ([100, 2000, 1000], None)
    steps, note = series_steps(["ckpt-100", "step_2000", "final"])
    assert steps == [0, 1, 2] and "final has no step number in its name" in note
    steps, note = series_steps(["a/checkpoint-500", "b/checkpoint-500"])
    assert steps == [0, 1] and "step 500 appears in more than one checkpoint name" in note
