"""QA journey "analyzing a checkpoint before pruning": regressions found by driving ``analyze`` and ``report``.

* ``--samples`` larger than the data's calibration share was cut down without a word in ``--format json``.
* In a series, the undersampled warnings of every checkpoint were identical lines that did not say which
  checkpoint they were about.
* Tensor data (no ``--seq-len``): the table title said "16 tokens" and the report "16 tokens in 16 windows of –
  tokens" for 16 images whose conv layers saw thousands of positions.
* The report's "median r*" over an even number of frontiers was the upper of the two middle values.
* The series figure's k* panel, when no checkpoint has a frontier, was an empty 1..10 × −0.05..0.05 frame with a
  legend for a line that is not there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli_run, one_error_line, tree_hash

run = cli_run


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory) -> dict[str, Path]:
    from specprune.toy import TinyCNN

    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    torch.save(TinyCNN().state_dict(), root / "cnn.pt")
    torch.save({"input": torch.randn(24, 3, 16, 16)}, root / "imgs.pt")
    (root / "notes.txt").write_text("not images\n", encoding="utf-8")
    return {"model": root / "cnn.pt", "data": root / "imgs.pt", "text": root / "notes.txt"}


@pytest.mark.slow
def test_more_samples_than_the_data_holds_is_said_even_in_json(tiny_dirs, small_text_file):
    code, out, err = run("analyze", tiny_dirs["gpt2"], "--data", small_text_file, "--samples", "100000",
                         "--seq-len", "64", "--format", "json")
    assert code == 0, err
    got = json.loads(out)["calibration"]["samples"]
    assert 0 < got < 100000
    lines = [ln for ln in err.splitlines() if "--samples 100000" in ln]
    assert len(lines) == 1 and f"analysed {got}" in lines[0], err


@pytest.mark.slow
def test_series_warnings_name_their_checkpoint(tiny_dirs, small_text_file, tmp_path):
    ckpts = [tmp_path / f"ckpt-{s}" for s in (10, 20)]
    for c in ckpts:
        shutil.copytree(tiny_dirs["gpt2"], c)
    code, out, err = run("analyze", *ckpts, "--data", small_text_file, *FAST, "--format", "json")
    assert code == 0, err
    warns = [ln for ln in err.splitlines() if "calibration tokens per input dimension" in ln]
    assert len(warns) == 2, err
    for c, ln in zip(ckpts, warns):
        assert ln.startswith(f"specprune: warning: {c}: "), ln
    assert len(json.loads(out)["series"]) == 2


def test_a_series_with_a_missing_checkpoint_is_refused_before_any_work(tiny_dirs, small_text_file, tmp_path):
    """The first checkpoint was analysed (minutes on a real model) before the second was found missing."""
    code, out, err = run("analyze", tiny_dirs["gpt2"], tmp_path / "missing", "--data", small_text_file, *FAST,
                         "--out", tmp_path / "a")
    assert code == 1 and out == "" and "model not found" in one_error_line(err)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_series_that_fails_on_a_later_checkpoint_is_one_error_line(tiny_dirs, small_text_file, tmp_path):
    """The first checkpoint's warnings (undersampled here) are not printed before the second one's error."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    code, out, err = run("analyze", tiny_dirs["gpt2"], tmp_path / "broken", "--data", small_text_file, *FAST,
                         "--out", tmp_path / "a", "--quiet")
    one_error_line(err)
    assert code == 1 and out == "" and not (tmp_path / "a").exists()


def test_tensor_data_counts_samples_and_conv_positions(cnn_files, tmp_path):
    before = tree_hash(cnn_files["model"]), tree_hash(cnn_files["data"])
    code, out, err = run("analyze", cnn_files["model"], "--arch", "specprune.toy:TinyCNN", "--data", cnn_files["data"],
                         "--samples", "16", "--batch-size", "4", "--out", tmp_path / "a")
    assert code == 0, err
    assert "16 samples" in out and "16 tokens" not in out, out  # the table's title
    doc = json.loads((tmp_path / "a" / "analysis.json").read_text(encoding="utf-8"))
    tokens = {lay["name"]: lay["tokens"] for lay in doc["layers"]}
    # 16 images of 16×16: conv1 every pixel, conv2 stride 2, conv3 its 64 positions for each of its 2 groups,
    # conv1d the 64 flattened positions, fc one per image
    assert tokens == {"conv1": 16 * 256, "conv2": 16 * 64, "conv3": 2 * 16 * 64, "conv1d": 16 * 64, "fc": 16}
    assert {lay["name"]: lay["k_max"] for lay in doc["layers"]} == {"conv1": 27, "conv2": 72, "conv3": 72,
                                                                    "conv1d": 48, "fc": 16}
    code, _, err = run("report", tmp_path / "a", "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "16 samples of tensor data" in md and "windows of – tokens" not in md and "None" not in md
    assert (tree_hash(cnn_files["model"]), tree_hash(cnn_files["data"])) == before


@pytest.mark.parametrize("extra, words", [
    (["--data", "TEXT"], "needs a tokenizer"),
    (["--data", "MISSING"], "data not found"),
])
def test_cnn_bad_data_is_one_line(cnn_files, tmp_path, extra, words):
    extra = [{"TEXT": str(cnn_files["text"]), "MISSING": str(tmp_path / "nope.pt")}.get(x, x) for x in extra]
    code, out, err = run("analyze", cnn_files["model"], "--arch", "specprune.toy:TinyCNN", *extra,
                         "--out", tmp_path / "a")
    assert code == 1 and out == "" and words in one_error_line(err)
    assert not (tmp_path / "a").exists()


def _fake_analysis(k_stars: list[int | None], k_max: int = 64) -> dict:
    layers = [{"name": f"l{i}", "type": "Linear", "d_in": k_max, "d_out": k_max, "tokens": 512, "b": 1.5,
               "a": 1.6, "k_star": k, "k_max": k_max, "r_star": None if k is None else 1 - k / k_max,
               "fit": {}, "flags": []} for i, k in enumerate(k_stars)]
    return {"specprune_version": "0", "model": {"source": "m", "num_parameters": 1},
            "calibration": {"tokens": 512, "samples": 16, "seq_len": 32, "seed": 0}, "layers": layers}


def test_report_median_r_star_of_an_even_count(tmp_path):
    """r* = 87.5%, 75%, 25%, 12.5%: the median is 50% (the upper middle value, 75%, was printed)."""
    d = tmp_path / "analysis"
    d.mkdir()
    (d / "analysis.json").write_text(json.dumps(_fake_analysis([8, 16, 48, 56, None])), encoding="utf-8")
    code, _, err = run("report", d, "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "4 of 5 layers show a frontier; their r* ranges from 12% to 88% (median 50%)." in md, md


def test_series_figure_without_any_frontier_keeps_the_steps_axis():
    from specprune.report.figures import series_figure

    fig = series_figure([{"step": s, "analysis": _fake_analysis([None, None])} for s in (100, 1000, 10000)])
    k_ax, b_ax = fig.axes[0], fig.axes[1]
    assert k_ax.get_xlim() == b_ax.get_xlim()
    assert k_ax.get_legend() is None and list(k_ax.get_yticks()) == []
    assert any("no layer shows a frontier" in t.get_text() for t in k_ax.texts)
