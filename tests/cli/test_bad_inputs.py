"""Bad input → one clear line on stderr and exit 1 (2 for an unknown option or a missing argument),
no traceback (unless ``--debug``), no output written, inputs unchanged (hash before/after).

One test per bad input of issue 8, each across the commands that take that input. Most runs go
through ``typer.testing.CliRunner`` (fast, in-process, with ``--quiet`` so stderr must be exactly
the error line); a few run ``python -m specprune`` end to end to show that a real process prints
one line and no traceback. Nothing is mocked: the files are really truncated, really pickles that
call ``os.system``, really unreadable (capabilities dropped with ``setpriv`` when running as root).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ERROR_PREFIX, one_error_line, tree_hash
from typer.testing import CliRunner

from specprune.cli.app import app

REPO = Path(__file__).resolve().parents[2]
FAST = ["--samples", "8", "--seq-len", "32", "--batch-size", "4"]
ALL_COMMANDS = ("analyze", "recommend", "prune", "quantize", "apply", "evaluate", "compress")
DATA_COMMANDS = ("analyze", "recommend", "prune", "apply", "evaluate", "compress")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine (and the result is
    the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers


def argv(cmd: str, model, data, out, plan=None, extra=()) -> list[str]:
    """A fast, otherwise valid invocation of ``cmd`` (so the bad input is the only fault)."""
    m, d, o = str(model), str(data), str(out)
    few = ["--include", "q_proj"]
    base = {
        "analyze": ["analyze", m, "--data", d, "--out", o, *FAST, *few],
        "recommend": ["recommend", m, "--data", d, "--tolerance", "0.05", "--out", o, *FAST, *few],
        "prune": ["prune", m, "--rate", "0.3", "--data", d, "--out", o, *FAST, *few],
        "quantize": ["quantize", m, "--bits", "4", "--out", o, *few],
        "apply": ["apply", m, "--plan", str(plan), "--data", d, "--out", o, *FAST],
        "evaluate": ["evaluate", m, "--data", d, "--out", o, *FAST],
        "compress": ["compress", m, "--data", d, "--tolerance", "0.05", "--out", o, *FAST, *few],
    }[cmd]
    return [*base, *extra, "--quiet"]


def out_path(tmp: Path, cmd: str) -> Path:
    """Where ``cmd`` writes: a file for recommend/evaluate, a directory otherwise."""
    return tmp / {"recommend": "plan.json", "evaluate": "evaluation.json"}.get(cmd, "out")


def invoke(args, inputs=(), code: int = 1, must_not_exist=()):
    """Run the CLI in-process; check the exit code, the single error line, that no exception
    escaped the error boundary, that every input is unchanged and that no output appeared.
    Returns the error message (without the prefix)."""
    before = {str(p): tree_hash(Path(p)) for p in inputs}
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"exception escaped the error boundary: {res.exception!r}\n{res.stderr}")
    assert res.exit_code == code, f"exit {res.exit_code} != {code}\nstderr: {res.stderr}\nstdout: {res.stdout}"
    for p in inputs:
        assert tree_hash(Path(p)) == before[str(p)], f"input {p} changed"
    for p in must_not_exist:
        assert not Path(p).exists(), f"{p} was written"
        assert not list(Path(p).parent.glob(f".{Path(p).name}.tmp-*")), f"temporary output of {p} left"
    if code != 1:
        return res.stderr
    return one_error_line(res.stderr)


def cli(*args, pythonpath=(), wrapper=(), timeout=240) -> subprocess.CompletedProcess:
    """``python -m specprune ARGS`` in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(REPO)]))
    return subprocess.run([*wrapper, sys.executable, "-m", "specprune", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


class Evil:
    """Unpickling this runs ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_pickle(obj, path: Path) -> Path:
    torch.save(obj, str(path))
    return path


# ------------------------------------------------------------------------------------------------
# fixtures: real broken inputs built once per module


@pytest.fixture(scope="module")
def llama(tiny_dirs) -> Path:
    from specprune.models import load_model

    load_model(tiny_dirs["llama"])  # first load: third-party import chatter goes to pytest, not a test
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def data(small_text_file) -> Path:
    return small_text_file


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("plan") / "plan.json"
    p.write_text(json.dumps({"format": 1, "model": {}, "layers": {  # pruning: reads the --data
        "model.layers.0.self_attn.q_proj": {"method": "spectral", "prune_rate": 0.3, "bits": 4}}}),
        encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def bad(tmp_path_factory, llama) -> dict[str, Path]:
    """Broken models and data, each a real file on disk."""
    root = tmp_path_factory.mktemp("bad")
    out: dict[str, Path] = {}

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(llama, d)
        return d

    weights = (llama / "model.safetensors").read_bytes()
    d = copy("truncated")
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out["truncated"] = d
    d = copy("garbage_header")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    out["garbage_header"] = d
    d = copy("evil_bin")
    (d / "model.safetensors").unlink()
    save_pickle({"model.embed_tokens.weight": Evil(root / "PWNED_bin")}, d / "pytorch_model.bin")
    out["evil_bin"] = d
    d = copy("remote_code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_custom.py").write_text(f"open({str(root / 'PWNED_remote')!r}, 'w').close()\n")
    out["remote_code"] = d
    d = copy("no_tokenizer")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    out["no_tokenizer"] = d
    d = root / "not_a_model"
    d.mkdir()
    (d / "README.md").write_text("my notes, not a model\n")
    out["not_a_model"] = d
    (root / "dangling").symlink_to(root / "nowhere")
    out["dangling"] = root / "dangling"

    from safetensors.torch import save_file

    from specprune.toy import build_cnn

    cnn = build_cnn().state_dict()
    save_file(cnn, str(root / "cnn.safetensors"))
    out["cnn"] = root / "cnn.safetensors"
    raw = (root / "cnn.safetensors").read_bytes()
    (root / "cnn_truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    out["cnn_truncated"] = root / "cnn_truncated.safetensors"
    out["evil_pt"] = save_pickle({"conv1.weight": Evil(root / "PWNED_pt")}, root / "evil.pt")
    out["marker_dir"] = root

    texts = root / "texts"
    texts.mkdir()
    (texts / "empty.txt").write_text("")
    (texts / "blank.txt").write_text("\n\n   \n\t\n")
    (texts / "empty.jsonl").write_text("\n")
    (texts / "short.txt").write_text("Just a few words.\n")
    (texts / "latin1.txt").write_bytes("Un café très naïf, déjà vu.\n".encode("latin-1") * 200)
    (texts / "no_text_field.jsonl").write_text('{"content": "the text is under another key"}\n')
    empty_dir = texts / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("not a .txt file")
    for name in ("empty.txt", "blank.txt", "empty.jsonl", "short.txt", "latin1.txt", "no_text_field.jsonl"):
        out[name] = texts / name
    out["empty_dir"] = empty_dir
    save_file({"input": torch.zeros(0, 3, 8, 8)}, str(texts / "empty_tensor.safetensors"))
    out["empty_tensor"] = texts / "empty_tensor.safetensors"
    out["evil_data"] = save_pickle({"input": Evil(root / "PWNED_data")}, texts / "evil_data.pt")
    return out


def no_markers(bad) -> None:
    """None of the malicious payloads ran."""
    assert not list(bad["marker_dir"].glob("PWNED*")), "untrusted code ran"


# ------------------------------------------------------------------------------------------------
# missing or unreadable paths


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_missing_model(cmd, tmp_path, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, tmp_path / "no-such-model", data, out, plan_file), [data, plan_file],
                 must_not_exist=[out])
    assert msg == f"model not found: {tmp_path / 'no-such-model'}"


def test_dangling_symlink_model(tmp_path, bad, data):
    msg = invoke(argv("analyze", bad["dangling"], data, tmp_path / "out"), [data], must_not_exist=[tmp_path / "out"])
    assert msg.startswith("model not found")


@pytest.mark.parametrize("cmd", DATA_COMMANDS)
def test_missing_data(cmd, tmp_path, llama, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, llama, tmp_path / "no-such.txt", out, plan_file), [llama, plan_file],
                 must_not_exist=[out])
    assert msg == f"data not found: {tmp_path / 'no-such.txt'}"


def test_missing_plan(tmp_path, llama, data):
    msg = invoke(argv("apply", llama, data, tmp_path / "out", tmp_path / "no-plan.json"), [llama, data],
                 must_not_exist=[tmp_path / "out"])
    assert msg.startswith("plan not found")


def _unreadable_runner():
    """Run a subprocess that cannot bypass file permissions (root: drop the DAC capabilities)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    probe = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
                            "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return (setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")


@pytest.mark.parametrize("what", ["weights", "model_dir", "data_file", "data_subdir"])
def test_unreadable_paths(what, tmp_path, llama, data):
    wrapper = _unreadable_runner()
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    shutil.copyfile(data, corpus / "a.txt")
    shutil.copyfile(data, corpus / "sub" / "b.txt")
    target, data_arg, expect = {
        "weights": (model / "model.safetensors", corpus, f"cannot read {model / 'model.safetensors'}"),
        "model_dir": (model, corpus, f"cannot read model {model}"),
        "data_file": (corpus / "a.txt", corpus / "a.txt", f"cannot read {corpus / 'a.txt'}"),
        "data_subdir": (corpus / "sub", corpus, f"cannot read data directory {corpus / 'sub'}"),
    }[what]
    hashes = {p: tree_hash(p) for p in (model, corpus)}
    out = tmp_path / "out"
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        res = cli("analyze", model, "--data", data_arg, "--out", out, *FAST, "--quiet", wrapper=wrapper)
    finally:
        target.chmod(mode)
    assert res.returncode == 1, res.stderr
    msg = one_error_line(res.stderr)
    assert msg.startswith(expect) and "Permission denied" in msg, msg
    assert not out.exists()
    assert {p: tree_hash(p) for p in (model, corpus)} == hashes


# ------------------------------------------------------------------------------------------------
# not a model, corrupted weights, pickles, remote code


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_directory_that_is_not_a_model(cmd, tmp_path, bad, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, bad["not_a_model"], data, out, plan_file), [bad["not_a_model"], data],
                 must_not_exist=[out])
    assert msg == f"{bad['not_a_model']} is not a model directory (no config.json or specprune.json)"


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
@pytest.mark.parametrize("kind", ["truncated", "garbage_header"])
def test_corrupted_safetensors_in_model_dir(cmd, kind, tmp_path, bad, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, bad[kind], data, out, plan_file), [bad[kind], data], must_not_exist=[out])
    assert msg.startswith(f"the weights in {bad[kind]} are not a readable safetensors file (corrupted or truncated?)")


