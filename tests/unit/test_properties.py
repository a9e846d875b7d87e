"""Property-based tests (hypothesis): data loaders, plan JSON, CLI option validation.

* text windows tile the token stream without overlap; calibration and evaluation windows are
  disjoint, drawn without replacement, in the documented numbers, the same for the same seed;
* tensor data splits the same way and keeps labels aligned with inputs;
* a plan survives JSON (file and dict) unchanged;
* whatever the option values, the CLI ends with exit 0, 1 (one line) or 2 (usage) — no
  exception escapes the error boundary.

Example counts are kept small so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from specprune.cli.app import app
from specprune.data import EVAL_FRACTION, load_data, split_indices, text_windows, tokenize_stream
from specprune.errors import InputError
from specprune.plan import LayerPlan, Plan

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine (and the result is
    the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_eval_of(n: int) -> int:
    return n if n < 2 else max(1, round(EVAL_FRACTION * n))


# ------------------------------------------------------------------------------------------------
# text data


@pytest.fixture(scope="module")
def corpus(small_text_file, tmp_path_factory) -> Path:
    """About 1,500 words of the generated text (fast to tokenize for every example)."""
    paras = small_text_file.read_text(encoding="utf-8").split("\n\n")
    out, words = [], 0
    for p in paras:
        out.append(p)
        words += len(p.split())
        if words > 1500:
            break
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n\n".join(out), encoding="utf-8")
    return f


@pytest.fixture(scope="module", params=["bpe", "minilm"])
def tok(request):
    """A tokenizer without special tokens (byte-level BPE) and one with [CLS]/[SEP] (MiniLM)."""
    if request.param == "bpe":
        return request.getfixturevalue("tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(request.getfixturevalue("minilm_dir")), local_files_only=True)


def _specials(tok) -> int:
    return tok.num_special_tokens_to_add()  # the tokenizer's own count, independent of specprune


@FEW
@given(seq_len=st.integers(1, 96))
def test_text_windows_tile_the_stream_without_overlap(tok, corpus, seq_len):
    docs = [corpus.read_text(encoding="utf-8")]
    stream = tokenize_stream(tok, docs)
    k = _specials(tok)
    body = seq_len - k
    if body <= 0 or len(stream) < body:
        with pytest.raises(InputError):
            text_windows(tok, docs, seq_len)
        return
    w = text_windows(tok, docs, seq_len)
    n = len(stream) // body
    assert tuple(w.shape) == (n, seq_len)
    assert k in (0, 2)
    bodies = []
    for row in w.tolist():
        piece = row[1:-1] if k == 2 else row
        if k:  # BERT-style: [CLS] body [SEP], as the model saw in training
            assert (row[0], row[-1]) == (tok.cls_token_id, tok.sep_token_id)
        bodies.extend(piece)
    assert bodies == stream[: n * body]  # in order, contiguous, no token twice


@FEW
@given(n=st.integers(1, 500), seed=st.integers(0, 2**32 - 1))
def test_split_indices_partition(n, seed):
    calib, held = split_indices(n, seed)
    if n < 2:
        assert calib.tolist() == held.tolist() == [0]
        return
    assert len(held) == n_eval_of(n)
    assert sorted([*calib.tolist(), *held.tolist()]) == list(range(n))
    c2, h2 = split_indices(n, seed)
    assert np.array_equal(calib, c2) and np.array_equal(held, h2)


def _rows(batches) -> list[tuple]:
    return [tuple(r) for b in batches for r in b["input_ids"].tolist()]


@FEW
@given(samples=st.integers(1, 200), seq_len=st.integers(4, 64), batch_size=st.integers(1, 16),
       seed=st.integers(0, 2**31 - 1))
def test_text_calibration_and_evaluation_windows(tok, corpus, samples, seq_len, batch_size, seed):
    docs = [corpus.read_text(encoding="utf-8")]
    windows = [tuple(r) for r in text_windows(tok, docs, seq_len).tolist()]
    assume(len(set(windows)) == len(windows))  # identify rows by content
    n = len(windows)
    kw = {"samples": samples, "seq_len": seq_len, "batch_size": batch_size, "seed": seed}
    cal = load_data([corpus], tok, split="calibration", **kw)
    ev = load_data([corpus], tok, split="evaluation", **kw)
    c, e = _rows(cal), _rows(ev)
    assert len(c) == cal.samples == min(samples, n - n_eval_of(n) if n >= 2 else n)
    assert len(e) == ev.samples == min(samples, n_eval_of(n))
    assert set(c) <= set(windows) and set(e) <= set(windows)
    assert len(set(c)) == len(c) and len(set(e)) == len(e)  # without replacement
    if n >= 2:
        assert not set(c) & set(e)  # evaluation text never seen by calibration
    for batches in (cal, ev):
        sizes = [b["input_ids"].shape[0] for b in batches]
        assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        for b in batches:
            assert b["input_ids"].shape[1] == seq_len
            assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
    assert cal.describe() == {"tokens": len(c) * seq_len, "samples": len(c), "seq_len": seq_len, "seed": seed}
    again = load_data([corpus], tok, split="calibration", **kw)
    assert _rows(again) == c  # same seed, same windows, same order


# ------------------------------------------------------------------------------------------------
# tensor data


@FEW
@given(n=st.integers(1, 60), samples=st.integers(1, 80), batch_size=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), suffix=st.sampled_from([".safetensors", ".pt", ".npy"]))
def test_tensor_data_split(tmp_path_factory, n, samples, batch_size, seed, suffix):
    d = tmp_path_factory.mktemp("tensors")
    ids = torch.arange(n, dtype=torch.float32)
    x = ids[:, None].repeat(1, 3)  # row i holds i
    f = d / f"data{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"input": x, "labels": ids * 10}, str(f))
    elif suffix == ".pt":
        torch.save({"input": x, "labels": ids * 10}, str(f))
    else:
        np.save(str(f), x.numpy())
    kw = {"samples": samples, "batch_size": batch_size, "seed": seed}
    cal = load_data([f], split="calibration", **kw)
    ev = load_data([f], split="evaluation", **kw)
    c = [int(r) for b in cal for r in b["input"][:, 0].tolist()]
    e = [int(r) for b in ev for r in b["input"][:, 0].tolist()]
    assert len(c) == min(samples, n - n_eval_of(n) if n >= 2 else n)
    assert len(e) == min(samples, n_eval_of(n))
    assert len(set(c)) == len(c) and len(set(e)) == len(e)
    assert set(c) | set(e) <= set(range(n))
    if n >= 2:
        assert not set(c) & set(e)
    if suffix != ".npy":
        for b in [*cal, *ev]:
            assert torch.equal(b["labels"], b["input"][:, 0] * 10)  # labels stay with their inputs
    assert all(b["input"].shape[0] <= batch_size for b in cal)


# ------------------------------------------------------------------------------------------------
# plan JSON round trip

names = st.lists(st.text("abcdefghij_0123456789", min_size=1, max_size=6), min_size=1, max_size=4).map(".".join)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def layer_plans(draw) -> LayerPlan:
    method = draw(st.sampled_from([None, "spectral", "whitened", "magnitude"]))
    bits = draw(st.one_of(st.none(), st.integers(2, 8)))
    return LayerPlan(
        method=method,
        prune_rate=draw(st.floats(0, 1, exclude_max=True)) if method else 0.0,
        rank=draw(st.one_of(st.none(), st.integers(1, 4096))) if method else None,
        bits=bits,
        group_size=draw(st.one_of(st.none(), st.integers(1, 512))) if bits else None,
        predicted_delta=draw(finite),
    )


@st.composite
def plans(draw) -> Plan:
    return Plan(
        model={"source": draw(st.text(max_size=20)), "fingerprint": "sha256:" + draw(st.text("0123456789abcdef",
                                                                                          max_size=32))},
        tolerance=draw(st.floats(1e-6, 1.0)), metric=draw(st.sampled_from(["lm-loss", "output-mse", "task-loss"])),
        layers=draw(st.dictionaries(names, layer_plans(), max_size=6)),
        calibrated=draw(st.booleans()), predicted_delta=draw(finite), predicted_delta_uncertainty=draw(finite),
        size={k: draw(st.integers(0, 2**40)) for k in ("params_before", "params_after", "bits_before", "bits_after")},
        details={"note": draw(st.text(max_size=10)), "numbers": draw(st.lists(finite, max_size=3))},
    )


@settings(max_examples=40, deadline=None)
@given(plan=plans())
def test_plan_json_round_trip(tmp_path_factory, plan):
    doc = plan.to_dict()
    back = Plan.from_dict(json.loads(json.dumps(doc)))
    assert back.to_dict() == doc
    f = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(f)
    assert Plan.load(f).to_dict() == doc
    assert json.loads(f.read_text()) == doc  # the file is strict JSON of exactly this document


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["method", "prune_rate", "rank", "bits", "group_size"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), finite, st.text(max_size=5),
                       st.lists(st.integers(), max_size=2)))
def test_plan_layer_validation_raises_only_input_error(field, value):
    doc = {"format": 1, "layers": {"a.b": {"method": "spectral", "prune_rate": 0.5, "bits": 4, field: value}}}
    try:
        Plan.from_dict(doc)
    except InputError:
        pass


def test_plan_top_level_numbers_are_validated():
    with pytest.raises(InputError):
        Plan.from_dict({"format": 1, "layers": {}, "predicted_delta": "x"})


# ------------------------------------------------------------------------------------------------
# CLI option validation: exit 0, 1 (one line) or 2 (usage) and nothing else


def _invoke(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 1, 2), res.exit_code
    if res.exit_code == 1:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("specprune: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return res


def _opt(strategy):
    """An option value as a user might type it: usually the number, sometimes junk text."""
    return st.one_of(strategy.map(str), st.text("0123456789.-abcxe ,", min_size=1, max_size=6)
                     .filter(lambda s: not s.startswith("-") or s.lstrip("-")[:1].isdigit()))


@pytest.fixture(scope="module")
def llama(tiny_dirs) -> Path:
    from specprune.models import load_model

    load_model(tiny_dirs["llama"])  # first import's third-party chatter happens here
    return tiny_dirs["llama"]


@given(tolerance=_opt(st.floats(allow_nan=True, allow_infinity=True)), bits=_opt(st.integers(-3, 12)),
       methods=st.sampled_from(["prune", "quantize", "prune,quantize", "magic", ""]),
       group=_opt(st.integers(-2, 300)), seq_len=_opt(st.integers(-4, 64)))
@settings(max_examples=30, deadline=None)
def test_recommend_and_compress_options(tmp_path_factory, tolerance, bits, methods, group, seq_len):
    """Against a model that does not exist: every option combination is either refused with its own
    message or gets as far as loading the model."""
    missing = tmp_path_factory.getbasetemp() / "no-such-model"
    for cmd in ("recommend", "compress"):
        res = _invoke([cmd, missing, "--data", "x.txt", "--tolerance", tolerance, "--bits-choices", bits,
                       "--methods", methods, "--group-size", group, "--seq-len", seq_len,
                       "--out", tmp_path_factory.getbasetemp() / "never"])
        if res.exit_code == 1:
            msg = res.stderr.strip()
            assert msg.startswith(("specprune: error: --", "specprune: error: model not found",
                                   "specprune: error: invalid value for '--")), msg
        assert not (tmp_path_factory.getbasetemp() / "never").exists()


@CLI
@given(rate=st.one_of(st.floats(-1, 2), st.sampled_from([float("nan"), float("inf"), 0.0, 0.999])))
def test_prune_rate(tmp_path_factory, llama, rate):
    out = tmp_path_factory.mktemp("prune") / "out"
    res = _invoke(["prune", llama, "--rate", repr(rate), "--method", "magnitude", "--include",
                   "model.layers.0.mlp.down_proj", "--out", out, "--quiet"])
    ok = math.isfinite(rate) and 0 <= rate < 1
    assert (res.exit_code == 0) == ok, res.stderr
    assert out.exists() == ok
    if not ok:
        assert res.stderr.startswith("specprune: error: --rate must be in [0, 1)")


@CLI
@given(bits=_opt(st.integers(-2, 12)), group=st.one_of(st.none(), st.integers(-4, 200)))
@example(bits="0.0", group=None).via("found by CI")  # an integral float: read as 0, refused as out of range
@example(bits="4", group=0)  # --group-size 0 is one scale per output channel, as for recommend
def test_quantize_options(tmp_path_factory, llama, bits, group):
    out = tmp_path_factory.mktemp("quant") / "out"
    args = ["quantize", llama, "--bits", bits, "--include", "model.layers.0.mlp.down_proj", "--out", out, "--quiet"]
    if group is not None:
        args += ["--group-size", group]
    res = _invoke(args)
    invalid = res.exit_code == 1 and res.stderr.startswith("specprune: error: invalid value for '--bits'")
    try:
        b = int(bits)
    except ValueError:
        try:
            f = float(bits)
        except ValueError:
            f = math.nan
        if not (math.isfinite(f) and f.is_integer()):  # not an integer: a bad value (exit 1, one line)
            assert invalid, res.stderr
            return
        if invalid:  # an integral float as text ("4.", "4e0"): refused as not an integer, one line
            return
        b = int(f)  # the option reads "2.0" as 2
    ok = 2 <= b <= 8 and (group is None or group >= 0)  # --group-size 0: one scale per channel
    assert (res.exit_code == 0) == ok, res.stderr
    assert (out / "specprune.json").exists() == ok


@CLI
@given(samples=st.integers(-2, 40), seq_len=st.one_of(st.integers(-2, 48), st.just(10**6)),
       batch_size=st.integers(-1, 9), seed=st.integers(0, 2**31 - 1))
def test_analyze_numeric_options(tmp_path_factory, llama, corpus, tokenizer, samples, seq_len, batch_size, seed):
    stream = len(tokenize_stream(tokenizer, [corpus.read_text(encoding="utf-8")]))
    res = _invoke(["analyze", llama, "--data", corpus, "--samples", samples, "--seq-len", seq_len,
                   "--batch-size", batch_size, "--seed", seed, "--include", "model.layers.0.self_attn.o_proj",
                   "--format", "json"])
    ok = samples > 0 and 0 < seq_len <= stream and batch_size > 0
    assert (res.exit_code == 0) == ok, res.stderr
    if ok:
        doc = json.loads(res.stdout)
        assert doc["calibration"]["seed"] == seed and doc["calibration"]["seq_len"] == seq_len
        n = stream // seq_len
        assert doc["calibration"]["samples"] == min(samples, n - n_eval_of(n) if n >= 2 else n)
