"""Gradient-based layer responses: every layer's probe deltas from a few backward passes.

:func:`specprune.sensitivity.measure_sensitivities` perturbs one layer at a time and runs the model
seven times per layer. For the built-in smooth metrics the same numbers follow from the metric's
second-order expansion around the reference weights, for every layer at once:

    δ(W + ΔW) ≈ ⟨∇_W δ, ΔW⟩ + ½ ΔWᵀ H ΔW,   H ≈ Jᵀ A J  (Gauss–Newton),

with J the Jacobian of the model output with respect to the layer's output and A the metric's
Hessian with respect to the model output: 2I/Σ‖f‖² for ``output-mse`` (exact at the reference, where
the residual is zero), (diag p − p pᵀ)/ΣL per position for ``lm-loss`` (the Fisher of the softmax).

The curvature term is estimated without forming H: for a random output cotangent v with E[v vᵀ] = A
(Rademacher signs for output-mse, a sampled token minus the predicted distribution for lm-loss) one
backward pass gives every layer's output gradient g = Jᵀ v, and for window n

    E_v[⟨G_n, ΔW⟩²] = ΔWᵀ H_n ΔW,   G_n = Σ_t g_t x_tᵀ  (the window's weight gradient),

so each of ``draws`` backward passes scores every probe perturbation of every layer. Since
⟨G_n, ΔW⟩ = ⟨g, X ΔWᵀ⟩, the responses X ΔW_kᵀ of the K perturbations are formed once in the forward
pass (one tokens × d_in × K·d_out product) and each backward pass only takes dot products with them
(a layer beyond :data:`RESPONSE_BYTES` forms its weight gradient per pass instead; MiniLM: 1.5 s
where one weight gradient per pass took 2.3 s). Windows are independent, so the squares are summed per
window (χ² with windows × draws degrees of freedom: relative noise ≈ √(2/(windows·draws)), 18% at
4 windows × 16 draws). For ``lm-loss`` one more backward pass with the true next tokens gives the
first-order term ⟨∇_W L, ΔW⟩ that one-sided truncation probes keep.

Measured on all-MiniLM-L6-v2 (4 windows, 16 draws), against the one-layer-at-a-time probes of the
same perturbations (int-5 and int-2 noise, two truncations) on 36 layers: ratio 1.01 geometric mean,
log-sd 0.22; 1.4 s of backward passes where the probes take 9.4 s (docs/benchmarks.md).

Limits. Gauss–Newton drops the Hessian's residual term: exact for output-mse at the reference, close
for the loss of a trained model (the small trained Llama: 0.6–1.6× the probes per layer), but on a
randomly initialised LM it overstates the curvature up to ~15× against the probes — plans made from it
are then conservative, and the verification pass still measures them. Only layers whose input is
(..., d_in) and output (..., d_out) (``nn.Linear``, HF ``Conv1D``) and the ``output-mse`` and
``lm-loss`` metrics are covered (:func:`unsupported` says why not); the recommender probes layers that no
backward pass reaches (a backbone run under ``no_grad`` or detached) or that score non-finite (a float16
backward pass that overflowed), and falls back to the probes everywhere else.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import HFConv1DAdapter, LinearAdapter, TargetLayer
from .models import eval_mode
from .progress import track

DRAWS = 16
METRICS = ("output-mse", "lm-loss")
CHUNK_BYTES = 1 << 30  # perturbations held at once; further layers are scored in further passes
RESPONSE_BYTES = 1 << 29  # responses X ΔWᵀ held per batch; layers beyond it form weight gradients per pass


def unsupported(layers: list[TargetLayer], metric: str) -> str | None:
    """Why the gradient sensitivities are not defined here (None when they are): they need a built-in
    smooth metric and layers that are linear maps of token features."""
    if metric not in METRICS:
        return f"the metric is {metric} (it needs output-mse or lm-loss)"
    other = [lay for lay in layers if type(lay.adapter) not in (LinearAdapter, HFConv1DAdapter)]
    if other:
        return (f"layer {other[0].name} is a {type(other[0].module).__name__} (it needs nn.Linear or Conv1D "
                f"layers{f'; {len(other)} layers are not' if len(other) > 1 else ''})")
    return None


def supported(layers: list[TargetLayer], metric: str) -> bool:
    """True when every layer is a linear map of token features and the metric is a built-in smooth one."""
    return unsupported(layers, metric) is None


class _Scores:
    """Running sums for one layer's K perturbations: Σ_v (Σ_n s²) per draw, and the first-order term."""

    def __init__(self, deltas: torch.Tensor, draws: int):
        self.deltas = deltas  # (K, d_out, d_in) float32
        self.curv = np.zeros((draws, deltas.shape[0]))
        self.first = np.zeros(deltas.shape[0])
        self.reached = False  # a backward pass reached the layer's output


