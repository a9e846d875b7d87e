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
