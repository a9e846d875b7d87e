"""specprune.compress: quantization, packing, low-rank truncation, apply_ (with undo), sizes, save/load."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from specprune.compress import apply as apply_mod
from specprune.compress import quantize as quant_mod
from specprune.compress.apply import apply_, layer_size, plan_size
from specprune.compress.pack import pack_codes, packed_nbytes, unpack_codes
from specprune.compress.prune import (
    Factorized,
    FactorizedConv,
    FactorizedLinear,
    factorize_module,
    prune_rate_for_rank,
    rank_for_rate,
    spectral_factors,
    spectral_mode_energy,
    svd_factors,
    whitened_factors,
    whitened_singular_values,
)
from specprune.compress.quantize import QUANT_ATTR, quantization_error, quantize_weight
from specprune.compress.saved import CODES_SUFFIX, SCALES_SUFFIX, load, load_saved, save_compressed
from specprune.errors import InputError, SpecpruneError
from specprune.layers import select_layers
from specprune.plan import LayerPlan, Plan

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------
# tiny models


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def make_cnn() -> nn.Module:
    """The ``arch`` callable of the non-HF round trip (defined here, passed explicitly)."""
    return SmallCNN()


def text_batches(n: int = 2, seq: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def image_batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def random_cov(d: int, n: int, seed: int = 0, decay: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * (np.arange(1, d + 1) ** (-decay / 2))
    x = x @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    return x.T @ x / n


def eig_desc(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, u = np.linalg.eigh(cov)
    return np.clip(lam[::-1], 0, None).copy(), u[:, ::-1].copy()


def cost(w: torch.Tensor, wk: torch.Tensor, cov: np.ndarray) -> float:
    dw = (w - wk).detach().double().numpy()
    return float(np.trace(dw @ cov @ dw.T))


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hooks_and_masks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks)
        n += sum(1 for name, _ in m.named_parameters(recurse=False) if name.endswith("_orig"))
        n += sum(1 for name, _ in m.named_buffers(recurse=False) if name.endswith("_mask"))
    return n


# ------------------------------------------------------------------------------------------------
# quantization


def _expand_scales(qw, d_in):
    g = d_in if qw.group_size is None else min(qw.group_size, d_in)
    return qw.scales.float().repeat_interleave(g, dim=1)[:, :d_in]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 16, 13, 64])
def test_quantize_codes_in_range_and_error_within_half_scale(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(24, 50) * torch.rand(24, 1) * 3
    qw = quantize_weight(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == w.shape
    assert int(qw.codes.abs().max()) == qmax  # the largest |w| of each group maps to ±qmax
    assert int(qw.codes.min()) >= -qmax  # the −2^(B−1) level is never used
    n_groups = 1 if group_size is None else math.ceil(50 / min(group_size, 50))
    assert qw.scales.shape == (24, n_groups) and qw.scales.dtype == torch.float16
    dw = qw.dequantize() - w
    assert torch.all(dw.abs() <= _expand_scales(qw, 50) / 2 * (1 + 1e-6) + 1e-12)
    assert torch.allclose(quantization_error(w, bits, group_size), dw, atol=1e-7, rtol=0)


def test_quantize_non_divisible_group_uses_short_last_group():
    w = torch.randn(6, 50)
    w[:, 48:] *= 0.01  # the last group (2 columns) is small: its scale must come from those columns only
    qw = quantize_weight(w, 4, 16)
    assert qw.scales.shape == (6, 4)
    expected = w[:, 48:].abs().amax(dim=1) / 7
    got = qw.scales[:, 3].float()
    # float16 rounded up: one ulp at most (2^-10 relative; 2^-24 absolute for subnormal scales)
    assert torch.all(got >= expected) and torch.all(got <= expected * (1 + 2 ** -10) + 2 ** -24)
    assert torch.all((qw.dequantize() - w)[:, 48:].abs() <= got[:, None] / 2 + 1e-9)


def test_per_group_beats_per_channel_with_outliers():
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    w[:, 5] *= 40  # one outlier column inflates the per-channel scale
    e_channel = quantization_error(w, 4, None).pow(2).sum()
    e_group = quantization_error(w, 4, 32).pow(2).sum()
    assert e_group < 0.5 * e_channel


def test_zero_rows_and_groups_give_zeros_not_nan():
    w = torch.randn(4, 40)
    w[1] = 0
    w[2, :20] = 0
    for g in (None, 20, 7):
        qw = quantize_weight(w, 3, g)
        deq = qw.dequantize()
        assert torch.isfinite(deq).all() and torch.isfinite(qw.scales.float()).all()
        assert torch.all(deq[1] == 0)
        assert torch.all(quantization_error(w, 3, g)[1] == 0)
    assert torch.all(quantize_weight(w, 3, 20).dequantize()[2, :20] == 0)


def test_quantization_error_float64_and_bad_bits():
    w = torch.randn(5, 9, dtype=torch.float64)
    assert quantization_error(w, 8).dtype == torch.float64
    with pytest.raises(InputError):
        quantize_weight(w, 9)
    with pytest.raises(InputError):
        quantization_error(w, 1)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_round_trip(bits):
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(-qmax, qmax + 1, (n,), generator=g, dtype=torch.int8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
        assert packed.numel() == (n if bits == 8 else math.ceil(n / 8) * bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    # the little-endian bit-stream layout, checked against numpy's bit (un)packing
    codes = torch.randint(-qmax, qmax + 1, (64,), generator=g)
    u = (codes.numpy() + qmax + 1).astype(np.uint8)
    ref = np.packbits(np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1),
                      bitorder="little")
    assert np.array_equal(pack_codes(codes, bits).numpy(), ref)


def test_packing_rejects_out_of_range_and_corrupt():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([8]), 4)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([-8]), 4)  # −2^(B−1) is not a level
    with pytest.raises(InputError):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 4, 12)  # wrong length
    with pytest.raises(InputError):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 8)  # u = 0 decodes to −8: out of range


# ------------------------------------------------------------------------------------------------
# low-rank math


def test_spectral_cost_equals_tail_mode_energy():
    torch.manual_seed(0)
    w = torch.randn(20, 30, dtype=torch.float64)
    cov = random_cov(30, 200, seed=1)
    lam, u = eig_desc(cov)
    e = spectral_mode_energy(w, lam, u).numpy()
    assert np.isclose(e.sum(), np.trace(w.numpy() @ cov @ w.numpy().T), rtol=1e-12)
    worst = 0.0
    for k in range(1, 30):
        a, b = spectral_factors(w, u, k)
        assert a.shape == (20, k) and b.shape == (k, 30)
        c = cost(w, a @ b, cov)
        tail = float(e[k:].sum())
        worst = max(worst, abs(c - tail) / e.sum())
    assert worst < 1e-12


def test_whitened_cost_equals_tail_singular_values_and_beats_spectral():
    torch.manual_seed(1)
    w = torch.randn(24, 16, dtype=torch.float64)
    cov = random_cov(16, 100, seed=2, decay=1.5)
    lam, u = eig_desc(cov)
    s = whitened_singular_values(w, lam, u).numpy()
    assert np.all(np.diff(s) <= 1e-12)
    e = spectral_mode_energy(w, lam, u).numpy()
    for k in range(1, 16):
        a, b = whitened_factors(w, lam, u, k)
        c = cost(w, a @ b, cov)
        assert c == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9, abs=1e-12 * e.sum())
        assert c <= e[k:].sum() * (1 + 1e-9) + 1e-12


def test_whitened_with_singular_covariance():
    torch.manual_seed(2)
    w = torch.randn(10, 30, dtype=torch.float64)
    cov = random_cov(30, 8, seed=3)  # rank 8 < d_in: many zero eigenvalues
    lam, u = eig_desc(cov)
    s = whitened_singular_values(w, lam, u).numpy()
    assert np.all(s[8:] < 1e-6 * s[0])
    for k in (2, 5, 8):
        a, b = whitened_factors(w, lam, u, k)
        assert np.isfinite(a.numpy()).all() and np.isfinite(b.numpy()).all()
        assert cost(w, a @ b, cov) == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-8, abs=1e-12)


def test_rank_for_rate_rule_and_inverse():
    assert rank_for_rate(32, 32, 0.5) == 8
    assert prune_rate_for_rank(32, 32, 8) == pytest.approx(0.5)
    assert rank_for_rate(64, 256, 0.3) == math.floor(0.7 * 64 * 256 / 320)
    for d_in, d_out, rate in [(64, 256, 0.3), (384, 1536, 0.1), (33, 17, 0.75), (128, 128, 0.01)]:
        k = rank_for_rate(d_in, d_out, rate)
        assert k * (d_in + d_out) < d_in * d_out
        assert prune_rate_for_rank(d_in, d_out, k) >= rate  # never removes less than asked
        assert prune_rate_for_rank(d_in, d_out, k + 1) < rate  # the largest such rank
    assert rank_for_rate(10, 1, 0.5) == 1  # nothing saves parameters: dense truncation rule
    assert rank_for_rate(20, 1, 0.5) == 1
    assert rank_for_rate(2, 2, 0.5) == 1
    assert rank_for_rate(16, 8, 0.0) == 8
    assert prune_rate_for_rank(32, 32, 20) == 0.0
    with pytest.raises(InputError):
        rank_for_rate(4, 4, 1.0)


# ------------------------------------------------------------------------------------------------
# apply_: factorization, outputs, fallbacks


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _layer_plan(layers: dict[str, LayerPlan]) -> Plan:
    return Plan(model={"source": "test", "fingerprint": ""}, tolerance=0.0, metric="none", layers=layers)


def test_factorize_only_when_it_saves_parameters_and_output_is_wk_x():
    torch.manual_seed(0)
    model = TwoLinear()
    w_a, w_b = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    bias_a = model.a.bias.detach().clone()
    plan = _layer_plan({"a": LayerPlan(method="spectral", prune_rate=0.5),
                        "b": LayerPlan(method="spectral", rank=20)})
    apply_(model, plan)
    assert plan.details["applied"]["covariance"] == "identity"
    assert sorted(plan.details["applied"]["identity_layers"]) == ["a", "b"]
    assert plan.layers["a"].rank == 8  # derived from the rate and written back
    assert plan.layers["b"].prune_rate == 0.0  # rank 20 saves nothing: dense truncation
    assert isinstance(model.a, FactorizedLinear) and model.a.rank == 8
    assert (model.a.in_features, model.a.out_features) == (32, 32)
    assert model.a.first.bias is None and torch.equal(model.a.second.bias, bias_a)
    assert isinstance(model.b, nn.Linear) and torch.linalg.matrix_rank(model.b.weight.double(), rtol=1e-5) == 20
    # Σ = I fallback: plain truncated SVD
    u, s, vh = torch.linalg.svd(w_a.double())
    wk_a = (u[:, :8] * s[:8]) @ vh[:8]
    x = torch.randn(5, 32)
    assert torch.allclose(model.a(x).double(), x.double() @ wk_a.T + bias_a.double(), atol=1e-5)
    u, s, vh = torch.linalg.svd(w_b.double())
    assert torch.allclose(model.b.weight.double(), (u[:, :20] * s[:20]) @ vh[:20], atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == plan.size["params_after"]


def test_spectral_with_data_keeps_top_input_modes():
    torch.manual_seed(0)
    model = TwoLinear()
    w = model.a.weight.detach().double().clone()
    x = torch.randn(400, 32) @ torch.diag(torch.linspace(3, 0.01, 32)) @ torch.linalg.qr(torch.randn(32, 32))[0]
    plan = _layer_plan({"a": LayerPlan(method="spectral", rank=6)})
    apply_(model, plan, data=[x[:200], x[200:]])
    assert plan.details["applied"]["covariance"] == "data"
    cov = (x.double().T @ x.double() / 400).numpy()
    lam, u = eig_desc(cov)
    uk = torch.from_numpy(u[:, :6])
    wk = w @ uk @ uk.T
    got = model.a.second.weight.double() @ model.a.first.weight.double()
    assert torch.allclose(got, wk, atol=1e-4)
    e = spectral_mode_energy(w, lam, u).numpy()
    assert cost(w, got, cov) == pytest.approx(float(e[6:].sum()), rel=1e-3)


class FakeAnalysis:
    """What apply_ needs from an Analysis: group_of(name) → eigenpairs of Σ."""

    def __init__(self, groups):
        self.groups = groups

    def group_of(self, name):
        return self.groups[name]


def test_analysis_covariance_is_used_and_whitened_is_optimal():
    from specprune.analysis import InputGroup

    torch.manual_seed(0)
    model = TwoLinear()
    w = model.a.weight.detach().double().clone()
    cov = random_cov(32, 500, seed=5, decay=2.0)
    lam, u = eig_desc(cov)
    group = InputGroup("a", 500, lam, u.astype(np.float32), ["a"])
    plan = _layer_plan({"a": LayerPlan(method="whitened", rank=5)})
    apply_(model, plan, analysis=FakeAnalysis({"a": group}))
    assert plan.details["applied"]["covariance"] == "analysis"
    got = model.a.second.weight.double() @ model.a.first.weight.double()
    s = whitened_singular_values(w, lam, u.astype(np.float32)).numpy()
    assert cost(w, got, cov) == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-4)
    with pytest.raises(InputError, match="no spectrum"):
        apply_(TwoLinear(), _layer_plan({"b": LayerPlan(method="spectral", rank=3)}),
               analysis=FakeAnalysis({}))


def test_conv_factorization_and_grouped_conv_stays_dense():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = image_batches(1)[0]
    plan = _layer_plan({"conv1": LayerPlan(method="spectral", rank=2),
                        "conv2": LayerPlan(method="spectral", rank=3),
                        "conv3": LayerPlan(method="whitened", prune_rate=0.6)})
    ref = SmallCNN().eval()
    ref.load_state_dict(model.state_dict())
    apply_(model, plan, data=image_batches(2))
    assert isinstance(model.conv1, FactorizedConv) and model.conv1.rank == 2
    assert model.conv1.first.kernel_size == (3, 3) and model.conv1.second.kernel_size == (1, 1)
    assert isinstance(model.conv3, FactorizedConv) and model.conv3.first.stride == (2, 2)
    assert type(model.conv2) is nn.Conv2d  # groups = 4: kept dense, truncated in place
    # the factorized conv computes exactly the dense rank-k conv
    dense = model.conv1.to_dense()
    assert torch.allclose(model.conv1(x), dense(x), atol=1e-5)
    assert torch.linalg.matrix_rank(dense.weight.reshape(16, -1).double(), atol=1e-5) == 2
    y = model(x)
    assert y.shape == ref(x).shape and torch.isfinite(y).all()


def test_gpt2_conv1d_factorization_matches_dense():
    model = tiny_gpt2()
    name = "transformer.h.0.mlp.c_fc"
    conv = model.get_submodule(name)
    w = conv.weight.detach().t().double().clone()  # (d_out, d_in)
    bias = conv.bias.detach().double().clone()
    plan = _layer_plan({name: LayerPlan(method="spectral", prune_rate=0.5)})
    apply_(model, plan)
    fac = model.get_submodule(name)
    assert isinstance(fac, FactorizedLinear) and fac.original["type"] == "Conv1D"
    k = plan.layers[name].rank
    assert k == rank_for_rate(32, 128, 0.5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    x = torch.randn(3, 7, 32)
    want = x.double() @ ((u[:, :k] * s[:k]) @ vh[:k]).T + bias
    assert torch.allclose(fac(x).double(), want, atol=1e-5)
    dense = fac.to_dense()
    assert type(dense).__name__ == "Conv1D" and dense.weight.shape == (32, 128)
    assert torch.allclose(dense(x), fac(x), atol=1e-5)


def test_factorized_layers_expose_the_dense_weight_and_bias_model_code_reads():
    """Model code that reads a layer's ``weight`` (HF ViT: the patch projection's dtype; PyTorch's
    TransformerEncoderLayer: its linears' weights for the fused inference path) keeps running after a
    factorization: ``weight`` is W_k in the replaced layer's layout, ``bias`` the original bias."""
    torch.manual_seed(0)
    lin, conv2, conv1 = nn.Linear(12, 10), nn.Conv2d(3, 6, (3, 2), padding=1), nn.Conv1d(4, 5, 3)
    for mod in (lin, conv2, conv1):
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        fac = factorize_module(mod, *svd_factors(w, 2))
        dense = fac.to_dense()
        assert fac.weight.shape == dense.weight.shape == mod.weight.shape
        assert torch.allclose(fac.weight, dense.weight, atol=1e-6) and fac.bias is fac.second.bias
        assert "weight" not in dict(fac.named_parameters()) and "weight" not in fac.state_dict()
    gpt = tiny_gpt2()
    c_fc = gpt.get_submodule("transformer.h.0.mlp.c_fc")
    fac = factorize_module(c_fc, *svd_factors(c_fc.weight.detach().t(), 4))
    assert fac.weight.shape == c_fc.weight.shape == fac.to_dense().weight.shape
    # a stock encoder layer: its linears factorized, in eval (fused path) and with gradients
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    for name in ("linear1", "linear2"):
        old = getattr(layer, name)
        setattr(layer, name, factorize_module(old, *svd_factors(old.weight.detach(), 3)))
    dense = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if "linear" not in k}, strict=False)
    dense.linear1, dense.linear2 = layer.linear1.to_dense(), layer.linear2.to_dense()
    with torch.no_grad():
        assert torch.allclose(layer(x), dense(x), atol=1e-5)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)


