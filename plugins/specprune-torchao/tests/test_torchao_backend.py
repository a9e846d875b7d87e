"""specprune-torchao: torchao quantization on specprune's grid, saved packed, equal to the RTN path;
torchao's stock configs; conversion to torchao tensors; checkpoints; the message without torchao."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from specprune_torchao import (
    TORCHAO_REQUIREMENT,
    load_torchao,
    quantize_matrix,
    quantize_model_,
    save_torchao,
    tensor_parts,
    to_torchao_,
)
from torch import nn

from specprune.compress.apply import apply_
from specprune.compress.pack import unpack_codes
from specprune.compress.quantize import QUANT_ATTR, quantize_weight
from specprune.errors import InputError
from specprune.plan import LayerPlan, Plan

pytest.importorskip("torchao")

VOCAB = 256


def _llama():
    from specprune.toy import tiny_model

    return tiny_model("llama", vocab_size=VOCAB, hidden=128, layers=2)


def _plan(names, bits, group_size, method):
    return Plan(model={"source": "test", "fingerprint": ""}, tolerance=0.0, metric="none",
                layers={n: LayerPlan(method=method, bits=bits, group_size=group_size) for n in names})


def _plan_json(path: Path, names, bits, group_size, method) -> Path:
    _plan(names, bits, group_size, method).save(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("torchao") / "llama"
    _llama().save_pretrained(str(d))
    return d


def _linear_names(model) -> list[str]:
    from specprune.layers import select_layers

    return [t.name for t in select_layers(model)]


def _cli(*args):
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# the integers


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_torchao_codes_equal_specprune_rtn(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    w[5] = 0.0  # an all-zero row: scale 0, codes 0, no NaN
    ref = quantize_weight(w, bits, group_size)
    t = quantize_matrix(w, bits, group_size)
    assert type(t).__name__ == "IntxUnpackedToInt8Tensor"
    parts = tensor_parts(t)
    assert_codes_match(parts.codes, ref, w)
    qmax = 2 ** (bits - 1) - 1
    assert int(parts.codes.abs().max()) <= qmax
    assert parts.group_size == (96 if group_size is None else group_size)
    live = ref.scales > 0  # an all-zero group reaches torchao with scale 1 (codes 0 either way)
    assert torch.equal(parts.scales[live], ref.scales.float()[live])
    if torch.equal(parts.codes, ref.codes):  # the usual case: no weight sits on a rounding tie
        assert torch.equal(t.dequantize(), ref.dequantize())
        x = torch.randn(7, 96)
        assert torch.equal(nn.functional.linear(x, t), x @ ref.dequantize().T)


def assert_codes_match(codes: torch.Tensor, ref, w: torch.Tensor) -> None:
    """torchao's codes equal specprune's except where w/s lies on a rounding tie k + ½ (torchao
    computes w·(1/s), specprune w/s: one ulp apart), and there by one level."""
    diff = (codes.int() - ref.codes.int()).abs()
    assert int(diff.max()) <= 1
    if diff.any():
        d_in = w.shape[1]
        g = d_in if ref.group_size is None else min(ref.group_size, d_in)
        s = ref.scales.float().repeat_interleave(g, dim=1)[:, :d_in]
        ratio = (w.float() / s)[diff > 0]
        assert bool(((ratio.abs() - ratio.abs().floor() - 0.5).abs() < 1e-5 * ratio.abs()).all())


def test_rounding_ties_are_the_only_difference():
    """A weight exactly on a tie: specprune rounds w/s half-to-even, torchao w·(1/s) just below."""
    s = torch.tensor(0.041283488273620605 / 119.5).to(torch.float16).float()
    w = torch.full((1, 32), float(s) * 119.5)
    w[0, 0] = float(s) * 127  # fixes the per-row scale to s (127 = q_max at 8 bits)
    ref = quantize_weight(w, 8)
    parts = tensor_parts(quantize_matrix(w, 8))
    assert torch.equal(parts.scales, ref.scales.float())
    assert ref.codes[0, 1] == 120 and parts.codes[0, 1] == 119  # 119.5: half-to-even vs just below
    assert_codes_match(parts.codes, ref, w)


def test_bfloat16_weights_match_too():
    torch.manual_seed(0)
    w = (torch.randn(32, 64) * 0.05).to(torch.bfloat16)
    ref = quantize_weight(w, 4, 16)
    t = quantize_matrix(w, 4, 16)
    assert t.dtype == torch.bfloat16
    assert torch.equal(tensor_parts(t).codes, ref.codes)
    assert torch.equal(t.dequantize(), ref.dequantize().to(torch.bfloat16))


def test_stock_torchao_grid_is_within_one_step_but_not_symmetric():
    """torchao's own SYMMETRIC mapping uses [−2^(B−1), 2^(B−1)−1] with s = max|w|/(q_max + ½): a
    different grid (hence a separate, in-memory-only scheme) whose weights stay within one
    specprune step of the RTN weights."""
    torch.manual_seed(1)
    x = torch.randn(16, 128)
    for bits in (2, 4, 8):
        w = torch.randn(64, 128)
        lin = nn.Sequential(nn.Linear(128, 64, bias=False))
        lin[0].weight.data.copy_(w)
        quantize_model_(lin, bits, None, scheme="stock")
        tw = lin[0].weight
        ref = quantize_weight(w, bits).dequantize()
        step = (w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1))
        diff = (tw.dequantize() - ref).abs()
        assert bool((diff <= step * (1 + 1e-3)).all())
        assert int(tensor_parts(tw).codes.min()) == -(2 ** (bits - 1))  # uses the level ±q_max excludes
        rel = float((lin(x) - x @ ref.T).norm() / (x @ ref.T).norm())
        assert rel < {2: 1.0, 4: 0.2, 8: 0.02}[bits]


def test_group_size_must_divide_d_in():
    with pytest.raises(InputError, match="divide d_in"):
        quantize_matrix(torch.randn(8, 96), 4, 64)
    # larger than d_in means per channel, as in specprune
    assert torch.equal(tensor_parts(quantize_matrix(torch.ones(4, 32), 4, 128)).codes,
                       quantize_weight(torch.ones(4, 32), 4, 128).codes)


# --------------------------------------------------------------------------------------------
# the compressor through apply_ and the CLI


def test_apply_with_torchao_quantizer_equals_rtn_on_every_layer_kind():
    """Linear, HF Conv1D (GPT-2) and a factorized layer (both factors) end up bit-identical to RTN."""
    from specprune.toy import tiny_model

    for kind in ("llama", "gpt2"):
        a = tiny_model(kind, vocab_size=VOCAB, hidden=64)
        b = tiny_model(kind, vocab_size=VOCAB, hidden=64)
        names = _linear_names(a)
        apply_(a, _plan(names, 4, 32, None), quantizer="torchao")
        apply_(b, _plan(names, 4, 32, None), quantizer="rtn")
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert na == nb and torch.equal(pa, pb), na
        rec = getattr(dict(a.named_modules())[names[0]], QUANT_ATTR)
        assert (rec.bits, rec.group_size, rec.scales.dtype) == (4, 32, torch.float16)

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    ref = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    ref.load_state_dict(mlp.state_dict())
    plan = Plan(model={"source": "t", "fingerprint": ""}, tolerance=0.0, metric="none",
                layers={"0": LayerPlan(method="spectral", rank=8, bits=6)})
    apply_(mlp, plan, quantizer="torchao")
    apply_(ref, Plan(model={"source": "t", "fingerprint": ""}, tolerance=0.0, metric="none",
                     layers={"0": LayerPlan(method="spectral", rank=8, bits=6)}))
    assert type(mlp[0]).__name__ == "FactorizedLinear"
    for (na, pa), (nb, pb) in zip(mlp.state_dict().items(), ref.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_cli_apply_method_torchao_is_smaller_and_matches_fake_quant(llama_dir, tmp_path):
    import specprune

    model = _llama()
    names = _linear_names(model)
    src = (llama_dir / "model.safetensors").stat().st_size
    outs = {}
    for method in ("torchao", None):
        for bits in (8, 4, 2):
            plan = _plan_json(tmp_path / f"plan-{method}-{bits}.json", names, bits, 32, method)
            out = tmp_path / f"out-{method}-{bits}"
            res = _cli("apply", llama_dir, "--plan", plan, "--out", out, "--format", "json")
            assert res.exit_code == 0, res.stderr
            outs[method, bits] = out
    ratios = {b: (outs["torchao", b] / "model.safetensors").stat().st_size / src for b in (8, 4, 2)}
    assert ratios[8] < 0.40 and ratios[4] < ratios[8] and ratios[2] < ratios[4] < 0.25
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    for bits in (8, 4, 2):
        fa, fb = outs["torchao", bits] / "model.safetensors", outs[None, bits] / "model.safetensors"
        assert fa.stat().st_size == fb.stat().st_size
        ta, tb = load_file(fa), load_file(fb)
        assert ta.keys() == tb.keys()
        spec = json.loads((outs["torchao", bits] / "specprune.json").read_text())["quantized"]
        for key in ta:
            if key.endswith("::codes"):
                d_out, d_in = spec[key[:-len("::codes")]]["matrix"]
                n = d_out * d_in
                ca, cb = unpack_codes(ta[key], bits, n), unpack_codes(tb[key], bits, n)
                diff = (ca.int() - cb.int()).abs()
                assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, n // 10_000), key
            else:
                assert torch.equal(ta[key], tb[key]), key
        a, b = specprune.load(outs["torchao", bits]), specprune.load(outs[None, bits])
        with torch.no_grad():
            la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
        assert float((la - lb).abs().max()) <= 1e-3 * float(lb.abs().max())
    spec = json.loads((outs["torchao", 4] / "specprune.json").read_text())
    assert spec["quantized"] and all(not m["requantized"] for m in spec["quantized"].values())


def test_quantize_backend_flag(llama_dir, tmp_path):
    help_text = _cli("quantize", "--help").stdout
    if "--backend" not in help_text:
        pytest.skip("specprune quantize has no --backend option yet")
    res = _cli("quantize", llama_dir, "--bits", "4", "--group-size", "32", "--backend", "torchao",
               "--out", tmp_path / "q", "--format", "json")
    assert res.exit_code == 0, res.stderr
    ref = _cli("quantize", llama_dir, "--bits", "4", "--group-size", "32", "--out", tmp_path / "r")
    assert ref.exit_code == 0, ref.stderr
    import specprune

    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        la = specprune.load(tmp_path / "q")(input_ids=ids).logits
        lb = specprune.load(tmp_path / "r")(input_ids=ids).logits
    assert float((la - lb).abs().max()) <= 1e-3 * float(lb.abs().max())  # equal but for rounding ties
    sizes = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("q", "r")}
    assert sizes["q"] == sizes["r"] < 0.25 * (llama_dir / "model.safetensors").stat().st_size
    missing = _cli("quantize", llama_dir, "--bits", "4", "--backend", "torchoa", "--out", tmp_path / "x")
    assert missing.exit_code == 1 and "did you mean 'torchao'" in missing.stderr


BLOCKED = textwrap.dedent("""
    import json, os, sys
    sys.modules["torchao"] = None  # torchao not importable in this process
    from typer.testing import CliRunner
    from specprune.cli.app import app
    import specprune
    res = CliRunner().invoke(app, ["apply", sys.argv[1], "--plan", sys.argv[2], "--out", sys.argv[3]])
    model = specprune.load(sys.argv[4])  # a saved torchao-backend directory needs no torchao
    print(json.dumps({"exit": res.exit_code, "stderr": res.stderr, "out_exists": os.path.exists(sys.argv[3]),
                      "loaded": type(model).__name__,
                      "torchao_imported": sys.modules.get("torchao") is not None}))
