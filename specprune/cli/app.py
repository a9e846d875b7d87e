"""The typer application: one module per command group, mounted here."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from . import analyze

# The exceptions typer's parser raises (its vendored click, or click itself in older typer versions).
_exceptions = sys.modules[typer.BadParameter.__module__]


def _value_problem(err) -> str:
    """What is wrong with a value the parser could not convert, e.g. "'nan' is not a valid integer"."""
    cause = err.__cause__
    errors = getattr(cause, "errors", None)
    if callable(errors):  # typer converts values with pydantic: its error has the value and the kind
        try:
            first = errors()[0]
        except (IndexError, TypeError, ValueError):
            first = None
        if isinstance(first, dict):
            kind, value, msg = str(first.get("type", "")), first.get("input"), str(first.get("msg", ""))
            if kind.startswith("int_"):
                return f"{value!r} is not a valid integer"
            if kind.startswith("float_"):
                return f"{value!r} is not a valid number"
            if kind.startswith("bool_"):
                return f"{value!r} is not a valid boolean (true/false)"
            msg = msg.removeprefix("Value error, ").rstrip(".")
            return msg if repr(value) in msg else f"{value!r}: {msg}"
    return str(err.message).rstrip(".")


def usage_error_line(err) -> tuple[str, int]:
    """A parser error as one line and its exit code: a value that cannot be converted, or an extra
    argument, is a bad input (exit 1, the contract); an unknown option or command, a missing argument or
    option, or any other misuse of the command line keeps click's exit 2."""
    hint = getattr(err, "param_hint", None)
    if hint is None and getattr(err, "param", None) is not None:
        hint = err.param.get_error_hint()
    if isinstance(hint, (list, tuple)):
        hint = " / ".join(repr(h) for h in hint)
    if getattr(err, "verbatim", False):  # common.OptionError: a range check with its own wording
        return str(err.message), 1
    if isinstance(err, _exceptions.BadParameter) and not isinstance(err, _exceptions.MissingParameter):
        where = f"invalid value for {hint}" if hint else "invalid value"
        return f"{where}: {_value_problem(err)}", 1
    msg = err.format_message().rstrip(".")
    # an extra positional argument is bad input, not an unknown option or a missing one: exit 1
    code = 1 if msg.startswith("Got unexpected extra argument") else err.exit_code
    ctx = getattr(err, "ctx", None)
    if not msg and ctx is not None and isinstance(ctx.command, TyperGroup):  # a group called without a command
        msg = f"missing command: one of {', '.join(sorted(ctx.command.list_commands(ctx)))}"
    if ctx is not None:
        msg += f" (see '{ctx.command_path} --help')"
    return msg, code


class SpecpruneGroup(TyperGroup):
    """Parser errors of the commands as one line on stderr: exit 1 for a value that cannot be
    converted (``--samples nan``, ``--format xml``), exit 2 only for an unknown option, a missing
    argument or another usage error (see CONTRACT.md, exit codes)."""

    def parse_args(self, ctx, args):  # the root's own options (``specprune --nosuch``)
        try:
            return super().parse_args(ctx, args)
        except _exceptions.UsageError as err:
            if isinstance(err, getattr(_exceptions, "NoArgsIsHelpError", ())):
                raise  # plain ``specprune``: the help, as before
            _usage_exit(err)

    def invoke(self, ctx):  # the commands' options and arguments, and unknown command names
        try:
            return super().invoke(ctx)
        except _exceptions.UsageError as err:
            _usage_exit(err)


def _usage_exit(err) -> None:
    msg, code = usage_error_line(err)
    sys.stderr.write(f"specprune: error: {' '.join(msg.split())}\n")
    raise typer.Exit(code) from None


app = typer.Typer(
    cls=SpecpruneGroup,
    name="specprune",
    help="Spectral compression analysis: measure layer spectra, recommend pruning rates and bit-widths "
         "with a predicted loss increase, apply them, and measure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("analyze", epilog=analyze.EPILOG)(analyze.analyze_cmd)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"specprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """specprune: spectra → recommendation → compression → measurement."""


def _mount_optional() -> None:
    import importlib

    for mod_name, attr in (("theory", "app"),):
        try:
            mod = importlib.import_module(f".{mod_name}", __package__)
        except ImportError:
            continue
        app.add_typer(getattr(mod, attr), name=mod_name)
    for mod_name in ("recommend", "compress_cmds", "evaluate", "report", "demo", "plugins"):
        try:
            mod = importlib.import_module(f".{mod_name}", __package__)
        except ImportError:
            continue
        mod.register(app)


_mount_optional()


def main() -> None:
    from .. import heap
    from ..distributed import init_from_env
    from ..io import sigterm_as_interrupt

    # SIGTERM unwinds like Ctrl-C: temporary outputs removed, hooks and devices restored, and the error
    # boundary (common.py) prints one line and exits 130
    sigterm_as_interrupt()
    _quiet_third_party()
    distributed = init_from_env()  # under torchrun: one process group, rank 0 writes
    if not distributed:  # a torchrun rank keeps the default collector (its process group's threads)
        heap.enable()  # this process only: see specprune.heap
    try:
        app()
    finally:
        if distributed:
            from ..distributed import shutdown

            shutdown()


def _quiet_third_party() -> None:
    """Keep stderr for specprune's own messages: optional kernels that torchao cannot load and
    torch's deprecation chatter are not the user's problem."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    # recommend()'s InSampleVerificationWarning: the CLI prints the plan's warning itself, in one line
    warnings.filterwarnings("ignore", message=r".*the plan's truncations were verified")