def test_truncated_state_dict_file(tmp_path, bad):
    x = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"input": torch.randn(8, 3, 8, 8)}, str(x))
    msg = invoke(["analyze", bad["cnn_truncated"], "--arch", "specprune.toy:build_cnn", "--data", x,
                  "--out", tmp_path / "out", "--quiet"], [bad["cnn_truncated"], x], must_not_exist=[tmp_path / "out"])
    assert msg.startswith(f"{bad['cnn_truncated']} is not a readable safetensors file (corrupted or truncated?)")


def test_truncated_compressed_directory(tmp_path, llama, data):
    comp = tmp_path / "int4"
    invoke(["quantize", llama, "--bits", "4", "--include", "q_proj", "--out", comp, "--quiet"], [llama], code=0)
    weights = (comp / "model.safetensors").read_bytes()
    (comp / "model.safetensors").write_bytes(weights[:-200])
    msg = invoke(argv("evaluate", comp, data, tmp_path / "ev.json"), [comp, data],
                 must_not_exist=[tmp_path / "ev.json"])
    assert "not a readable safetensors file (corrupted or truncated?)" in msg


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory, llama, data) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "a"
    invoke(["analyze", llama, "--data", data, "--out", out, *FAST, "--include", "q_proj", "--quiet"], code=0)
    return out


