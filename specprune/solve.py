"""Dense eigensolves of accumulated Grams: covariance in place, the precision of the solve, GPU → CPU
fallback.

Precision (``precision="auto"``, the default of :func:`specprune.analysis.analyze`). Inputs at least
:data:`FLOAT32_MIN_DIM` wide whose Gram has at least twice as many tokens as dimensions are solved in
float32; every other group in float64. The float32 ``eigh`` of a d = 1536 covariance takes 0.44× the
float64 one's time on the project's 2-core CPU (0.14 s against 0.31 s), and the solve is most of an
analysis' cost from d ≈ 1024 on. Its error is LAPACK's backward-stable bound, recorded with the group
(``InputGroup.solver["eigenvalue_error_bound"]``): every eigenvalue within ≈ d · ε₃₂ · λ₁ of the exact one
(ε₃₂ = 2⁻²³ ≈ 1.19e-7), so a mode carrying a fraction f of λ₁ is accurate to d·ε₃₂/f relative — the
top modes to ~1e-6, the far tail (λ ≲ 1e-4 λ₁) only roughly. The Gram itself is summed from float32
batch products, so its smallest eigenvalues already carry float32 rounding; eigenvectors are stored in
float32 either way. Measured on all-MiniLM-L6-v2's 37 layers (docs/benchmarks.md): the same k* on every
layer, |Δb| ≤ 3.3e-6 and |Δa| ≤ 8.6e-5 against float64 solves. A rank-deficient sample (tokens < 2d) keeps
float64: there the float32 round-off would stand in for the exactly-zero eigenvalues the fits leave out.

Thin SVDs (:func:`thin_svd`, :func:`singular_values`; the whitened low-rank factors of W Σ^½) run on the
tall orientation: LAPACK's divide-and-conquer SVD of a wide d_out × d_in matrix took 1.9–3.1× (vectors)
and 3.5–5× (values only) the time of the same SVD of its transpose (one thread, d_out = 384…1024,
d_in = 1536…3072, float32 and float64; the singular values agree to 2e-15 relative in float64).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

FLOAT32_MIN_DIM = 1024
PRECISIONS = ("auto", "float32", "float64")


def solve_precision(d: int, tokens: int, precision: str = "auto") -> str:
    """"float32" or "float64" for a d-wide group summed over ``tokens`` tokens (module docstring)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "float32" if d >= FLOAT32_MIN_DIM and tokens >= 2 * d else "float64"


def _symmetrize_scale_(a: torch.Tensor, scale: float, block: int = 1024) -> torch.Tensor:
    """a ← scale · (a + aᵀ)/2 in place, one block pair at a time (no second d × d buffer)."""
    n = a.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            blk = (a[i:i + block, j:j + block] + a[j:j + block, i:i + block].mT).mul_(0.5 * scale)
            a[i:i + block, j:j + block] = blk
            a[j:j + block, i:i + block] = blk.mT
    return a


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _covariance_(gram: torch.Tensor, tokens: int, device: torch.device | None) -> torch.Tensor:
    """Σ = (G + Gᵀ)/(2N), on ``device``: in place on ``gram`` when it is already there (the caller
    drops the accumulator), else on a staged copy (an offloaded accumulator brought to its GPU; if that
    copy does not fit, in place on the CPU). Computed exactly once per accumulator."""
    with torch.inference_mode():  # the accumulator is an inference tensor: in-place work stays in the mode
        cov = gram
        if device is not None and gram.device != device:
            try:
                cov = gram.to(device)
            except RuntimeError:  # out of memory on the device: solve where the accumulator is
                _free_cuda_cache()
        return _symmetrize_scale_(cov, 1.0 / max(tokens, 1))


def _with_cpu_fallback(fn, cov: torch.Tensor):
    """``fn(cov)`` on Σ's device; if a GPU solver fails (no kernel, out of memory), ``fn(Σ on the CPU)``."""
    try:
        return fn(cov)
    except RuntimeError:
        if cov.device.type == "cpu":
            raise
        _free_cuda_cache()
        return fn(cov.cpu())


def _eigh(gram: torch.Tensor, tokens: int, device: torch.device | None = None,
          precision: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of Σ = G/N, descending, eigenvalues as float64 (clamped at 0), eigenvectors in the
    solve's precision; on ``device`` (default: the accumulator's) when it is a GPU, CPU fallback if the
    device solver fails. ``precision``: "float64" or "float32" (see :func:`solve_precision`). ``gram`` is
    overwritten (symmetrised and scaled in place) when it already lives on the solve device."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[precision]

    def solve(cov: torch.Tensor):
        evals, evecs = torch.linalg.eigh(cov if cov.dtype == dtype else cov.to(dtype))
        return (evals.flip(0).to(torch.float64).clamp_min(0.0).cpu().numpy(),
                evecs.flip(1).cpu().numpy())

    with torch.inference_mode():
        return _with_cpu_fallback(solve, _covariance_(gram, tokens, device))


def error_bound(d: int, top: float, precision: str) -> float:
    """The backward-stable eigenvalue error bound d · ε · λ₁ of a solve in ``precision``."""
    eps = float(np.finfo(np.float32 if precision == "float32" else np.float64).eps)
    return float(d * eps * max(top, 0.0))


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ``m``'s thin SVD, m = U diag(S) Vh, computed on whichever of m and mᵀ is tall
    (module docstring): for a wide m, svd(mᵀ) = V S Uᵀ is solved and transposed back."""
    if m.shape[-2] < m.shape[-1]:
        u, s, vh = torch.linalg.svd(m.mT, full_matrices=False)
        return vh.mT, s, u.mT
    return torch.linalg.svd(m, full_matrices=False)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """``m``'s singular values (descending), computed on its tall orientation."""
    return torch.linalg.svdvals(m.mT if m.shape[-2] < m.shape[-1] else m)
