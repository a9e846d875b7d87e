"""Known failures say what is wrong and what to do, on one line with exit 1, instead of a raw
framework exception: windows longer than the model's position embeddings, lm-loss on a model
without next-token logits, tensor data of the wrong shape, a --metric callable that cannot be
called or returns something else than (sum, count), an unimportable --metric, empty --eval-data,
text and tensor files mixed, and a --reference of another architecture.

``evaluate COMPRESSED_DIR`` without ``--reference`` measures against the source model recorded in
its specprune.json (absolute, or relative to the directory) and says so; when that source cannot
be used, the output says that no reference was measured instead of showing a made-up zero delta.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, tree_hash
from torch import nn
from typer.testing import CliRunner

from specprune.cli.app import app
from specprune.errors import InputError

FAST = ["--samples", "8", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def fails(*args, inputs=(), must_not_exist=()) -> str:
    """Exit 1, one error line, inputs unchanged, no output: returns the message."""
    before = {str(p): tree_hash(Path(p)) for p in inputs}
    res = run(*args, "--quiet")
    assert res.exit_code == 1, f"exit {res.exit_code}\nstderr: {res.stderr}\nstdout: {res.stdout}"
    assert res.stdout == ""
    for p in inputs:
        assert tree_hash(Path(p)) == before[str(p)], f"input {p} changed"
    for p in must_not_exist:
        assert not Path(p).exists(), f"{p} was written"
    return one_error_line(res.stderr)


@pytest.fixture(scope="module")
def models(tiny_dirs) -> dict[str, Path]:
    from specprune.models import load_model

    load_model(tiny_dirs["llama"])  # first load: import chatter goes to pytest, not a test
    return tiny_dirs


@pytest.fixture(scope="module")
def text(small_text_file) -> Path:
    return small_text_file


@pytest.fixture(scope="module")
def tensors(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    from specprune.toy import build_cnn

    root = tmp_path_factory.mktemp("tensors")
    save_file(build_cnn().state_dict(), str(root / "cnn.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({"input": torch.randn(16, 3, 8, 8, generator=g)}, str(root / "images.safetensors"))
    save_file({"input": torch.randn(16, 12, generator=g)}, str(root / "flat.safetensors"))
    (root / "empty.txt").write_text("")
    return {"cnn": root / "cnn.safetensors", "images": root / "images.safetensors",
            "flat": root / "flat.safetensors", "empty": root / "empty.txt"}


# ------------------------------------------------------------------------------------------------
# --seq-len past the model's learned position embeddings


@pytest.mark.parametrize("cmd", ["analyze", "evaluate"])
@pytest.mark.parametrize("kind,field", [("bert", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_seq_len_longer_than_the_position_embeddings(cmd, kind, field, models, text, tmp_path):
    out = tmp_path / "out"
    args = [cmd, models[kind], "--data", text, "--seq-len", "300", "--samples", "2", "--batch-size", "2"]
    msg = fails(*args, *(["--out", out] if cmd == "analyze" else []), inputs=[models[kind], text],
                must_not_exist=[out])
    assert msg == (f"windows of 300 tokens are longer than the model accepts (256 positions, {field} in its "
                   "config): pass --seq-len 256 or less")


def test_seq_len_at_the_limit_and_rotary_models_run(models, text):
    """The control: 256 tokens fit BERT; a rotary model (Llama) is not limited by the field."""
    res = run("evaluate", models["bert"], "--reference", models["bert"], "--data", text, "--seq-len", "256",
              "--samples", "2", "--batch-size", "2", "--quiet")
    assert res.exit_code == 0, res.stderr
    # output-mse's two values are different quantities (the reference's energy, the compressed error)
    assert "reference output energy (mean ‖f(x)‖² per position): " in res.stdout
    assert "output error (mean ‖f̃(x) − f(x)‖² per position): 0\n" in res.stdout
    res = run("evaluate", models["llama"], "--data", text, "--seq-len", "300", "--samples", "2",
              "--batch-size", "2", "--quiet")
    assert res.exit_code == 0, res.stderr


# ------------------------------------------------------------------------------------------------
# --metric lm-loss on a model without next-token logits


def test_lm_loss_on_an_encoder_is_refused(models, text):
    msg = fails("evaluate", models["bert"], "--data", text, "--metric", "lm-loss", *FAST,
                inputs=[models["bert"]])
    assert msg == ("--metric lm-loss needs a causal language model (next-token logits), and BertModel has "
                   "no language-model head: use --metric output-mse with --reference (or task-loss with "
                   "labelled data)")


def test_lm_loss_against_an_encoder_reference_is_refused(models, text):
    msg = fails("evaluate", models["bert"], "--reference", models["gpt2"], "--data", text, *FAST)
    assert msg.startswith("the model (BertModel) has no language-model head, unlike the reference: "
                          "lm-loss cannot compare them")


# ------------------------------------------------------------------------------------------------
# tensor data that does not fit the model


def test_flat_tensors_for_a_cnn(tensors, tmp_path):
    out = tmp_path / "out"
    msg = fails("analyze", tensors["cnn"], "--arch", "specprune.toy:build_cnn", "--data", tensors["flat"],
                "--out", out, inputs=[tensors["cnn"], tensors["flat"]], must_not_exist=[out])
    assert msg.startswith(f"the data in {tensors['flat']} (a batch of shape (8, 12)) does not fit the model: "
                          "IndexError: Dimension out of range"), msg


@pytest.mark.parametrize("cmd", ["analyze", "evaluate"])
def test_image_tensors_for_bert(cmd, models, tensors, tmp_path):
    out = tmp_path / "out"
    msg = fails(cmd, models["bert"], "--data", tensors["images"],
                *(["--out", out] if cmd == "analyze" else []), inputs=[models["bert"], tensors["images"]],
                must_not_exist=[out])
    assert msg.startswith(f"the data in {tensors['images']} (a batch of shape ("), msg
    assert "does not fit the model: ValueError: too many values to unpack" in msg


# ------------------------------------------------------------------------------------------------
# --metric module:callable


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "specprune_test_metrics.py").write_text(textwrap.dedent("""
        import torch

        def tensor_metric(model, batch, device):
            return torch.zeros(2, 3)

        def scalar_metric(model, batch, device):
            return 1.5

        def text_metric(model, batch, device):
            return ("a", "b")

        def two_args(model, batch):
            return 1.0, 1

        def good(model, batch, device):
            return torch.tensor(2.0), 4
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("specprune_test_metrics", None)
    yield "specprune_test_metrics"
    sys.modules.pop("specprune_test_metrics", None)


