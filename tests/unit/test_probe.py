"""SpectrumProbe and analyze() on tiny models: hooks, masks, sharing, precision, outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from specprune.analysis import Analysis, analyze
from specprune.data import Batches, from_iterable
from specprune.errors import InputError
from specprune.layers import select_layers
from specprune.probe import SpectrumProbe, no_hooks_left, run_probe
from specprune.toy import TinyCNN, tiny_model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _token_batches(vocab: int, n: int = 8, seq: int = 16, bs: int = 4, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    batches = [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones(min(bs, n - i), seq, dtype=torch.long)}
               for i in range(0, n, bs)]
    return Batches(batches, n, seq, seed)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_tiny_transformers_analyze_end_to_end(kind, tmp_path):
    model = tiny_model(kind, vocab_size=128)
    batches = _token_batches(128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out_before = model(**batches.batches[0])[0].clone()
    with no_hooks_left(model):
        res = analyze(model, batches, source=kind)
    names = [lay.name for lay in res.layers]
    assert len(names) == len(select_layers(model))
    for lay in res.layers:
        # the BERT pooler reads only the [CLS] position of each window
        assert lay.tokens == (8 if lay.name == "pooler.dense" else 8 * 16)
        assert lay.k_max == lay.d_in
        assert lay.mode_energy.shape == (lay.d_in,)
        assert np.all(np.diff(lay.eigenvalues) <= 1e-12)
    # q/k/v (and gate/up) read one tensor: one accumulator, fewer groups than layers
    if kind != "gpt2":  # GPT-2 fuses q/k/v into one Conv1D
        assert len(res.groups) < len(res.layers)
    with torch.no_grad():
        out_after = model(**batches.batches[0])[0]
    assert torch.equal(out_before, out_after)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.save(tmp_path / "a")
    back = Analysis.load(tmp_path / "a")
    assert back.to_dict()["layers"] == res.to_dict()["layers"]
    for k, g in res.groups.items():
        np.testing.assert_allclose(back.groups[k].eigenvalues, g.eigenvalues)


def test_gpt2_conv1d_is_read_transposed():
    model = tiny_model("gpt2", vocab_size=64)
    layers = {lay.name: lay for lay in select_layers(model)}
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert c_fc.type == "Conv1D"
    assert c_fc.weight_matrix().shape == (c_fc.d_out, c_fc.d_in) == (256, 64)


def test_tied_head_excluded_by_default_and_includable():
    model = tiny_model("gpt2", vocab_size=64)  # lm_head is tied to wte
    names = [lay.name for lay in select_layers(model)]
    assert "lm_head" not in names
    assert [lay.name for lay in select_layers(model, include=["lm_head"])] == ["lm_head"]


def test_include_exclude_patterns():
    model = tiny_model("llama", vocab_size=64)
    q = select_layers(model, include=["q_proj"])
    assert [lay.name for lay in q] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    mlp = select_layers(model, include=["re:.*mlp\\..*"], exclude=["down_proj"])
    assert all("mlp" in lay.name and "down" not in lay.name for lay in mlp) and len(mlp) == 4
    with pytest.raises(InputError, match="matches no supported layer"):
        select_layers(model, include=["nonexistent"])


def test_padding_invariance():
    """The same sequences padded differently give the same spectra (padding never enters Σ)."""
    model = tiny_model("bert", vocab_size=100)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 12, 7]
    seqs = [torch.randint(3, 100, (n,), generator=g) for n in lengths]

    def padded(total):
        ids = torch.zeros(len(seqs), total, dtype=torch.long)
        mask = torch.zeros(len(seqs), total, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    a = analyze(model, from_iterable([padded(12)]))
    b = analyze(model, from_iterable([padded(20)]))
    # one sequence per batch, no padding at all
    c = analyze(model, from_iterable([{"input_ids": s[None], "attention_mask": torch.ones(1, len(s),
                                                                                          dtype=torch.long)}
                                      for s in seqs]))
    for la, lb, lc in zip(a.layers, b.layers, c.layers):
        # the pooler reads only the [CLS] position of each sequence
        assert la.tokens == lb.tokens == lc.tokens == (len(seqs) if la.name == "pooler.dense" else sum(lengths))
        np.testing.assert_allclose(la.eigenvalues, lb.eigenvalues, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(la.eigenvalues, lc.eigenvalues, rtol=1e-4, atol=1e-6)


def test_cnn_unfolded_patches_match_conv():
    """Conv features are the patches the conv sees: W·patch reproduces the conv output."""
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    layer = [lay for lay in select_layers(model) if lay.name == "conv2"][0]
    seen = {}
    h = model.conv2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
        y = model.conv2(seen["x"])
    h.remove()
    feats = layer.adapter.features(layer.module, seen["x"])  # (B·L, d_in)
    w = layer.weight_matrix()
    recon = feats @ w.T + model.conv2.bias
    expected = y.flatten(2).permute(0, 2, 1).reshape(-1, y.shape[1])
    torch.testing.assert_close(recon, expected, rtol=1e-4, atol=1e-5)
    assert layer.d_in == 8 * 9


def test_cnn_and_grouped_conv_analyze():
    model = TinyCNN().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    res = analyze(model, data)
    by = {lay.name: lay for lay in res.layers}
    assert set(by) == {"conv1", "conv2", "conv3", "conv1d", "fc"}
    assert by["conv1"].d_in == 27 and by["conv3"].d_in == 8 * 9  # per group: 16/2 channels × 3×3
    assert by["conv1"].tokens == 3 * 4 * 64
    assert by["conv3"].tokens == 3 * 4 * 16 * 2  # groups pooled as samples


def test_hooks_removed_after_exception():
    model = tiny_model("bert", vocab_size=64)
    layers = select_layers(model)
    n0 = _hook_count(model)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with SpectrumProbe(model, layers) as probe:
            assert _hook_count(model) == n0 + len(layers)
            probe.set_batch({})
            raise Boom()
    assert _hook_count(model) == n0


def test_hooks_removed_after_keyboard_interrupt():
    model = tiny_model("bert", vocab_size=64)
    layers = select_layers(model)
    n0 = _hook_count(model)

    def batches():
        yield {"input_ids": torch.randint(3, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_probe(model, layers, _Interrupting(batches()))
    assert _hook_count(model) == n0


class _Interrupting:
    def __init__(self, it):
        self.it = it

    def __len__(self):
        return 2

    def __iter__(self):
        return self.it


def test_hook_that_never_fires_is_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    unused = nn.Linear(4, 4)
    model.add_module("unused", unused)
    model.forward = lambda x: model[1](model[0](x))  # 'unused' never runs
    with pytest.raises(InputError, match="never ran"):
        analyze(model, [torch.randn(8, 4)])


def test_half_precision_model_gram_matches_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    data = [torch.randn(64, 16) for _ in range(4)]
    ref = analyze(model, data)
    half = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    res = analyze(half, [d.to(torch.bfloat16) for d in data])
    np.testing.assert_allclose(res.layers[0].eigenvalues[:8], ref.layers[0].eigenvalues[:8], rtol=0.05)


def test_nonfinite_features_are_flagged_not_fatal():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    bad = torch.randn(8, 4)
    bad[0, 0] = float("nan")
    res = analyze(model, [torch.randn(8, 4), bad, torch.randn(8, 4)])
    lay = res.layers[0]
    assert lay.tokens == 16 and lay.skipped_tokens == 8
    assert any("nonfinite" in f for f in lay.flags)


def test_all_nonfinite_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(InputError, match="no finite features"):
        analyze(model, [torch.full((8, 4), float("inf"))])


def test_model_moved_back_to_original_device_and_mode():
    model = tiny_model("bert", vocab_size=64).train()
    analyze(model, _token_batches(64, n=4), device="cpu")
    assert model.training


def test_mode_gains_in_row_blocks_match_the_whole_product():
    from specprune.analysis import _mode_gains

    torch.manual_seed(0)
    w = torch.randn(301, 40)
    u = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0]
    direct = (w.double() @ u).pow(2).sum(0)
    gain, w_sq = _mode_gains(w, u, chunk_bytes=8 * 40 * 7)  # 7 rows per block, a ragged last block
    assert torch.allclose(torch.as_tensor(gain), direct, rtol=1e-12)
    assert w_sq == pytest.approx(float(w.double().pow(2).sum()), rel=1e-12)
    # float32 eigenvectors (a float32 solve): float32 products, float64 sums, to float32 accuracy
    g32, sq32 = _mode_gains(w, u.float(), chunk_bytes=4 * 40 * 7)
    assert torch.allclose(torch.as_tensor(g32), direct, rtol=1e-5)
    assert sq32 == pytest.approx(float(w.double().pow(2).sum()), rel=1e-6)
