"""Encoder-decoder Hugging Face directories (T5) from the command line: text data gets decoder inputs made by
the model's own right shift, output-mse and task-loss are measured, lm-loss is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, cli_run, one_error_line, tree_hash


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    d = tmp_path_factory.mktemp("t5") / "t5"
    tf.T5ForConditionalGeneration(cfg).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def test_analyze_and_compress_a_t5_directory_on_text(t5_dir, small_text_file, tmp_path):
    before = tree_hash(t5_dir)
    code, stdout, stderr = cli_run("analyze", t5_dir, "--data", small_text_file, *FAST, "--out", tmp_path / "a",
                                   "--format", "json")
    assert code == 0, stderr
    layers = {lay["name"]: lay["tokens"] for lay in json.loads(stdout)["layers"]}
    assert "decoder.block.1.layer.0.SelfAttention.q" in layers and "encoder.block.0.layer.1.DenseReluDense.wi" in layers
    assert set(layers.values()) == {8 * 32}  # the decoder reads windows as long as the encoder's
    code, stdout, stderr = cli_run("compress", t5_dir, "--data", small_text_file, *FAST, "--tolerance", "0.05",
                                   "--out", tmp_path / "c", "--format", "json")
    assert code in (0, 3), stderr
    doc = json.loads(stdout)
    assert doc["metric"] == "output-mse" and doc["measured_delta"] > 0 and doc["reference_value"] > 0
    assert tree_hash(t5_dir) == before
    code, _, stderr = cli_run("evaluate", tmp_path / "c", "--reference", t5_dir, "--data", small_text_file, *FAST,
                              "--metric", "lm-loss")
    assert code == 1
    assert one_error_line(stderr).startswith("--metric lm-loss is the next-token loss of a causal language model, "
                                             "and T5ForConditionalGeneration is an encoder-decoder model")


def test_task_loss_of_a_t5_directory_on_labelled_tensors(t5_dir, tmp_path):
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, 100, (8, 12), generator=g), torch.randint(3, 100, (8, 6), generator=g)
    data = tmp_path / "pairs.pt"
    torch.save({"input": ids, "labels": labels}, str(data))
    code, stdout, stderr = cli_run("evaluate", t5_dir, "--data", data, "--batch-size", "8", "--format", "json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    from specprune.data import split_indices

    rows = torch.as_tensor(sorted(split_indices(8, 0)[1]))  # --data of evaluate: the held-apart windows
    model = tf.T5ForConditionalGeneration.from_pretrained(str(t5_dir)).eval()
    with torch.no_grad():
        want = float(model(input_ids=ids[rows], labels=labels[rows]).loss)
    assert doc["metric"] == "task-loss" and doc["reference_value"] == pytest.approx(want, rel=1e-5)
