"""How a batch reaches the model (specprune.data.forward): dict keys as keyword arguments, labels for the
task-loss metric only, the dtype cast on every path, and decoder inputs for encoder-decoder models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import specprune
from specprune.data import count_tokens, forward
from specprune.errors import InputError


class TwoIn(nn.Module):
    """A model of two named inputs: ``forward(x, y)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(6, 16)
        self.o = nn.Linear(16, 4)

    def forward(self, x, y):
        return self.o(torch.relu(self.a(x) + self.b(y)))


class Recorder(nn.Module):
    """Records the keyword arguments it was called with (``**kwargs`` takes every key)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen: list[set] = []

    def forward(self, input_ids=None, **kwargs):
        self.seen.append(set(kwargs) | ({"input_ids"} if input_ids is not None else set()))
        return self.lin(kwargs["feats"])


def _two_in_batches(n=3, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(bs, 12, generator=g), "y": torch.randn(bs, 6, generator=g)} for _ in range(n)]


def test_dict_keys_reach_a_forward_of_named_inputs():
    model = TwoIn().eval()
    data = _two_in_batches()
    a = specprune.analyze(model, data)
    assert {lay.name: lay.tokens for lay in a.layers} == {"a": 24, "b": 24, "o": 24}
    b0 = data[0]
    assert torch.equal(forward(model, b0), model(b0["x"], b0["y"]))
    assert count_tokens(b0) == 8  # one per sample, not 0 for keys outside a fixed list
    assert specprune.evaluate(model, data, reference=model).measured_delta == 0.0


def test_a_key_the_forward_cannot_take_is_refused_by_name():
    data = [{**b, "z": torch.zeros(8, 2)} for b in _two_in_batches()]
    with pytest.raises(InputError, match=r"^the data has the batch key 'z', which TwoIn.forward does not "
                                         r"take \(its parameters are x, y\)"):
        specprune.analyze(TwoIn().eval(), data)
    # text read from a file, for a model that takes no token ids: one line naming the file and the keys
    from specprune.data import _label, from_iterable

    ids = torch.ones(2, 4, dtype=torch.long)
    batches = from_iterable([{"input_ids": ids, "attention_mask": ids}])
    batches.sources = ["text.txt"]
    with pytest.raises(InputError, match=r"^the data in text.txt has the batch key 'input_ids', which "
                                         r"TwoIn.forward does not take \(its parameters are x, y\)"):
        forward(TwoIn(), _label(batches).batches[0])


def test_a_forward_with_kwargs_gets_every_key_but_the_labels():
    from specprune.data import model_arguments

    model = Recorder().eval()
    batch = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "feats": torch.randn(2, 4),
             "extra": torch.ones(2), "labels": torch.zeros(2, dtype=torch.long)}
    forward(model, batch)
    assert model.seen[-1] == {"input_ids", "feats", "extra"}
    args, kwargs = model_arguments(model, batch, labels=True)  # no `labels` parameter: not given
    assert args == () and "labels" not in kwargs


def test_the_attention_mask_is_given_when_taken_and_otherwise_only_masks():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(x)

    class Masked(Seq):
        def forward(self, x, attention_mask):
            self.mask = attention_mask
            return self.lin(x)

    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    a = specprune.analyze(Seq().eval(), [{"input": x, "attention_mask": mask}])
    assert a.layers[0].tokens == 8  # padding never enters the covariance
    m = Masked().eval()
    forward(m, {"input": x, "attention_mask": mask})
    assert m.mask is mask


def test_hf_inputs_embeds_reach_the_model():
    from specprune.toy import tiny_model

    model = tiny_model("llama", vocab_size=64, hidden=32)
    emb = torch.randn(2, 7, 32)
    a = specprune.analyze(model, [{"inputs_embeds": emb}])
    assert {lay.tokens for lay in a.layers} == {14}
    assert count_tokens({"inputs_embeds": emb}) == 14


def _vit():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=5)
    return tf.ViTForImageClassification(cfg).eval()


def test_task_loss_feeds_pixel_values_and_uses_the_models_own_loss():
    model = _vit()
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 5, (4,), generator=g)}
            for _ in range(3)]
    ev = specprune.evaluate(model, data)
    assert ev.metric == "task-loss"
    with torch.no_grad():
        want = sum(float(model(**b).loss) * 4 for b in data) / 12
    assert ev.reference_value == pytest.approx(want, rel=1e-5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.mul_(1.5)
    assert specprune.evaluate(other, data, reference=model).measured_delta != 0.0
    bad = [{"pixel_values": torch.randn(4, 3, 8, 8), "labels": torch.randint(0, 5, (4,))}]
    with pytest.raises(InputError, match=r"^the data .*does not fit the model: ValueError"):
        specprune.evaluate(_vit(), bad)


def test_task_loss_casts_float_inputs_to_a_bfloat16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16).eval()
    xs = [torch.randn(16, 8) for _ in range(3)]
    ys = [torch.randint(0, 3, (16,)) for _ in range(3)]
    ev = specprune.evaluate(model, list(zip(xs, ys)))
    with torch.no_grad():
        want = sum(float(nn.functional.cross_entropy(model(x.bfloat16()).float(), y, reduction="sum"))
                   for x, y in zip(xs, ys)) / 48
    assert ev.metric == "task-loss" and ev.reference_value == pytest.approx(want, rel=1e-6)
    # named inputs are cast too
    two = TwoIn().to(torch.bfloat16).eval()
    out = forward(two, _two_in_batches()[0])
    assert out.dtype == torch.bfloat16


def _t5(**kw):
    import transformers as tf

    torch.manual_seed(0)
    cfg = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
           "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    cfg.update(kw)
    return tf.T5ForConditionalGeneration(tf.T5Config(**cfg)).eval()


def _ids(bs=2, seq=9, seed=0):
    return torch.randint(2, 64, (bs, seq), generator=torch.Generator().manual_seed(seed))


def test_t5_gets_decoder_inputs_from_the_models_own_shift():
    model = _t5()
    ids = _ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=model._shift_right(ids)).logits
        got = forward(model, batch).logits
    torch.testing.assert_close(got, want)
    assert set(batch) == {"input_ids", "attention_mask"}  # the batch itself is not modified
    a = specprune.analyze(model, [batch])
    assert {lay.tokens for lay in a.layers} == {18}
    ev = specprune.evaluate(model, [batch], reference=model)
    assert ev.metric == "output-mse" and ev.measured_delta == 0.0
    with pytest.raises(InputError, match=r"^--metric lm-loss is the next-token loss of a causal language model, "
                                         r"and T5ForConditionalGeneration is an encoder-decoder model"):
        specprune.evaluate(model, [batch], metric="lm-loss")


def test_t5_decoder_inputs_given_in_the_batch_are_used():
    model = _t5()
    ids = _ids()
    dec = _ids(seq=4, seed=1)
    a = specprune.analyze(model, [{"input_ids": ids, "decoder_input_ids": dec}])
    tokens = {lay.name: lay.tokens for lay in a.layers}
    assert tokens["encoder.block.0.layer.0.SelfAttention.q"] == 18
    assert tokens["decoder.block.0.layer.0.SelfAttention.q"] == 8  # 2 × 4 decoder positions
    assert tokens["decoder.block.0.layer.1.EncDecAttention.k"] == 18  # reads the encoder's output


def test_t5_task_loss_is_its_own_loss_on_the_labels():
    model = _t5()
    ids, labels = _ids(), _ids(seq=5, seed=2)
    ev = specprune.evaluate(model, [{"input_ids": ids, "labels": labels}])
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=labels).loss)
    assert ev.metric == "task-loss" and ev.reference_value == pytest.approx(want, rel=1e-6)
    # calibration sees the decoder inputs the loss is computed with: the labels shifted right
    a = specprune.analyze(model, [{"input_ids": ids, "labels": labels}])
    assert {lay.name: lay.tokens for lay in a.layers}["decoder.block.0.layer.0.SelfAttention.q"] == 10


def test_t5_without_a_decoder_start_token_is_one_clear_line():
    model = _t5(decoder_start_token_id=None)
    with pytest.raises(InputError, match=r"^cannot make decoder inputs for the encoder-decoder model "
                                         r"T5ForConditionalGeneration .*give decoder_input_ids \(or labels\)"):
        specprune.analyze(model, [{"input_ids": _ids()}])
