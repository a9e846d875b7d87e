"""How much memory an analysis needs, how much is free, and whether it fits — decided before any
accumulator is allocated.

Memory model (bytes; g runs over input groups — layers reading the same input share one accumulator —
d_g its width, k_g the modes solved for it, T the counted tokens of one batch, w the widest layer
dimension, in or out):

* accumulators   A = Σ_g 8 d_g²                 float64 Gram sums, alive for the whole pass (on a CPU
                                                Σ_g 12 d_g²: each group also keeps the float32 buffer its
                                                batch GEMM writes into, for the whole pass);
* batch Gram     B = 4 max_g d_g²               one float32 ``xᵀx`` per hook call (transient; 0 on a CPU);
* activations    X = c_X · 4 T w, c_X = 6       the model's own live tensors for one batch plus the hook's
                                                float32 copy of its input — a rough rule (attention score
                                                matrices are not counted; measured against it in
                                                docs/scaling.md);
* eigensolve     E = max_g e_g                  one group at a time, the covariance symmetrised in place of
                                                its accumulator: a full solve needs the eigenvector buffer,
                                                ``syevd``'s workspace and the re-ordered copy, e_g = 8 · 3 d_g²
                                                (measured on this CPU: 2.1–2.3 d_g² beyond the kept
                                                eigenvectors at d = 2048–4096); a randomized top-k solve
                                                (l = 2k basis vectors) e_g = 8 (4 d_g l + 3 l²);
* eigenvectors   V = Σ_g 8 d_g k_g              kept on the host for the results (k_g = d_g for full solves);
* weights        W                              parameters still to be moved onto the device.

Peak on the compute device: W + A + max(B + X, E). With ``offload`` the accumulators live in host
memory: device W + max(B + X, E + 8 max d²) (the Gram being solved is staged back), host A + B + V
(B: the float32 batch Gram's host copy). On a CPU the two pools are one: W + A + V + max(B + X, E).

Groups are known exactly only after a forward pass (tensor identity); without them every layer counts
as its own group, which makes A an upper bound (q/k/v and gate/up are counted three and two times).
:func:`specprune.probe.discover_input_groups` finds the exact groups from one tiny forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .randomized import DEFAULT_THRESHOLD, default_oversample, default_top_k

FP64 = 8
FP32 = 4
EIGH_WORKSPACE = 3  # full solve transient, in d² fp64: eigenvector buffer + syevd work + re-ordered copy
ACTIVATION_FACTOR = 6

GiB = float(1 << 30)


def fmt_bytes(n: float) -> str:
    """Human size: 1.5 GiB, 12.0 MiB, 640 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class GroupPlan:
    """One input group: its width, its member layers, and how it will be solved."""

    key: str
    d: int
    layers: list[str]
    solver: str  # "full" | "randomized"
    k: int

    @property
    def basis(self) -> int:
        """Basis vectors of the randomized solve (l = k + oversample, ≤ d)."""
        return min(self.d, self.k + default_oversample(self.k)) if self.solver == "randomized" else self.d


def choose_solver(d: int, solver: str = "auto", top_k: int | None = None,
                  threshold: int = DEFAULT_THRESHOLD) -> tuple[str, int]:
    """("full", d) or ("randomized", k) for a group of width d: randomized when asked, or under ``auto``
    when d ≥ threshold; k = ``top_k`` or :func:`~specprune.randomized.default_top_k`; a k that covers
    the whole space falls back to the full solve."""
    if solver not in ("auto", "full", "randomized"):
        raise InputError(f"solver must be auto, full or randomized, got {solver!r}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k (top_k) must be ≥ 1, got {top_k}")
    use = solver == "randomized" or (solver == "auto" and d >= threshold)
    if not use:
        return "full", d
    k = min(d, int(top_k) if top_k is not None else default_top_k(d))
    if k + default_oversample(k) >= d:
        return "full", d
    return "randomized", k


def plan_groups(layers: Sequence, groups: Mapping[str, str] | None = None, *, solver: str = "auto",
                top_k: int | None = None, threshold: int = DEFAULT_THRESHOLD) -> list[GroupPlan]:
    """Input groups of ``layers`` (objects with ``name`` and ``d_in``): from ``groups`` (layer name →
    group key, as the probe assigns them) when given, else one group per layer (an upper bound)."""
    out: dict[str, GroupPlan] = {}
    for lay in layers:
        key = groups.get(lay.name, lay.name) if groups else lay.name
        d = int(lay.d_in)
        if key in out:
            out[key].layers.append(lay.name)
            continue
        how, k = choose_solver(d, solver, top_k, threshold)
        out[key] = GroupPlan(key, d, [lay.name], how, k)
    return list(out.values())


