"""SpectrumProbe: forward hooks that stream each layer's uncentred input Gram matrix.

For every target layer with input features x ∈ R^{d_in} (one row per counted token; padded
positions are dropped through the batch's attention mask), the probe keeps

    G = Σ_tokens x xᵀ   (d_in × d_in),   N = number of tokens,

so the feature covariance is Σ = G / N. Precision: each batch's x is upcast to float32
(fp16/bf16 models work), its Gram xᵀx is float32 GEMMs (TF32 off while the probe runs), and
batches are summed into a float64 accumulator, so rounding does not grow with the number of
batches (on the CPU only the upper strips of the batch Gram are computed, into a buffer kept for
the whole pass, and the sum is mirrored once at the end). Placement: each accumulator computes on
its layer's device (the device of the layer's weights; a model dispatched over several GPUs keeps
each accumulator beside its layer); with ``offload`` the float64 sum lives in CPU memory instead and
only the float32 batch Gram is made on the device.

Sharing (an optimisation, never a change of result): layers that read the same input tensor and
turn it into the same feature rows (q/k/v, gate/up: :func:`feature_key`) share one accumulator, so
its Gram is computed and stored once. Tensors are told apart by identity (weak references, so a
freed tensor whose memory is reused cannot be mistaken for a shared one; an in-place change between
two readers is not seen). A layer joins an accumulator only on its first call, and only one that has
taken nothing but that same tensor; from then on a tensor one member reads is held until every member
has read it, and only then added, so the shared Gram holds exactly the inputs each member saw. When a
batch ends with a tensor not read by every member (``b(x); a(x); b(h)``: b reused on a tensor a never
sees), or more than :data:`MAX_PENDING` tensors wait, the group splits for good: each member gets a
copy of the common sum plus the tensors it alone read, and its own accumulator from then on. A layer
called several times per forward on different tensors (ALBERT-style reuse) counts each call's tokens.
:func:`discover_input_groups` runs the same logic on a one-sample forward, so the memory estimate sees
the same groups.

Token sampling (``sample``, off by default): for inputs at least :data:`SAMPLE_MIN_WIDTH` wide, each
batch keeps token i with probability p_i = min(1, c‖x_i‖²), c set per batch so that the expected number
kept is ``sample`` × the batch's tokens, and adds x_i x_iᵀ / p_i: an unbiased estimate of the all-token
Gram at ``sample`` of its cost (the Gram of a d-wide input is d²/2 multiply-adds per token, the layer's
own forward d·d_out: on MiniLM's 1536-wide FFN inputs 84% of all Gram work). Norm² probabilities keep
the few high-norm tokens (e.g. [CLS]) that carry the top modes, which uniform sampling misses. Error bound:
for a unit vector v, Var(vᵀĜv) = Σ_i (1 − p_i)/p_i (vᵀx_i)⁴, and for a token with p_i = c‖x_i‖² < 1,
(1 − p_i)/p_i (vᵀx_i)⁴ ≤ (1/c − ‖x_i‖²)(vᵀx_i)² because (vᵀx_i)² ≤ ‖x_i‖² (tokens with p_i = 1 add nothing).
So Var(vᵀĜv) ≤ V·vᵀGv with V the largest over batches of 1/c − min ‖x‖² over that batch's uncertain tokens,
and the relative standard error of an eigenvalue λ_k of Σ = Ĝ/N is at most √(V / (N λ_k)) to first order,
recorded per group as ``variance_factor`` V (:attr:`GramAccumulator.sampling`; 0 when every token entered).

The probe is a context manager that removes exactly its own hook handles in ``finally``
(also on exceptions and KeyboardInterrupt) and raises if a hook never fired.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
import weakref
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .layers import ConvAdapter, LinearAdapter, TargetLayer

STRIP = 128  # CPU Gram strip width: 96–128 measured fastest for d = 384…3072 (2-core AVX-512 host)
SAMPLE_MIN_WIDTH = 1024  # token sampling (when asked for) applies to inputs at least this wide
MIN_SAMPLE = 1e-6  # the smallest token-sampling fraction taken (below it the inclusion scale underflows)
MAX_PENDING = 8  # tensors a shared accumulator holds for members yet to read them before it splits


class AmbiguousMaskWarning(UserWarning):
    """Some layer inputs were (n, n, …) under an (n, n) attention mask: batch-first and seq-first cannot be
    told apart from the shapes, and the mask was applied batch-first (:meth:`SpectrumProbe._features`)."""


def check_sample(sample: float | None, name: str = "token_sample") -> float | None:
    """Validate a token-sampling fraction: None or 1 (every token), or a number in (0, 1)."""
    if sample is None:
        return None
    if isinstance(sample, bool) or not isinstance(sample, numbers.Real) or not math.isfinite(sample) \
            or not MIN_SAMPLE <= sample <= 1:
        raise InputError(f"{name} must be a fraction in [{MIN_SAMPLE:g}, 1], got {sample!r}")
    return None if sample == 1 else float(sample)


def inclusion_scale(norms2: torch.Tensor, budget: float) -> float:
    """c with Σ_i min(1, c·s_i) = ``budget`` for the squared norms s_i ≥ 0 (inf when the budget covers every
    token of positive norm: all are kept). The top m tokens are capped at probability 1 for the smallest m
    whose c_m = (budget − m) / Σ_{i ≥ m} s_i leaves the (m+1)-th below 1."""
    v = torch.sort(norms2.double(), descending=True).values
    v = v[v > 0]
    if budget >= v.numel():
        return math.inf
    tail = v.flip(0).cumsum(0).flip(0)
    m = torch.arange(v.numel(), dtype=torch.float64, device=v.device)
    c = (budget - m) / tail
    ok = torch.nonzero((c > 0) & (c * v <= 1)).flatten()
    return float(c[ok[0]]) if ok.numel() else math.inf


def _strips(d: int):
    """(a, b) of the column strips a:b, STRIP wide, that cover 0:d."""
    return ((a, min(a + STRIP, d)) for a in range(0, d, STRIP))


@dataclass
class GramAccumulator:
    """Streaming Σ xxᵀ for one input tensor (possibly shared by several layers)."""

    key: str
    d: int
    device: torch.device  # where each batch's Gram is computed (the layer's device)
    gram: torch.Tensor | None = None
    tokens: int = 0
    skipped_tokens: int = 0  # tokens of batches with NaN/Inf features, left out
    layers: list[str] = field(default_factory=list)
    offload: bool = False  # keep the float64 sum in CPU memory
    sample: float | None = None  # token sampling fraction (module docstring); None: every token
    seed: int = 0
    kept_tokens: int = 0  # tokens whose features entered the Gram (= tokens unless sampled)
    max_variance: float = 0.0  # the largest per-batch 1/c − min s over uncertain tokens (module docstring)

    _gen: torch.Generator | None = field(default=None, repr=False)
    _buf: torch.Tensor | None = field(default=None, repr=False)  # CPU: the float32 batch Gram's buffer
    _mirror: bool = field(default=False, repr=False)  # CPU: lower strips not yet copied from the upper

    def update(self, x: torch.Tensor) -> None:
        """x: (tokens, d) features; G += xᵀx. A batch with a NaN/Inf feature is left out whole
        (``skipped_tokens``): NaN and Inf propagate into ``x.sum()``, an O(N·d) check; only when that
        sum is not finite are the elements themselves checked (a finite batch can overflow its sum).

        Each batch's Gram is float32 GEMMs added to the float64 sum on ``device`` or, with ``offload``,
        in CPU memory. Batch Grams are never summed in float32: a distributed run (other batches per
        rank) then gives the single-process sums to float64 rounding. On the CPU the Gram is symmetric
        work done once: only the block upper triangle is formed, strip by strip (rows ``a:b`` against
        columns ``a:``, :data:`STRIP` wide, written into a float32 buffer kept for the whole pass), and
        :meth:`finalize` mirrors it — (B+1)/2B of the multiply-adds, 0.46–0.68× the full GEMM's time
        measured for d = 384…3072 (a BLAS ``ssyrk`` through scipy would do the same, but its OpenBLAS
        threads compete with torch's for the cores: measured 7.4× the plain forward against 2.5×)."""
        if x.dim() != 2 or x.shape[1] != self.d or x.is_complex():
            what = "complex features" if x.is_complex() else f"features of shape {tuple(x.shape)}"
            raise InputError(f"layer {self.key} got {what}, but it takes {self.d} real input features per token: "
                             "the data does not fit the model")
        n = int(x.shape[0])
        if n == 0:
            return
        xf = x.to(self.device, torch.float32)
        if not bool(torch.isfinite(xf.sum())) and not bool(torch.isfinite(xf).all()):
            self.skipped_tokens += n
            return
        kept = n
        if self.sample is not None:
            xf, kept, scale = self._sampled(xf)
        if xf.device.type == "cpu":
            strips = self._upper_strips(xf)
            diag = [g[:, : g.shape[0]].diagonal() for _, g in strips]
        else:
            g = xf.t() @ xf
            strips, diag = [(0, g)], [g.diagonal()]
        del xf
        if not all(bool(torch.isfinite(dg).all()) for dg in diag):  # |g_ij| ≤ √(g_ii g_jj)
            self.skipped_tokens += n  # finite features whose squares overflow float32 (|x| > 1.8e19)
            return
        if self.gram is None:
            dev = "cpu" if self.offload else strips[0][1].device
            self.gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=dev)
        if len(strips) == 1 and strips[0][1].shape[0] == self.d:
            self.gram += strips[0][1].to(self.gram.device)
        else:
            for a, g in strips:
                self.gram[a : a + g.shape[0], a:] += g
            self._mirror = True
        self.tokens += n
        self.kept_tokens += kept
        if self.sample is not None:
            self.max_variance = max(self.max_variance, scale)

    def _sampled(self, xf: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Norm² importance sampling of the batch's rows (module docstring): the kept rows scaled by
        1/√p_i, how many were kept, and the batch's variance factor 1/c − min s_i over the tokens not
        kept for certain (p_i < 1; 0 when every token is: the batch's Gram is exact)."""
        n = int(xf.shape[0])
        s = (xf * xf).sum(1)
        c = inclusion_scale(s, self.sample * n)
        if not math.isfinite(c):
            return xf, n, 0.0
        if self._gen is None:  # one stream per accumulator: the same run draws the same tokens
            self._gen = torch.Generator(device=xf.device)
            self._gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.key.encode())) % (1 << 63))
        s = s.double()
        p = (s * c).clamp_(max=1.0)
        keep = torch.rand(n, generator=self._gen, device=xf.device, dtype=torch.float64) < p
        idx = torch.nonzero(keep).flatten()
        out = xf.index_select(0, idx).mul_(p.index_select(0, idx).rsqrt().to(xf.dtype)[:, None])
        uncertain = s[(p < 1) & (s > 0)]  # c > 0 here (inclusion_scale), and some token has p < 1
        return out, int(idx.numel()), max(1.0 / c - float(uncertain.min()), 0.0) if uncertain.numel() else 0.0

    @property
    def sampling(self) -> dict:
        """What sampling did ({} when every token entered): the fraction asked for, the tokens kept, and
        ``variance_factor`` V (0: every token entered with certainty), so that the relative
        standard error of an eigenvalue λ of Σ is at most √(V / (N λ)) (module docstring)."""
        if self.sample is None:
            return {}
        return {"fraction": self.sample, "kept_tokens": self.kept_tokens, "tokens": self.tokens,
                "variance_factor": self.max_variance}

    def _upper_strips(self, xf: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """CPU: the upper strips ``x[:, a:b]ᵀ x[:, a:]`` (width STRIP), one after another in the kept
        float32 buffer (their sizes add up to less than d²)."""
        d = self.d
        if self._buf is None:
            self._buf = torch.empty(d * d, dtype=torch.float32)
        out, at = [], 0
        for a, b in _strips(d):
            size = (b - a) * (d - a)
            g = self._buf[at : at + size].view(b - a, d - a)
            torch.mm(xf[:, a:b].t(), xf[:, a:], out=g)
            out.append((a, g))
            at += size
        return out

    def finalize(self) -> None:
        """Complete the CPU Gram from its upper strips and free the batch buffer (idempotent; call
        before reading ``gram`` — :class:`SpectrumProbe` does on removal)."""
        self._buf = None
        if self._mirror and self.gram is not None:
            g = self.gram
            with torch.inference_mode():  # the sum was made under inference mode
                for a, b in _strips(self.d):
                    g[b:, a:b] = g[a:b, b:].t()
            self._mirror = False

    def reset(self) -> None:
        self._buf = None
        self._mirror = False
        self.gram = None
        self.tokens = 0
        self.skipped_tokens = 0
        self.kept_tokens = 0
        self.max_variance = 0.0
        self._gen = None


def relative_se_bound(sampling: dict, eigenvalue: float) -> float:
    """First-order bound on the relative standard error of an eigenvalue of Σ estimated from sampled
    tokens (``sampling`` as :attr:`GramAccumulator.sampling`); 0 when every token entered, inf for λ ≤ 0."""
    if not sampling:
        return 0.0
    v, n = sampling.get("variance_factor"), sampling.get("tokens") or 0
    if v is None or n <= 0:  # a record without its factor (a hand-edited analysis): nothing bounded
        return math.inf
    if v == 0:  # every token entered with certainty: the Gram is exact
        return 0.0
    return math.sqrt(v / (n * eigenvalue)) if eigenvalue > 0 else math.inf


def layer_device(module: nn.Module) -> torch.device | None:
    """The device a layer computes on: accelerate's execution device when a dispatch hook says so,
    else its first parameter's device; None for parameter-less or ``meta`` (offloaded) layers."""
    hook = getattr(module, "_hf_hook", None)
    exe = getattr(hook, "execution_device", None)
    if exe is not None:
        return torch.device("cuda", exe) if isinstance(exe, int) else torch.device(exe)
    p = next(iter(module.parameters(recurse=False)), None)
    if p is None:
        p = next(iter(module.parameters()), None)
    if p is None or p.device.type == "meta":
        return None
    return p.device


def feature_key(adapter, module: nn.Module) -> tuple:
    """What a layer's feature rows depend on besides its input tensor. Layers that read one tensor share
    an accumulator only when their keys are equal: Linear and HF Conv1D take the last dimension (the
    width is the key), a convolution its patches (a ResNet block's 3×3 conv and its 1×1 downsample
    read one tensor but see different patches); any other adapter its class, the module's class and
    the width."""
    feats = getattr(type(adapter), "features", None)
    if feats is LinearAdapter.features:
        return ("last-dim", adapter.d_in(module))
    if feats is ConvAdapter.features:
        return ("conv", type(module), module.kernel_size, module.stride, module.padding, module.dilation,
                module.groups, module.padding_mode, adapter.d_in(module))
    return (type(adapter), type(module), adapter.d_in(module))


@dataclass
class _Pending:
    """A tensor a shared accumulator took but not every member has read yet (held until then)."""

    x: torch.Tensor
    seen: set[str]
    adapter: object
    module: nn.Module


class SpectrumProbe:
    """Hooks on ``layers`` accumulating input Grams; use as ``with SpectrumProbe(...) as probe:``
    and call ``probe.set_batch(batch)`` before each forward so masks apply (and a batch's sharing is
    checked when it ends: module docstring).

    ``offload``: float64 sums in CPU memory; ``accumulate=False``: only find which layers share an
    input (``layer_acc``), allocating nothing (see :func:`discover_input_groups`); ``sample``: the
    token sampling fraction of inputs ≥ :data:`SAMPLE_MIN_WIDTH` wide (module docstring; None: every
    token), drawn reproducibly from ``seed``. After the pass ``mask_ambiguous`` lists the layers whose
    inputs the attention mask fitted both ways (:meth:`_features`)."""

    def __init__(self, model: nn.Module, layers: list[TargetLayer], *, offload: bool = False,
                 accumulate: bool = True, sample: float | None = None, seed: int = 0):
        self.model = model
        self.layers = layers
        self.offload = offload
        self.accumulate = accumulate
        self.sample = check_sample(sample)
        self.seed = int(seed)
        self.accumulators: dict[str, GramAccumulator] = {}
        self.layer_acc: dict[str, str] = {}
        self.mask_ambiguous: list[str] = []
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, list[str]]] = {}  # this batch: tensor → accumulators holding it
        self._pending: dict[str, dict[int, _Pending]] = {}  # accumulator → tensors members have yet to read
        self._taken: dict[str, int] = {}  # accumulator → distinct tensors taken (1: it may still be joined)
        self._fkey: dict[str, tuple] = {}
        self._inference = False  # whether the hooks ran under inference mode (the Grams are made in it)
        self._ambiguous: dict[str, tuple[int, int]] = {}  # layer → the (n, n) mask shape read batch-first
        self._seq_first: bool | None = None
        self._fired: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "SpectrumProbe":
        try:
            for layer in self.layers:
                self._handles.append(layer.module.register_forward_pre_hook(self._make_hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.remove(flush=exc_type is None)  # after an error the sums are thrown away: no work for them

    def remove(self, flush: bool = True) -> None:
        """Remove exactly the handles this probe registered, settle the last batch's held tensors
        (``flush``) and free the CPU batch buffers."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        if flush:
            self._end_batch()
        for acc in self.accumulators.values():
            acc.finalize()
        self._seen.clear()
        self._pending.clear()
        self._mask = None
        if flush and self._ambiguous and not self.mask_ambiguous:
            self.mask_ambiguous = list(self._ambiguous)
            first, shape = next(iter(self._ambiguous.items()))
            warnings.warn(AmbiguousMaskWarning(
                f"{len(self._ambiguous)} layer(s) (e.g. {first}) got inputs whose first two dimensions fit the "
                f"{shape[0]}×{shape[1]} attention mask both batch-first and seq-first; the mask was applied "
                "batch-first (batch, seq, …), so if they are seq-first padding entered their covariance: "
                "calibrate with a batch size other than the sequence length"), stacklevel=2)

    def set_batch(self, batch: dict) -> None:
        """Call before each forward: settles the previous batch's sharing, sets the attention mask and
        clears per-batch sharing state."""
        self._end_batch()
        m = batch.get("attention_mask") if isinstance(batch, dict) else None
        m = m.bool() if isinstance(m, torch.Tensor) else None
        self._mask = None if m is None or bool(m.all()) else m  # no padding: no copy of every input

    def check_fired(self) -> None:
        missing = [lay.name for lay in self.layers if lay.name not in self._fired]
        if missing:
            raise InputError(f"{len(missing)} target layer(s) never ran in the forward pass "
                             f"(e.g. {missing[0]}); exclude them with --exclude")

    # -- the hook ---------------------------------------------------------------------------
    def _make_hook(self, layer: TargetLayer):
        name = layer.name

        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            self._fired.add(name)
            self._inference = torch.is_inference_mode_enabled()
            entry = self._seen.get(id(x))
            holders = entry[1] if entry is not None and entry[0]() is x else []
            acc_key = self.layer_acc.get(name)
            if acc_key is None:
                acc_key = self._join_or_create(layer, x, holders)
            acc = self.accumulators[acc_key]
            if acc_key in holders:  # taken already, by this layer or by a partner
                held = self._pending.get(acc_key, {}).get(id(x))
                if held is not None:
                    held.seen.add(name)
                    if len(held.seen) == len(acc.layers):  # every member read it: add it once
                        del self._pending[acc_key][id(x)]
                        self._add([acc], held.adapter, held.module, held.x)
                return None
            if entry is None or entry[0]() is not x:
                self._seen[id(x)] = (weakref.ref(x), holders)
            holders.append(acc_key)
            self._taken[acc_key] += 1
            if len(acc.layers) == 1:
                self._add([acc], layer.adapter, layer.module, x)
                return None
            waiting = self._pending.setdefault(acc_key, {})
            waiting[id(x)] = _Pending(x, {name}, layer.adapter, layer.module)
            if len(waiting) > MAX_PENDING:  # members that do not read the same tensors: split now
                self._split(acc_key)
            return None

        return hook

    def _join_or_create(self, layer: TargetLayer, x: torch.Tensor, holders: list[str]) -> str:
        """A layer's first call: join an accumulator that has taken only this very tensor so far and
        makes the same feature rows from it, else start its own."""
        name, adapter, module = layer.name, layer.adapter, layer.module
        fkey = feature_key(adapter, module)
        for key in holders:
            if self._taken[key] == 1 and self._fkey[key] == fkey:
                self.layer_acc[name] = key
                self.accumulators[key].layers.append(name)
                return key
        d = adapter.d_in(module)
        self.layer_acc[name] = name
        self.accumulators[name] = GramAccumulator(
            name, d, layer_device(module) or x.device, layers=[name], offload=self.offload,
            sample=self.sample if d >= SAMPLE_MIN_WIDTH else None, seed=self.seed)
        self._taken[name] = 0
        self._fkey[name] = fkey
        return name

    def _add(self, accs: list[GramAccumulator], adapter, module, x: torch.Tensor) -> None:
        """The feature rows of ``x`` (made once) into each accumulator of ``accs``."""
        if not self.accumulate:
            return
        with torch.no_grad():
            feats = self._features(adapter, module, x, accs[0].layers)
            for acc in accs:
                acc.update(feats)

    def _split(self, key: str) -> None:
        """Dissolve a shared accumulator whose members did not all read the same tensors: each member
        other than its first gets a copy of the common sum, then every held tensor goes to the members
        that read it. Exact: the common sum holds only tensors every member read."""
        acc = self.accumulators[key]
        waiting = self._pending.pop(key, {})
        common = self._taken[key] - len(waiting)
        accs = {key: acc}
        for name in acc.layers[1:]:
            new = GramAccumulator(name, acc.d, acc.device, layers=[name], offload=acc.offload,
                                  sample=acc.sample, seed=acc.seed)
            if acc.gram is not None:
                new.gram = acc.gram.clone()
            new.tokens, new.skipped_tokens, new.kept_tokens = acc.tokens, acc.skipped_tokens, acc.kept_tokens
            new.max_variance, new._mirror = acc.max_variance, acc._mirror
            self.accumulators[name] = accs[name] = new
            self.layer_acc[name] = name
            self._fkey[name] = self._fkey[key]
        acc.layers = [key]
        for name in accs:
            self._taken[name] = common + sum(name in held.seen for held in waiting.values())
        for ref, holders in self._seen.values():  # this batch's tensors: who holds which from now on
            if key not in holders or ref() is None:
                continue
            held = waiting.get(id(ref()))
            holders[:] = [k for k in holders if k != key] + [n for n in accs if held is None or n in held.seen]
        for held in waiting.values():
            self._add([accs[n] for n in accs if n in held.seen], held.adapter, held.module, held.x)

    def _end_batch(self) -> None:
        """A batch ended: a shared accumulator still holding tensors not every member read splits."""
        if self._pending:
            with torch.inference_mode(self._inference):
                for key in [k for k, w in self._pending.items() if w]:
                    self._split(key)
        self._pending.clear()
        self._seen.clear()

    def _features(self, adapter, module, x: torch.Tensor, layers: list[str]) -> torch.Tensor:
        """The feature rows of ``x`` for ``adapter``, padding dropped for token-shaped inputs (``layers``:
        the layers they go to). The mask (batch, seq) applies to an input whose first two dimensions are
        (batch, seq), and transposed to a seq-first one (seq, batch), as PyTorch modules with
        ``batch_first=False`` take. A square mask fits both ways; the input is then read batch-first (the
        Hugging Face layout, always right for their models), and when the model might be seq-first (it is
        not a transformers ``PreTrainedModel``, or some module declares ``batch_first=False``) the layers
        are recorded and one :class:`AmbiguousMaskWarning` at the end of the pass names them. An input
        that fits neither (the BERT pooler's (batch, d)) is read whole."""
        m = self._mask
        if getattr(adapter, "token_shaped", False) and m is not None and x.dim() >= 3:
            lead, shape = tuple(x.shape[:2]), tuple(m.shape)
            if lead == shape:
                if shape[0] == shape[1] and self._maybe_seq_first():
                    for name in layers:
                        self._ambiguous.setdefault(name, shape)
                x = x[m.to(x.device)]
            elif lead == shape[::-1]:
                x = x[m.t().to(x.device)]
        return adapter.features(module, x)

    def _maybe_seq_first(self) -> bool:
        """Whether some layer input may be seq-first: the model is not a transformers ``PreTrainedModel``
        (always batch-first), or one of its modules declares ``batch_first=False``."""
        if self._seq_first is None:
            tf = sys.modules.get("transformers")  # never imported here: a model of it means it is loaded
            base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
            hf = isinstance(base, type) and isinstance(self.model, base)
            self._seq_first = not hf or any(getattr(mod, "batch_first", None) is False
                                            for mod in self.model.modules())
        return self._seq_first

    # -- results ----------------------------------------------------------------------------
    def results(self) -> dict[str, GramAccumulator]:
        return self.accumulators


@contextlib.contextmanager
def tf32_disabled():
    """TF32 off for CUDA matmuls inside the block (a Gram in TF32 keeps ~10 mantissa bits: relative
    errors ~1e-3 that swamp the small eigenvalues), restored afterwards whatever happens. The flag is
    process-global, so it also covers layers dispatched over several GPUs; on CPU-only builds it is inert."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def run_probe(model: nn.Module, layers: list[TargetLayer], batches, device: torch.device | None = None,
              description: str = "calibration", *, offload: bool = False, sample: float | None = None,
              seed: int = 0) -> SpectrumProbe:
    """Stream every batch through ``model`` with the probe attached; returns the (closed) probe.
    ``device``: where batches are sent (None: left where they are); ``offload``: accumulators in CPU
    memory; ``sample``, ``seed``: token sampling of wide inputs (:class:`SpectrumProbe`)."""
    from .data import forward
    from .progress import track

    probe = SpectrumProbe(model, layers, offload=offload, sample=sample, seed=seed)
    with tf32_disabled():
        with probe, torch.inference_mode():
            for batch in track(batches, description, total=len(batches)):
                probe.set_batch(batch)
                forward(model, batch, device)
        probe.check_fired()
    return probe


def _tiny_batch(batch: dict, tokens: int = 8) -> dict:
    """The first sample of ``batch``, cut to its first ``tokens`` positions for token inputs."""
    out = {}
    n = None
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            n = int(v.shape[0])
            break
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and n is not None and v.shape[0] == n:
            v = v[:1]
            if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids") and v.dim() == 2:
                v = v[:, :tokens]
        out[k] = v
    return out


def discover_input_groups(model: nn.Module, layers: list[TargetLayer], batch: dict,
                          device: torch.device | None = None) -> dict[str, str]:
    """Layer name → accumulator key, exactly as :class:`SpectrumProbe` will group them (layers reading the
    same tensors into the same feature rows → one accumulator; a group whose members read different tensors
    is split: module docstring), from one forward of the first sample of ``batch`` (≤ 8 tokens) with hooks
    that allocate nothing. Used to make the memory estimate exact before a big run."""
    from .data import forward

    probe = SpectrumProbe(model, layers, accumulate=False)
    tiny = _tiny_batch(batch)
    with tf32_disabled(), probe, torch.inference_mode():
        probe.set_batch(tiny)
        forward(model, tiny, device)
    return dict(probe.layer_acc)


@contextlib.contextmanager
def no_hooks_left(model: nn.Module):
    """Test helper: assert the model has the same number of hooks after the block."""
    def count():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = count()
    yield
    after = count()
    if after != before:
        raise AssertionError(f"hooks left on the model: {after - before}")
