"""Safe outputs: whole or nothing, never inside (or over) an input.

Every writer in specprune goes through :func:`output_dir` or :func:`write_atomic`, so an
interrupted or failed run leaves no partial output and an input is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import RefusedError


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give an output the permissions a plain mkdir/open would have (mkdtemp/mkstemp use 0700/0600),
    recursively for directories."""
    mask = _umask()
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False) -> Path:
    """Refuse an output that equals, lies inside or contains an input; refuse an existing
    output unless ``overwrite``. Returns the resolved output path."""
    out_p = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        in_p = _resolved(inp)
        if out_p == in_p or _is_within(out_p, in_p) or _is_within(in_p, out_p):
            raise RefusedError(
                f"refusing to write output {out}: it is, lies inside or contains the input {inp}"
            )
    if out_p.exists() and not overwrite:
        raise RefusedError(f"output {out} already exists; pass --overwrite to replace it")
    # before any work: the nearest existing folder above the output must be a writable directory
    anc = out_p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise RefusedError(f"cannot write output {out}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RefusedError(f"cannot write output {out}: {anc} is not writable")
    return out_p


@contextlib.contextmanager
def _creating(out):
    """An output's folder or temporary file that cannot be created is refused in the user's terms (the
    output they named and why), not as the OS error on a temporary name they never chose."""
    try:
        yield
    except OSError as err:
        raise RefusedError(f"cannot write output {out}: {err.strerror or err}") from None


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
               overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``
    atomically (rename), on any failure or interrupt it is removed and ``out`` is untouched."""
    out_p = check_output_path(out, inputs, overwrite)
    with _creating(out):
        out_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.tmp-", dir=out_p.parent))
    try:
        yield tmp
        _publish_mode(tmp)
        if out_p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.old-", dir=out_p.parent))
            os.replace(out_p, old / "x")
            os.replace(tmp, out_p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = True) -> Path:
    """Write a file whole or not at all (temp file + rename)."""
    p = check_output_path(path, inputs, overwrite)
    with _creating(path):
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        _publish_mode(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (``kill``, ``timeout``, a job scheduler's limit) raise KeyboardInterrupt, as Ctrl-C does,
    so that it unwinds through :func:`output_dir` and :func:`write_atomic` and leaves no partial output.
    Without it, SIGTERM ends Python without running any cleanup. Only the main thread can install a signal
    handler: called from another thread, it does nothing. The CLI calls it at start-up; a script may too."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def read_json_doc(path: str | os.PathLike, file_name: str, what: str):
    """The JSON document at ``path`` (or ``path/file_name`` for a directory): InputError, one line, when it is
    missing, unreadable or nested too deeply (``what`` names it: "plan", "evaluation")."""
    from .errors import InputError

    p = Path(path)
    if p.is_dir():
        p = p / file_name
    if not p.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not readable JSON: {err}") from None
    except RecursionError:
        raise InputError(f"{path} is not a {what}: its JSON is nested too deeply") from None


def dumps(obj) -> str:
    """Deterministic JSON used for every file specprune writes. Strict JSON: a non-finite float
    (an undefined statistic, e.g. the spread of a single sample) is written as null."""
    return json.dumps(finite(obj), indent=2, sort_keys=False, allow_nan=False, default=_default) + "\n"


def finite(obj):
    """``obj`` with every NaN/±Inf float (in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return finite(float(o))
    if isinstance(o, np.ndarray):
        return finite(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
