"""An interrupted run leaves no output: Ctrl-C (SIGINT) or SIGTERM in the middle of calibration ends
``specprune analyze`` with exit 130 and one line on stderr, and neither ``--out`` nor a temporary
sibling ``.OUT.tmp-*`` remains. The atomic writer itself is checked for an interrupt mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tree_hash

from specprune.io import output_dir, write_atomic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine (and the result is
    the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_calibration_leaves_no_output(sig, tmp_path, tiny_dirs, text_file):
    model = tiny_dirs["llama"]
    hashes = {p: tree_hash(p) for p in (model, text_file)}
    out = tmp_path / "analysis"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # thousands of one-window batches: calibration takes several seconds after the "analysing" line
    proc = subprocess.Popen([sys.executable, "-m", "specprune", "analyze", str(model), "--data", str(text_file),
                             "--samples", "3000", "--seq-len", "16", "--batch-size", "1", "--include", "q_proj",
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        before: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            before.append(line)
            if line.startswith("analysing "):  # printed right before the calibration loop starts
                break
        assert before and before[-1].startswith("analysing "), "".join(before)
        time.sleep(1.0)
        assert proc.poll() is None, "calibration finished before the signal: give it more windows"
        proc.send_signal(sig)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, rest)
    assert "Traceback" not in rest
    # status lines of the run may precede it (human mode); the error itself is one line, the last
    lines = rest.strip().splitlines()
    err = "specprune: error: interrupted; no partial output was written"
    assert lines[-1] == err and [ln for ln in lines if ln.startswith("specprune:")] == [err], rest
    assert stdout == ""
    assert _leftovers(out) == []
    assert {p: tree_hash(p) for p in (model, text_file)} == hashes


def test_interrupt_while_writing_a_directory_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), output_dir(out) as tmp:
        (tmp / "analysis.json").write_text("{}")
        raise KeyboardInterrupt
    assert _leftovers(out) == []


def test_interrupt_while_overwriting_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text('{"old": true}')
    before = tree_hash(out)
    with pytest.raises(KeyboardInterrupt), output_dir(out, overwrite=True) as tmp:
        (tmp / "analysis.json").write_text('{"new": true}')
        raise KeyboardInterrupt
    assert tree_hash(out) == before
    assert _leftovers(out) == [out]


def test_failed_atomic_file_write_leaves_nothing(tmp_path):
    class Boom(str):
        def encode(self, *a, **k):  # fails after the temporary file was created
            raise KeyboardInterrupt

    target = tmp_path / "plan.json"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, Boom("{}"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the Python API on a user's module: Ctrl-C in the middle leaves the module as it was


class _Interrupting(torch.nn.Module):
    """A user's MLP whose forward raises KeyboardInterrupt (as Ctrl-C would) after ``limit`` calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 8))
        self.calls = 0
        self.limit: int | None = None
        self.__dict__["original"] = [p.detach().clone() for p in self.net.parameters()]
        self.changed_calls = 0  # forwards that ran with the layers changed in place (by specprune)

    def forward(self, x):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt
        params = list(self.net.parameters())
        if len(params) != len(self.original) or any(
                a.shape != b.shape or not torch.equal(a, b) for a, b in zip(params, self.original)):
            self.changed_calls += 1
        return self.net(x)


def _snapshot(model, records: bool = False):
    """Values, module objects' types and hooks (and, with ``records``, specprune's quantization
    records left in module ``__dict__``s)."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__, sorted(m._forward_pre_hooks), sorted(m._forward_hooks),
              sorted(k for k in m.__dict__ if "specprune" in k) if records else None)
             for n, m in model.named_modules()])


def _same(model, snap, records: bool = False) -> bool:
    state, modules = snap
    now_state, now_modules = _snapshot(model, records)
    return modules == now_modules and state.keys() == now_state.keys() and all(
        torch.equal(state[k], now_state[k]) for k in state)


def test_ctrl_c_in_the_api_leaves_the_module_as_it_was():
    import specprune
    from specprune.data import from_iterable
    from specprune.probe import no_hooks_left

    model = _Interrupting().train()
    g = torch.Generator().manual_seed(0)
    data = from_iterable([torch.randn(16, 16, generator=g) for _ in range(3)])
    snap = _snapshot(model, records=True)

    model.limit = 2  # mid-calibration
    with no_hooks_left(model), pytest.raises(KeyboardInterrupt):
        specprune.analyze(model, data)
    assert model.training and _same(model, snap, records=True)

    model.limit = None
    analysis = specprune.analyze(model, data)
    model.calls = 0
    specprune.recommend(analysis, 0.05, model=model, data=data)  # sensitivities change layers in place
    total = model.calls
    assert total > 6 and model.changed_calls > 0  # layers really are changed in place while it runs
    for limit in (1, total // 2, total - 2):
        model.calls, model.limit = 0, limit
        with no_hooks_left(model), pytest.raises(KeyboardInterrupt):
            specprune.recommend(analysis, 0.05, model=model, data=data)
        assert _same(model, snap, records=True), f"module changed after Ctrl-C at forward {limit + 1} of {total}"


def test_recommend_leaves_no_quantization_records():
    """Nothing of specprune stays on the user's module, not even the quantization bookkeeping
    (a stale record would make a later save store an untouched layer as quantized)."""
    import specprune
    from specprune.data import from_iterable

    model = _Interrupting()
    g = torch.Generator().manual_seed(0)
    data = from_iterable([torch.randn(16, 16, generator=g) for _ in range(3)])
    snap = _snapshot(model, records=True)
    specprune.recommend(specprune.analyze(model, data), 0.05, model=model, data=data)
    assert _same(model, snap, records=True)


def test_apply_temporarily_leaves_no_quantization_records():
    from specprune.plan import LayerPlan, Plan
    from specprune.snapshot import apply_temporarily

    model = _Interrupting()
    snap = _snapshot(model, records=True)
    plan = Plan({}, 0.05, "output-mse", {"net.0": LayerPlan(bits=4), "net.2": LayerPlan(bits=3)})
    with apply_temporarily(model, plan):
        assert not _same(model, snap)  # applied in place inside the block
    assert _same(model, snap, records=True)