def test_metric_that_takes_other_arguments(models, text):
    msg = fails("evaluate", models["llama"], "--data", text, "--metric", "os:getcwd", *FAST)
    assert msg.startswith("--metric os:getcwd must take (model, batch, device) and return (sum, count); "
                          "it cannot be called that way"), msg


@pytest.mark.parametrize("fn,got", [("tensor_metric", "a tensor of shape (2, 3)"), ("scalar_metric", "1.5"),
                                    ("text_metric", "('a', 'b')")])
def test_metric_returning_something_else(fn, got, models, text, metric_module):
    msg = fails("evaluate", models["llama"], "--data", text, "--metric", f"{metric_module}:{fn}", *FAST)
    assert msg == (f"--metric {metric_module}:{fn} must return (sum, count): two numbers, the count a whole "
                   f"number ≥ 0; it returned {got}")


def test_metric_with_two_arguments(models, text, metric_module):
    msg = fails("evaluate", models["llama"], "--data", text, "--metric", f"{metric_module}:two_args", *FAST)
    assert msg.startswith(f"--metric {metric_module}:two_args must take (model, batch, device)")


def test_good_metric_returning_tensors(models, text, metric_module):
    res = run("evaluate", models["llama"], "--reference", models["llama"], "--data", text, "--metric",
              f"{metric_module}:good", *FAST, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["metric"] == f"{metric_module}:good" and doc["value"] == 0.5 and doc["measured_delta"] == 0.0


@pytest.mark.parametrize("spec,expect", [
    ("specprune_no_such_module:fn",
     "cannot import 'specprune_no_such_module' for --metric: No module named 'specprune_no_such_module'"),
    ("os:no_such_fn", "'os' has no attribute 'no_such_fn' (from --metric os:no_such_fn)"),
    ("os:sep", "--metric os:sep is not callable"),
])
def test_metric_that_cannot_be_imported_names_metric_not_arch(spec, expect, models, text):
    msg = fails("evaluate", models["llama"], "--data", text, "--metric", spec, *FAST)
    assert msg == expect and "--arch" not in msg


# ------------------------------------------------------------------------------------------------
# data options


@pytest.mark.parametrize("cmd", ["evaluate", "compress"])
def test_empty_eval_data_says_evaluation(cmd, models, text, tensors, tmp_path):
    out = tmp_path / "out"
    args = [cmd, models["llama"], "--data", text, "--eval-data", tensors["empty"], *FAST]
    if cmd == "compress":
        args += ["--tolerance", "0.05", "--out", out, "--include", "q_proj"]
    msg = fails(*args, inputs=[models["llama"], text], must_not_exist=[out])
    assert msg == "the evaluation text (--eval-data) is empty"


def test_empty_calibration_text_still_says_calibration(models, tensors):
    msg = fails("evaluate", models["llama"], "--data", tensors["empty"], *FAST)
    assert msg == "the calibration text is empty"


@pytest.mark.parametrize("order", ["text-first", "tensor-first"])
@pytest.mark.parametrize("cmd", ["analyze", "evaluate"])
def test_text_and_tensor_files_mixed(cmd, order, models, text, tensors, tmp_path):
    pair = [text, tensors["images"]] if order == "text-first" else [tensors["images"], text]
    out = tmp_path / "out"
    msg = fails(cmd, models["llama"], "--data", pair[0], "--data", pair[1], *FAST,
                *(["--out", out] if cmd == "analyze" else []), must_not_exist=[out])
    assert msg == (f"text and tensor data cannot be mixed ({text}, {tensors['images']}): give either text "
                   "files (.txt/.jsonl) or tensor files (.pt/.safetensors/.npy), not both")


def test_text_directory_next_to_tensor_files(models, text, tensors, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copyfile(text, corpus / "a.txt")
    msg = fails("analyze", tensors["cnn"], "--arch", "specprune.toy:build_cnn", "--data", tensors["images"],
                "--data", corpus, "--out", tmp_path / "out")
    assert msg.startswith("text and tensor data cannot be mixed"), msg


# ------------------------------------------------------------------------------------------------
# --reference of another architecture


def test_reference_with_other_output_shape(models, text):
    msg = fails("evaluate", models["gpt2"], "--reference", models["bert"], "--data", text, *FAST)
    assert msg == ("the outputs of the model and the reference do not have the same shape (512 values per "
                   "position against the reference's 64): compare a compressed model with the model it was "
                   "made from (the same architecture)")


# ------------------------------------------------------------------------------------------------
# evaluate COMPRESSED_DIR without --reference: the recorded source is the reference


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, models) -> Path:
    out = tmp_path_factory.mktemp("comp") / "int2"
    res = run("quantize", models["llama"], "--bits", "2", "--out", out, "--quiet")
    assert res.exit_code == 0, res.stderr
    return out


def evaluate_json(*args) -> dict:
    res = run("evaluate", *args, *FAST, "--format", "json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_compressed_dir_is_measured_against_its_recorded_source(compressed, models, text):
    before = tree_hash(compressed)
    auto = evaluate_json(compressed, "--data", text)
    explicit = evaluate_json(compressed, "--reference", models["llama"], "--data", text)
    assert auto["measured_delta"] != 0.0 and auto["reference_value"] != auto["value"]
    for key in ("metric", "reference_value", "value", "measured_delta", "predicted_delta", "plan", "size"):
        assert auto[key] == explicit[key], key
    assert auto["reference"] == str(models["llama"]) and auto["reference_source"] == "specprune.json"
    assert auto["reference_note"] is None and auto["prediction_note"] is None  # keys kept, null
    assert explicit["reference"] == str(models["llama"]) and explicit["reference_source"] is None
    assert tree_hash(compressed) == before


def test_recorded_source_is_named_in_the_human_output(compressed, models, text):
    res = run("evaluate", compressed, "--data", text, *FAST, "--quiet")
    assert res.exit_code == 0, res.stderr
    assert f"reference model: {models['llama']} (the source recorded in specprune.json)" in res.stdout
    assert "not measured" not in res.stdout and "note:" not in res.stdout


def _copy_with_source(compressed: Path, dest: Path, source: str) -> Path:
    shutil.copytree(compressed, dest)
    spec = json.loads((dest / "specprune.json").read_text())
    spec["source"]["path"] = source
    (dest / "specprune.json").write_text(json.dumps(spec))
    return dest


def test_recorded_source_relative_to_the_directory(compressed, models, text, tmp_path):
    shutil.copytree(models["llama"], tmp_path / "models" / "llama")
    comp = _copy_with_source(compressed, tmp_path / "models" / "int2", "../llama")
    doc = evaluate_json(comp, "--data", text)
    assert doc["reference"] == str(tmp_path / "models" / "llama")
    assert doc["measured_delta"] != 0.0


def test_recorded_source_not_found(compressed, text, tmp_path):
    comp = _copy_with_source(compressed, tmp_path / "int2", str(tmp_path / "gone"))
    doc = evaluate_json(comp, "--data", text)
    assert doc["reference"] is None
    assert doc["reference_note"].startswith(
        f"the source model recorded in {comp / 'specprune.json'} ({tmp_path / 'gone'}) is not found; "
        "no reference model was measured")
    assert doc["reference_value"] == doc["value"] and doc["measured_delta"] == 0.0  # kept, but marked
    res = run("evaluate", comp, "--data", text, *FAST, "--quiet")
    assert res.exit_code == 0, res.stderr
    assert "measured delta: not measured (no reference model)" in res.stdout
    assert "note: the source model recorded in" in res.stdout


def test_recorded_source_with_other_weights_is_not_used(compressed, models, text, tmp_path):
    comp = _copy_with_source(compressed, tmp_path / "int2", str(models["gpt2"]))
    doc = evaluate_json(comp, "--data", text)
    assert doc["reference"] is None and "fingerprints differ" in doc["reference_note"]


def test_plain_model_without_reference_says_no_reference(models, text):
    doc = evaluate_json(models["llama"], "--data", text)
    assert doc["reference"] is None and doc["measured_delta"] == 0.0
    assert "no reference model was measured" in doc["reference_note"]


# ------------------------------------------------------------------------------------------------
# the same errors from the Python API (only the first batch of a layout is reworded, so a later
# failure keeps its own error)


@pytest.fixture(scope="module")
def bert_module():
    from specprune.toy import tiny_model

    return tiny_model("bert", vocab_size=128)


def test_position_limit_only_for_learned_positions(bert_module):
    from specprune.data import position_limit
    from specprune.toy import tiny_model

    assert position_limit(bert_module) == (256, "max_position_embeddings")
    assert position_limit(tiny_model("gpt2", vocab_size=128)) == (256, "n_positions")
    assert position_limit(tiny_model("llama", vocab_size=128)) is None  # rotary
    assert position_limit(nn.Linear(2, 2)) is None


def test_forward_refuses_windows_past_the_position_embeddings(bert_module):
    from specprune.data import forward

    ids = torch.randint(0, 128, (1, 300))
    with pytest.raises(InputError, match=r"^windows of 300 tokens are longer than the model accepts \(256 "
                       r"positions, max_position_embeddings in its config\): pass --seq-len 256"):
        forward(bert_module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_forward_reports_data_that_does_not_fit():
    from specprune.data import forward
    from specprune.toy import build_cnn

    with pytest.raises(InputError, match=r"^the data \(a batch of shape \(2, 12\)\) does not fit the model: "
                                         r"RuntimeError: Expected 3D \(unbatched\) or 4D"):
        forward(build_cnn(), {"input": torch.randn(2, 12)})


def test_forward_names_the_file_the_data_came_from(tmp_path):
    from safetensors.torch import save_file

    from specprune.data import forward, load_data
    from specprune.toy import build_cnn

    save_file({"input": torch.randn(6, 12)}, str(tmp_path / "flat.safetensors"))
    batches = load_data([tmp_path / "flat.safetensors"], samples=4, batch_size=2)
    with pytest.raises(InputError, match=r"^the data in .*flat\.safetensors \(a batch of shape \(2, 12\)\) "):
        forward(build_cnn(), batches.batches[0])


class FailsLater(nn.Module):
    """Runs once, then fails like a bug would (not a data problem)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("a bug in the second call")
        return self.lin(x)


def test_only_the_first_batch_of_a_layout_is_reworded():
    from specprune.data import forward

    model = FailsLater()
    forward(model, {"input": torch.randn(3, 4)})
    with pytest.raises(RuntimeError, match="a bug in the second call"):
        forward(model, {"input": torch.randn(3, 4)})


def test_lm_loss_on_an_encoder_from_the_api(bert_module):
    import specprune

    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(InputError, match=r"^--metric lm-loss needs a causal language model .* BertModel"):
        specprune.evaluate(bert_module, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                           metric="lm-loss")


@pytest.mark.parametrize("seed,expect", [(-1, "--seed must be ≥ 0, got -1"),
                                         (2 ** 64, f"--seed must be below 2**64, got {2 ** 64}"),
                                         (1.5, "--seed must be an integer, got 1.5")])
def test_check_seed(seed, expect):
    from specprune.data import check_seed

    with pytest.raises(InputError) as err:
        check_seed(seed)
    assert str(err.value) == expect
    check_seed(0)
    check_seed(2 ** 64 - 1)


def test_load_data_refuses_a_negative_seed_and_mixed_files(tmp_path):
    from safetensors.torch import save_file

    from specprune.data import load_data

    (tmp_path / "a.txt").write_text("some text\n")
    save_file({"input": torch.randn(4, 3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InputError, match=r"^--seed must be ≥ 0, got -3$"):
        load_data([tmp_path / "x.safetensors"], seed=-3)
    with pytest.raises(InputError, match=r"^text and tensor data cannot be mixed"):
        load_data([tmp_path / "a.txt", tmp_path / "x.safetensors"])


class TinyLM(nn.Module):
    """A causal LM that is not a Hugging Face model: judged by its output."""

    def __init__(self, vocab: int = 128, width: int = 8, out: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, out or vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


def test_lm_loss_on_a_plain_module_is_judged_by_its_output():
    import specprune

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    ev = specprune.evaluate(TinyLM(), batches, reference=TinyLM(), metric="lm-loss")
    assert ev.metric == "lm-loss" and ev.measured_delta == 0.0 and ev.reference_value > 0
    with pytest.raises(InputError, match=r"^the lm-loss metric needs next-token logits over the vocabulary, "
                                         r"and the model's output has shape \(2, 16, 8\)"):
        specprune.evaluate(TinyLM(out=8), batches, metric="lm-loss")


def test_lm_loss_on_a_classifier_is_refused():
    import transformers as tf

    import specprune
    from specprune.toy import tiny_config

    model = tf.BertForSequenceClassification(tiny_config("bert", vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(InputError, match=r"BertForSequenceClassification has no language-model head"):
        specprune.evaluate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                           metric="lm-loss")