def test_unknown_layer_is_an_input_error():
    model = TwoLinear()
    with pytest.raises(InputError, match="'c'"):
        apply_(model, _layer_plan({"c": LayerPlan(bits=4)}))
    with pytest.raises(InputError, match="did you mean 'encoder.layer.0.attention.self.query'"):
        apply_(tiny_bert(), _layer_plan({"encoder.layer.0.attention.self.qeury": LayerPlan(bits=4)}))
    with pytest.raises(SpecpruneError, match="did you mean 'spectral'"):
        apply_(model, _layer_plan({"a": LayerPlan(method="spectrl", prune_rate=0.5)}))
    with pytest.raises(InputError, match="exceeds d_in"):
        apply_(model, _layer_plan({"a": LayerPlan(method="spectral", rank=33)}))


def test_magnitude_zeros_smallest_fraction_without_hooks():
    torch.manual_seed(0)
    model = TwoLinear()
    param = model.a.weight
    before = param.detach().clone()
    plan = _layer_plan({"a": LayerPlan(method="magnitude", prune_rate=0.3)})
    apply_(model, plan)
    assert model.a.weight is param  # same Parameter object: no reparametrisation left
    assert hooks_and_masks(model) == 0
    w = model.a.weight.detach()
    zeros = w == 0
    assert int(zeros.sum()) == round(0.3 * w.numel())
    assert before[zeros].abs().max() <= before[~zeros].abs().min()
    assert torch.equal(w[~zeros], before[~zeros])
    assert plan.size["params_after"] == plan.size["params_before"] - round(0.3 * 1024)
    assert plan.size["bits_after"] == plan.size["bits_before"]


