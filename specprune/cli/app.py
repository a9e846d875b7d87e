"""The typer application: one module per command group, mounted here."""

from __future__ import annotations

import typer

from . import analyze

app = typer.Typer(
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

    _terminate_as_interrupt()
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


def _terminate_as_interrupt() -> None:
    """SIGTERM (``kill``, a job scheduler's timeout) unwinds like Ctrl-C: temporary output
    directories are removed, hooks and devices restored, and the error boundary prints one line
    and exits 130. Without this, SIGTERM would end the process without running any cleanup."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def _quiet_third_party() -> None:
    """Keep stderr for specprune's own messages: optional kernels that torchao cannot load and
    torch's deprecation chatter are not the user's problem."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