def _window_groups(x: torch.Tensor, g: torch.Tensor, windows: int) -> int:
    """Windows the per-window scores are split into: the batch's windows when the layer's leading
    dimension is theirs, else one group (cross-window terms then have mean zero and only add noise)."""
    return windows if x.shape[0] == windows and g.shape[0] == windows else 1


def _responses(x: torch.Tensor, deltas: torch.Tensor, windows: int) -> torch.Tensor:
    """Y_k = X ΔW_kᵀ, laid out (groups, K, tokens·d_out): ⟨G_n, ΔW_k⟩ = ⟨g_n, Y_nk⟩ for any output gradient
    g, so one (tokens × d_in × K·d_out) product made in the forward pass serves every backward pass
    instead of one (d_out × tokens × d_in) weight gradient per pass."""
    k, d_out, d_in = deltas.shape
    n = windows if x.shape[0] == windows else 1
    y = x.reshape(-1, d_in).to(torch.float32) @ deltas.reshape(k * d_out, d_in).t()
    return y.reshape(n, -1, k, d_out).permute(0, 2, 1, 3).reshape(n, k, -1)


def _window_grads(x: torch.Tensor, g: torch.Tensor, windows: int) -> torch.Tensor:
    """Per-window weight gradients G_n = Σ_t g_t x_tᵀ, (windows, d_out, d_in); one group when the
    layer's leading dimension is not the batch's windows (cross-window terms then have mean zero and
    only add noise)."""
    d_in, d_out = x.shape[-1], g.shape[-1]
    n = _window_groups(x, g, windows)
    xs = x.reshape(n, -1, d_in).to(torch.float32)
    gs = g.reshape(n, -1, d_out).to(torch.float32)
    return torch.bmm(gs.transpose(1, 2), xs)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """No parameter requires grad inside the block (the backward passes need activation gradients
    only); every flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cotangents(metric: str, out: torch.Tensor, batch: dict, draws: int, gen: torch.Generator):
    """(reference sum, first-order cotangent or None, curvature cotangents) for one batch's output.

    output-mse: Rademacher signs on the counted positions, scale 1 (A = I up to 2/Σ‖f‖²);
    lm-loss: e_ỹ − p with ỹ ~ p at each counted position (E = diag p − p pᵀ), and p − e_y for the
    true next token y (the loss gradient)."""
    y = out.detach().float()
    mask = batch.get("attention_mask")
    if metric == "output-mse":
        keep = torch.ones(y.shape[:-1] if y.dim() > 1 else y.shape, dtype=torch.bool)
        if isinstance(mask, torch.Tensor) and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
            keep = mask.bool().cpu()
        w = keep.unsqueeze(-1).to(y.dtype) if y.dim() > 1 else keep.to(y.dtype)
        w = w.to(y.device)
        ref = float((y * w).double().pow(2).sum())

        def draw():
            signs = torch.randint(0, 2, y.shape, generator=gen).to(y.device, y.dtype) * 2 - 1
            return (signs * w).to(out.dtype)

        return ref, None, (draw() for _ in range(draws))
    ids = batch["input_ids"].to(y.device)
    m = (mask.bool().to(y.device) if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool))
    counted = (m[:, 1:] & m[:, :-1]).unsqueeze(-1).to(y.dtype)
    logits = y[:, :-1]
    p = torch.softmax(logits, dim=-1)
    tgt = ids[:, 1:]
    ref = float((F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
                 .reshape(tgt.shape) * counted[..., 0]).double().sum())

    def pad(v):
        full = torch.zeros_like(y)
        full[:, :-1] = v * counted
        return full.to(out.dtype)

    first = pad(p - F.one_hot(tgt, p.shape[-1]).to(p.dtype))

    flat = p.reshape(-1, p.shape[-1]).cpu()  # sampled on the CPU: the seeded generator lives there

    def draw():
        sampled = torch.multinomial(flat, 1, generator=gen).reshape(tgt.shape).to(y.device)
        return pad(F.one_hot(sampled, p.shape[-1]).to(p.dtype) - p)

    return ref, first, (draw() for _ in range(draws))


def gauss_newton_scores(model: nn.Module, layers: list[TargetLayer], deltas: dict[str, torch.Tensor],
                        batches: list[dict], metric: str, device=None, *, draws: int = DRAWS,
                        seed: int = 0) -> dict[str, dict]:
    """For each layer and each of its K perturbations ``deltas[name]`` (K, d_out, d_in): the metric's
    curvature term ½ΔWᵀHΔW (output-mse: ‖JΔ‖²/Σ‖f‖², its full second-order change), its standard
    error over the draws, the first-order term ⟨∇δ, ΔW⟩ (0 for output-mse), all as relative deltas, and
    ``reached``: whether any backward pass reached the layer (not when the output does not depend on it,
    or only through ``no_grad``/``detach``). Hooks and parameter flags are always restored.

    Each batch draws its cotangents from its own generator (seeded by ``seed`` and the batch's index), so
    under torch.distributed every rank scores its share of the batches and the sums are all-reduced: the
    scores of one process, to summation order, for 1/W of the backward passes each."""
    from .distributed import all_reduce_scalars, is_distributed, shard

    chunk = [lay for lay in layers if lay.name in deltas]
    scores = {lay.name: _Scores(deltas[lay.name], draws) for lay in chunk}
    ref_total = 0.0
    for i, batch in shard(list(enumerate(batches)), allow_empty=True):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + i) % (1 << 63))
        ref_total += _score_batch(model, chunk, scores, batch, metric, device, draws, gen)
    if is_distributed():
        order = [scores[lay.name] for lay in chunk]
        flat = all_reduce_scalars(ref_total, *(v for sc in order
                                               for v in (*sc.curv.ravel(), *sc.first, float(sc.reached))))
        ref_total, at = flat[0], 1
        for sc in order:
            n = sc.curv.size
            sc.curv = np.asarray(flat[at:at + n]).reshape(sc.curv.shape)
            sc.first = np.asarray(flat[at + n:at + n + sc.first.size])
            sc.reached = flat[at + n + sc.first.size] > 0
            at += n + sc.first.size + 1
    half = 0.5 if metric == "lm-loss" else 1.0  # output-mse: the squared distance is the quadratic itself
    scale = half / ref_total if ref_total > 0 else 0.0
    out = {}
    for n, s in scores.items():
        curv = s.curv * scale
        out[n] = {"curvature": curv.mean(0), "stderr": curv.std(0, ddof=1) / math.sqrt(draws) if draws > 1
                  else np.full(curv.shape[1], np.nan),
                  "first": s.first / ref_total if (ref_total > 0 and metric == "lm-loss") else np.zeros_like(s.first),
                  "reached": s.reached}
    return out


def _score_batch(model, chunk_layers, scores, batch, metric, device, draws, gen) -> float:
    """One forward pass of ``batch`` and its backward passes; returns the batch's reference sum.

    Each backward pass adds every call's ⟨G_n, ΔW_k⟩ into the layer's ``pending`` (a layer called
    more than once per forward gets the sum over its calls: its whole weight gradient), which is
    squared once the pass is complete."""
    from .data import forward, to_device
    from .evaluation import output_tensor

    b = to_device(batch, device) if device is not None else batch
    first_key = next(iter(b.values()))
    windows = int(first_key.shape[0]) if isinstance(first_key, torch.Tensor) and first_key.dim() else 1
    pending: dict[str, torch.Tensor] = {}
    handles = []
    kept = [0]  # bytes of responses Y held for this batch's backward passes

    def tap(name):
        sc = scores[name]

        def fwd(mod, args, out):
            x = args[0].detach()
            if not torch.is_grad_enabled():  # run under no_grad: no backward pass can reach this layer
                return out
            if not out.requires_grad:  # nothing before this layer needs a gradient: start the graph here,
                out = out.detach().requires_grad_(True).clone()  # on a copy that in-place ops may change

            if sc.deltas.device != x.device:  # once: the perturbations go where the layer computes
                sc.deltas = sc.deltas.to(x.device)
            y = None
            y_bytes = x.numel() // x.shape[-1] * sc.deltas.shape[0] * sc.deltas.shape[1] * 4
            if draws > 1 and kept[0] + y_bytes <= RESPONSE_BYTES:
                y = _responses(x, sc.deltas, windows)
                kept[0] += y_bytes

            def grad_hook(g):
                sc.reached = True
                if y is not None and _window_groups(x, g, windows) == y.shape[0]:
                    s = torch.bmm(y, g.reshape(y.shape[0], -1, 1).to(torch.float32))[..., 0]
                else:
                    s = torch.einsum("nij,kij->nk", _window_grads(x, g, windows), sc.deltas)
                s = s.double().cpu()
                prev = pending.get(name)
                if prev is not None and prev.shape != s.shape:  # calls grouped differently: one group
                    prev, s = prev.sum(0, keepdim=True), s.sum(0, keepdim=True)
                pending[name] = s if prev is None else prev + s

            out.register_hook(grad_hook)
            return out

        return fwd

    def collect(draw: int | None) -> None:
        for name, s in pending.items():
            if draw is None:
                scores[name].first += s.sum(0).numpy()
            else:
                scores[name].curv[draw] += s.pow(2).sum(0).numpy()
        pending.clear()

    try:
        with _frozen(model), eval_mode(model), torch.enable_grad():
            for lay in chunk_layers:
                handles.append(lay.module.register_forward_hook(tap(lay.name)))
            out = output_tensor(forward(model, b))
            if not out.requires_grad:  # the output does not depend on these layers (e.g. a pooler)
                return _reference(metric, out, b, gen)
            ref, first, draws_iter = _cotangents(metric, out, b, draws, gen)
            if first is not None:
                out.backward(first, retain_graph=draws > 0)
                collect(None)
            for i, v in enumerate(draws_iter):
                out.backward(v, retain_graph=i < draws - 1)
                collect(i)
    finally:
        for h in handles:
            h.remove()
    return ref


def _reference(metric, out, batch, gen) -> float:
    return _cotangents(metric, out, batch, 0, gen)[0]


def gradient_sensitivities(layers: list[TargetLayer], geoms: dict, batches: list[dict], metric: str,
                           model: nn.Module, prune_method: str | None, *, draws: int = DRAWS, seed: int = 0,
                           device=None) -> tuple[dict, dict[str, str]]:
    """The per-layer response laws of :func:`specprune.sensitivity.measure_sensitivities`, from the same
    perturbations (RTN int-5 and int-2 per channel; truncations at half the break-even rank and at 3/4 of
    full rank) scored by :func:`gauss_newton_scores` on ``batches`` instead of one forward pass per
    perturbation. Quantization keeps the curvature term (what the antithetic probe measures);
    truncations keep the first-order term too (the one-sided probe), floored at the curvature.

    Layers that no backward pass reached (the output does not read them, or reads them only through
    ``no_grad``/``detach``) and layers with a non-finite score (a float16 backward pass that overflowed)
    are left out: returns ({name: LayerSensitivity}, {left-out name: why}), and the caller probes them."""
    from .compress.quantize import quantization_error
    from .sensitivity import PROBE_BITS, LayerSensitivity, _response_law, truncation_law, truncation_ranks

    def perturbations(g) -> list[torch.Tensor]:
        dws = [quantization_error(g.w, b, None).to(torch.float32) for b in PROBE_BITS]
        if prune_method is not None:
            k1, k2 = truncation_ranks(g)
            dws.append(g.low_rank_delta(prune_method, k1))
            if k2 < min(g.d_in, g.d_out):
                dws.append(g.low_rank_delta(prune_method, k2))
        return dws

    # layers in chunks whose perturbations fit in CHUNK_BYTES, each scored by its own passes
    count = len(PROBE_BITS) + (2 if prune_method is not None else 0)
    chunks, cur, size = [], [], 0
    for lay in layers:
        b = count * geoms[lay.name].w.numel() * 4
        if cur and size + b > CHUNK_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(lay)
        size += b
    chunks += [cur] if cur else []
    scores, dist = {}, {}
    for chunk in track(chunks, "sensitivity (backward passes)"):
        deltas = {lay.name: torch.stack(perturbations(geoms[lay.name])) for lay in chunk}
        dist.update({n: [geoms[n].distortion(dw) for dw in d[: len(PROBE_BITS)]] for n, d in deltas.items()})
        scores.update(gauss_newton_scores(model, chunk, deltas, batches, metric, device, draws=draws, seed=seed))
        del deltas
    out, skipped = {}, {}
    for lay in layers:
        g, sc = geoms[lay.name], scores[lay.name]
        curv, first, se = sc["curvature"], sc["first"], sc["stderr"]
        if not sc["reached"]:
            skipped[lay.name] = "no backward pass reached it"
            continue
        if not (np.isfinite(curv).all() and np.isfinite(first).all()):
            skipped[lay.name] = "non-finite scores"
            continue
        probes = [{"kind": "quant", "bits": b, "distortion": dist[lay.name][i],
                   "delta": float(curv[i]), "stderr": _finite(se[i]), "method": "gauss-newton"}
                  for i, b in enumerate(PROBE_BITS)]
        power, s_q = _response_law(probes)
        sens = LayerSensitivity(lay.name, s_q, None, power, probes)
        if prune_method is not None:
            k1, k2 = truncation_ranks(g)
            i = len(PROBE_BITS)
            light = se_light = None
            if len(curv) > i + 1:
                light, se_light = float(curv[i + 1] + first[i + 1]), _finite(se[i + 1])
            truncation_law(sens, g, prune_method, k1, float(curv[i] + first[i]), float(curv[i]), k2, light,
                           se_light)
        out[lay.name] = sens
    return out, skipped


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