@pytest.mark.parametrize("damage", ["truncated-spectra", "bad-json", "missing-source"])
def test_corrupted_analysis_directory(damage, tmp_path, analysis_dir, data):
    d = tmp_path / "analysis"
    shutil.copytree(analysis_dir, d)
    if damage == "truncated-spectra":
        raw = (d / "spectra.safetensors").read_bytes()
        (d / "spectra.safetensors").write_bytes(raw[: len(raw) // 2])
        expect = f"{d / 'spectra.safetensors'} is not readable (corrupted?)"
    elif damage == "bad-json":
        text = (d / "analysis.json").read_text()
        (d / "analysis.json").write_text(text[: len(text) // 2])
        expect = f"{d / 'analysis.json'} is not a specprune analysis"
    else:
        doc = json.loads((d / "analysis.json").read_text())
        doc["model"]["source"] = str(tmp_path / "gone")
        (d / "analysis.json").write_text(json.dumps(doc))
        expect = f"the analysis in {d} names source model {str(tmp_path / 'gone')!r}, which is not found"
    msg = invoke(["recommend", d, "--data", data, "--tolerance", "0.05", "--out", tmp_path / "plan.json", *FAST,
                  "--quiet"], [d, data], must_not_exist=[tmp_path / "plan.json"])
    assert msg.startswith(expect), msg


def test_recommend_out_inside_the_analysed_model(tmp_path, llama, data):
    """The model an analysis directory names is an input too: --out may not go inside it."""
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    a = tmp_path / "a"
    invoke(["analyze", model, "--data", data, "--out", a, *FAST, "--include", "q_proj", "--quiet"], code=0)
    before = tree_hash(model)
    msg = invoke(["recommend", a, "--data", data, "--tolerance", "0.05", "--out", model / "plan.json", *FAST,
                  "--overwrite", "--quiet"], [a, data], must_not_exist=[model / "plan.json"])
    assert msg.startswith(f"refusing to write output {model / 'plan.json'}: it is, lies inside or contains")
    assert tree_hash(model) == before


@pytest.mark.parametrize("text", ['{"format": 1, "layers": {', "not json", '{"format": 7, "layers": {}}', "[]"])
def test_corrupted_plan(text, tmp_path, llama, data):
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    msg = invoke(["apply", llama, "--plan", plan, "--out", tmp_path / "out", "--quiet"], [llama, plan],
                 must_not_exist=[tmp_path / "out"])
    assert msg.startswith((f"{plan} is not readable JSON", f"{plan}: unsupported plan format",
                           f"{plan} is not a JSON object")), msg


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_pickle_needing_code_in_model_dir_is_refused(cmd, tmp_path, bad, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, bad["evil_bin"], data, out, plan_file), [bad["evil_bin"], data], must_not_exist=[out])
    assert msg.startswith(f"refusing to load the weights in {bad['evil_bin']}: a pickle that needs arbitrary code")
    assert "weights_only=True" in msg and "posix.system" in msg  # the reason: the blocked global
    no_markers(bad)


def test_pickle_needing_code_as_state_dict_is_refused(tmp_path, bad, data):
    msg = invoke(["analyze", bad["evil_pt"], "--arch", "specprune.toy:build_cnn", "--data", data,
                  "--out", tmp_path / "out", "--quiet"], [bad["evil_pt"], data], must_not_exist=[tmp_path / "out"])
    assert msg.startswith(f"refusing to load {bad['evil_pt']}: it is a pickle that needs arbitrary code")
    assert "weights_only=True" in msg and "posix.system" in msg
    no_markers(bad)


def test_pickle_needing_code_as_tensor_data_is_refused(tmp_path, bad):
    msg = invoke(["analyze", bad["cnn"], "--arch", "specprune.toy:build_cnn", "--data", bad["evil_data"],
                  "--out", tmp_path / "out", "--quiet"], [bad["cnn"], bad["evil_data"]],
                 must_not_exist=[tmp_path / "out"])
    assert msg.startswith(f"refusing to load {bad['evil_data']}: it is a pickle")
    no_markers(bad)


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_remote_code_needs_the_flag(cmd, tmp_path, bad, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, bad["remote_code"], data, out, plan_file), [bad["remote_code"], data],
                 must_not_exist=[out])
    assert msg == (f"{bad['remote_code']} needs its own Python code (auto_map in config.json); "
                   "pass --trust-remote-code if you trust it")
    no_markers(bad)


# ------------------------------------------------------------------------------------------------
# tokenizer and calibration data


@pytest.mark.parametrize("cmd", DATA_COMMANDS)
def test_tokenizer_missing(cmd, tmp_path, bad, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, bad["no_tokenizer"], data, out, plan_file), [bad["no_tokenizer"], data],
                 must_not_exist=[out])
    assert msg.startswith("text data needs a tokenizer, and the model has none")


@pytest.mark.parametrize("cmd", DATA_COMMANDS)
@pytest.mark.parametrize("kind,expect", [
    ("empty.txt", "the calibration text is empty"),
    ("blank.txt", "the calibration text is empty"),
    ("empty.jsonl", "the calibration text is empty"),
    ("short.txt", "the text is too short:"),
    ("empty_dir", "data directory {path} holds no .txt/.jsonl files"),
    ("no_text_field.jsonl", "{path}:1 has no string 'text' field"),
])
def test_empty_or_too_short_calibration_data(cmd, kind, expect, tmp_path, llama, bad, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, llama, bad[kind], out, plan_file), [llama, bad[kind]], must_not_exist=[out])
    assert msg.startswith(expect.format(path=bad[kind])), msg


