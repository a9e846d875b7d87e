"""A compressed Hugging Face directory must not load quietly with random weights through transformers'
from_pretrained: it refuses (config.json marker), while specprune.load and the dense/ export keep working,
and so do directories written before the marker existed."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from specprune.compress.apply import apply_
from specprune.compress.saved import (
    HF_MARKER_FIELD,
    HF_ORIGINAL_FIELD,
    HF_REFUSAL,
    _mark_hf_config,
    _unmark_config,
    load,
    load_saved,
    save_compressed,
)
from specprune.layers import select_layers
from specprune.plan import LayerPlan, Plan

transformers = pytest.importorskip("transformers")

FACTORIZED = "encoder.layer.0.attention.self.query"  # rank 8 + int4: factorized and quantized
QUANT_ONLY = "encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny BERT source directory (config, weights, tokenizer), its compressed copy (with dense/)
    and the in-memory compressed model's outputs on a fixed batch."""
    root = tmp_path_factory.mktemp("hftrap")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    src = root / "src"
    model.save_pretrained(str(src))
    vocab = src / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(src))
    names = [t.name for t in select_layers(model)]
    plan = Plan.uniform(names, bits=4, group_size=16)
    plan.layers[FACTORIZED] = LayerPlan(method="spectral", rank=8, bits=4, group_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IdentityCovarianceWarning: no data for the truncation, on purpose
        apply_(model, plan)
    ids = {"input_ids": torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        want = model(**ids).last_hidden_state
    out = root / "out"
    out.mkdir()
    save_compressed(model, plan, out, source=str(src), export_dense=True)
    return {"root": root, "src": src, "out": out, "plan": plan, "ids": ids, "want": want}


def _hf_load(cls, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(d)).eval()


def test_layout_holds_the_contract_files(compressed):
    out = compressed["out"]
    for f in ("model.safetensors", "plan.json", "specprune.json", "config.json", "vocab.txt", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "specprune.json").read_text())
    assert FACTORIZED in spec["factorized"] and f"{QUANT_ONLY}.weight" in spec["quantized"]
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((compressed["src"] / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg  # only the marker added
    assert cfg["quantization_config"] == {HF_MARKER_FIELD: HF_REFUSAL}
    assert "specprune.load(DIR)" in HF_REFUSAL and "dense/" in HF_REFUSAL


@pytest.mark.parametrize("cls_name", ["BertModel", "AutoModel"])
def test_from_pretrained_on_compressed_dir_raises(compressed, cls_name):
    """Before the marker: a load report in the log and random weights for every packed/factorized layer."""
    cls = getattr(transformers, cls_name)
    with pytest.raises(ValueError, match="quant_method"):
        _hf_load(cls, compressed["out"])


def test_auto_config_and_tokenizer_still_read_the_dir(compressed):
    out = compressed["out"]
    cfg = transformers.AutoConfig.from_pretrained(str(out))
    assert type(cfg).__name__ == "BertConfig" and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert HF_MARKER_FIELD in cfg.quantization_config  # whoever inspects it sees why from_pretrained refuses
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w1 w2")["input_ids"] == [2, 6, 7, 3]


def test_specprune_load_round_trips_and_drops_the_marker(compressed, tmp_path):
    loaded = load(compressed["out"])
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        got = loaded(**compressed["ids"]).last_hidden_state
    assert torch.allclose(got, compressed["want"], atol=1e-6)
    # its save_pretrained writes a config transformers loads (no marker carried over)
    loaded.save_pretrained(str(tmp_path / "again"))
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_old_layout_without_marker_still_loads(compressed, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(compressed["out"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"]
    (old / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.no_grad():
        got = load(old)(**compressed["ids"]).last_hidden_state
    assert torch.allclose(got, compressed["want"], atol=1e-6)


@pytest.mark.parametrize("cls_name", ["BertModel", "AutoModel"])
def test_dense_export_loads_with_from_pretrained(compressed, cls_name):
    dense_dir = compressed["out"] / "dense"
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    dense = _hf_load(getattr(transformers, cls_name), dense_dir)
    with torch.no_grad():
        got = dense(**compressed["ids"]).last_hidden_state
        ref = load(compressed["out"])(**compressed["ids"]).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)


def test_recompressing_keeps_one_marker(compressed, tmp_path):
    lm = load_saved(compressed["out"])
    out2 = tmp_path / "m2"
    out2.mkdir()
    save_compressed(lm.model, compressed["plan"], out2, source=lm, export_dense=True)
    assert json.loads((out2 / "config.json").read_text())["quantization_config"] == {HF_MARKER_FIELD: HF_REFUSAL}
    assert "quantization_config" not in json.loads((out2 / "dense" / "config.json").read_text())
    with torch.no_grad():
        got = load(out2)(**compressed["ids"]).last_hidden_state
    assert torch.allclose(got, compressed["want"], atol=1e-6)


def test_source_quantization_config_is_kept_inside_the_marker(tmp_path):
    original = {"quant_method": "something", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "quantization_config": original}))
    _mark_hf_config(tmp_path)
    _mark_hf_config(tmp_path)  # idempotent: a re-save does not nest markers
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {HF_MARKER_FIELD: HF_REFUSAL, HF_ORIGINAL_FIELD: original}
    cfg = transformers.BertConfig(quantization_config=qc)
    _unmark_config(cfg)
    assert cfg.quantization_config == original
