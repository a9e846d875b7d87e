"""Synthetic layers with a known learning frontier, for validating the spectral estimators.

A synthetic layer is the exact gradient-flow (NTK) solution of a linear layer ``y = W x`` trained
towards a target ``W*`` on Gaussian inputs ``x ~ N(0, Σ)``, written in the eigenbasis of Σ:

- input covariance ``Σ = U diag(λ) Uᵀ`` with ``λ_k = k^-b`` (k = 1..d) and ``U`` a random
  orthogonal matrix (QR of a Gaussian matrix, signs fixed so the draw is Haar);
- target ``W* = M diag(w) Uᵀ``: mode k maps onto the unit output direction ``m_k`` (column k of
  ``M``; orthonormal columns when ``d_out >= d``, otherwise independent random unit vectors), with
  ``λ_k w_k² = s k^-a``, i.e. target per-mode gain ``w_k² = s k^(b-a)``;
- gradient flow on ``E‖(W − W*) x‖²`` with rate η from the random init ``W0`` (i.i.d. entries of
  standard deviation ``init_std``) gives ``W(t) − W* = (W0 − W*) exp(−η Σ t)``, so

      W(t) u_k = w_k (1 − e^(−g_k)) m_k + e^(−g_k) W0 u_k,      g_k = η λ_k t.

  With ``init_std = 0`` this is ``W_k(t) = w_k (1 − exp(−η λ_k t))`` of the theory notes. Learned
  modes (g_k ≫ 1) lose their init; unlearned modes (g_k ≪ 1) keep it, so their gain
  ``‖W u_k‖² ≈ d_out · init_std²`` is flat and their mode energy is proportional to λ_k — the
  "random-init floor" seen in real networks. ``init_decays=False`` instead adds ``W0`` on top of
  the noise-free solution (a floor under every mode).

The true frontier is the mode where ``η λ_k t = 1``: ``k* = (η t)^(1/b)``, returned rounded.

Scale of the target (what makes the noisy cases meaningful). The expected init gain of a mode is
``d_out · init_std²``; at the largest noise considered, ``init_std = 1/√d``, it is ``d_out / d``.
The target scale ``s`` is fixed (independent of t and of ``init_std``) so that the *smallest* target
gain over the spectrum equals ``snr · d_out / d``: every learned mode stands at least ``snr`` times
above the init floor of the noisiest case (default ``snr = 10``, i.e. the learned weights carry
at least ten times the per-mode energy of a 1/√d init). Smaller ``init_std`` only raises that ratio.
Because ``s`` does not depend on ``t``, a series of layers at increasing ``t`` is one training run.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_orthogonal", "synthetic_frontier", "synthetic_layer", "time_for_frontier"]

_EXACT_TOKENS = 2**40  # "N huge": the exact Gram Σ·N with this token count


def random_orthogonal(n: int, rng: np.random.Generator, cols: int | None = None) -> np.ndarray:
    """A Haar-random ``n × cols`` matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    cols = n if cols is None else cols
    q, r = np.linalg.qr(rng.standard_normal((n, cols)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def synthetic_frontier(d: int, b: float, t: float, eta: float = 1.0) -> float:
    """The continuous true frontier ``k* = (η t)^(1/b)``: the mode where ``η λ_k t = 1``."""
    if d < 1 or b <= 0 or eta * t <= 0:
        raise ValueError("need d >= 1, b > 0 and eta * t > 0")
    return float((eta * t) ** (1.0 / b))


def synthetic_layer(
    d: int,
    d_out: int,
    a: float,
    b: float,
    t: float,
    eta: float = 1.0,
    init_std: float = 0.0,
    tokens: int | None = None,
    seed: int = 0,
    *,
    snr: float = 10.0,
    init_decays: bool = True,
    chunk: int = 32768,
) -> tuple[np.ndarray, int, np.ndarray, int, np.ndarray]:
    """Build one synthetic layer with a known learning frontier (see the module docstring).

    Parameters
    ----------
    d, d_out : input and output widths.
    a, b : target-energy and eigenvalue exponents (``λ_k w_k² ∝ k^-a``, ``λ_k = k^-b``).
    t, eta : training time and rate; the true frontier is ``k* = (η t)^(1/b)``.
    init_std : per-element standard deviation of the random init ``W0`` (0 = no init noise).
    tokens : ``None`` for the exact Gram ``Σ · N`` with ``N = 2**40``; otherwise the Gram of
        ``tokens`` i.i.d. samples ``x ~ N(0, Σ)``, so eigenvalues and eigenvectors carry real
        sampling error.
    seed : seed of ``numpy.random.default_rng``; the same seed gives the same layer.
    snr : the smallest target gain over the spectrum, in units of ``d_out / d`` (the expected init
        gain at ``init_std = 1/√d``).
    init_decays : ``True`` (default) uses the exact gradient-flow solution, where learned modes
        forget the init; ``False`` adds ``W0`` to the noise-free ``W(t)``.
    chunk : at most this many tokens per sampling block (also capped at 2^24 / d, bounding memory).

    Returns
    -------
    gram : ``(d, d)`` float64 uncentred Gram sum ``Σ_tokens x xᵀ``.
    tokens : the token count N (``Σ̂ = gram / N``).
    weight : ``(d_out, d)`` float64 weight matrix ``W(t)``.
    true_k_star : ``round((η t)^(1/b))`` (may exceed ``d``: then no frontier lies in the spectrum).
    true_eigenvalues : ``λ_k = k^-b``, descending.
    """
    if d < 2 or d_out < 1:
        raise ValueError("need d >= 2 and d_out >= 1")
    if a <= 0 or b <= 0 or t <= 0 or eta <= 0 or snr <= 0:
        raise ValueError("a, b, t, eta and snr must be positive")
    if init_std < 0:
        raise ValueError("init_std must be >= 0")
    if tokens is not None and tokens < 1:
        raise ValueError("tokens must be a positive integer or None")
    rng = np.random.default_rng(seed)
    k = np.arange(1, d + 1, dtype=np.float64)
    lam = k**-b
    u = random_orthogonal(d, rng)
    if d_out >= d:
        m = random_orthogonal(d_out, rng, cols=d)
    else:
        m = rng.standard_normal((d_out, d))
        m /= np.linalg.norm(m, axis=0, keepdims=True)
    gain_shape = k ** (b - a)  # target per-mode gain w_k² up to the scale s
    scale = snr * (d_out / d) / gain_shape.min()
    w = np.sqrt(scale * gain_shape)
    g = eta * lam * t
    learned = -np.expm1(-g)  # 1 − e^(−g), accurate for tiny g
    weight = (m * (w * learned)) @ u.T
    if init_std > 0:
        w0 = rng.standard_normal((d_out, d)) * init_std
        if init_decays:
            w0 = ((w0 @ u) * np.exp(-g)) @ u.T  # W0 exp(−η Σ t)
        weight = weight + w0
    if tokens is None:
        n = _EXACT_TOKENS
        gram = (u * (lam * float(n))) @ u.T
    else:
        n = int(tokens)
        root = u * np.sqrt(lam)  # x = root @ z, z ~ N(0, I)
        gram = np.zeros((d, d))
        done = 0
        rows = max(1, min(chunk, 2**24 // d))  # ≤ 2^24 floats (128 MiB) per block
        while done < n:
            m_rows = min(rows, n - done)
            x = rng.standard_normal((m_rows, d)) @ root.T
            gram += x.T @ x
            done += m_rows
    gram = 0.5 * (gram + gram.T)
    true_k = round(synthetic_frontier(d, b, t, eta))
    return gram, n, weight, true_k, lam


def time_for_frontier(k_star: float, b: float, eta: float = 1.0) -> float:
    """The training time t that puts the true frontier at ``k_star``: ``t = k_star^b / η``."""
    if k_star <= 0 or b <= 0 or eta <= 0:
        raise ValueError("k_star, b and eta must be positive")
    return float(k_star**b / eta)
