"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023), from specprune's
input covariance.

A layer computes y = W x, W ∈ R^{d_out × d_in}. Over N calibration tokens X ∈ R^{N × d_in}, Wanda
scores every weight by its magnitude times the norm of the input feature it multiplies,

    S_ij = |W_ij| · ‖X_{:,j}‖₂,      ‖X_{:,j}‖₂² = Σ_t x_tj² = N · Σ_jj,

where Σ = XᵀX / N is the (uncentred) input covariance the probe accumulates. specprune hands a
compressor Σ as eigenpairs (λ_k, u_k), so the diagonal is rebuilt as

    Σ_jj = Σ_k λ_k u_jk²   (diag(U Λ Uᵀ)),

and the common factor √N is dropped (it does not change any comparison). Within each output row
(the paper's comparison group: weights competing for the same output) the lowest-scoring weights are
set to zero. The layer loses ``prune_rate`` of its weights, counted like specprune's ``magnitude``
and ``plan_size``: n = round(rate · d_out · d_in) in all, q = ⌊n / d_out⌋ in every row, and the
remaining n − q·d_out go, one each, to the rows whose next-lowest score is smallest (so every row
loses q or q + 1, and exactly q = rate · d_in when that is an integer).

Without a covariance (Σ = I: no data or analysis given) every feature norm is equal and Wanda
reduces to magnitude pruning per output row; specprune reports that the identity was used.

The pruning error of a layer is exact from Σ: with ΔW = Ŵ − W (minus the pruned weights),

    E‖ΔW x‖² = tr(ΔW Σ ΔWᵀ) = Σ_k λ_k ‖ΔW u_k‖²,

which :func:`wanda_distortion` computes; :meth:`WandaPruner.candidate_delta` gives the ΔW of a rate for
such scoring by hand (specprune's recommender scores only its built-in methods).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from specprune.errors import InputError


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(device=device, dtype=dtype)


def covariance_diagonal(eigenvalues: Any, eigenvectors: Any, *, device: torch.device | str = "cpu"
                        ) -> torch.Tensor:
    """diag(Σ)_j = Σ_k λ_k u_jk² (float64, length d_in) from eigenpairs (eigenvectors as columns).
    Negative eigenvalues (round-off) count as 0."""
    dev = torch.device(device)
    u = _as_tensor(eigenvectors, dev, torch.float64)
    lam = _as_tensor(eigenvalues, dev, torch.float64).clamp_min(0.0)
    if u.dim() != 2 or lam.dim() != 1 or u.shape[1] != lam.shape[0]:
        raise InputError(f"eigenpairs do not fit: eigenvectors {tuple(u.shape)}, "
                         f"eigenvalues {tuple(lam.shape)}")
    return (u * u) @ lam


def wanda_scores(w: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """S = |W| · √diag(Σ) per input column (float64); ``diag`` None means Σ = I (S = |W|)."""
    s = w.detach().to(torch.float64).abs()
    if diag is None:
        return s
    d = diag.to(device=s.device, dtype=torch.float64)
    if d.shape != (s.shape[1],):
        raise InputError(f"covariance of dimension {d.shape[0]} does not match d_in = {s.shape[1]}")
    return s * d.clamp_min(0.0).sqrt()


def prune_counts(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Weights to remove per row (int64, d_out): q = ⌊n/d_out⌋ each, n = round(rate·numel), plus one
    in the n − q·d_out rows whose (q+1)-th lowest score is smallest (ties: lower row index)."""
    if not 0.0 <= rate < 1.0:
        raise InputError(f"prune rate must be in [0, 1), got {rate}")
    d_out, d_in = scores.shape
    total = round(rate * d_out * d_in)  # same count as magnitude pruning and plan_size
    q, extra = divmod(total, d_out)
    counts = torch.full((d_out,), q, dtype=torch.int64, device=scores.device)
    if extra:
        nxt = torch.sort(scores, dim=1, stable=True).values[:, q]
        rows = torch.argsort(nxt, stable=True)[:extra]
        counts[rows] += 1
    return counts


def wanda_mask(w: torch.Tensor, diag: torch.Tensor | None, rate: float) -> torch.Tensor:
    """Boolean keep-mask of W (True = kept): per row, the lowest Wanda scores are dropped
    (:func:`prune_counts` of them; ties broken by column order, deterministic)."""
    scores = wanda_scores(w, diag)
    counts = prune_counts(scores, rate)
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    pruned_sorted = ranks < counts.unsqueeze(1)
    pruned = torch.zeros_like(pruned_sorted).scatter_(1, order, pruned_sorted)
    return ~pruned


def wanda_delta(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, rate: float) -> torch.Tensor:
    """ΔW = Ŵ − W of Wanda at ``rate`` (float32, same shape/device as ``w``): minus the pruned
    weights. ``eigenvalues``/``eigenvectors`` None means Σ = I."""
    diag = None if eigenvalues is None else covariance_diagonal(eigenvalues, eigenvectors, device=w.device)
    keep = wanda_mask(w, diag, rate)
    wf = w.detach().to(torch.float32)
    return torch.where(keep, torch.zeros_like(wf), -wf)


def wanda_distortion(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, rate: float) -> float:
    """tr(ΔW Σ ΔWᵀ) = Σ_k λ_k ‖ΔW u_k‖² of Wanda at ``rate``: the mean squared output error per token."""
    dw = wanda_delta(w, eigenvalues, eigenvectors, rate).to(torch.float64)
    u = _as_tensor(eigenvectors, dw.device, torch.float64)
    lam = _as_tensor(eigenvalues, dw.device, torch.float64).clamp_min(0.0)
    return float(((dw @ u) ** 2 * lam).sum())


class WandaPruner:
    """The ``wanda`` compressor (kind ``prune``, unstructured, in place): zero ``prune_rate`` of the
    layer's weights, the lowest |W_ij|·‖x_j‖ per output row (see the module docstring).

    Compressor protocol (:mod:`specprune.compress.apply`): receives the layer's input covariance as
    eigenpairs (``needs_covariance``), or None for Σ = I. For the recommender,
    :meth:`candidate_delta` gives ΔW at any rate without touching a model."""

    name = "wanda"
    kind = "prune"
    needs_covariance = True
    low_rank = False
    unstructured = True

    def apply(self, layer, layer_plan, covariance=None) -> None:
        rate = float(layer_plan.prune_rate or 0.0)
        if rate <= 0.0:
            return
        module = layer.module
        adapter = layer.adapter
        w = adapter.weight_matrix(module)
        diag = None
        if covariance is not None:
            diag = covariance_diagonal(covariance.eigenvalues, covariance.eigenvectors, device=w.device)
        keep = wanda_mask(w, diag, rate)
        adapter.set_weight_matrix(module, w * keep.to(w.dtype))

    def candidate_delta(self, w: torch.Tensor, eigenvalues: Any, eigenvectors: Any,
                        rate: float) -> torch.Tensor:
        """ΔW of pruning ``w`` (d_out × d_in) at ``rate`` with Σ = U diag(λ) Uᵀ (None: Σ = I);
        the recommender's exact distortion is then tr(ΔW Σ ΔWᵀ) (``LayerGeometry.distortion``)."""
        return wanda_delta(w, eigenvalues, eigenvectors, rate)
