"""Helpers the ``bench/`` scripts share: the machine a run was measured on, and markdown tables.

Each script puts the repository root (for ``specprune``) and this folder on ``sys.path`` itself, so
``python bench/bench_*.py`` works from any directory without installing anything extra.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine(with_torch: bool = True) -> dict:
    """nproc, CPU model, memory, load average, date, Python version — and torch's version and thread
    count when ``with_torch`` (a script timing other processes may not want to import torch)."""
    info = {"nproc": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if with_torch:
        import torch

        info.update(torch_threads=torch.get_num_threads(), torch=torch.__version__)
    try:
        info.update(_first(Path("/proc/cpuinfo"), "model name", lambda v: v.strip()))
        info.update(_first(Path("/proc/meminfo"), "MemTotal", lambda v: round(int(v.split()[0]) / 2 ** 20, 1),
                           key="mem_gib"))
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _first(path: Path, field: str, parse, key: str = "cpu") -> dict:
    """{key: parse(value)} of the first ``field: value`` line of a /proc file ({} if none)."""
    with path.open() as fh:
        for line in fh:
            if line.startswith(field):
                return {key: parse(line.split(":", 1)[1])}
    return {}


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table: a header row, a rule, then one row per list (cells through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
