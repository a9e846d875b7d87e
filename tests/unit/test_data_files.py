"""Data files as users have them: a UTF-8 byte-order mark, upper-case suffixes, a directory of tensors."""

from __future__ import annotations

import json

import pytest
import torch

from specprune.data import read_texts
from specprune.errors import InputError


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n", encoding="utf-8-sig")
    (tmp_path / "b.txt").write_text("plain words", encoding="utf-8-sig")
    assert read_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"]) == ["hello world", "plain words"]


def test_upper_case_suffixes_get_a_hint(tmp_path):
    (tmp_path / "A.TXT").write_text("words")
    with pytest.raises(InputError, match=r"unsupported data file .*A\.TXT: expected \.txt, \.jsonl or a directory, "
                                         r"or tensors \(\.pt, \.pth, \.safetensors, \.npy\) "
                                         r"\(suffixes are lower case\)"):
        read_texts([tmp_path / "A.TXT"])
    d = tmp_path / "d"
    d.mkdir()
    (d / "B.TXT").write_text("words")
    with pytest.raises(InputError, match=r"holds no \.txt/\.jsonl files \(suffixes are lower case: \.txt, \.jsonl\)"):
        read_texts([d])


def test_a_directory_of_tensors_says_how_to_pass_them(tmp_path):
    d = tmp_path / "tensors"
    d.mkdir()
    torch.save({"input": torch.randn(4, 3)}, str(d / "a.pt"))
    with pytest.raises(InputError, match=r"holds no \.txt/\.jsonl files \(a directory is read as text; pass tensor "
                                         r"files themselves"):
        read_texts([d])


def test_float64_numpy_data_is_cast_to_the_model_dtype(tmp_path):
    """np.save writes float64 by default; a float32 model takes it as float32 (a copy), and the analysis equals
    the one of the same data saved as float32."""
    import numpy as np

    from specprune.analysis import analyze
    from specprune.data import load_data
    from specprune.toy import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8))
    np.save(tmp_path / "x64.npy", x)
    np.save(tmp_path / "x32.npy", x.astype(np.float32))
    a64 = analyze(model, load_data([tmp_path / "x64.npy"], samples=16, batch_size=8))
    a32 = analyze(model, load_data([tmp_path / "x32.npy"], samples=16, batch_size=8))
    for p, q in zip(a64.layers, a32.layers):
        np.testing.assert_array_equal(p.eigenvalues, q.eigenvalues)
    assert np.load(tmp_path / "x64.npy").dtype == np.float64  # the input is not modified


def test_only_floating_model_inputs_are_cast():
    from specprune.data import _as_model_dtype

    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    batch = {"input": torch.randn(3, 4), "labels": torch.randn(3, 2)}
    out = _as_model_dtype(model, batch)
    assert out["input"].dtype == torch.bfloat16 and out["labels"].dtype == torch.float32
    assert batch["input"].dtype == torch.float32  # a copy, the batch itself is unchanged
    ids = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.randn(2, 3, dtype=torch.float64)}
    out = _as_model_dtype(torch.nn.Linear(3, 3), ids)
    assert out["input_ids"].dtype == torch.long and out["pixel_values"].dtype == torch.float32
    same = {"input": torch.randn(2, 4)}
    assert _as_model_dtype(torch.nn.Linear(4, 2), same) is same
    cplx = {"input": torch.randn(2, 4, dtype=torch.complex64)}
    assert _as_model_dtype(torch.nn.Linear(4, 2), cplx)["input"].dtype == torch.complex64


def test_a_mask_of_another_shape_than_the_ids_is_refused():
    from specprune.data import from_iterable

    ok = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert from_iterable([ok]).samples == 1
    bad = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 5\), its input_ids \(1, 3\)"):
        from_iterable([ok, bad])


def test_api_arguments_of_the_wrong_type_are_one_line_errors(tmp_path):
    from specprune.analysis import analyze
    from specprune.compress.saved import load

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(InputError, match=r"--seed must be an integer, got '0'"):
        analyze(model, [torch.randn(8, 4)], seed="0")
    for bad in (None, 3, True):
        with pytest.raises(InputError, match="load takes the path of a compressed directory"):
            load(bad)


def test_analysis_repr_is_one_short_line():
    from specprune.analysis import analyze

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    res = analyze(model, [torch.randn(64, 16)], source="mlp")
    text = repr(res)
    assert "\n" not in text and len(text) < 200
    assert text.startswith("Analysis('mlp': 2 layers in 2 input groups, 64 tokens")
    assert "array" not in repr(next(iter(res.groups.values())))


def test_the_undersampled_hint_names_only_options_that_add_tokens():
    from specprune.analysis import analyze, undersampled_note

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    note = undersampled_note(analyze(model, [torch.randn(40, 32)]))  # tensor data: no windows of tokens
    assert note is not None and note.endswith("calibrate on more tokens (--samples)")
