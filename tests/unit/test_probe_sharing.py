"""Shared input accumulators (:mod:`specprune.probe`): sharing is an optimisation that never changes a layer's
spectrum. Layers reused on other tensors after sharing one get their own Grams (QA11 defect 3), q/k/v and
gate/up still share one, convolutions with other patches never share, and the attention mask fits seq-first
inputs (QA11 defect 9)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from specprune.analysis import analyze
from specprune.data import Batches
from specprune.layers import select_layers
from specprune.probe import MAX_PENDING, AmbiguousMaskWarning, SpectrumProbe, discover_input_groups
from specprune.toy import tiny_model


def _cov_eigs(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    return np.sort(np.linalg.eigvalsh((x.T @ x / len(x)).numpy()))[::-1]


def _assert_spectrum(layer, rows: torch.Tensor) -> None:
    """The layer's token count and eigenvalues are those of ``rows`` (float32 batch Grams: to ~1e-7)."""
    assert layer.tokens == len(rows), layer.name
    want = _cov_eigs(rows)
    np.testing.assert_allclose(layer.eigenvalues, want, rtol=1e-5, atol=1e-6 * want[0], err_msg=layer.name)


class _Calls(nn.Module):
    """Two Linears a, b on 16 features, called in the order ``pattern`` names ("x": the input, "h": a
    tensor made from it that only the named layers read)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.pattern = pattern.split()

    def forward(self, x):
        h = x * 10 + 1
        for step in self.pattern:
            layer, arg = step.split(":")
            getattr(self, layer)(x if arg == "x" else h)
        return x


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("pattern", ["b:x a:x b:h", "a:x b:x b:h"])
def test_a_layer_reused_after_sharing_keeps_its_partner_clean(pattern):
    """b shares x with a, then reads h that a never sees: a's covariance is x's alone and b's holds both
    (before: with b first a's Gram silently held h too; with a first analyze refused the model)."""
    model = _Calls(pattern).eval()
    data = _data()
    res = analyze(model, data)
    by = {lay.name: lay for lay in res.layers}
    x = torch.cat(data)
    _assert_spectrum(by["a"], x)
    _assert_spectrum(by["b"], torch.cat([x, x * 10 + 1]))
    assert by["a"].input_group == "a" and by["b"].input_group == "b"
    # the trial forward that sizes the memory plan finds the same groups
    layers = select_layers(model)
    assert discover_input_groups(model, layers, {"input": data[0]}) == {"a": "a", "b": "b"}


def test_layers_reading_the_same_tensors_in_any_order_still_share():
    """b(x), a(x), b(h), a(h): both read exactly x and h, so one accumulator serves both."""
    model = _Calls("b:x a:x b:h a:h").eval()
    data = _data()
    res = analyze(model, data)
    x = torch.cat(data)
    for lay in res.layers:
        _assert_spectrum(lay, torch.cat([x, x * 10 + 1]))
    assert len(res.groups) == 1 and sorted(res.groups["b"].layers) == ["a", "b"]


def test_a_partner_far_behind_splits_the_group_early_and_exactly():
    """More than MAX_PENDING tensors waiting for a partner: the group splits mid-forward (bounded memory),
    and both spectra are still exact (no tensor counted twice, none lost)."""
    n = MAX_PENDING + 3

    class Lagging(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            hs = [x] + [x * (i + 2) + i for i in range(n)]
            self.a(x)
            self.b(x)  # b joins a on x
            for h in hs:
                self.a(h)  # x again, then tensors b has not read yet
            for h in hs:
                self.b(h)
            return x

    model = Lagging().eval()
    data = _data(2)
    res = analyze(model, data)
    x = torch.cat(data)
    rows = torch.cat([x] + [x * (i + 2) + i for i in range(n)])
    for lay in res.layers:
        _assert_spectrum(lay, rows)
    assert [lay.input_group for lay in res.layers] == ["a", "b"]


def test_reused_block_counts_every_call_and_shares():
    """A block called twice per forward on different tensors (ALBERT-style weight sharing): its q/k/v read
    one tensor per call, stay one accumulator, and count the tokens of both calls."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            return torch.tanh(self.q(x) + self.k(x) * self.v(x))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(self.block(x) + x)

    model = Shared().eval()
    data = _data()
    res = analyze(model, data)
    with torch.no_grad():
        rows = torch.cat([torch.cat([x, model.block(x) + x]) for x in data])
    assert len(res.groups) == 1 and sorted(res.groups["block.q"].layers) == ["block.k", "block.q", "block.v"]
    for lay in res.layers:
        _assert_spectrum(lay, rows)


def _token_batches(vocab: int, n: int = 8, seq: int = 16, bs: int = 4) -> Batches:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, 11:] = 0  # some padding, so the mask applies
    mask[6, 5:] = 0
    return Batches([{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]} for i in range(0, n, bs)],
                   n, seq, 3)


@pytest.mark.parametrize("kind, sharing", [
    ("bert", [("attention.self.query", "attention.self.key", "attention.self.value")]),
    ("llama", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]),
])
def test_hf_qkv_still_share_one_accumulator_with_unchanged_spectra(kind, sharing):
    """q/k/v (and Llama's gate/up) read one hidden state once per forward: one accumulator per block, as
    found by the trial forward too, whose spectrum is exactly the one the first layer has analysed alone."""
    model = tiny_model(kind, vocab_size=64)
    batches = _token_batches(64)
    res = analyze(model, batches)
    layers = select_layers(model)
    found = discover_input_groups(model, layers, batches.batches[0])
    for lay in res.layers:
        assert found[lay.name] == lay.input_group
    first = sharing[0][0]
    blocks = [lay.name[: -len(first) - 1] for lay in res.layers if lay.name.endswith("." + first)]
    assert len(blocks) == 2
    by = {lay.name: lay for lay in res.layers}
    for block in blocks:
        for names in sharing:
            full = [f"{block}.{n}" for n in names]
            assert {by[n].input_group for n in full} == {full[0]}
            assert sorted(res.groups[full[0]].layers) == sorted(full)
            alone = analyze(model, batches, include=[full[0]]).layers[0]  # its own accumulator
            for n in full:
                assert by[n].tokens == alone.tokens == int(sum(b["attention_mask"].sum() for b in batches.batches))
                np.testing.assert_array_equal(by[n].eigenvalues, alone.eigenvalues)
    assert len(res.groups) == len(res.layers) - 2 * sum(len(names) - 1 for names in sharing)


def test_convolutions_with_other_patches_never_share():
    """A ResNet block's 3×3 conv and its 1×1 downsample read one tensor but see different patches: two
    accumulators of their own widths (before: one 36-wide Gram for both, and analyze crashed)."""

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
            self.down = nn.Conv2d(4, 8, 1, stride=2)
            self.down2 = nn.Conv2d(4, 8, 1, stride=2, bias=False)  # the same patches as down: shares

        def forward(self, x):
            return self.conv1(x) + self.down(x) + self.down2(x)

    model = Down().eval()
    data = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = analyze(model, data)
    by = {lay.name: lay for lay in res.layers}
    assert by["conv1"].input_group == "conv1" and by["conv1"].d_in == 36 and len(by["conv1"].eigenvalues) == 36
    assert by["down"].input_group == by["down2"].input_group == "down" and by["down"].d_in == 4
    x = torch.cat(data)
    _assert_spectrum(by["down"], x[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 4))


def test_a_split_under_no_grad_outside_inference_mode():
    """The probe used directly under ``no_grad`` (not inference mode): a split at the end of the batch copies
    and adds in the mode the Grams were made in."""
    model = _Calls("b:x a:x b:h").eval()
    layers = select_layers(model)
    data = _data(2)
    with torch.no_grad(), SpectrumProbe(model, layers) as probe:
        for x in data:
            probe.set_batch({"input": x})
            model(x)
    accs = probe.results()
    assert probe.layer_acc == {"a": "a", "b": "b"} and accs["a"].tokens == 16 and accs["b"].tokens == 32
    x = torch.cat(data).double()
    torch.testing.assert_close(accs["a"].gram, x.T @ x, rtol=1e-5, atol=1e-4)


class _SeqFirst(nn.Module):
    """Token ids → (seq, batch, d) hidden states, as PyTorch code with ``batch_first=False`` passes them."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(50, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids).transpose(0, 1)).transpose(0, 1)


def _padded(batch: int, seq: int) -> dict:
    ids = torch.randint(1, 50, (batch, seq), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, 3:] = 0
    mask[0, 3:5] = 1
    ids[~mask.bool()] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_seq_first_inputs_get_the_transposed_mask():
    """(seq, batch, d) inputs with batch ≠ seq: the mask applies transposed (before: padding included)."""
    torch.manual_seed(0)
    model = _SeqFirst().eval()
    batch = _padded(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousMaskWarning)
        res = analyze(model, [batch])
    with torch.no_grad():
        rows = model.emb(batch["input_ids"])[batch["attention_mask"].bool()]
    _assert_spectrum(res.layers[0], rows)


def test_square_inputs_of_a_model_that_may_be_seq_first_are_flagged():
    """batch == seq cannot be told apart: read batch-first, with one warning naming the layer."""
    torch.manual_seed(0)
    model = _SeqFirst().eval()
    layers = select_layers(model)
    probe = SpectrumProbe(model, layers)

    def run():
        with torch.inference_mode(), probe:
            for _ in range(2):
                batch = _padded(6, 6)
                probe.set_batch(batch)
                model(**batch)

    with pytest.warns(AmbiguousMaskWarning, match=r"1 layer\(s\) \(e\.g\. lin\).*6×6"):
        run()
    assert probe.mask_ambiguous == ["lin"]
    assert probe.results()["lin"].tokens == 2 * int(_padded(6, 6)["attention_mask"].sum())


def test_square_batches_of_a_hf_model_are_not_flagged():
    """Hugging Face models are batch-first: a batch as long as its windows raises no warning."""
    model = tiny_model("bert", vocab_size=64)
    batch = {"input_ids": torch.randint(3, 64, (8, 8), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(8, 8, dtype=torch.long)}
    batch["attention_mask"][2, 5:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousMaskWarning)
        res = analyze(model, [batch])
    assert all(lay.tokens == (8 if lay.name == "pooler.dense" else 61) for lay in res.layers)
