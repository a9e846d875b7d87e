"""Option values the parser cannot convert are bad input: exit 1 and one line on stderr
(``specprune: error: invalid value for '--samples': 'nan' is not a valid integer``), never click's
multi-line box and exit 2. Exit 2 stays for an unknown option or a missing argument/option, and
``--help`` still exits 0. ``--seed`` is checked while parsing too (≥ 0), before any work.

These errors happen while the command line is parsed, so the model and data paths need not exist:
the runs are fast. Most go through ``typer.testing.CliRunner`` (in-process); a few run
``python -m specprune`` to show what a real process prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ERROR_PREFIX, one_error_line
from specprune.cli.app import app

REPO = Path(__file__).resolve().parents[2]

# A valid command line per command, except that the paths need not exist (parsing fails first).
BASE = {
    "analyze": ["analyze", "M", "--data", "d.txt", "--out", "o"],
    "recommend": ["recommend", "M", "--data", "d.txt", "--tolerance", "0.05", "--out", "p.json"],
    "prune": ["prune", "M", "--rate", "0.3", "--out", "o"],
    "quantize": ["quantize", "M", "--bits", "4", "--out", "o"],
    "apply": ["apply", "M", "--plan", "p.json", "--out", "o"],
    "evaluate": ["evaluate", "M", "--data", "d.txt"],
    "compress": ["compress", "M", "--data", "d.txt", "--tolerance", "0.05", "--out", "o"],
    "report": ["report", "D"],
    "plugins": ["plugins"],
    "theory": ["theory", "exponents", "--a", "1.5", "--b", "2", "--g", "ntk"],
}


def invoke(args, code: int):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, (
        f"exit {res.exit_code} != {code}\nstderr: {res.stderr}\nstdout: {res.stdout}")
    return res


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "specprune", *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=env, check=False)


# ------------------------------------------------------------------------------------------------
# values that cannot be converted: exit 1, one line


UNPARSEABLE = [
    ("analyze", ["--samples", "nan"], "invalid value for '--samples': 'nan' is not a valid integer"),
    ("analyze", ["--samples", "1.5"], "invalid value for '--samples': '1.5' is not a valid integer"),
    ("evaluate", ["--samples", "ten"], "invalid value for '--samples': 'ten' is not a valid integer"),
    ("analyze", ["--seq-len", "3e2"], "invalid value for '--seq-len': '3e2' is not a valid integer"),
    ("recommend", ["--batch-size", "x"], "invalid value for '--batch-size': 'x' is not a valid integer"),
    ("compress", ["--seed", "0.5"], "invalid value for '--seed': '0.5' is not a valid integer"),
    ("quantize", ["--bits", "4.5"], "invalid value for '--bits': '4.5' is not a valid integer"),
    ("quantize", ["--bits", "four"], "invalid value for '--bits': 'four' is not a valid integer"),
    ("quantize", ["--group-size", "big"], "invalid value for '--group-size': 'big' is not a valid integer"),
    ("recommend", ["--tolerance", "abc"], "invalid value for '--tolerance': 'abc' is not a valid number"),
    ("compress", ["--tolerance", "2%"], "invalid value for '--tolerance': '2%' is not a valid number"),
    ("prune", ["--rate", "half"], "invalid value for '--rate': 'half' is not a valid number"),
    *[(cmd, ["--format", "xml"], "invalid value for '--format': 'xml' is not one of 'human', 'json'")
      for cmd in BASE],
]


@pytest.mark.parametrize("cmd,opts,expect", UNPARSEABLE, ids=[f"{c}{'='.join(o)}" for c, o, _ in UNPARSEABLE])
def test_unparseable_value_is_exit_1_and_one_line(cmd, opts, expect):
    res = invoke([*BASE[cmd], *opts], code=1)
    assert one_error_line(res.stderr) == expect
    assert res.stdout == ""


@pytest.mark.parametrize("cmd", ["recommend", "compress"])
def test_unknown_sensitivity_mode_is_refused_before_any_work(cmd):
    res = invoke([*BASE[cmd], "--sensitivity", "fast"], code=1)
    assert one_error_line(res.stderr) == "--sensitivity takes auto, gradient, probe, got 'fast'"


@pytest.mark.parametrize("cmd", ["analyze", "evaluate", "quantize", "recommend"])
def test_unparseable_value_with_json_format_leaves_stdout_empty(cmd):
    opt = ["--tolerance", "abc"] if cmd == "recommend" else ["--bits", "x"] if cmd == "quantize" else \
        ["--samples", "nan"]
    res = invoke([*BASE[cmd], "--format", "json", *opt], code=1)
    assert res.stdout == ""
    assert one_error_line(res.stderr).startswith(f"invalid value for '{opt[0]}'")


def test_unparseable_value_in_a_real_process():
    res = cli("analyze", "M", "--data", "d.txt", "--samples", "nan", "--format", "json")
    assert res.returncode == 1, res.stderr
    assert one_error_line(res.stderr) == "invalid value for '--samples': 'nan' is not a valid integer"
    assert res.stdout == ""


# ------------------------------------------------------------------------------------------------
# --seed: a non-negative integer below 2**64, refused while parsing (before the model is looked at)


@pytest.mark.parametrize("cmd", ["analyze", "recommend", "prune", "apply", "evaluate", "compress"])
@pytest.mark.parametrize("seed,expect", [("-1", "--seed must be ≥ 0, got -1"),
                                         (str(2 ** 64), f"--seed must be below 2**64, got {2 ** 64}")])
def test_seed_out_of_range(cmd, seed, expect, tmp_path):
    args = [a if a != "M" else str(tmp_path / "no-such-model") for a in BASE[cmd]]
    res = invoke([*args, "--seed", seed, "--quiet"], code=1)
    assert one_error_line(res.stderr) == expect
    assert not (tmp_path / "o").exists()


def test_largest_seed_is_accepted_by_the_parser(tmp_path):
    """2**64 - 1 passes the check: the run goes on and fails on the missing model instead."""
    res = invoke(["analyze", tmp_path / "nope", "--data", "d.txt", "--seed", str(2 ** 64 - 1), "--quiet"],
                 code=1)
    assert one_error_line(res.stderr) == f"model not found: {tmp_path / 'nope'}"


# ------------------------------------------------------------------------------------------------
# exit 2 only for an unknown option or a missing argument/option (now one line too)


@pytest.mark.parametrize("args,expect", [
    (["analyze", "M", "--data", "x.txt", "--nosuch"], "No such option: --nosuch"),
    (["quantize", "M", "--bits", "4", "--out", "o", "--bogus", "1"], "No such option: --bogus"),
    (["analyze"], "Missing argument"),
    (["apply", "M", "--out", "o"], "Missing option '--plan'"),
    (["prune", "M", "--rate", "0.3"], "Missing option '--out'"),
    (["analyze", "M", "--samples"], "Option '--samples' requires an argument"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["--nosuch"], "No such option: --nosuch"),
])
def test_unknown_option_or_missing_argument_is_exit_2(args, expect):
    res = invoke(args, code=2)
    assert "Traceback" not in res.stderr and "╭" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX) and expect in lines[0], res.stderr


def test_unknown_option_in_a_real_process():
    res = cli("evaluate", "M", "--data", "d.txt", "--nosuch", "--format", "json")
    assert res.returncode == 2
    assert res.stdout == ""
    assert "No such option: --nosuch" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# help and valid values are untouched


@pytest.mark.parametrize("args", [["--help"], ["analyze", "--help"], ["quantize", "--help"],
                                  ["theory", "exponents", "--help"]])
def test_help_still_exits_0(args):
    res = invoke(args, code=0)
    assert "Usage" in res.stdout and res.stderr == ""


def test_no_arguments_still_shows_the_help():
    res = CliRunner().invoke(app, [])
    assert "Usage" in res.stdout


def test_valid_values_still_parse():
    res = invoke(["theory", "exponents", "--a", "1.5", "--b", "2", "--g", "ntk", "--format", "json"], code=0)
    doc = json.loads(res.stdout)
    assert {"rho", "chi", "gamma", "gamma_regime"} <= set(doc)
