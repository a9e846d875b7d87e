"""torchrun with two gloo processes on CPU gives the single-process results (issue 7).

Each rank streams every second batch; Gram sums, token counts and metric sums are all-reduced, so
the only difference allowed is floating-point summation order: eigenvalues agree to rtol 1e-6 (and
1e-10 of the top eigenvalue in absolute terms, for numerically-zero modes), token counts exactly.
The calibration runs use 4 batches so that the summation order really differs between the runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

COMMON = ["--samples", "16", "--seq-len", "32", "--batch-size", "4", "--format", "json"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPECPRUNE_DIST_BACKEND="gloo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _specprune() -> list[str]:
    exe = shutil.which("specprune")
    return [exe] if exe else [sys.executable, "-m", "specprune"]


def _run(args: list[str], *, ranks: int = 1, timeout: int = 300) -> dict:
    """``specprune ARGS`` single-process, or under ``torchrun --nproc_per_node=RANKS --standalone``
    (a free rendezvous port, so parallel test sessions do not collide); returns the stdout JSON."""
    cmd = _specprune() + args
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd = launcher + (["--no-python"] + cmd if cmd[0] != sys.executable else cmd[1:])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def quantized_llama(tiny_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "q4"
    _run(["quantize", str(tiny_dirs["llama"]), "--bits", "4", "--out", str(out), "--format", "json"])
    return out


def test_analyze_torchrun_matches_single_process(tiny_dirs, small_text_file, tmp_path):
    from specprune.analysis import Analysis

    model = str(tiny_dirs["llama"])
    data = ["--data", str(small_text_file)]
    single = _run(["analyze", model, *data, *COMMON, "--out", str(tmp_path / "single")])
    dist = _run(["analyze", model, *data, *COMMON, "--out", str(tmp_path / "dist")], ranks=2)

    assert dist["calibration"] == single["calibration"]
    assert dist["calibration"]["tokens"] == 16 * 32
    a, b = Analysis.load(tmp_path / "single"), Analysis.load(tmp_path / "dist")
    assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers]
    for la, lb in zip(a.layers, b.layers):
        assert la.tokens == lb.tokens == 16 * 32, la.name
        assert la.input_group == lb.input_group
        top = float(la.eigenvalues[0])
        np.testing.assert_allclose(lb.eigenvalues, la.eigenvalues, rtol=1e-6, atol=1e-10 * top,
                                   err_msg=la.name)
        np.testing.assert_allclose(lb.mode_energy, la.mode_energy, rtol=1e-5,
                                   atol=1e-9 * float(np.max(la.mode_energy)), err_msg=la.name)
    # the group structure and the up-front memory plan are the same on every rank
    assert set(a.groups) == set(b.groups)
    assert dist["memory"] == single["memory"]
    # only rank 0 wrote: one analysis.json, no stray per-rank files
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())


def test_evaluate_torchrun_matches_single_process(tiny_dirs, small_text_file, quantized_llama):
    args = ["evaluate", str(quantized_llama), "--reference", str(tiny_dirs["llama"]), "--data",
            str(small_text_file), "--samples", "32", "--seq-len", "32", "--batch-size", "4", "--format", "json"]
    single = _run(args)
    dist = _run(args, ranks=2)
    assert dist["metric"] == single["metric"] == "lm-loss"
    assert dist["reference_value"] == pytest.approx(single["reference_value"], rel=1e-9)
    assert dist["value"] == pytest.approx(single["value"], rel=1e-9)
    assert single["measured_delta"] != 0.0  # a real 4-bit model: the delta is measurable
    assert dist["measured_delta"] == pytest.approx(single["measured_delta"], rel=1e-6, abs=1e-12)


def test_evaluate_torchrun_stderr_matches_single_process(tiny_dirs, small_text_file, quantized_llama):
    args = ["evaluate", str(quantized_llama), "--reference", str(tiny_dirs["llama"]), "--data",
            str(small_text_file), "--samples", "32", "--seq-len", "32", "--batch-size", "4", "--format", "json"]
    single = _run(args)
    dist = _run(args, ranks=2)
    assert dist["measured_delta_stderr"] == pytest.approx(single["measured_delta_stderr"], rel=1e-6)


def test_recommend_sensitivities_torchrun_match_single_process(tiny_dirs, small_text_file, tmp_path):
    # batch size 2: the sensitivity windows (4) make ≥ 1 batch per rank
    args = ["recommend", str(tiny_dirs["llama"]), "--data", str(small_text_file), "--samples", "32",
            "--seq-len", "32", "--batch-size", "2", "--tolerance", "0.05", "--format", "json"]
    _run([*args, "--out", str(tmp_path / "single.json")])
    _run([*args, "--out", str(tmp_path / "dist.json")], ranks=2)
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "dist.json").read_text())
    sa, sb = a["details"]["sensitivities"], b["details"]["sensitivities"]
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        for pa, pb in zip(sa[name]["probes"], sb[name]["probes"]):
            assert pa["kind"] == pb["kind"]
            assert pb["distortion"] == pytest.approx(pa["distortion"], rel=1e-6)
            assert pb["delta"] == pytest.approx(pa["delta"], rel=1e-5, abs=1e-12), name
    # the same plan; its per-layer shares agree to float rounding (each rank scores its share of the gradient
    # sensitivities' windows, each window with its own seeded draws, and the sums are all-reduced: a missing
    # or wrong reduction would move every sensitivity)
    assert b["layers"].keys() == a["layers"].keys()
    for name, la in a["layers"].items():
        lb = b["layers"][name]
        assert {k: v for k, v in lb.items() if k != "predicted_delta"} == \
            {k: v for k, v in la.items() if k != "predicted_delta"}, name
        assert lb["predicted_delta"] == pytest.approx(la["predicted_delta"], rel=1e-6, abs=1e-15), name
    assert b["predicted_delta"] == pytest.approx(a["predicted_delta"], rel=1e-6, abs=1e-12)


def test_analyze_torchrun_token_sample_sums_kept_tokens_and_keeps_the_largest_variance_factor(tmp_path):
    """``--token-sample`` under torchrun: the kept tokens are summed over ranks, the bound's variance factor is
    the largest any rank had, and the top eigenvalues stay within the stated error of the all-token run."""
    import torch
    from safetensors.torch import save_file

    from specprune.analysis import Analysis
    from specprune.probe import relative_se_bound
    from specprune.toy import build_wide_mlp

    weights = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in build_wide_mlp().state_dict().items()}, str(weights))
    data = tmp_path / "x.pt"
    torch.manual_seed(0)
    torch.save({"input": torch.randn(8192, 48) * torch.logspace(0, -1, 48)}, str(data))
    args = ["analyze", str(weights), "--arch", "specprune.toy:build_wide_mlp", "--data", str(data),
            "--samples", "8192", "--batch-size", "1024", "--format", "json"]
    exact = _run([*args, "--out", str(tmp_path / "exact")])
    _run([*args, "--token-sample", "0.5", "--out", str(tmp_path / "dist")], ranks=2)
    a, b = Analysis.load(tmp_path / "exact"), Analysis.load(tmp_path / "dist")
    info = b.groups["down"].sampling
    tokens = exact["calibration"]["tokens"]
    assert info["tokens"] == tokens == b.groups["down"].tokens and info["fraction"] == 0.5
    assert 0.45 * tokens < info["kept_tokens"] < 0.55 * tokens and info["variance_factor"] > 0
    assert b.groups["up"].sampling == {}
    np.testing.assert_allclose(b.groups["up"].eigenvalues, a.groups["up"].eigenvalues, rtol=1e-6,
                               atol=1e-10 * float(a.groups["up"].eigenvalues[0]))
    for ref, got in zip(a.groups["down"].eigenvalues[:10], b.groups["down"].eigenvalues[:10]):
        assert abs(got / ref - 1) < 4 * relative_se_bound(info, float(ref))
