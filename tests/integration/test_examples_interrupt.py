"""An interrupted example leaves nothing behind, like the CLI (tests/cli/test_interrupt.py): Ctrl-C or SIGTERM
mid-run ends it with exit 130 and one line on stderr, and neither --out nor a temporary sibling remains. SIGTERM
is turned into Ctrl-C by ``specprune.io.sigterm_as_interrupt``, which the CLI calls too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
INTERRUPTED = "error: interrupted; no partial output was written"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dirs) -> dict:
    from specprune.textgen import write_text

    text = write_text(tmp_path_factory.mktemp("ex-text") / "text.txt", max_words=3000)
    return {"model": str(tiny_dirs["bert"]), "text": str(text)}


def _interrupt(script: str, args: list[str], cwd: Path, sig: int, working: Path | None = None) -> tuple[int, str]:
    """Run the example, send ``sig`` once it prints "analysing …" (its model and data are loaded, the analysis
    starts), and return its exit status and stderr. ``working``: a file that must exist at that moment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        for line in proc.stdout:  # ends at EOF if the example exits before it starts the analysis
            lines.append(line)
            if line.startswith("analysing "):
                break
        assert lines and lines[-1].startswith("analysing "), "".join(lines) + proc.communicate(timeout=60)[1]
        if working is not None:
            assert working.is_file(), f"{working} missing while the example works"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # does nothing once it has exited
        proc.wait()
    return proc.returncode, err


def _leftovers(d: Path, name: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name == name or p.name.startswith(f".{name}.")
                  or p.name.startswith(f"{name}-"))


@pytest.mark.parametrize("script, sig", [("analyze_before_pruning.py", signal.SIGTERM),
                                         ("analyze_before_pruning.py", signal.SIGINT),
                                         ("compression_workflow.py", signal.SIGTERM)],
                         ids=["analyze-SIGTERM", "analyze-SIGINT", "workflow-SIGTERM"])
def test_signal_mid_run_leaves_nothing(inputs, tmp_path, script, sig):
    args = ["--model", inputs["model"], "--data", inputs["text"], "--samples", "16", "--seq-len", "32", "--out", "out"]
    rc, err = _interrupt(script, args, tmp_path, sig, working=tmp_path / "out" / "INCOMPLETE")
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == INTERRUPTED, err[-3000:]
    assert _leftovers(tmp_path, "out") == []


def test_pick_bitwidth_interrupted_writes_nothing(inputs, tmp_path):
    args = ["--model", inputs["model"], "--data", inputs["text"], "--samples", "16", "--seq-len", "32",
            "--bits", "8,4,2", "--workdir", "work"]
    rc, err = _interrupt("pick_bitwidth.py", args, tmp_path, signal.SIGTERM)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == INTERRUPTED, err[-3000:]
    assert list(tmp_path.iterdir()) == []