def test_quantization_of_factorized_layer_quantizes_both_factors():
    torch.manual_seed(0)
    model = TwoLinear()
    plan = _layer_plan({"a": LayerPlan(method="spectral", rank=4, bits=3, group_size=8)})
    apply_(model, plan)
    for sub in (model.a.first, model.a.second):
        rec = getattr(sub, QUANT_ATTR)
        assert rec.bits == 3 and rec.group_size == 8
        w = sub.weight.detach()
        qw = quantize_weight(w, 3, 8)
        assert torch.equal(qw.dequantize(), w)  # already on the 3-bit grid
        assert len(torch.unique(w)) <= 7 * w.shape[0] * math.ceil(w.shape[1] / 8)


# ------------------------------------------------------------------------------------------------
# undo on failure


def test_apply_undoes_everything_when_a_later_layer_raises(monkeypatch):
    model = tiny_bert()
    before = state_copy(model)
    originals = {n: m for n, m in model.named_modules()}
    names = [t.name for t in select_layers(model)]
    plan = Plan.uniform(names[:3], rate=0.5, bits=4, group_size=8)
    plan_before = plan.to_dict()
    real = quant_mod.fake_quantize_
    calls = {"n": 0}

    def failing(module, bits, group_size=None):
        calls["n"] += 1
        if calls["n"] == 3:  # layer 1 done (both factors), fail on layer 2
            raise RuntimeError("boom")
        return real(module, bits, group_size)

    monkeypatch.setattr(quant_mod, "fake_quantize_", failing)
    with pytest.raises(RuntimeError, match="boom"):
        apply_(model, plan, data=text_batches(1))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(model.get_submodule(n) is m for n, m in originals.items() if n)
    assert not any(QUANT_ATTR in m.__dict__ for m in model.modules())
    assert plan.to_dict() == plan_before  # ranks written back are undone too


