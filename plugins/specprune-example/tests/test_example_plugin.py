"""specprune-example: the walkthrough package of docs/plugins.md works through specprune's own
entry points — `specprune plugins` lists it, `theory exponents --g warmup` uses its g, its metric
runs in `specprune evaluate`, and its adapter makes ChannelLinear layers analysable and compressible."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from specprune_example import ChannelLinear, ChannelLinearAdapter, Warmup, next_token_error, warmup_factory
from torch import nn

from specprune import registry


def _cli(*args):
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_plugins_lists_all_three_kinds():
    registry.clear_cache()
    res = _cli("plugins", "--format", "json", "--check")
    assert res.exit_code == 0, res.stderr
    mine = {(r["kind"], r["name"]): r for r in json.loads(res.stdout) if r["package"] == "specprune-example"}
    assert set(mine) == {("evolution", "warmup"), ("metrics", "next-token-error"),
                         ("adapters", "channel-linear")}
    for r in mine.values():
        assert r["version"] == "0.1.0" and r["builtin"] is False and r["loaded"] is True
    assert registry.get("evolution", "warmup") is warmup_factory
    assert registry.get("metrics", "next-token-error") is next_token_error
    assert registry.get("adapters", "channel-linear") is ChannelLinearAdapter


# --------------------------------------------------------------------------------------------
# evolution


def test_theory_exponents_with_the_plugin_g():
    res = _cli("theory", "exponents", "--a", "1.5", "--b", "2", "--g", "warmup:tau=10", "--t", "5",
               "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["rho"] == pytest.approx((1 + 10 / 15) / 1, rel=1e-6)  # (n + τ/(t+τ))/m at t = 5
    assert doc["chi"] + doc["gamma"] == pytest.approx(doc["rho"], rel=1e-6)
    assert doc["gamma_regime"] == "power"
    res = _cli("theory", "exponents", "--a", "1.5", "--b", "2", "--g", "warmup:m=2,n=3,tau=10",
               "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["rho"] == pytest.approx(1.5, rel=1e-6)  # t → ∞: n/m
    bad = _cli("theory", "exponents", "--a", "1.5", "--b", "2", "--g", "warmup:tua=10")
    assert bad.exit_code == 1 and "unknown parameter(s) tua" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_warmup_g_is_smooth_increasing_with_the_stated_elasticities():
    from specprune.theory.evolution import parse_g

    g = parse_g("warmup:m=1.5,n=0.5,tau=3")
    assert isinstance(g, Warmup) and (g.m, g.n, g.tau) == (1.5, 0.5, 3.0)
    lam, t, h = 0.2, 4.0, 1e-5
    dlog = math.log(1 + h) - math.log(1 - h)
    e_lam = (math.log(g(lam * (1 + h), t)) - math.log(g(lam * (1 - h), t))) / dlog
    e_t = (math.log(g(lam, t * (1 + h))) - math.log(g(lam, t * (1 - h)))) / dlog
    assert e_lam == pytest.approx(1.5, rel=1e-6) and e_t == pytest.approx(0.5 + 3 / 7, rel=1e-6)
    assert g.rho(4.0) == pytest.approx(e_t / e_lam, rel=1e-6)
    grid = np.logspace(-3, 3, 13)
    vals = g(grid[:, None], grid[None, :])
    assert np.all(np.diff(vals, axis=0) > 0) and np.all(np.diff(vals, axis=1) > 0)


# --------------------------------------------------------------------------------------------
# metric


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from specprune.textgen import write_text
    from specprune.toy import tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("example")
    text = write_text(root / "corpus.txt", max_words=4000)
    tok = train_tokenizer(text.read_text(encoding="utf-8"), vocab_size=300)
    model = tiny_model("llama", vocab_size=len(tok), hidden=32, layers=1)
    model.save_pretrained(str(root / "llama"))
    tok.save_pretrained(str(root / "llama"))
    return root / "llama", text


def test_metric_counts_mispredicted_next_tokens():
    class Echo(nn.Module):
        """Predicts that the next token repeats the current one."""

        def forward(self, input_ids, attention_mask=None):
            return torch.nn.functional.one_hot(input_ids, 10).float()

    ids = torch.tensor([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    wrong, count = next_token_error(Echo(), {"input_ids": ids, "attention_mask": mask})
    assert (wrong, count) == (2.0, 8)  # row 1: 1→2 and 2→3 missed of 5; row 2: none of 3


def test_metric_in_specprune_evaluate(lm_dir, tmp_path):
    src, text = lm_dir
    data = ["--data", text, "--samples", "8", "--seq-len", "32"]
    metric = ["--metric", "specprune_example.metrics:next_token_error"]
    res = _cli("evaluate", src, *data, *metric, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert 0.5 < doc["reference_value"] <= 1.0  # an untrained model mostly misses
    pruned = tmp_path / "pruned"
    assert _cli("prune", src, "--rate", "0.9", "--method", "magnitude", "--out", pruned).exit_code == 0
    res = _cli("evaluate", pruned, "--reference", src, *data, "--metric",
               "specprune_example.metrics:next_token_error", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    ref = doc["reference_value"]
    assert doc["measured_delta"] == pytest.approx((doc["value"] - ref) / ref)


def test_metric_by_registered_name(lm_dir):
    src, text = lm_dir
    res = _cli("evaluate", src, "--data", text, "--samples", "8", "--seq-len", "32",
               "--metric", "next-token-error",
               "--format", "json")
    if res.exit_code == 1 and "unknown metric" in res.stderr:
        pytest.skip("specprune's --metric does not look up registered metric plugins yet")
    assert res.exit_code == 0, res.stderr
    assert 0.5 < json.loads(res.stdout)["reference_value"] <= 1.0


# --------------------------------------------------------------------------------------------
# adapter


class ChannelNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = ChannelLinear(12, 24)
        self.act = nn.GELU()
        self.out = ChannelLinear(24, 6)

    def forward(self, x):
        return self.out(self.act(self.mix(x)))


def _channel_data(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, 12).reshape(1, 12, 1)
    return [torch.randn(4, 12, 20, generator=g) * scale for _ in range(3)]


def test_adapter_selects_layers_and_measures_the_channel_covariance():
    import specprune
    from specprune.layers import select_layers

    model = ChannelNet()
    assert [(t.name, t.d_in, t.d_out, type(t.adapter).__name__) for t in select_layers(model)] == [
        ("mix", 12, 24, "ChannelLinearAdapter"), ("out", 24, 6, "ChannelLinearAdapter")]
    data = _channel_data()
    analysis = specprune.analyze(model, data)
    grp = analysis.group_of("mix")
    sigma = (grp.eigenvectors.astype(np.float64) * grp.eigenvalues) @ grp.eigenvectors.T.astype(np.float64)
    x = torch.cat([b.transpose(1, 2).reshape(-1, 12) for b in data]).double()
    expected = (x.T @ x / x.shape[0]).numpy()
    assert np.allclose(sigma, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert {lay.name for lay in analysis.layers} == {"mix", "out"}


def test_adapter_layers_compress_save_and_load(tmp_path):
    import specprune
    from specprune.compress.apply import apply_
    from specprune.compress.saved import save_compressed
    from specprune.plan import LayerPlan, Plan

    model = ChannelNet()
    x = _channel_data()[0]
    plan = Plan(model={"source": "example", "fingerprint": ""}, tolerance=0.0, metric="none",
                layers={"mix": LayerPlan(method="magnitude", prune_rate=0.5, bits=4),
                        "out": LayerPlan(bits=8, group_size=12)})
    apply_(model, plan)
    assert int((model.mix.weight == 0).sum()) >= 12 * 24 // 2
    with torch.no_grad():
        y = model(x)
    save_compressed(model, plan, tmp_path, source={"path": "example"})
    packed = json.loads((tmp_path / "specprune.json").read_text(encoding="utf-8"))["quantized"]
    assert packed["mix.weight"]["bits"] == 4 and packed["out.weight"]["group_size"] == 12  # bit-packed
    back = specprune.load(tmp_path, arch=ChannelNet)
    with torch.no_grad():
        assert torch.equal(back(x), y)
