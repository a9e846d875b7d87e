"""specprune.solve: the precision rule, and float32 solves against float64 (alone and in analyze)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from specprune.analysis import Analysis, analyze
from specprune.errors import InputError
from specprune.solve import _eigh, error_bound, singular_values, solve_precision, thin_svd


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
    scale = torch.arange(1, d + 1, dtype=torch.float64) ** -0.7
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
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


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 1024)
        self.down = nn.Linear(1024, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_analyze_records_float32_solves_and_matches_float64(tmp_path):
    torch.manual_seed(1)
    batches = [torch.randn(512, 64) for _ in range(6)]  # 3072 tokens ≥ 2 × 1024
    model = _Wide()
    auto = analyze(model, batches)
    exact = analyze(model, batches, precision="float64")
    g = auto.groups["down"]
    assert g.solver["precision"] == "float32" and g.solver["eigenvalue_error_bound"] > 0
    assert not g.truncated and auto.groups["up"].solver == {}  # 64 wide: float64
    assert exact.groups["down"].solver == {}
    for la, lb in zip(auto.layers, exact.layers):
        assert la.name == lb.name and la.k_star == lb.k_star
        np.testing.assert_allclose(la.eigenvalues, lb.eigenvalues, rtol=1e-4,
                                   atol=error_bound(la.d_in, lb.eigenvalues[0], "float32"))
        assert la.b == pytest.approx(lb.b, abs=1e-3) and la.a == pytest.approx(lb.a, abs=1e-3)
    auto.save(tmp_path / "a")
    back = Analysis.load(tmp_path / "a")
    assert back.groups["down"].solver == g.solver and not back.truncated
    with pytest.raises(InputError, match="precision must be one of"):
        analyze(model, batches, precision="bf16")


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (11, 11), (1, 5), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thin_svd_either_orientation_is_the_thin_svd(shape, dtype):
    """Wide matrices are solved through their transpose; the result is still m's thin SVD."""
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    u, s, vh = thin_svd(m)
    r = min(shape)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(u @ torch.diag(s) @ vh, m, atol=tol)
    assert torch.allclose(u.T @ u, torch.eye(r, dtype=dtype), atol=tol)
    assert torch.allclose(vh @ vh.T, torch.eye(r, dtype=dtype), atol=tol)
    ref = torch.linalg.svdvals(m.double())
    assert torch.allclose(s.double(), ref, atol=tol) and bool((s[:-1] >= s[1:]).all())
    assert torch.allclose(singular_values(m).double(), ref, atol=tol)
