"""Pruning: activation-aware low-rank truncation (``spectral``, ``whitened``) and unstructured
magnitude pruning (``magnitude``).

Notation: a layer computes y = W x with W ∈ R^{d_out × d_in}; Σ = E[x xᵀ] = U Λ Uᵀ is its input
covariance (eigenvalues λ_1 ≥ λ_2 ≥ … , eigenvectors u_k as columns of U). Replacing W by W_k
costs, per token, the output error

    cost(W_k) = E‖(W − W_k) x‖² = tr((W − W_k) Σ (W − W_k)ᵀ).

``spectral`` — keep the top-k input modes: W_k = (W U_k) U_kᵀ, factors A = W U_k (d_out × k),
B = U_kᵀ (k × d_in). With the mode energies e_k = λ_k ‖W u_k‖² the cost is exactly

    cost = Σ_{k' > k} e_k'      (W − W_k = Σ_{k'>k} W u_k' u_k'ᵀ and the u's diagonalise Σ).

``whitened`` — the optimal rank-k approximation in that metric: with the SVD W Σ^½ = P S Qᵀ
(singular values s_1 ≥ s_2 ≥ …), W_k = P_k S_k Q_kᵀ Σ^{−½} and cost = Σ_{i > k} s_i² (Eckart–Young
on W Σ^½), which is never larger than the spectral cost at the same k. We compute it in the
equivalent form W_k = P_k P_kᵀ W (A = P_k, B = P_kᵀ W): since P_k P_kᵀ W Σ^½ = P_k S_k Q_kᵀ the two
agree on the range of Σ, and this form needs no inverse. Σ^½ = U Λ'^½ Uᵀ is formed with
eigenvalues below 1e-10·λ_max set to zero (treated as exact zeros of Σ); on that numerical null
space W_k keeps the projected action P_k P_kᵀ W instead of the arbitrary (zero) action of a
pseudo-inverse, at a cost of at most Σ_{λ_j<1e-10 λ_max} λ_j‖W u_j‖², i.e. nothing measurable.
The SVD itself is taken of M = (W U) diag(√λ') (= W Σ^½ U), which has the same P and S.

No covariance (``covariance=None``): Σ = I. Both methods then reduce to the plain truncated SVD of
W (for ``spectral`` the degenerate eigenbasis of I is taken as W's right singular vectors, so
e_k = σ_k²). The caller reports that the identity was used.

Parameters. A rank-k factorization stores k(d_in + d_out) weights instead of d_in·d_out, so it
is applied as two layers only when k(d_in + d_out) < d_in·d_out; otherwise the layer stays one
dense layer holding W_k. ``rank_for_rate`` / ``prune_rate_for_rank`` convert between the
contract's prune_rate (fraction of the layer's weight parameters removed) and k.

``magnitude`` — unstructured: the ``prune_rate`` fraction (rounded to whole weights) of the
smallest |w| in the layer's weight is set to zero. The mask is torch's own
``torch.nn.utils.prune.L1Unstructured`` mask (what ``prune.l1_unstructured`` computes) and it is
multiplied into the weight in place, which is exactly the state ``l1_unstructured`` followed by
``prune.remove`` leaves — no mask buffer, no hook, the same Parameter object — without the
temporary reparametrisation in between (that round trip also moves ``weight`` behind ``bias`` in
the module's parameter order, and an interrupt between the two calls would leave a hook).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import InputError
from ..solve import singular_values, thin_svd

EIG_REL_FLOOR = 1e-10


# --------------------------------------------------------------------------------------------
# rank ↔ prune rate


def factorization_saves(d_in: int, d_out: int, k: int) -> bool:
    """True when two rank-k factors hold fewer weights than the dense matrix: k(d_in+d_out) < d_in·d_out."""
    return k * (d_in + d_out) < d_in * d_out


def rank_for_rate(d_in: int, d_out: int, rate: float) -> int:
    """The rank whose factorization removes ≈ ``rate`` of the layer's d_in·d_out weights.

    Rule: k = max(1, floor((1 − rate)·d_in·d_out/(d_in + d_out))). This k always saves
    parameters when any rank does (for rate > 0 it is below the break-even rank
    d_in·d_out/(d_in+d_out)). Only when even rank 1 would not save parameters (min(d_in, d_out) = 1,
    or d_in = d_out = 2) is the layer truncated densely instead, to
    k = max(1, round((1 − rate)·min(d_in, d_out))). ``rate = 0`` keeps full rank, min(d_in, d_out)."""
    if not 0.0 <= rate < 1.0:
        raise InputError(f"prune rate must be in [0, 1), got {rate}")
    full = min(d_in, d_out)
    if rate == 0.0:
        return full
    k = max(1, math.floor((1.0 - rate) * d_in * d_out / (d_in + d_out)))
    if factorization_saves(d_in, d_out, k):
        return k
    return max(1, min(full, round((1.0 - rate) * full)))


def prune_rate_for_rank(d_in: int, d_out: int, k: int) -> float:
    """Inverse of :func:`rank_for_rate`: the fraction of weights removed by a rank-k factorization,
    1 − k(d_in + d_out)/(d_in·d_out), floored at 0 (a dense truncation removes none)."""
    return max(0.0, 1.0 - k * (d_in + d_out) / (d_in * d_out))


# --------------------------------------------------------------------------------------------
# factor math (no model needed: the recommender scores candidates with these)


def _work_dtype(w: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float32 if w.device.type == "cuda" and w.dtype != torch.float64 else torch.float64


def _as(x: Any, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(device=like.device, dtype=dtype)


def spectral_factors(w: torch.Tensor, eigenvectors: Any, k: int, *,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = W U_k (d_out × k), B = U_kᵀ (k × d_in) for the top-k input eigenvectors (columns of
    ``eigenvectors``, descending). Computed in float64 (float32 on CUDA unless ``dtype``)."""
    dt = _work_dtype(w, dtype)
    u = _as(eigenvectors, w, dt)
    d_in = w.shape[1]
    if u.shape[0] != d_in:
        raise InputError(f"eigenvectors of dimension {u.shape[0]} do not match d_in = {d_in}")
    k = max(1, min(int(k), u.shape[1]))
    uk = u[:, :k]
    return w.detach().to(dt) @ uk, uk.T.contiguous()