@dataclass
class MemoryEstimate:
    """Bytes an analysis needs, by component (module docstring), and where they live."""

    device: str
    offload: bool
    accumulators: int
    batch_gram: int
    activations: int
    eigensolve: int
    eigenvectors: int
    weights: int
    groups: int
    layers: int
    widest: int
    upper_bound: bool
    free_device: int | None = field(default=None, compare=False)
    free_host: int | None = field(default=None, compare=False)
    note: str = ""

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def largest_gram(self) -> int:
        return FP64 * self.widest * self.widest

    @property
    def device_bytes(self) -> int:
        """Peak on the compute device (on a CPU: the whole peak, host included)."""
        if self.on_cpu:
            return (self.weights + self.accumulators + self.eigenvectors
                    + max(self.batch_gram + self.activations, self.eigensolve))
        if self.offload:
            return self.weights + max(self.batch_gram + self.activations, self.eigensolve + self.largest_gram)
        return self.weights + self.accumulators + max(self.batch_gram + self.activations, self.eigensolve)

    @property
    def host_bytes(self) -> int:
        """Peak host memory beyond the model (0 extra pool on a CPU: see ``device_bytes``)."""
        if self.on_cpu:
            return self.device_bytes
        if self.offload:
            return self.accumulators + self.batch_gram + self.eigenvectors
        return self.eigenvectors

    def to_dict(self) -> dict:
        """Deterministic JSON fields (free memory is left out: it changes from run to run)."""
        return {"device": self.device, "offload": self.offload, "upper_bound": self.upper_bound,
                "groups": self.groups, "layers": self.layers,
                "bytes": {"accumulators": self.accumulators, "batch_gram": self.batch_gram,
                          "activations": self.activations, "eigensolve": self.eigensolve,
                          "eigenvectors": self.eigenvectors, "weights": self.weights,
                          "device_peak": self.device_bytes, "host_peak": self.host_bytes}}

    def describe(self) -> str:
        """One line for the log."""
        bound = "≤ " if self.upper_bound else ""
        where = "in RAM" if self.on_cpu else f"on {self.device}"
        s = (f"memory: {bound}{fmt_bytes(self.device_bytes)} {where} (accumulators {bound}"
             f"{fmt_bytes(self.accumulators)} for {self.groups} input group(s)"
             f"{', offloaded to CPU' if self.offload and not self.on_cpu else ''}, largest eigensolve "
             f"{fmt_bytes(self.eigensolve)}, activations ~{fmt_bytes(self.activations)})")
        if self.free_device is not None:
            s += f"; {fmt_bytes(self.free_device)} free"
        if not self.on_cpu:
            s += f"; host {fmt_bytes(self.host_bytes)}"
            if self.free_host is not None:
                s += f" of {fmt_bytes(self.free_host)} available"
        if self.note:
            s += f"; {self.note}"
        return s


