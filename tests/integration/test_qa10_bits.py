"""QA journey "someone picking a bit-width": regressions found while quantizing tiny Llamas and MiniLM.

* float16 scales underflowed silently: a tiny group's scale became a float16 subnormal rounded up by as much
  as the scale itself, so int8 weights of std 1e-7 kept 6 of their 127 levels and those of std 1e-8 came back
  zero; scales below 2^-17 now keep the layer in float32 scales, as overflowing ones already did.
* ``examples/pick_bitwidth.py --bits 9`` (or ``8,x``, ``--tolerance 0``) ran the whole analysis and
  recommendation before failing with a traceback; it now stops at once with argparse's one-line usage error.
* Kept as coverage of what held: every width 2..8, per channel and with a group size that does not divide
  d_in, round-trips its integer codes exactly through save/load of a bfloat16 model, loads in bfloat16, and the
  reported ``size.bits_after`` is exactly the bytes of the tensors in ``model.safetensors``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tree_hash
from safetensors import safe_open
from typer.testing import CliRunner

import specprune
from specprune.cli.app import app
from specprune.compress.pack import unpack_codes
from specprune.compress.quantize import quantization_error, quantize_weight

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pick_bitwidth.py"


def run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.stdout, res.stderr


def _tiny_llama_dir(root: Path, tokenizer, *, dtype=torch.float32, shrink: float | None = None) -> Path:
    from specprune.toy import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer))
    if shrink is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(shrink)
    model = model.to(dtype)
    root.mkdir(parents=True)
    model.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return root


@pytest.mark.parametrize("std", [1e-6, 1e-7, 1e-8])
def test_tiny_weights_keep_their_levels(std):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * std
    ref = torch.randn(16, 64)
    for bits in (8, 4):
        qw = quantize_weight(w, bits)
        assert qw.scales.dtype == torch.float32
        rel = float((qw.dequantize() - w).norm() / w.norm())
        rel_ref = float((quantize_weight(ref, bits).dequantize() - ref).norm() / ref.norm())
        assert rel < 1.5 * rel_ref, (bits, rel, rel_ref)  # was 0.99 at std 1e-8
        assert int(qw.codes.abs().max()) == 2 ** (bits - 1) - 1
        assert torch.equal(quantization_error(w, bits), qw.dequantize() - w)  # the recommender sees the same
    assert quantize_weight(torch.randn(16, 64) * 0.02, 4).scales.dtype == torch.float16  # normal layers unchanged
    assert quantize_weight(torch.randn(16, 64) * 1e-3, 8).scales.dtype == torch.float16  # subnormal but fine


def test_tiny_weight_layer_round_trips_through_quantize(tokenizer, tmp_path):
    src = _tiny_llama_dir(tmp_path / "src", tokenizer, shrink=1e-6)
    before = tree_hash(src)
    code, _, err = run("quantize", src, "--bits", 8, "--out", tmp_path / "q", "--format", "json")
    assert code == 0, err
    key = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(key + "::scales").dtype == torch.float32
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight::scales").dtype == torch.float16
    w = specprune.load(tmp_path / "q").state_dict()[key]
    from safetensors.torch import load_file

    w0 = load_file(str(src / "model.safetensors"))[key]
    assert float((w - w0).norm() / w0.norm()) < 0.01  # RTN int8 error; float16 scales gave ~0.1 here
    assert tree_hash(src) == before


def test_bf16_codes_round_trip_and_size_is_the_file(tokenizer, tmp_path):
    src = _tiny_llama_dir(tmp_path / "src", tokenizer, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    for bits, group in ((2, None), (3, 48), (5, None), (8, 48)):
        out = tmp_path / f"q{bits}-{group}"
        code, stdout, err = run("quantize", src, "--bits", bits, "--out", out, "--format", "json",
                                *(["--group-size", group] if group else []))
        assert code == 0, err
        tensor_bytes, packed = 0, 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is no dict)
                t = f.get_tensor(k)
                tensor_bytes += t.numel() * t.element_size()
                if k.endswith("::codes"):
                    packed += 1
                    w = sd[k[:-len("::codes")]]
                    expect = quantize_weight(w, bits, group)
                    assert torch.equal(unpack_codes(t, bits, w.numel()).reshape(w.shape), expect.codes), k
                    assert torch.equal(f.get_tensor(k[:-len("::codes")] + "::scales"), expect.scales), k
        assert packed == 15 and json.loads(stdout)["size"]["bits_after"] == 8 * tensor_bytes
        loaded = specprune.load(out).state_dict()
        w = sd["model.layers.1.mlp.down_proj.weight"]
        got = loaded["model.layers.1.mlp.down_proj.weight"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, quantize_weight(w, bits, group).dequantize().to(torch.bfloat16))


def _example():
    spec = importlib.util.spec_from_file_location("pick_bitwidth_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, what", [
    (["--bits", "9"], "--bits takes"),
    (["--bits", "8,x"], "--bits takes"),
    (["--bits", ","], "--bits takes"),
    (["--tolerance", "0"], "--tolerance must be"),
    (["--tolerance", "nan"], "--tolerance must be"),
    (["--samples", "0"], "--samples must be"),
])
def test_pick_bitwidth_refuses_bad_options_before_loading(args, what, tmp_path, capsys):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exc:
        _example().main([*args, "--workdir", str(work)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and what in err and "Traceback" not in err, err
    assert not work.exists()  # nothing generated, nothing loaded