def spectral_mode_energy(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, *,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """e_k = λ_k ‖W u_k‖² for every input mode (cost of spectral rank k = Σ_{k'>k} e_k')."""
    dt = _work_dtype(w, dtype)
    u = _as(eigenvectors, w, dt)
    lam = _as(eigenvalues, w, dt)
    return lam * ((w.detach().to(dt) @ u) ** 2).sum(dim=0)


def _whitened_svd(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, dt: torch.dtype):
    u = _as(eigenvectors, w, dt)
    lam = _as(eigenvalues, w, dt).clamp_min(0.0)
    if u.shape[0] != w.shape[1]:
        raise InputError(f"eigenvectors of dimension {u.shape[0]} do not match d_in = {w.shape[1]}")
    lmax = lam.max() if lam.numel() else lam.new_tensor(0.0)
    lam = torch.where(lam >= EIG_REL_FLOOR * lmax, lam, torch.zeros_like(lam))
    m = (w.detach().to(dt) @ u) * lam.sqrt()  # = W Σ^½ U: same left singular vectors and values
    return m


def whitened_singular_values(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, *,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Singular values s_1 ≥ s_2 ≥ … of W Σ^½ (length min(d_out, d_in)); whitened cost(k) = Σ_{i>k} s_i²."""
    dt = _work_dtype(w, dtype)
    return singular_values(_whitened_svd(w, eigenvalues, eigenvectors, dt))


def whitened_factors(w: torch.Tensor, eigenvalues: Any, eigenvectors: Any, k: int, *,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = P_k (d_out × k), B = P_kᵀ W (k × d_in), P_k the top-k left singular vectors of W Σ^½
    (see the module docstring for why this equals P_k S_k Q_kᵀ Σ^{−½} where it matters)."""
    dt = _work_dtype(w, dtype)
    m = _whitened_svd(w, eigenvalues, eigenvectors, dt)
    p, _, _ = thin_svd(m)
    k = max(1, min(int(k), p.shape[1]))
    pk = p[:, :k].contiguous()
    return pk, pk.T @ w.detach().to(dt)


def svd_factors(w: torch.Tensor, k: int, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ = I fallback: A = U_k S_k, B = V_kᵀ from the plain SVD of W (both methods agree here)."""
    dt = _work_dtype(w, dtype)
    u, s, vh = thin_svd(w.detach().to(dt))
    k = max(1, min(int(k), s.numel()))
    return u[:, :k] * s[:k], vh[:k].contiguous()


def low_rank_factors(method: str, w: torch.Tensor, covariance: Any, k: int, *,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors for ``method`` in {"spectral", "whitened"}; ``covariance`` is an InputGroup-like
    object (``eigenvalues``, ``eigenvectors``) or None for Σ = I."""
    if covariance is None:
        return svd_factors(w, k, dtype=dtype)
    if method == "spectral":
        return spectral_factors(w, covariance.eigenvectors, k, dtype=dtype)
    if method == "whitened":
        return whitened_factors(w, covariance.eigenvalues, covariance.eigenvectors, k, dtype=dtype)
    raise InputError(f"unknown low-rank method {method!r}")


# --------------------------------------------------------------------------------------------
# factorized modules


FACTOR_ATTR = "specprune_factor"  # set on the two layers of a Factorized


class Factorized(nn.Module):
    """y = second(first(x)): a rank-``rank`` factorization W_k = A B of a layer.

    ``first`` applies B (d_in → rank, no bias), ``second`` applies A (rank → d_out, with the
    original bias). ``original`` describes the replaced module (type and shape) so the dense
    layer can be rebuilt (:meth:`to_dense`) and the saved format can describe it."""

    def __init__(self, first: nn.Module, second: nn.Module, d_in: int, d_out: int, rank: int,
                 original: dict):
        super().__init__()
        self.first = first
        self.second = second
        for factor in (first, second):  # a factor is not factorized again (see can_factorize)
            setattr(factor, FACTOR_ATTR, True)
        self.in_features = d_in
        self.out_features = d_out
        self.rank = rank
        self.original = dict(original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense W_k = A B in the replaced layer's layout (Linear (d_out, d_in), HF Conv1D (d_in, d_out),
        Conv (C_out, C_in, *kernel)) and the factors' dtype, for model code that reads a layer's ``weight``:
        HF ViT reads its patch projection's dtype, ``nn.TransformerEncoderLayer`` hands its linears' weights
        to its fused inference path. Formed from the factors on each access (differentiable through them);
        never a parameter, so it is neither saved nor counted."""
        w = self.second.weight.reshape(self.out_features, self.rank) @ self.first.weight.reshape(
            self.rank, self.in_features)
        kind = self.original.get("type")
        if kind == "Conv1D":
            return w.T
        if kind in ("Conv1d", "Conv2d"):
            return w.reshape(self.out_features, self.original["in_channels"], *self.original["kernel_size"])
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        """The replaced layer's bias (held by ``second``)."""
        return self.second.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (d_out × rank), B (rank × d_in)) as stored."""
        a = self.second.weight.detach().reshape(self.out_features, self.rank)
        b = self.first.weight.detach().reshape(self.rank, self.in_features)
        return a, b

    def dense_matrix(self) -> torch.Tensor:
        """W_k = A B (d_out × d_in) in float32 (float64 for float64 factors)."""
        a, b = self.factors()
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        return a.to(dt) @ b.to(dt)

    def spec(self) -> dict:
        """JSON description sufficient to rebuild an empty module of this shape."""
        return {"rank": self.rank, "d_in": self.in_features, "d_out": self.out_features,
                "bias": self.second.bias is not None, "original": self.original}

    @staticmethod
    def from_spec(spec: dict, dtype: torch.dtype = torch.float32) -> Factorized:
        orig = spec["original"]
        rank, d_in, d_out, bias = int(spec["rank"]), int(spec["d_in"]), int(spec["d_out"]), bool(spec["bias"])
        if orig["type"] in ("Linear", "Conv1D"):
            return FactorizedLinear(d_in, d_out, rank, bias=bias, dtype=dtype, original_type=orig["type"])
        if orig["type"] in ("Conv1d", "Conv2d"):
            return FactorizedConv(orig, rank, bias=bias, dtype=dtype)
        raise InputError(f"cannot rebuild a factorized {orig['type']!r} layer")

    def to_dense(self) -> nn.Module:
        """The original module type holding W_k (and the bias): for ``--export dense``."""
        w = self.dense_matrix()
        dtype = self.second.weight.dtype
        device = self.second.weight.device
        bias = self.second.bias
        orig = self.original
        if orig["type"] == "Linear":
            mod = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype, device=device)
            with torch.no_grad():
                mod.weight.copy_(w.to(dtype))
        elif orig["type"] == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            mod = Conv1D(self.out_features, self.in_features).to(device=device, dtype=dtype)
            with torch.no_grad():
                mod.weight.copy_(w.T.to(dtype))
                if bias is None:
                    mod.bias.zero_()
        else:
            cls = nn.Conv1d if orig["type"] == "Conv1d" else nn.Conv2d
            mod = cls(orig["in_channels"], orig["out_channels"], tuple(orig["kernel_size"]),
                      stride=tuple(orig["stride"]), padding=_padding(orig["padding"]),
                      dilation=tuple(orig["dilation"]), groups=1, bias=bias is not None,
                      padding_mode=orig["padding_mode"], dtype=dtype, device=device)
            with torch.no_grad():
                mod.weight.copy_(w.reshape(mod.weight.shape).to(dtype))
        if bias is not None:
            with torch.no_grad():
                mod.bias.copy_(bias.detach())
        return mod


def _padding(p):
    return p if isinstance(p, str) else tuple(p)


class FactorizedLinear(Factorized):
    """Linear (or HF Conv1D) of rank k: ``first`` = Linear(d_in → k, no bias), ``second`` =
    Linear(k → d_out, original bias)."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 original_type: str = "Linear"):
        first = nn.Linear(d_in, rank, bias=False, dtype=dtype, device=device)
        second = nn.Linear(rank, d_out, bias=bias, dtype=dtype, device=device)
        super().__init__(first, second, d_in, d_out, rank, {"type": original_type})


class FactorizedConv(Factorized):
    """Conv of rank k: ``first`` = Conv(C_in → k, same kernel/stride/padding/dilation, no bias),
    ``second`` = 1×1 Conv(k → C_out, original bias). Only for groups = 1."""

    def __init__(self, original: dict, rank: int, *, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        cls = nn.Conv1d if original["type"] == "Conv1d" else nn.Conv2d
        ks = tuple(original["kernel_size"])
        first = cls(original["in_channels"], rank, ks, stride=tuple(original["stride"]),
                    padding=_padding(original["padding"]), dilation=tuple(original["dilation"]), groups=1,
                    bias=False, padding_mode=original["padding_mode"], dtype=dtype, device=device)
        second = cls(rank, original["out_channels"], 1, bias=bias, dtype=dtype, device=device)
        d_in = original["in_channels"] * math.prod(ks)
        super().__init__(first, second, d_in, original["out_channels"], rank, original)
        self.in_channels = original["in_channels"]
        self.out_channels = original["out_channels"]


def can_factorize(module: nn.Module) -> bool:
    """Linear, HF Conv1D, and Conv1d/2d with groups = 1 can be split into two layers — except a factor
    of an earlier factorization (``first`` / ``second`` of a :class:`Factorized`): splitting it again
    would nest factorizations; a lower rank for such a layer is written into the factor itself."""
    if is_factor(module):
        return False
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def is_factor(module: nn.Module) -> bool:
    """Whether ``module`` is ``first`` or ``second`` of a :class:`Factorized` (an earlier low-rank pruning)."""
    return bool(getattr(module, FACTOR_ATTR, False))


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def factorize_module(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Factorized:
    """A new :class:`Factorized` module computing A B x (+ the module's bias), in the module's
    dtype and on its device. ``a``: (d_out × k), ``b``: (k × d_in) in the adapter's layout."""
    w = module.weight
    dtype, device = w.dtype, w.device
    k = a.shape[1]
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        d_out, d_in = a.shape[0], b.shape[1]
        new: Factorized = FactorizedLinear(d_in, d_out, k, bias=bias is not None, dtype=dtype, device=device,
                                           original_type="Conv1D" if _is_hf_conv1d(module) else "Linear")
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        new = FactorizedConv(conv_spec(module), k, bias=bias is not None, dtype=dtype, device=device)
    else:
        raise InputError(f"cannot factorize a {type(module).__name__}")
    with torch.no_grad():
        new.first.weight.copy_(b.reshape(new.first.weight.shape).to(device=device, dtype=dtype))
        new.second.weight.copy_(a.reshape(new.second.weight.shape).to(device=device, dtype=dtype))
        if bias is not None:
            new.second.bias.copy_(bias.detach())
    new.train(module.training)
    return new


def conv_spec(module: nn.Module) -> dict:
    """JSON description of a Conv1d/2d (shape and geometry)."""
    return {"type": "Conv1d" if isinstance(module, nn.Conv1d) else "Conv2d",
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "padding_mode": module.padding_mode}


# --------------------------------------------------------------------------------------------
# compressors (see specprune.compress.apply for the protocol)


class _LowRankPruner:
    kind = "prune"
    needs_covariance = True
    low_rank = True
    name = ""

    def apply(self, layer, layer_plan, covariance=None) -> nn.Module | None:
        """Truncate ``layer`` to ``layer_plan.rank``: returns a :class:`Factorized` replacement when
        that saves parameters and the module supports it, else writes W_k into the module."""
        k = layer_plan.rank
        if k is None:
            raise InputError(f"layer {layer.name}: the {self.name} method needs a rank")
        d_in, d_out = layer.d_in, layer.d_out
        limit = d_in if (self.name == "spectral" and covariance is not None) else min(d_in, d_out)
        if k >= limit:
            return None  # full rank: nothing to truncate
        if covariance is not None:
            evec = covariance.eigenvectors
            if int(np.shape(evec)[0]) != d_in:
                raise InputError(f"layer {layer.name}: covariance of dimension {np.shape(evec)[0]} does not "
                                 f"match d_in = {d_in}")
        w = layer.weight_matrix()
        a, b = low_rank_factors(self.name, w, covariance, k)
        k_eff = a.shape[1]
        if can_factorize(layer.module) and factorization_saves(d_in, d_out, k_eff):
            return factorize_module(layer.module, a, b)
        layer.adapter.set_weight_matrix(layer.module, (a @ b).to(w.device))
        return None


class SpectralPruner(_LowRankPruner):
    """``spectral``: keep the top-k input eigenmodes, W → (W U_k) U_kᵀ; cost Σ_{k'>k} e_k'."""

    name = "spectral"


class WhitenedPruner(_LowRankPruner):
    """``whitened``: top-k singular directions of W Σ^½ (optimal output MSE); cost Σ_{i>k} s_i²."""

    name = "whitened"


class MagnitudePruner:
    """``magnitude``: zero the ``prune_rate`` fraction of smallest-|w| weights of the layer with
    torch's L1Unstructured mask applied permanently (see the module docstring)."""

    name = "magnitude"
    kind = "prune"
    needs_covariance = False
    low_rank = False

    def apply(self, layer, layer_plan, covariance=None) -> None:
        rate = float(layer_plan.prune_rate or 0.0)
        if rate <= 0.0:
            return
        weight = layer.module.weight
        method = torch_prune.L1Unstructured(amount=rate)
        with torch.no_grad():
            mask = method.compute_mask(weight.detach(), default_mask=torch.ones_like(weight, dtype=torch.bool))
            weight.mul_(mask.to(weight.dtype))
        return