def estimate_analysis_memory(layers: Sequence, *, offload: bool = False, groups: Mapping[str, str] | None = None,
                             device: str | torch.device = "cpu", batch_tokens: int = 0, weights: int = 0,
                             solver: str = "auto", top_k: int | None = None,
                             threshold: int = DEFAULT_THRESHOLD) -> MemoryEstimate:
    """The memory model of the module docstring for ``layers`` (objects with ``name``, ``d_in`` and
    ``d_out``, e.g. :class:`~specprune.layers.TargetLayer`).

    ``groups`` (layer → group key) makes the accumulator count exact; without it each layer is its own
    group and the estimate is an upper bound (``upper_bound`` says which). ``batch_tokens``: tokens of
    one forward batch; ``weights``: parameter bytes that must still be moved onto ``device``.
    """
    layers = list(layers)
    if not layers:
        raise InputError("no layers to estimate memory for")
    plans = plan_groups(layers, groups, solver=solver, top_k=top_k, threshold=threshold)
    widest_in = max(p.d for p in plans)
    width = max(max(int(lay.d_in), int(lay.d_out)) for lay in layers)
    on_cpu = torch.device(device).type == "cpu"
    # on a CPU each group keeps its float32 batch-Gram buffer for the whole pass (specprune.probe)
    acc = sum((FP64 + (FP32 if on_cpu else 0)) * p.d * p.d for p in plans)
    gram = 0 if on_cpu else FP32 * widest_in * widest_in
    act = ACTIVATION_FACTOR * FP32 * int(batch_tokens) * width
    solve = 0
    for p in plans:
        if p.solver == "full":
            e = FP64 * EIGH_WORKSPACE * p.d * p.d
        else:
            ell = p.basis
            e = FP64 * (4 * p.d * ell + 3 * ell * ell)
        solve = max(solve, e)
    vecs = sum(FP64 * p.d * p.k for p in plans)
    exact = bool(groups) and all(lay.name in groups for lay in layers)
    return MemoryEstimate(str(torch.device(device)), bool(offload), acc, gram, act, solve, vecs, int(weights),
                          len(plans), len(layers), widest_in, not exact)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory(device: str | torch.device) -> int | None:
    """Bytes available for new tensors on ``device``: CUDA — ``mem_get_info`` free plus what torch's
    caching allocator holds unused; CPU — psutil's ``available`` (or /proc/meminfo MemAvailable);
    None when unknown (the check is then skipped)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(idx)
        cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
        return int(free + max(cached, 0))
    if dev.type == "cpu":
        override = os.environ.get("SPECPRUNE_HOST_MEMORY")  # documented escape hatch for containers
        if override:
            try:
                return int(float(override))
            except ValueError:
                pass
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return _meminfo_available()
    return None


def check_memory(estimate: MemoryEstimate) -> None:
    """Raise :class:`InputError` (one line) when ``estimate`` exceeds the free memory recorded on it."""
    dev_free, host_free = estimate.free_device, estimate.free_host
    if estimate.on_cpu:
        if dev_free is not None and estimate.device_bytes > dev_free:
            raise InputError(
                f"the analysis needs about {fmt_bytes(estimate.device_bytes)} of RAM "
                f"({fmt_bytes(estimate.accumulators)} of float64 accumulators for {estimate.groups} input "
                f"groups) but {fmt_bytes(dev_free)} is available; analyse fewer layers at a time with "
                "--include/--exclude")
        return
    if dev_free is not None and estimate.device_bytes > dev_free:
        hint = ("even with --offload; analyse fewer layers at a time with --include/--exclude or use "
                "--device-map auto" if estimate.offload else
                "rerun with --offload to keep the accumulators in CPU memory")
        raise InputError(f"the analysis needs about {fmt_bytes(estimate.device_bytes)} on {estimate.device} "
                         f"but {fmt_bytes(dev_free)} is free, {hint}")
    if host_free is not None and estimate.host_bytes > host_free:
        raise InputError(f"the analysis needs about {fmt_bytes(estimate.host_bytes)} of host memory "
                         f"({'offloaded accumulators and ' if estimate.offload else ''}eigenvectors) but "
                         f"{fmt_bytes(host_free)} is available; analyse fewer layers at a time with "
                         "--include/--exclude")


def plan_memory(layers: Sequence, device: str | torch.device, *, offload: bool | None = None,
                groups: Mapping[str, str] | None = None, **kwargs) -> MemoryEstimate:
    """Estimate, read free memory, decide on offloading and check; returns the estimate that will be
    used (``offload`` set). ``offload=None`` (auto) keeps accumulators on a GPU when they fit and
    offloads them to the host when only that fits; ``True``/``False`` force it. Raises
    :class:`InputError` with a one-line explanation when nothing fits."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    free_dev = free_memory(dev)
    free_host = free_memory("cpu") if on_gpu else free_dev
    want = bool(offload) and on_gpu
    est = estimate_analysis_memory(layers, offload=want, groups=groups, device=dev, **kwargs)
    est.free_device, est.free_host = free_dev, free_host
    if on_gpu and offload is None and free_dev is not None and est.device_bytes > free_dev:
        alt = estimate_analysis_memory(layers, offload=True, groups=groups, device=dev, **kwargs)
        alt.free_device, alt.free_host = free_dev, free_host
        alt.note = (f"accumulators offloaded to CPU: {fmt_bytes(est.device_bytes)} would not fit in "
                    f"{fmt_bytes(free_dev)}")
        est = alt  # when even this does not fit, check_memory says so ("even with --offload")
    check_memory(est)
    return est


def by_device(layers: Iterable) -> dict[torch.device, list]:
    """Layers grouped by the device they compute on (:func:`specprune.probe.layer_device`; a dispatched
    model spans several); layers whose weights are offloaded without an execution device count for
    the CPU."""
    from .probe import layer_device

    out: dict[torch.device, list] = {}
    for lay in layers:
        dev = layer_device(lay.module) or torch.device("cpu")
        out.setdefault(dev, []).append(lay)
    return out