""")


def test_without_torchao_one_clear_line_and_saved_dirs_still_load(llama_dir, tmp_path):
    names = _linear_names(_llama())
    plan = _plan_json(tmp_path / "plan.json", names, 4, 32, "torchao")
    saved = tmp_path / "saved"
    assert _cli("apply", llama_dir, "--plan", plan, "--out", saved).exit_code == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(llama_dir), str(plan), str(tmp_path / "nope"),
                           str(saved)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["exit"] == 1 and not doc["out_exists"]
    lines = doc["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specprune: error:")
    assert "torchao" in lines[0] and "pip install" in lines[0] and TORCHAO_REQUIREMENT in lines[0]
    assert doc["loaded"] == "LlamaForCausalLM" and doc["torchao_imported"] is False


# --------------------------------------------------------------------------------------------
# runtime form


def test_to_torchao_and_checkpoint_roundtrip(llama_dir, tmp_path):
    import specprune

    plan = _plan_json(tmp_path / "plan.json", _linear_names(_llama()), 4, 32, "torchao")
    out = tmp_path / "q4"
    assert _cli("apply", llama_dir, "--plan", plan, "--out", out).exit_code == 0
    model = specprune.load(out)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    converted = to_torchao_(model)
    assert len(converted) == len(_linear_names(model))
    w = model.get_submodule(converted[0]).weight
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and tensor_parts(w).codes.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    ckpt = save_torchao(model, tmp_path / "model.pt")
    assert ckpt.stat().st_size < 0.5 * (llama_dir / "model.safetensors").stat().st_size
    fresh = load_torchao(_llama(), ckpt)
    assert type(fresh.get_submodule(converted[0]).weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, before)
    with pytest.raises(InputError, match="not quantized by specprune"):
        to_torchao_(_llama(), names=[converted[0]])


def test_stock_int8_weight_only_runs_through_torchao():
    model = _llama()
    ref = _llama()
    done = quantize_model_(model, 8)
    assert len(done) == len(_linear_names(ref))
    assert type(model.get_submodule(done[0]).weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        y, y0 = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((y - y0).norm() / y0.norm()) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's int4 kernel needs CUDA")
def test_int4_kernel_where_supported():
    from specprune_torchao import int4_kernel_available

    if not int4_kernel_available("cuda"):
        pytest.skip("CUDA device below compute capability 8")
    model = _llama().to("cuda", torch.bfloat16)
    ref = _llama().to("cuda", torch.bfloat16)
    done = quantize_model_(model, 4, 32)
    assert type(model.get_submodule(done[0]).weight).__name__ == "Int4TilePackedTo4dTensor"
    ids = torch.randint(0, VOCAB, (2, 16), device="cuda")
    with torch.no_grad():
        y, y0 = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    assert float((y - y0).norm() / y0.norm()) < 0.3
