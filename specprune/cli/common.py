"""Shared CLI pieces: option aliases (the same flag means the same thing everywhere), the
output sink (JSON alone on stdout with ``--format json``), and the error boundary that turns
known errors into one line on stderr with exit code 1 (full trace with ``--debug``)."""

from __future__ import annotations

import enum
import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .. import progress
from ..errors import SpecpruneError


class OutputFormat(str, enum.Enum):
    human = "human"
    json = "json"


class OptionError(typer.BadParameter):
    """An option value refused while the command line is parsed: exit 1 with this message as is
    (see ``app.SpecpruneGroup``)."""

    verbatim = True


def _check_seed(value: int) -> int:
    from ..data import check_seed
    from ..errors import InputError

    try:
        check_seed(value)
    except InputError as err:
        raise OptionError(str(err)) from None
    return value


FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="human tables or one JSON document on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or human output beyond results.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (never an input).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:i")]
DataOpt = Annotated[Optional[list[str]], typer.Option("--data", help="Calibration data: .txt/.jsonl files or dirs, or .pt/.safetensors/.npy tensors (repeatable).")]
EvalDataOpt = Annotated[Optional[list[str]], typer.Option("--eval-data", help="Evaluation data (default: 25% of --data windows held apart).")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Number of windows drawn from the data.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", callback=_check_seed,
                                      help="Random seed (window sampling, calibration).")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Layer name or dotted suffix, or re:REGEX (repeatable).")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Layer name or dotted suffix, or re:REGEX (repeatable).")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="module:callable building the model, for state-dict files.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a HF model's own Python code to run.")]
MetricOpt = Annotated[str, typer.Option("--metric", help="auto | lm-loss | task-loss | output-mse | an installed "
                                         "metric plugin's name (specprune plugins --kind metrics) | module:callable")]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Largest acceptable relative metric increase (0.02 = 2%).")]


class Ctx:
    """Per-invocation output settings."""

    def __init__(self, fmt: OutputFormat = OutputFormat.human, quiet: bool = False):
        self.fmt = fmt
        self.quiet = quiet
        if fmt == OutputFormat.json or quiet:
            progress.set_enabled(False)
        else:
            progress.set_enabled(None)

    @property
    def json(self) -> bool:
        return self.fmt == OutputFormat.json

    def emit(self, obj: Any, human: Callable[[Any], None] | None = None) -> None:
        """JSON document alone on stdout, or the human rendering (rank 0 only under torch.distributed)."""
        from ..distributed import is_main

        if not is_main():
            return
        if self.json:
            from ..io import finite

            sys.stdout.write(json.dumps(finite(obj), indent=2, allow_nan=False, default=_json_default) + "\n")
            sys.stdout.flush()
        elif human is not None:
            human(obj)
        else:
            from ..io import finite

            console().print_json(json.dumps(finite(obj), default=_json_default))

    def info(self, message: str) -> None:
        """A human status line on stderr (silent in json/quiet modes)."""
        from ..distributed import is_main

        if not (self.json or self.quiet) and is_main():
            console(stderr=True).print(message, highlight=False)


    def warn(self, message: str) -> None:
        """A warning on stderr, in every output mode (stdout stays machine-readable)."""
        from ..distributed import is_main

        if is_main():
            sys.stderr.write(f"specprune: warning: {message}\n")


def _json_default(o):
    from ..io import _default

    return _default(o)


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160  # pipes and logs get whole layer names
    return Console(stderr=stderr, soft_wrap=False, width=width)


def fail(message: str, code: int = 1, debug: bool = False) -> None:
    if debug:
        traceback.print_exc()
    msg = " ".join(str(message).split())
    sys.stderr.write(f"specprune: error: {msg}\n")
    raise typer.Exit(code)


def command(fn: Callable) -> Callable:
    """Error boundary for a CLI command: known errors → one line + exit 1 (3 for tolerance),
    Ctrl-C (and SIGTERM, see ``app.main``) → one line + exit 130, any other exception (a bug, an
    unforeseen library error) → one line + exit 1; ``--debug`` adds the trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool(kwargs.get("debug", False))
        from .plugins import plugin_warnings_as_lines

        try:
            with plugin_warnings_as_lines():  # a skipped plugin: one "specprune: warning:" line
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SpecpruneError as err:
            fail(str(err), err.exit_code, debug)
        except KeyboardInterrupt:
            fail("interrupted; no partial output was written", 130, debug)
        except Exception as err:  # noqa: BLE001 - a bug or an unforeseen failure: still one line, exit 1
            fail(f"{type(err).__name__}: {err}", 1, debug)

    return wrapper


def parse_csv_ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecpruneError(f"{name} must be a comma-separated list of integers, got {text!r}") from None


def check_early(device: str | None = None, include=None, exclude=None, **positive: int) -> None:
    """Options that would otherwise fail only after loading the model and the data: checked first.
    ``positive``: ``samples=``, ``seq_len=``, ``batch_size=`` values that must be > 0."""
    from ..errors import InputError
    from ..layers import pattern_matches
    from ..models import resolve_device

    for name, value in positive.items():
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if device is not None:
        resolve_device(device)
    for p in [*(include or []), *(exclude or [])]:
        pattern_matches(p, "")


def existing_path(p: str, what: str) -> Path:
    path = Path(p)
    if not path.exists():
        raise SpecpruneError(f"{what} not found: {p}")
    return path
