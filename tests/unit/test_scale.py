"""Scale (issue 7): the memory estimate, offloaded accumulators, the randomized top-k solver and
truncated spectra, sharded and device-mapped checkpoints, TF32 handling, and the CUDA paths
(``@pytest.mark.gpu``: skipped without a GPU)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from specprune.analysis import Analysis, analyze
from specprune.data import Batches
from specprune.errors import InputError
from specprune.layers import select_layers
from specprune.memory import (
    EIGH_WORKSPACE,
    FP32,
    FP64,
    MemoryEstimate,
    check_memory,
    choose_solver,
    estimate_analysis_memory,
    free_memory,
    plan_memory,
)
from specprune.probe import SpectrumProbe, discover_input_groups, run_probe
from specprune.randomized import compare_to_full, flat_tail_effective_rank, lumped_distortion, randomized_eigh
from specprune.toy import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _token_batches(vocab: int, n: int = 8, seq: int = 16, bs: int = 4, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    batches = [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones(min(bs, n - i), seq, dtype=torch.long)}
               for i in range(0, n, bs)]
    return Batches(batches, n, seq, seed)


@functools.lru_cache(maxsize=4)
def _haar(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _power_law_cov(d: int, b: float, seed: int = 0) -> torch.Tensor:
    """Q diag(k^-b) Qᵀ with a Haar-random Q (eigenpairs known exactly)."""
    q = _haar(d, seed)
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** (-b)
    return (q * lam) @ q.T


class WideLayer(nn.Module):
    """One Linear layer fed with x ~ N(0, Σ), Σ a power law with random eigenvectors."""

    def __init__(self, d: int, d_out: int = 256, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(d, d_out, bias=False)

    def forward(self, x):
        return self.fc(x)


def _wide_batches(d: int, tokens: int, b: float = 1.2, n_batches: int = 4, seed: int = 0) -> Batches:
    cov = _power_law_cov(d, b, seed)
    chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(d, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed + 1)
    per = tokens // n_batches
    batches = [{"input": (torch.randn(per, d, generator=g, dtype=torch.float64) @ chol.T).float()}
               for _ in range(n_batches)]
    return Batches(batches, tokens, None, seed)


# ------------------------------------------------------------------------------------ memory model
def test_memory_estimate_by_hand_tiny_llama():
    """Tiny Llama (hidden 64, MLP 192, 2 blocks, untied 128-word head): per block q/k/v share one
    64-wide input, o one, gate/up one, down one 192-wide; plus the head: 7 groups of 64, 2 of 192."""
    model = tiny_model("llama", vocab_size=128)
    layers = select_layers(model)
    batches = _token_batches(128, n=8, seq=16, bs=4)
    groups = discover_input_groups(model, layers, batches.batches[0])
    assert groups["model.layers.0.self_attn.k_proj"] == groups["model.layers.0.self_attn.q_proj"]
    assert groups["model.layers.0.self_attn.v_proj"] == groups["model.layers.0.self_attn.q_proj"]
    assert groups["model.layers.0.mlp.up_proj"] == groups["model.layers.0.mlp.gate_proj"]
    assert len(set(groups.values())) == 9

    est = estimate_analysis_memory(layers, groups=groups, batch_tokens=64)
    assert not est.upper_bound and est.groups == 9 and est.layers == 15
    # on a CPU: float64 sum + float32 batch buffer per group, no transient batch Gram
    assert est.accumulators == (8 + 4) * (7 * 64**2 + 2 * 192**2) == 1_228_800
    assert est.batch_gram == 0
    assert est.eigensolve == 8 * EIGH_WORKSPACE * 192**2
    assert est.eigenvectors == 8 * (7 * 64**2 + 2 * 192**2)  # full solves keep d² eigenvectors per group
    assert est.activations == 6 * 4 * 64 * 192  # widest layer dimension: the MLP's 192 (head: 128)
    assert est.device_bytes == est.accumulators + est.eigenvectors + max(est.batch_gram + est.activations,
                                                                         est.eigensolve)
    # without the groups every layer counts alone: an upper bound, here 15 accumulators
    ub = estimate_analysis_memory(layers, batch_tokens=64)
    assert ub.upper_bound and ub.groups == 15
    assert ub.accumulators == 12 * (13 * 64**2 + 2 * 192**2) > est.accumulators
    cuda = estimate_analysis_memory(layers, groups=groups, batch_tokens=64, device="cuda")
    assert cuda.accumulators == 8 * (7 * 64**2 + 2 * 192**2) and cuda.batch_gram == 4 * 192**2


def test_memory_estimate_randomized_groups_and_offload_split():
    class L:  # a layer description is all the estimate needs
        def __init__(self, name, d_in, d_out):
            self.name, self.d_in, self.d_out = name, d_in, d_out

    layers = [L("wide", 8192, 4096), L("narrow", 1024, 1024)]
    est = estimate_analysis_memory(layers, device="cuda", batch_tokens=1000)
    k, ell = 1024, 2048  # default top-k d/8 and l = 2k
    assert est.eigenvectors == FP64 * (8192 * k + 1024 * 1024)
    assert est.eigensolve == max(FP64 * (4 * 8192 * ell + 3 * ell * ell), FP64 * EIGH_WORKSPACE * 1024**2)
    assert est.accumulators == FP64 * (8192**2 + 1024**2)
    assert est.device_bytes == est.accumulators + max(est.batch_gram + est.activations, est.eigensolve)
    assert est.host_bytes == est.eigenvectors
    off = estimate_analysis_memory(layers, device="cuda", batch_tokens=1000, offload=True)
    assert off.device_bytes == max(off.batch_gram + off.activations, off.eigensolve + FP64 * 8192**2)
    assert off.host_bytes == off.accumulators + FP32 * 8192**2 + off.eigenvectors
    assert off.device_bytes < est.device_bytes and off.host_bytes > est.host_bytes
    d = off.to_dict()
    assert d["offload"] is True and d["bytes"]["accumulators"] == off.accumulators
    assert "free" not in str(d)  # run-to-run values stay out of analysis.json


def test_choose_solver_rules():
    assert choose_solver(1024) == ("full", 1024)
    assert choose_solver(8192) == ("randomized", 1024)
    assert choose_solver(16384, top_k=512) == ("randomized", 512)
    assert choose_solver(1024, "randomized", 128) == ("randomized", 128)
    assert choose_solver(1024, "randomized", 600) == ("full", 1024)  # l = 2k would span the space
    assert choose_solver(4096, threshold=4096) == ("randomized", 512)
    with pytest.raises(InputError):
        choose_solver(10, "lanczos")
    with pytest.raises(InputError):
        choose_solver(10, "randomized", 0)


def test_plan_memory_offloads_when_only_that_fits(monkeypatch):
    class L:
        def __init__(self, name, d):
            self.name, self.d_in, self.d_out = name, d, d

    layers = [L(f"l{i}", 4096) for i in range(8)]
    full = estimate_analysis_memory(layers, device="cuda", batch_tokens=512)
    off = estimate_analysis_memory(layers, device="cuda", batch_tokens=512, offload=True)
    free = {"cuda": (full.device_bytes + off.device_bytes) // 2, "cpu": 10 * off.host_bytes}
    monkeypatch.setattr("specprune.memory.free_memory", lambda dev: free[torch.device(dev).type])

    auto = plan_memory(layers, "cuda", batch_tokens=512)
    assert auto.offload and "offloaded" in auto.note and "offloaded" in auto.describe()
    assert plan_memory(layers, "cuda", batch_tokens=512, offload=True).offload
    with pytest.raises(InputError, match="--offload"):
        plan_memory(layers, "cuda", batch_tokens=512, offload=False)
    free["cuda"] = full.device_bytes + 1
    assert not plan_memory(layers, "cuda", batch_tokens=512).offload
    free["cuda"] = off.device_bytes - 1
    with pytest.raises(InputError, match="even with --offload"):
        plan_memory(layers, "cuda", batch_tokens=512)
    free["cuda"], free["cpu"] = 10 * full.device_bytes, off.host_bytes - 1
    with pytest.raises(InputError, match="host memory"):
        plan_memory(layers, "cuda", batch_tokens=512, offload=True)
    free["cpu"] = full.device_bytes - 1
    with pytest.raises(InputError, match="--include"):
        plan_memory(layers, "cpu", batch_tokens=512)


def test_check_memory_message_is_one_line():
    est = MemoryEstimate("cuda:0", False, 10 << 30, 1 << 20, 1 << 20, 1 << 30, 1 << 30, 0, 3, 3, 8192, False,
                         free_device=4 << 30, free_host=64 << 30)
    with pytest.raises(InputError) as err:
        check_memory(est)
    msg = str(err.value)
    assert "\n" not in msg and "--offload" in msg and "GiB" in msg


def test_free_memory_reads_the_host():
    free = free_memory("cpu")
    assert free is not None and free > 1 << 20
    assert free_memory("meta") is None


def test_analyze_checks_memory_up_front_and_records_it(monkeypatch, tmp_path):
    model = tiny_model("llama", vocab_size=128)
    block0 = [r"re:model\.layers\.0\..*"]  # q/k/v, o, gate/up, down: 3 groups of 64, 1 of 192
    monkeypatch.setenv("SPECPRUNE_HOST_MEMORY", "100000")  # 100 kB "available"
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(InputError, match="--include/--exclude"):
        analyze(model, _token_batches(128), include=block0)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    lines: list[str] = []
    res = analyze(model, _token_batches(128), include=block0, memory_check=False, log=lines.append)
    assert any(line.startswith("memory: ") for line in lines)
    assert res.memory["bytes"]["accumulators"] == 12 * (3 * 64**2 + 192**2)  # CPU: float64 sum + float32 buffer
    assert res.memory["upper_bound"] is False and res.memory["groups"] == 4 and res.memory["layers"] == 7
    assert res.to_dict()["memory"] == res.memory
    res.save(tmp_path)
    assert Analysis.load(tmp_path).memory == res.memory


def test_memory_estimate_bounds_measured_accumulator_bytes():
    """The accumulator bytes the probe really allocates equal the exact estimate."""
    model = tiny_model("llama", vocab_size=128)
    layers = select_layers(model)
    batches = _token_batches(128)
    probe = SpectrumProbe(model, layers)
    with probe, torch.inference_mode():
        for b in batches.batches:
            probe.set_batch(b)
            model(**b)
        # the float64 sum and the CPU's float32 batch buffer, both alive during the pass
        allocated = sum(a.gram.numel() * a.gram.element_size() + a._buf.nbytes for a in probe.accumulators.values())
    est = estimate_analysis_memory(layers, groups=probe.layer_acc)
    assert allocated == est.accumulators
    assert all(a._buf is None for a in probe.results().values())  # the buffers go at the end


# ------------------------------------------------------------------------------------ offload / TF32
def test_offloaded_accumulators_match(monkeypatch):
    model = tiny_model("gpt2", vocab_size=128)
    layers = select_layers(model)
    batches = _token_batches(128).batches
    a = run_probe(model, layers, batches).results()
    b = run_probe(model, layers, batches, offload=True).results()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].offload and not a[key].offload and b[key].gram.device.type == "cpu"
        assert torch.equal(a[key].gram, b[key].gram) and a[key].tokens == b[key].tokens


def test_tf32_off_during_accumulation_and_restored():
    model = tiny_model("bert", vocab_size=128)
    layers = select_layers(model)
    seen = []
    handle = layers[0].module.register_forward_pre_hook(
        lambda m, a: seen.append(torch.backends.cuda.matmul.allow_tf32))
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        run_probe(model, layers, _token_batches(128).batches)
        assert seen and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32 is True

        class Boom(RuntimeError):
            pass

        def boom():
            yield _token_batches(128).batches[0]
            raise Boom

        class Batched(list):
            def __iter__(self):
                return boom()

        with pytest.raises(Boom):
            run_probe(model, layers, Batched([None]))
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = previous


# ------------------------------------------------------------------------------------ randomized solver
@pytest.mark.parametrize("b", [0.8, 1.2, 2.0])
def test_randomized_eigh_error_against_full(b):
    a = _power_law_cov(1024, b)
    res = randomized_eigh(a, 128, seed=3)
    q = _haar(1024, 0)  # the exact eigenpairs, descending
    full = torch.arange(1, 1025, dtype=torch.float64) ** (-b)
    err = compare_to_full(a, res, full=(full, q))
    assert res.k == 128 and res.eigenvectors.shape == (1024, 128) and res.oversample == 128
    assert err.rel_eig_half < 1e-4  # the well-separated top half: essentially exact
    assert err.rel_eig_max < 5e-3  # up to mode k (measured 2.4e-3 at b = 0.8)
    assert err.sin_theta_half < 0.05
    assert 0.0 <= err.tail_rel < 1e-2  # Ritz values ≤ λ: the lumped tail is never underestimated
    assert bool((res.eigenvalues <= full[:128] * (1 + 1e-12)).all())
    # a posteriori: some eigenvalue within ‖r_j‖ of θ_j (Bauer–Fike); for the separated top modes, λ_j
    top = 32
    gap = (res.eigenvalues[:top] - full[:top]).abs()
    assert bool((gap <= res.residuals[:top] * (1 + 1e-9) + 1e-15).all())
    assert res.max_relative_residual < 0.1
    assert res.tail_trace == pytest.approx(float(full.sum() - res.eigenvalues.sum()), rel=1e-9)


def test_randomized_eigh_is_deterministic_and_falls_back_to_full():
    a = _power_law_cov(256, 1.0)
    r1, r2 = randomized_eigh(a, 32, seed=5), randomized_eigh(a, 32, seed=5)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    whole = randomized_eigh(a, 200)  # l = 2k > d: a full solve, truncated to k
    np.testing.assert_allclose(whole.eigenvalues.numpy(), torch.linalg.eigvalsh(a).flip(0)[:200].numpy(),
                               rtol=1e-10)
    with pytest.raises(ValueError):
        randomized_eigh(torch.zeros(3, 4), 2)


def test_lumped_distortion_exact_for_a_flat_tail():
    d, k = 64, 8
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.linspace(5, 1, k, dtype=torch.float64), torch.full((d - k,), 0.01, dtype=torch.float64)])
    cov = (q * lam) @ q.T
    dw = torch.randn(16, d, generator=g, dtype=torch.float64)
    exact = float(torch.trace(dw @ cov @ dw.T))
    approx = lumped_distortion(dw, q[:, :k], lam[:k], 0.01)
    assert approx == pytest.approx(exact, rel=1e-10)


def test_flat_tail_effective_rank_is_an_upper_bound():
    lam = np.arange(1, 513, dtype=np.float64) ** -1.1
    from specprune.spectra import effective_rank

    k = 64
    bound = flat_tail_effective_rank(lam[:k], float(lam[k:].sum()), 512 - k)
    assert bound >= effective_rank(lam)
    flat = np.concatenate([lam[:k], np.full(512 - k, lam[k:].mean())])
    assert flat_tail_effective_rank(lam[:k], float(lam[k:].sum()), 512 - k) == pytest.approx(effective_rank(flat))


def test_truncated_analysis_of_a_wide_layer(tmp_path):
    """d = 1024 with the threshold forced down: top-k eigenvalues and energies agree with the full
    solve, the lumped tail holds exactly the rest of the energy, k_max stays d_in, save/load keeps it."""
    d, k = 1024, 128
    model = WideLayer(d)
    full = analyze(model, _wide_batches(d, 4096), precision="float64")  # the exact reference
    trunc = analyze(model, _wide_batches(d, 4096), solver="auto", top_k=k, randomized_threshold=1024)
    lf, lt = full.layers[0], trunc.layers[0]
    assert lt.truncation is not None and lf.truncation is None
    assert lt.truncation["modes_solved"] == k and lt.truncation["tail_modes"] == d - k
    assert len(lt.eigenvalues) == k and lt.k_max == d == lf.k_max
    assert trunc.groups["fc"].eigenvectors.shape == (d, k) and trunc.truncated and not full.truncated
    np.testing.assert_allclose(lt.eigenvalues[:k // 2], lf.eigenvalues[:k // 2], rtol=1e-6)
    np.testing.assert_allclose(lt.eigenvalues, lf.eigenvalues[:k], rtol=2e-2)
    np.testing.assert_allclose(lt.mode_energy[:k // 2], lf.mode_energy[:k // 2], rtol=1e-4)
    # the lumped tail: total energy exact, so tail = total − solved head
    assert lt.energy == pytest.approx(lf.energy, rel=1e-9)
    assert lt.tail_energy[k] == pytest.approx(lt.lumped_tail_energy)
    assert lt.lumped_tail_energy == pytest.approx(float(lf.tail_energy[k]), rel=2e-2)
    assert lt.tail_energy[0] == pytest.approx(lf.tail_energy[0], rel=1e-9)
    assert trunc.groups["fc"].tail_trace == pytest.approx(float(lf.eigenvalues[k:].sum()), rel=2e-2)
    assert lt.effective_rank >= lf.effective_rank * 0.999
    if lt.k_star is not None:
        assert lt.r_star == pytest.approx(1 - lt.k_star / d)
    assert any(f.startswith("truncated: top 128 of 1024") for f in lt.flags)
    assert trunc.groups["fc"].solver["method"] == "randomized"
    assert trunc.groups["fc"].solver["max_relative_residual"] < 0.1
    # the truncated covariance model reproduces the head exactly and the tail's mass
    cov = trunc.groups["fc"].covariance()
    assert np.trace(cov) == pytest.approx(float(lf.eigenvalues.sum()), rel=1e-9)
    trunc.save(tmp_path)
    back = Analysis.load(tmp_path)
    g = back.groups["fc"]
    assert g.truncated and g.dim == d and g.tail_trace == pytest.approx(trunc.groups["fc"].tail_trace)
    assert back.layers[0].lumped_tail_energy == pytest.approx(lt.lumped_tail_energy)
    assert back.layers[0].to_dict()["truncation"]["modes_solved"] == k
    assert back.layers[0].energy == pytest.approx(lt.energy)
    full.require_full_spectra("recommend")
    with pytest.raises(InputError, match="--solver full"):
        back.require_full_spectra("recommend")


def test_solver_full_ignores_the_threshold():
    """The Python API solves fully by default (recommend/apply need every mode); ``auto`` applies the
    width threshold."""
    model = WideLayer(256, 64)
    res = analyze(model, _wide_batches(256, 1024), randomized_threshold=16, top_k=32)
    assert res.layers[0].truncation is None and len(res.layers[0].eigenvalues) == 256
    res = analyze(model, _wide_batches(256, 1024), solver="auto", randomized_threshold=16, top_k=32)
    assert res.layers[0].truncation["modes_solved"] == 32
    with pytest.raises(InputError):
        analyze(model, _wide_batches(256, 1024), solver="bogus")


# ------------------------------------------------------------------------------------ checkpoints
def _save_llama(path, tokenizer=None, **kw):
    model = tiny_model("llama", vocab_size=128)
    model.save_pretrained(str(path), **kw)
    return model


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    from specprune.models import load_model

    ref = _save_llama(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    loaded = load_model(tmp_path / "sharded")
    assert loaded.kind == "hf"
    ref_sd, got_sd = ref.state_dict(), loaded.model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for n in ref_sd:
        assert torch.equal(ref_sd[n], got_sd[n]), n


def test_device_map_loading_and_options(tmp_path):
    pytest.importorskip("accelerate")
    from specprune.models import load_model

    ref = _save_llama(tmp_path / "m")
    mapped = load_model(tmp_path / "m", device_map="auto")  # all on the CPU here: placed, not dispatched
    ref_sd, got_sd = ref.state_dict(), mapped.model.state_dict()
    assert all(torch.equal(ref_sd[n], got_sd[n]) for n in ref_sd)
    with pytest.raises(InputError, match="device-map"):
        load_model(tmp_path / "m", device_map="everywhere")
    with pytest.raises(InputError, match="Hugging Face model directories"):
        load_model(ref, device_map="auto")


def test_dispatched_model_is_not_moved_and_offloaded_weights_are_read(tmp_path, monkeypatch):
    """A model dispatched by accelerate with one block offloaded to disk (its weights are ``meta``
    outside its forward): analyze never calls ``model.to``, the hooks see real inputs and the spectra
    use the real weights — the same numbers as the plain model."""
    pytest.importorskip("accelerate")
    from transformers import LlamaForCausalLM

    from specprune.models import load_model

    _save_llama(tmp_path / "m")
    plain = load_model(tmp_path / "m").model
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), device_map=dmap,
                                           offload_folder=str(tmp_path / "offload"))
    assert off.hf_device_map and off.model.layers[1].mlp.down_proj.weight.device.type == "meta"

    def refuse(*a, **k):
        raise AssertionError("a dispatched model was moved")

    monkeypatch.setattr(off, "to", refuse)
    sel = [r"re:model\.layers\.1\.(self_attn\.q_proj|mlp\..*)", "lm_head"]
    a = analyze(plain, _token_batches(128), include=sel)
    lines: list[str] = []
    b = analyze(off, _token_batches(128), include=sel, device="cpu", log=lines.append)
    assert any("device map" in line for line in lines)
    assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers]
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_allclose(lb.eigenvalues, la.eigenvalues, rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(lb.mode_energy, la.mode_energy, rtol=1e-4, atol=1e-10)
    assert off.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # left as accelerate keeps it


def test_cli_analyze_scale_options(tmp_path, tiny_dirs, small_text_file):
    import json

    from typer.testing import CliRunner

    from specprune.cli.app import app

    runner = CliRunner()
    out = tmp_path / "a"
    r = runner.invoke(app, ["analyze", str(tiny_dirs["llama"]), "--data", str(small_text_file), "--samples", "8",
                            "--seq-len", "32", "--batch-size", "4", "--solver", "randomized", "--top-k", "8",
                            "--device-map", "auto", "--offload", "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "analysis.json").read_text())
    assert all(lay["truncation"]["modes_solved"] == 8 for lay in doc["layers"])
    assert all(lay["k_max"] == lay["d_in"] for lay in doc["layers"])
    assert doc["memory"]["device"] == "cpu"
    r = runner.invoke(app, ["analyze", str(tiny_dirs["llama"]), "--data", str(small_text_file), "--solver",
                            "lanczos", "--quiet"])
    assert r.exit_code == 1 and "solver must be" in r.output


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@cuda
def test_cuda_analysis_equals_cpu():
    model = tiny_model("llama", vocab_size=128)
    a = analyze(model, _token_batches(128), device="cpu")
    b = analyze(model, _token_batches(128), device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # moved back
    for la, lb in zip(a.layers, b.layers):
        top = float(la.eigenvalues[0])
        np.testing.assert_allclose(lb.eigenvalues, la.eigenvalues, rtol=1e-4, atol=1e-7 * top)
        assert la.tokens == lb.tokens
    assert b.memory["device"].startswith("cuda")


@pytest.mark.gpu
@cuda
def test_cuda_offload_equals_on_device_and_keeps_grams_on_cpu():
    model = tiny_model("llama", vocab_size=128).cuda()
    layers = select_layers(model)
    batches = _token_batches(128).batches
    dev = torch.device("cuda")
    a = run_probe(model, layers, batches, dev).results()
    b = run_probe(model, layers, batches, dev, offload=True).results()
    for key in a:
        assert a[key].gram.device.type == "cuda" and b[key].gram.device.type == "cpu"
        torch.testing.assert_close(a[key].gram.cpu(), b[key].gram, rtol=0, atol=0)
    ra = analyze(model, _token_batches(128), device="cuda")
    rb = analyze(model, _token_batches(128), device="cuda", offload=True)
    assert rb.memory["offload"] is True and ra.memory["offload"] is False
    for la, lb in zip(ra.layers, rb.layers):
        np.testing.assert_allclose(lb.eigenvalues, la.eigenvalues, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@cuda
def test_cuda_bf16_model_upcast_in_hook():
    model = tiny_model("llama", vocab_size=128)
    ref = analyze(model, _token_batches(128), device="cpu")
    bf = tiny_model("llama", vocab_size=128).to(torch.bfloat16)
    res = analyze(bf, _token_batches(128), device="cuda")
    assert next(bf.parameters()).dtype == torch.bfloat16
    for la, lb in zip(ref.layers, res.layers):
        assert np.all(np.isfinite(lb.eigenvalues)) and lb.eigenvalues.dtype == np.float64
        # bf16 activations carry ~3 significant digits: the spectra agree to that
        np.testing.assert_allclose(lb.eigenvalues[:8], la.eigenvalues[:8], rtol=5e-2)


@pytest.mark.gpu
@cuda
def test_cuda_tf32_disabled_during_accumulation_and_restored():
    model = tiny_model("bert", vocab_size=128).cuda()
    layers = select_layers(model)
    seen = []
    h = layers[0].module.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cuda.matmul.allow_tf32))
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        run_probe(model, layers, _token_batches(128).batches, torch.device("cuda"))
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        h.remove()
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@cuda
def test_cuda_randomized_matches_cpu():
    a = _power_law_cov(2048, 1.0)
    rc = randomized_eigh(a, 128, seed=1)
    rg = randomized_eigh(a.cuda(), 128, seed=1)
    np.testing.assert_allclose(rg.eigenvalues.cpu().numpy(), rc.eigenvalues.numpy(), rtol=1e-8)
    assert math.isclose(rg.tail_trace, rc.tail_trace, rel_tol=1e-9)