class HalfwayPlugin:
    """A plugin compressor that uses torch's pruning reparametrisation and is interrupted in the
    middle (mask and hook attached, not yet made permanent)."""

    name = "halfway"
    kind = "prune"
    needs_covariance = False

    def apply(self, layer, layer_plan, covariance=None):
        from torch.nn.utils import prune as torch_prune

        torch_prune.l1_unstructured(layer.module, "weight", amount=layer_plan.prune_rate)
        raise KeyboardInterrupt


class ReplacingPlugin:
    """A plugin compressor that returns a replacement module (protocol check)."""

    name = "replacing"
    kind = "prune"
    needs_covariance = True

    def __init__(self):
        self.seen_covariance = None

    def apply(self, layer, layer_plan, covariance=None):
        self.seen_covariance = covariance
        new = nn.Linear(layer.d_in, layer.d_out)
        with torch.no_grad():
            new.weight.copy_(layer.module.weight * 0.5)
            new.bias.copy_(layer.module.bias)
        return new


def _patch_plugins(monkeypatch, plugins):
    real = apply_mod.get_compressor
    monkeypatch.setattr(apply_mod, "get_compressor", lambda name: plugins[name] if name in plugins else real(name))


def test_apply_undoes_plugin_reparametrisation_on_keyboard_interrupt(monkeypatch):
    torch.manual_seed(0)
    model = TwoLinear()
    before = state_copy(model)
    _patch_plugins(monkeypatch, {"halfway": HalfwayPlugin()})
    plan = _layer_plan({"a": LayerPlan(method="magnitude", prune_rate=0.5, bits=4),
                        "b": LayerPlan(method="halfway", prune_rate=0.5)})
    with pytest.raises(KeyboardInterrupt):
        apply_(model, plan)
    assert hooks_and_masks(model) == 0
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_plugin_compressor_can_return_a_replacement(monkeypatch):
    torch.manual_seed(0)
    model = TwoLinear()
    w = model.b.weight.detach().clone()
    plugin = ReplacingPlugin()
    _patch_plugins(monkeypatch, {"replacing": plugin})
    x = torch.randn(64, 32)
    apply_(model, _layer_plan({"b": LayerPlan(method="replacing", prune_rate=0.1, bits=8)}), data=[x])
    assert model.b is not None and torch.allclose(model.b.weight, 0.5 * w, atol=0.01 * w.abs().max())
    assert QUANT_ATTR in model.b.__dict__  # quantized after the replacement
    assert plugin.seen_covariance is not None and plugin.seen_covariance.eigenvectors.shape == (32, 32)