def test_empty_tensor_data(tmp_path, bad):
    msg = invoke(["analyze", bad["cnn"], "--arch", "specprune.toy:build_cnn", "--data", bad["empty_tensor"],
                  "--out", tmp_path / "out", "--quiet"], [bad["cnn"], bad["empty_tensor"]],
                 must_not_exist=[tmp_path / "out"])
    assert msg == "the tensor data is empty"


@pytest.mark.parametrize("cmd", DATA_COMMANDS)
def test_non_utf8_text(cmd, tmp_path, llama, bad, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, llama, bad["latin1.txt"], out, plan_file), [llama, bad["latin1.txt"]],
                 must_not_exist=[out])
    assert msg == f"{bad['latin1.txt']} is not UTF-8 text (byte 6): convert it to UTF-8"


# ------------------------------------------------------------------------------------------------
# NaN/Inf in activations: batches with non-finite features are left out and the layer is flagged;
# a layer without any finite batch stops the run with a clear message.


def _tensor_data(path: Path, n: int, bad_rows: int, value: float) -> Path:
    from safetensors.torch import save_file

    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:bad_rows] = value
    save_file({"input": x}, str(path))
    return path


def test_nonfinite_activations_flag_the_layer_and_run_on(tmp_path, bad):
    data = _tensor_data(tmp_path / "half_inf.safetensors", 16, 8, float("inf"))
    out = tmp_path / "out"
    before = tree_hash(bad["cnn"])
    res = CliRunner().invoke(app, ["analyze", str(bad["cnn"]), "--arch", "specprune.toy:build_cnn", "--data",
                                   str(data), "--batch-size", "1", "--out", str(out), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    saved = json.loads((out / "analysis.json").read_text())
    assert doc["layers"] == saved["layers"]
    for lay in saved["layers"]:
        assert lay["skipped_tokens"] > 0 and lay["tokens"] > 0
        assert any(f.startswith("nonfinite:") for f in lay["flags"]), lay["flags"]
    assert tree_hash(bad["cnn"]) == before


def test_all_nonfinite_activations_stop_with_a_clear_message(tmp_path, bad):
    data = _tensor_data(tmp_path / "all_nan.safetensors", 16, 16, float("nan"))
    msg = invoke(["analyze", bad["cnn"], "--arch", "specprune.toy:build_cnn", "--data", data, "--batch-size", "2",
                  "--out", tmp_path / "out", "--quiet"], [bad["cnn"], data], must_not_exist=[tmp_path / "out"])
    assert msg.startswith("layer conv1 saw no finite features")


def test_api_leaves_no_hooks_and_restores_the_module_on_error():
    """The Python API on a user's module: the failure above leaves no hook behind and the
    module's mode and weights as they were."""
    import specprune
    from specprune.errors import InputError
    from specprune.probe import no_hooks_left
    from specprune.toy import build_cnn

    model = build_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.full((2, 3, 8, 8), float("nan")) for _ in range(3)]
    with no_hooks_left(model), pytest.raises(InputError, match="no finite features"):
        specprune.analyze(model, batches)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# a model with no supported layers


@pytest.fixture
def no_layer_arch(tmp_path, monkeypatch):
    """A user module (state dict + ``--arch``) with an embedding and a norm only."""
    from safetensors.torch import save_file

    (tmp_path / "nolayers_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    sys.modules.pop("nolayers_mod", None)
    mod = importlib.import_module("nolayers_mod")
    save_file(mod.build().state_dict(), str(tmp_path / "nolayers.safetensors"))
    save_file({"input": torch.randint(0, 16, (12, 5))}, str(tmp_path / "tokens.safetensors"))
    yield tmp_path / "nolayers.safetensors", tmp_path / "tokens.safetensors"
    sys.modules.pop("nolayers_mod", None)


@pytest.mark.parametrize("cmd", ["analyze", "prune", "quantize"])
def test_model_with_no_supported_layers(cmd, tmp_path, no_layer_arch):
    weights, tokens = no_layer_arch
    args = {"analyze": ["analyze", weights, "--data", tokens],
            "prune": ["prune", weights, "--rate", "0.5"],
            "quantize": ["quantize", weights, "--bits", "4"]}[cmd]
    out = tmp_path / "out"
    msg = invoke([*args, "--arch", "nolayers_mod:build", "--out", out, "--quiet"], [weights, tokens],
                 must_not_exist=[out])
    assert msg == "the model has no supported layers to analyse (Linear, Conv1D, Conv1d/2d)"


def test_every_layer_excluded(tmp_path, llama, data):
    msg = invoke(["analyze", llama, "--data", data, "--exclude", "re:.*", "--out", tmp_path / "out", *FAST,
                  "--quiet"], [llama, data], must_not_exist=[tmp_path / "out"])
    assert msg == ("the model has no supported layers to analyse (Linear, Conv1D, Conv1d/2d) "
                   "after --include/--exclude")


# ------------------------------------------------------------------------------------------------
# out-of-range options: refused before any work


OUT_OF_RANGE = [
    # (command, option arguments, message)
    *[(c, ["--tolerance", t], f"--tolerance must be a positive finite number (0.02 = 2%), got {float(t)}")
      for c in ("recommend", "compress") for t in ("0", "-0.01", "nan", "inf")],
    *[("quantize", ["--bits", b], f"--bits must be in 2..8, got {b}") for b in ("1", "9", "0", "-4")],
    *[(c, ["--bits-choices", b], f"--bits-choices takes integers in 2..8, got {b!r}")
      for c in ("recommend", "compress") for b in ("1,4", "4,9", ",")],
    *[("prune", ["--rate", r], f"--rate must be in [0, 1), got {float(r)}") for r in ("1", "-0.1", "1.5", "nan")],
    *[(c, ["--seq-len", s], f"--seq-len must be positive, got {s}")
      for c in ("analyze", "recommend", "compress", "evaluate", "prune", "apply") for s in ("0", "-8")],
    *[(c, ["--samples", "0"], "--samples must be positive, got 0") for c in ("analyze", "evaluate", "compress")],
    *[(c, ["--batch-size", "0"], "--batch-size must be positive, got 0") for c in ("analyze", "recommend")],
    ("quantize", ["--group-size", "-1"], "--group-size must be ≥ 0 (0: one scale per output channel), got -1"),
    ("recommend", ["--group-size", "-1"], "--group-size must be ≥ 0, got -1"),
    ("analyze", ["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:i, got 'tpu'"),
    *[("analyze", ["--token-sample", v], f"--token-sample must be a fraction in [1e-06, 1], got {float(v)!r}")
      for v in ("0", "1.5", "-0.5", "nan")],
    ("analyze", ["--include", "re:["], "bad layer pattern 're:[': unterminated character set at position 0"),
]


@pytest.mark.parametrize("cmd,opts,expect", OUT_OF_RANGE, ids=[f"{c}{'='.join(o)}" for c, o, _ in OUT_OF_RANGE])
def test_out_of_range_options(cmd, opts, expect, tmp_path, llama, data, plan_file):
    out = out_path(tmp_path, cmd)
    msg = invoke(argv(cmd, llama, data, out, plan_file, extra=opts), [llama, data, plan_file], must_not_exist=[out])
    assert msg == expect
    # checked before any work: the option is reported even where the model would fail to load
    msg = invoke(argv(cmd, tmp_path / "no-model", data, out, plan_file, extra=opts), [data, plan_file],
                 must_not_exist=[out])
    assert msg == expect


@pytest.mark.parametrize("cmd", ["recommend", "compress"])
def test_bad_bits_choices_fail_before_the_analysis(cmd, tmp_path, llama, data):
    """Checked up front (not after minutes of calibration): no 'analysing' line before the error."""
    res = CliRunner().invoke(app, [str(a) for a in argv(cmd, llama, data, out_path(tmp_path, cmd),
                                                        extra=["--bits-choices", "4,16"])][:-1])  # not --quiet
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "--bits-choices takes integers in 2..8, got '4,16'"


# ------------------------------------------------------------------------------------------------
# --out: never equal to, inside or containing an input (even with --overwrite); existing needs --overwrite


@pytest.fixture
def workspace(tmp_path, llama, data, plan_file):
    """A user's folder: model, corpus and plan side by side under ``root``."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(llama, root / "model")
    shutil.copyfile(data, root / "corpus.txt")
    shutil.copyfile(plan_file, root / "plan-in.json")
    return root


def _out_cases(root: Path, cmd: str) -> list[tuple[str, Path]]:
    model = root / "model"
    inside = model / ("plan.json" if cmd == "recommend" else "evaluation.json" if cmd == "evaluate" else "sub")
    cases = [("equal-model", model), ("inside-model", inside), ("contains-inputs", root)]
    if cmd in DATA_COMMANDS:
        cases.append(("equal-data", root / "corpus.txt"))
    if cmd == "apply":
        cases.append(("equal-plan", root / "plan-in.json"))
    return cases


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_out_equal_inside_or_containing_an_input(cmd, overwrite, workspace):
    inputs = [workspace / "model", workspace / "corpus.txt", workspace / "plan-in.json"]
    whole = tree_hash(workspace)
    for case, out in _out_cases(workspace, cmd):
        args = argv(cmd, workspace / "model", workspace / "corpus.txt", out, workspace / "plan-in.json",
                    extra=["--overwrite"] if overwrite else [])
        msg = invoke(args, inputs)
        assert msg.startswith(f"refusing to write output {out}: it is, lies inside or contains the input"), (case, msg)
        assert tree_hash(workspace) == whole, case
        assert not list(workspace.rglob(".*.tmp-*")), case


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_existing_out_without_overwrite(cmd, tmp_path, llama, data, plan_file):
    out = out_path(tmp_path, cmd)
    if out.suffix:
        out.write_text('{"mine": "keep me"}\n')
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me\n")
    msg = invoke(argv(cmd, llama, data, out, plan_file), [llama, data, plan_file, out])
    assert msg == f"output {out} already exists; pass --overwrite to replace it"


def test_existing_evaluate_out_directory_without_overwrite(tmp_path, llama, data):
    out = tmp_path / "results"
    out.mkdir()
    msg = invoke(["evaluate", llama, "--data", data, "--out", out, *FAST, "--quiet"], [llama, data, out])
    assert msg == f"output {out} already exists; pass --overwrite to replace it"
    assert not (out / "evaluation.json").exists()


def test_existing_out_is_replaced_whole_with_overwrite(tmp_path, llama):
    """The control for the refusals above: with --overwrite the old output is replaced, and only it."""
    out = tmp_path / "int4"
    out.mkdir()
    (out / "stale.txt").write_text("old run\n")
    before = tree_hash(llama)
    invoke(["quantize", llama, "--bits", "4", "--include", "q_proj", "--out", out, "--overwrite", "--quiet"],
           code=0)
    assert not (out / "stale.txt").exists() and (out / "specprune.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # no temporary or backup left
    assert tree_hash(llama) == before


# ------------------------------------------------------------------------------------------------
# usage errors: exit 2 (click's usage message, not ours)


@pytest.mark.parametrize("args", [
    ["analyze", "MODEL", "--data", "x.txt", "--no-such-option"],
    ["quantize", "MODEL", "--bits", "4", "--out", "o", "--bogus", "1"],
    ["analyze"],                                   # missing MODEL
    ["apply", "MODEL", "--out", "o"],              # missing --plan
    ["prune", "MODEL", "--rate", "0.3"],           # missing --out
])
def test_usage_errors_exit_2(args):
    stderr = invoke(args, code=2)
    assert "Traceback" not in stderr and ("No such option" in stderr or "Missing" in stderr
                                          or "Invalid value" in stderr)


# ------------------------------------------------------------------------------------------------
# an unexpected exception (a bug, a user callable failing) is still one line and exit 1


@pytest.fixture
def broken_metric(tmp_path, monkeypatch):
    (tmp_path / "broken_metric.py").write_text("def metric(model, batch, device):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_metric", None)
    yield tmp_path
    sys.modules.pop("broken_metric", None)


def test_unexpected_exception_is_one_line(tmp_path, llama, data, broken_metric):
    msg = invoke(["evaluate", llama, "--data", data, "--metric", "broken_metric:metric", *FAST, "--quiet"],
                 [llama, data])
    assert msg == "ZeroDivisionError: division by zero"


# ------------------------------------------------------------------------------------------------
# end to end in a real process: one line, no traceback; --debug shows the traceback


def test_e2e_missing_model(tmp_path):
    res = cli("analyze", tmp_path / "nope", "--data", tmp_path / "x.txt")
    assert res.returncode == 1
    assert one_error_line(res.stderr) == f"model not found: {tmp_path / 'nope'}"
    assert res.stdout == ""


def test_e2e_corrupted_model(tmp_path, bad, data):
    before = tree_hash(bad["truncated"])
    res = cli("analyze", bad["truncated"], "--data", data, "--out", tmp_path / "out", *FAST)
    assert res.returncode == 1
    assert "corrupted or truncated" in one_error_line(res.stderr)
    assert not (tmp_path / "out").exists()
    assert tree_hash(bad["truncated"]) == before


@pytest.mark.parametrize("case", ["known", "unexpected"])
def test_debug_shows_the_traceback(case, tmp_path, bad, llama, data, broken_metric):
    args = (["analyze", bad["truncated"], "--data", data, "--out", tmp_path / "out", *FAST] if case == "known" else
            ["evaluate", llama, "--data", data, "--metric", "broken_metric:metric", *FAST])
    res = CliRunner().invoke(app, [*map(str, args), "--debug"])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR_PREFIX) and ("corrupted" in last or "ZeroDivisionError" in last)
    assert not (tmp_path / "out").exists()


def test_e2e_pickle_refused_and_payload_not_run(tmp_path, bad, data):
    res = cli("prune", bad["evil_bin"], "--rate", "0.3", "--out", tmp_path / "out")
    assert res.returncode == 1
    assert "needs arbitrary code" in one_error_line(res.stderr)
    no_markers(bad)


def test_e2e_unexpected_exception(tmp_path, llama, data, broken_metric):
    res = cli("evaluate", llama, "--data", data, "--metric", "broken_metric:metric", *FAST,
              pythonpath=[broken_metric])
    assert res.returncode == 1
    assert one_error_line(res.stderr) == "ZeroDivisionError: division by zero"


# ------------------------------------------------------------------------------------------------
# what specprune trusts: checked on the code and on received directories


def _package_files() -> list[Path]:
    files = sorted((REPO / "specprune").rglob("*.py"))
    files += sorted(p for p in (REPO / "plugins").rglob("*.py") if "tests" not in p.parts)
    return files


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if called == name:
                yield node


def test_every_torch_load_is_weights_only():
    seen = 0
    for f in _package_files():
        for call in _calls(ast.parse(f.read_text(encoding="utf-8")), "load"):
            f_src = ast.unparse(call.func)
            if not f_src.startswith("torch."):
                continue
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) \
                and kw["weights_only"].value is True, f"{f}:{call.lineno}: torch.load without weights_only=True"
    assert seen >= 1  # the scan finds specprune's own torch.load


def test_trust_remote_code_is_never_hardcoded_true():
    for f in _package_files():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{f}:{node.value.lineno}: trust_remote_code=True"


def test_offline_by_default():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", ("import os, specprune.models; "
                          "print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])")],
                         capture_output=True, text=True, env=env, check=True, timeout=240)
    assert res.stdout.split() == ["1", "1"]


@pytest.fixture
def compressed(tmp_path_factory, llama) -> Path:
    out = tmp_path_factory.mktemp("comp") / "int4"
    invoke(["quantize", llama, "--bits", "4", "--include", "q_proj", "--out", out, "--quiet"], code=0)
    return out


def test_compressed_directory_never_imports_what_it_names(tmp_path, compressed, data, monkeypatch):
    """A received directory that names a builder module is refused; the module is never imported."""
    evil = tmp_path / "evilpkg_builder.py"
    evil.write_text(f"open({str(tmp_path / 'PWNED_import')!r}, 'w').close()\ndef build():\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = tmp_path / "received"
    shutil.copytree(compressed, d)
    spec = json.loads((d / "specprune.json").read_text())
    spec["source"].update(hf=False, arch="evilpkg_builder:build", architecture="evilpkg_builder:build")
    (d / "specprune.json").write_text(json.dumps(spec))
    msg = invoke(argv("evaluate", d, data, tmp_path / "ev.json"), [d, data], must_not_exist=[tmp_path / "ev.json"])
    assert ("pass --arch module:callable (Python: arch=) explicitly; nothing named inside a received directory is "
            "imported") in msg
    assert "evilpkg_builder" not in sys.modules and not (tmp_path / "PWNED_import").exists()

    spec["source"].update(hf=True, architecture="evilpkg_builder:build")
    (d / "specprune.json").write_text(json.dumps(spec))
    msg = invoke(argv("evaluate", d, data, tmp_path / "ev.json"), [d, data])
    assert "is not a transformers model class" in msg
    assert "evilpkg_builder" not in sys.modules and not (tmp_path / "PWNED_import").exists()


def test_plan_naming_a_module_is_not_imported(tmp_path, llama, monkeypatch):
    """A received plan's method is a registry name, never an import path."""
    (tmp_path / "evilpkg_method.py").write_text(f"open({str(tmp_path / 'PWNED_plan')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": 1, "layers": {"model.layers.0.self_attn.q_proj": {
        "method": "evilpkg_method:apply", "prune_rate": 0.5}}}))
    msg = invoke(["apply", llama, "--plan", plan, "--out", tmp_path / "out", "--quiet"], [llama, plan],
                 must_not_exist=[tmp_path / "out"])
    assert "evilpkg_method:apply" in msg
    assert "evilpkg_method" not in sys.modules and not (tmp_path / "PWNED_plan").exists()


def test_compressed_directory_with_remote_code_is_refused_even_with_the_flag(tmp_path, compressed, data):
    d = tmp_path / "received"
    shutil.copytree(compressed, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    msg = invoke(argv("evaluate", d, data, tmp_path / "ev.json", extra=["--trust-remote-code"]), [d, data])
    assert "the config needs remote code (auto_map); specprune never runs code from a received directory" in msg
