"""specprune.solve: the precision rule, float32 solves against float64, and the solve/fit overlap."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from specprune.analysis import Analysis, analyze
from specprune.errors import InputError
from specprune.solve import _eigh, error_bound, overlapped, solve_precision


def test_precision_rule():
    assert solve_precision(1536, 16384) == "float32"
    assert solve_precision(1024, 2048) == "float32"
    assert solve_precision(1024, 2047) == "float64"  # too few tokens: a rank-deficient sample keeps fp64
    assert solve_precision(1023, 10**6) == "float64"  # narrow: float64 costs little there
    assert solve_precision(384, 10, "float32") == "float32"
    assert solve_precision(4096, 10**6, "float64") == "float64"
    with pytest.raises(InputError, match="precision must be one of"):
        solve_precision(8, 8, "half")


def _power_law_gram(d: int, n: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.arange(1, d + 1, dtype=torch.float64) ** -0.7
    return x.T @ x, n


def test_float32_solve_within_its_error_bound():
    gram, n = _power_law_gram(1024, 4096)
    ev64, vec64 = _eigh(gram.clone(), n, precision="float64")
    ev32, vec32 = _eigh(gram.clone(), n, precision="float32")
    assert ev32.dtype == np.float64 and vec32.dtype == np.float32 and vec64.dtype == np.float64
    bound = error_bound(1024, ev64[0], "float32")
    assert np.max(np.abs(ev32 - ev64)) <= bound
    np.testing.assert_allclose(ev32[:32], ev64[:32], rtol=1e-5)  # the top modes: to ~1e-6
    # eigenvectors agree up to sign where the spectrum is not degenerate
    dots = np.abs(np.sum(vec32[:, :32].astype(np.float64) * vec64[:, :32], axis=0))
    assert dots.min() > 1 - 1e-4
    assert np.all(np.diff(ev32) <= 0) and ev32.min() >= 0


def test_overlapped_in_order_and_restores_threads():
    threads = torch.get_num_threads()
    seen = []

    def solve(i):
        seen.append((i, threading.current_thread().name, torch.get_num_threads()))
        return i * i

    out = list(overlapped(range(5), solve, overlap=True))
    assert out == [(i, i * i) for i in range(5)]
    assert [s[0] for s in seen] == list(range(5))
    assert all(name.startswith("specprune-solve") for _, name, _ in seen)
    assert all(n == max(1, threads - 1) for _, _, n in seen)
    assert torch.get_num_threads() == threads
    # without overlap: the caller's thread, nothing changed
    seen.clear()
    assert list(overlapped(range(3), solve, overlap=False)) == [(0, 0), (1, 1), (2, 4)]
    assert all(name == threading.current_thread().name for _, name, _ in seen)


def test_overlapped_stops_the_worker_when_the_caller_stops():
    threads = torch.get_num_threads()
    started = []
    gate = threading.Event()

    def solve(i):
        started.append(i)
        if i > 0:
            gate.wait(10)  # the second solve is still running when the caller stops
        return i

    gen = overlapped(range(50), solve, overlap=True)
    assert next(gen) == (0, 0)
    for _ in range(500):  # let the worker start the second solve
        if len(started) == 2:
            break
        threading.Event().wait(0.01)
    threading.Timer(0.3, gate.set).start()
    gen.close()  # pending solves cancelled at once, the running one awaited
    assert gate.is_set() and started == [0, 1]
    assert torch.get_num_threads() == threads

    def failing(i):
        if i == 2:
            raise InputError("boom")
        return i

    with pytest.raises(InputError, match="boom"):
        list(overlapped(range(6), failing, overlap=True))
    assert torch.get_num_threads() == threads


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 1024)
        self.down = nn.Linear(1024, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_analyze_records_float32_solves_and_overlap_matches_sequential(tmp_path, monkeypatch):
    torch.manual_seed(1)
    batches = [torch.randn(512, 64) for _ in range(6)]  # 3072 tokens ≥ 2 × 1024
    model = _Wide()
    over = analyze(model, batches)
    import specprune.analysis as A

    monkeypatch.setattr(A, "overlap_helps", lambda devices: False)
    seq = analyze(model, batches)
    exact = analyze(model, batches, precision="float64")
    g = over.groups["down"]
    assert g.solver["precision"] == "float32" and g.solver["eigenvalue_error_bound"] > 0
    assert not g.truncated and over.groups["up"].solver == {}  # 64 wide: float64
    for a, b in ((over, seq), (over, exact)):
        for la, lb in zip(a.layers, b.layers):
            assert la.name == lb.name and la.k_star == lb.k_star
            np.testing.assert_allclose(la.eigenvalues, lb.eigenvalues, rtol=1e-4,
                                       atol=error_bound(la.d_in, lb.eigenvalues[0], "float32"))
            assert la.b == pytest.approx(lb.b, abs=1e-3)
    over.save(tmp_path / "a")
    back = Analysis.load(tmp_path / "a")
    assert back.groups["down"].solver == g.solver and not back.truncated