# ------------------------------------------------------------------------------------------------
# sizes


class SizeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l0 = nn.Linear(8, 16)
        self.l1 = nn.Linear(16, 4)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: counted once

    def forward(self, ids):
        h = self.emb(ids)
        return self.l1(torch.relu(self.l0(h))), self.head(h)


def test_plan_size_by_hand():
    model = SizeNet()
    plan = _layer_plan({"l0": LayerPlan(method="spectral", rank=2, bits=4, group_size=4),
                        "l1": LayerPlan(bits=8)})
    size = plan_size(model, plan)
    params_before = 80 + (128 + 16) + (64 + 4)  # embedding (= head), l0, l1
    assert size["params_before"] == params_before == 292
    assert size["bits_before"] == 292 * 32
    # l0: factors B (2×8) and A (16×2), 4 bits + one 16-bit scale per group of 4 columns
    l0_bits = (16 * 4 + 16 * 2 * 2) + (32 * 4 + 16 * 16 * 1)
    # l1: 4×16 at 8 bits + one scale per output channel
    l1_bits = 64 * 8 + 16 * 4
    assert size["params_after"] == 292 - 128 + 2 * (8 + 16)
    assert size["bits_after"] == 292 * 32 - (128 + 64) * 32 + l0_bits + l1_bits
    assert layer_size(8, 16, rank=2, bits=4, group_size=4) == (48, l0_bits)
    assert layer_size(8, 16, rank=6) == (128, 128 * 32)  # 6·24 ≥ 128: stays dense
    apply_(model, plan)
    assert plan.size == size
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == size["params_after"]


