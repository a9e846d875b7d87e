"""torch.distributed support: each rank streams its own share of the batches; sums are all-reduced.

Under ``torchrun`` (any backend: nccl on GPUs, gloo on CPUs) call
``torch.distributed.init_process_group`` (the CLI does it when ``WORLD_SIZE`` > 1) and use
specprune as usual: :func:`shard` gives rank r the batches r, r + W, r + 2W, …; Gram sums,
token counts and metric sums are all-reduced, so every rank holds the single-process result
(up to floating-point summation order) and rank 0 writes the outputs.
"""

from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    d = _dist()
    return d is not None and d.get_world_size() > 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def is_main() -> bool:
    return rank() == 0


def shutdown() -> None:
    """Meet the other ranks, then destroy the process group explicitly at exit. Left to interpreter
    teardown, gloo's threads can be destroyed while joinable and abort the process (seen once under load
    in CI); destroyed while another rank is still finishing, rank 0 aborted the same way ("terminate called
    without an active exception", seen once more in CI after every rank had its result). The barrier is
    bounded (gloo: a monitored barrier of 120 s), so a rank that died cannot hold the others."""
    d = _dist()
    if d is None:
        return
    try:
        if d.get_backend() == "gloo":
            from datetime import timedelta

            d.monitored_barrier(timeout=timedelta(seconds=120))
        else:
            d.barrier()
    except Exception:  # noqa: BLE001 - best effort at exit; the command's result stands
        pass
    try:
        d.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit; the command's result stands
        pass


def init_from_env() -> bool:
    """Initialise the process group from torchrun's environment (WORLD_SIZE > 1); gloo unless every
    rank has a GPU. Returns True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SPECPRUNE_DIST_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def shard(batches: list, allow_empty: bool = False) -> list:
    """This rank's share of a list of batches (all of them when not distributed). Sums over an empty
    share are zero, which is fine for metrics (``allow_empty``) but not for a probe that must see
    every layer run."""
    if not is_distributed():
        return list(batches)
    mine = list(batches)[rank()::world_size()]
    if not mine and not allow_empty:
        from .errors import InputError

        raise InputError(f"rank {rank()} got no batch: {len(batches)} batches for {world_size()} processes")
    return mine


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op="max"``: the maximum of) ``t`` over ranks in place (no-op when not distributed)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(t, op=d.ReduceOp.MAX if op == "max" else d.ReduceOp.SUM)
    return t


def all_reduce_scalars(*values: float, op: str = "sum") -> list[float]:
    """Sum (``op="max"``: the maximum of) a few Python numbers over ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    d = _dist()
    if d.get_backend() == "nccl":
        t = t.cuda()
    all_reduce_(t, op)
    return [float(v) for v in t.cpu()]


def solve_on_main(solve, d: int):
    """Run ``solve() -> (eigenvalues (d,), eigenvectors (d, d))`` on rank 0 only and broadcast the
    result, so every rank holds the same eigenpairs (and only one pays for the solve)."""
    import numpy as np

    if not is_distributed():
        return solve()
    dist = _dist()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    if rank() == 0:
        ev, vec = solve()
        t_ev = torch.as_tensor(np.ascontiguousarray(ev), dtype=torch.float64).to(dev)
        t_vec = torch.as_tensor(np.ascontiguousarray(vec), dtype=torch.float64).to(dev)
    else:
        t_ev = torch.empty(d, dtype=torch.float64, device=dev)
        t_vec = torch.empty(d, d, dtype=torch.float64, device=dev)
    dist.broadcast(t_ev, 0)
    dist.broadcast(t_vec, 0)
    return t_ev.cpu().numpy(), t_vec.cpu().numpy()