def test_plan_size_counts_tied_gpt2_embeddings_once():
    model = tiny_gpt2()
    names = [t.name for t in select_layers(model)]
    assert "lm_head" not in names
    size = plan_size(model, Plan.uniform(names, bits=4))
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert size["params_before"] == sum(unique.values()) == size["params_after"]
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    rows = sum(model.get_submodule(n).weight.shape[1] for n in names)  # Conv1D: d_out = weight.shape[1]
    assert size["bits_before"] - size["bits_after"] == weights * (32 - 4) - rows * 16


# ------------------------------------------------------------------------------------------------
# save / load


def _tensor_bytes(path, suffixes) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if k.endswith(suffixes):
                t = fh.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


def test_save_load_round_trip_tiny_bert_with_dense_export(tmp_path):
    model = tiny_bert()
    dims = {t.name: (t.d_in, t.d_out) for t in select_layers(model)}
    names = list(dims)
    plan = Plan.uniform(names, rate=0.5, bits=4, group_size=16)
    apply_(model, plan, data=text_batches())
    ids = text_batches(1, seed=9)[0]
    with torch.no_grad():
        want = model(**ids).last_hidden_state
    out = tmp_path / "m"
    out.mkdir()
    save_compressed(model, plan, out, source={"path": "tiny-bert", "kind": "module"}, export_dense=True)
    spec = json.loads((out / "specprune.json").read_text())
    assert spec["format"] == 1 and spec["source"]["architecture"] == "BertModel" and spec["source"]["hf"]
    assert set(spec["factorized"]) == {n for n, (di, do) in dims.items() if plan.layers[n].rank * (di + do) < di * do}
    assert len(spec["factorized"]) == len(names) and len(spec["quantized"]) == 2 * len(names)
    assert spec["layers"][names[0]] == {"type": "FactorizedLinear", "factorized_rank": plan.layers[names[0]].rank,
                                        "bits": 4, "group_size": 16, "dtype": "float32"}
    assert json.loads((out / "plan.json").read_text())["layers"] == plan.to_dict()["layers"]
    loaded = load(out)
    assert not loaded.training and next(loaded.parameters()).device.type == "cpu"
    with torch.no_grad():
        got = loaded(**ids).last_hidden_state
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = transformers.BertModel.from_pretrained(str(out / "dense")).eval()
    assert all(type(m) is not FactorizedLinear for m in dense.modules())
    with torch.no_grad():
        got_dense = dense(**ids).last_hidden_state
    assert torch.allclose(got_dense, want, atol=1e-5)
    # re-saving the loaded model stores the very same packed codes
    out2 = tmp_path / "m2"
    out2.mkdir()
    save_compressed(loaded, plan, out2, source=load_saved(out))
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int4_file_is_small(tmp_path):
    model = tiny_bert()
    names = [t.name for t in select_layers(model)]
    fp32_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    sizes = {}
    for bits in (None, 4):
        m = tiny_bert()
        apply_(m, Plan.uniform(names, bits=bits))
        out = tmp_path / f"b{bits}"
        out.mkdir()
        save_compressed(m, Plan.uniform(names, bits=bits), out)
        sizes[bits] = (out / "model.safetensors").stat().st_size
    q_bytes = _tensor_bytes(tmp_path / "b4" / "model.safetensors", (CODES_SUFFIX, SCALES_SUFFIX))
    assert q_bytes < 0.3 * fp32_bytes
    assert sizes[4] < sizes[None] - 0.7 * fp32_bytes


def test_save_load_gpt2_conv1d_with_tied_head(tmp_path):
    model = tiny_gpt2()
    names = [t.name for t in select_layers(model)]
    plan = Plan.uniform(names, rate=0.4, bits=3, group_size=None, method="whitened")
    apply_(model, plan, data=text_batches())
    ids = text_batches(1, seed=3)[0]
    with torch.no_grad():
        want = model(**ids).logits
    out = tmp_path / "g"
    out.mkdir()
    save_compressed(model, plan, out, export_dense=True)
    spec = json.loads((out / "specprune.json").read_text())
    assert spec["aliases"].get("lm_head.weight") == "transformer.wte.weight"
    assert any(v["original"]["type"] == "Conv1D" for v in spec["factorized"].values())
    loaded = load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(**ids).logits, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = transformers.GPT2LMHeadModel.from_pretrained(str(out / "dense")).eval()
    assert type(dense.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(dense(**ids).logits, want, atol=1e-4)


def test_save_load_non_hf_cnn_needs_explicit_arch(tmp_path):
    model = make_cnn().eval()
    names = [t.name for t in select_layers(model)]
    plan = Plan.uniform(names, rate=0.5, bits=5, group_size=8)
    apply_(model, plan, data=image_batches())
    x = image_batches(1)[0]
    with torch.no_grad():
        want = model(x)
    out = tmp_path / "c"
    out.mkdir()
    save_compressed(model, plan, out, source={"path": "cnn.safetensors", "kind": "state_dict",
                                               "arch": "tests.unit.test_compress:make_cnn"},
                    export_dense=True)
    assert not (out / "config.json").exists()
    with pytest.raises(InputError, match=r"pass --arch module:callable \(Python: arch=\)"):
        load(out)
    loaded = load(out, arch=make_cnn)
    assert isinstance(loaded.conv1, FactorizedConv) and type(loaded.conv2) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    from specprune.models import read_state_dict

    dense = make_cnn().eval()
    dense.load_state_dict(read_state_dict(out / "dense" / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.allclose(dense(x), want, atol=1e-5)


def test_bf16_model_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = TwoLinear().to(torch.bfloat16)
    plan = _layer_plan({"a": LayerPlan(bits=8, group_size=8), "b": LayerPlan(method="spectral", rank=4, bits=6)})
    apply_(model, plan)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
    out = tmp_path / "bf"
    out.mkdir()
    save_compressed(model, plan, out)
    spec = json.loads((out / "specprune.json").read_text())
    assert spec["source"]["dtype"] == "bfloat16"
    assert not any(v["requantized"] for v in spec["quantized"].values())
    loaded = load(out, arch=TwoLinear)
    assert loaded.a.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_a_loaded_compressed_model_is_sized_as_stored(tmp_path):
    """Compressing a compressed model again: its quantized layers count at their stored bits (the QA saw
    "0.21 MB → 0.15 MB" for re-quantizing a 4-bit directory whose file did not change)."""
    torch.manual_seed(0)
    model = TwoLinear()
    plan = _layer_plan({"a": LayerPlan(bits=4, group_size=8), "b": LayerPlan(method="spectral", rank=4, bits=6)})
    apply_(model, plan)
    out = tmp_path / "q"
    out.mkdir()
    save_compressed(model, plan, out)
    loaded = load(out, arch=TwoLinear)
    again = plan_size(loaded, _layer_plan({"a": LayerPlan(bits=4, group_size=8)}))
    assert again["bits_before"] == again["bits_after"] == plan.size["bits_after"]
    assert again["params_before"] == plan.size["params_after"]


def test_pruning_a_quantized_layer_without_bits_says_it_is_no_longer_quantized(tmp_path):
    from specprune.compress.apply import DequantizedWarning

    torch.manual_seed(0)
    model = TwoLinear()
    plan = _layer_plan({"a": LayerPlan(bits=4), "b": LayerPlan(bits=4)})
    apply_(model, plan)
    out = tmp_path / "q"
    out.mkdir()
    save_compressed(model, plan, out)
    loaded = load(out, arch=TwoLinear)
    prune = _layer_plan({"a": LayerPlan(method="spectral", rank=4), "b": LayerPlan(method="spectral", rank=4,
                                                                                     bits=4)})
    with pytest.warns(DequantizedWarning, match=r"1 layer\(s\) stored quantized \(e.g. a\) were changed without "
                                                r"bits"):
        apply_(loaded, prune)
    assert prune.details["applied"]["dequantized_layers"] == ["a"]  # b keeps bits: requantized, no warning


def test_load_model_dispatches_and_corruption_is_one_line(tmp_path):
    from specprune.models import load_model

    model = tiny_bert()
    names = [t.name for t in select_layers(model)][:2]
    plan = Plan.uniform(names, bits=4)
    apply_(model, plan)
    out = tmp_path / "m"
    out.mkdir()
    save_compressed(model, plan, out)
    lm = load_model(out)
    assert lm.kind == "specprune" and isinstance(lm.model, transformers.BertModel)
    # truncated weights
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        load(bad)
    assert "\n" not in str(err.value)
    # a packed tensor of the wrong length
    from safetensors.torch import load_file, save_file

    t = load_file(str(out / "model.safetensors"))
    key = next(k for k in t if k.endswith(CODES_SUFFIX))
    t[key] = t[key][:-1].clone()
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match="corrupted"):
        load(bad)
    # garbage / incomplete specprune.json, missing weights
    (bad / "specprune.json").write_text("{not json")
    with pytest.raises(InputError, match="specprune.json"):
        load(bad)
    (bad / "specprune.json").write_text(json.dumps({"format": 1, "source": {}}))
    with pytest.raises(InputError, match="missing or malformed"):
        load(bad)
    (bad / "specprune.json").write_text((out / "specprune.json").read_text())
    (bad / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no model.safetensors"):
        load(bad)


def test_load_refuses_remote_code_config(tmp_path):
    from specprune.errors import RefusedError

    model = tiny_bert()
    plan = Plan.uniform([], bits=None)
    out = tmp_path / "m"
    out.mkdir()
    save_compressed(model, plan, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RefusedError):
        load(out)


def test_factorized_from_spec_round_trip():
    lin = FactorizedLinear(12, 7, 3, bias=False, original_type="Conv1D")
    again = Factorized.from_spec(json.loads(json.dumps(lin.spec())))
    assert isinstance(again, FactorizedLinear) and again.rank == 3 and again.second.bias is None
    assert again.original == {"type": "Conv1D"}


def test_get_compressor_protocol_attributes():
    for name, kind in (("spectral", "prune"), ("whitened", "prune"), ("magnitude", "prune"), ("rtn", "quantize")):
        comp = apply_mod.get_compressor(name)
        assert comp.name == name and comp.kind == kind
        assert isinstance(comp.needs_covariance, bool) and callable(comp.apply)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_on_cuda_model_saves_and_loads_on_cpu(tmp_path):
    model = tiny_bert().to("cuda")
    names = [t.name for t in select_layers(model)]
    plan = Plan.uniform(names, rate=0.3, bits=4, group_size=16, method="whitened")
    batches = text_batches()
    apply_(model, plan, data=batches, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    ids = {k: v.to("cuda") for k, v in text_batches(1, seed=4)[0].items()}
    with torch.no_grad():
        want = model(**ids).last_hidden_state.cpu()
    out = tmp_path / "cuda"
    out.mkdir()
    save_compressed(model, plan, out)
    loaded = load(out)
    assert next(loaded.parameters()).device.type == "cpu"
    for name, mod in model.named_modules():
        if QUANT_ATTR in mod.__dict__:
            assert torch.equal(mod.weight.detach().cpu(), loaded.get_submodule(name).weight)
    with torch.no_grad():
        got = loaded(**{k: v.cpu() for k, v in ids.items()}).last_hidden_state
    assert torch.allclose(got, want, atol=1e-4)
