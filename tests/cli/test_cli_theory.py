"""`specprune theory ...`: JSON contract, exit codes (1 bad values, 2 unknown options)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from specprune import theory as T
from specprune.cli.theory import app

runner = CliRunner()
CONTRACT = {"rho", "chi", "gamma", "gamma_regime", "k_star_exponent"}


def run(*args: str):
    return runner.invoke(app, list(args))


def run_json(*args: str) -> dict:
    res = run(*args, "--format", "json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)  # exactly one JSON document, nothing else


@pytest.mark.parametrize("a,b,g,chi,gamma,regime", [
    ("1.5", "2", "ntk", 0.25, 0.75, "power"),
    ("1.5", "2", "feature:beta=0.2", 0.4167, 1.25, "power"),
    ("2.5", "2", "ntk", 0.75, 0.25, "power"),
    ("3", "2", "ntk", 1.0, None, "logarithmic"),
    ("4", "2", "ntk", 1.5, None, "saturating"),
    ("1.5", "2", "monomial:m=0.2,n=1", 1.25, None, "cutoff-dominated"),
])
def test_exponents_json_contract(a, b, g, chi, gamma, regime):
    doc = run_json("exponents", "--a", a, "--b", b, "--g", g)
    assert CONTRACT <= set(doc)
    assert isinstance(doc["rho"], float) and isinstance(doc["chi"], float)
    assert isinstance(doc["k_star_exponent"], float)
    assert doc["chi"] == pytest.approx(chi, abs=5e-5)
    assert doc["gamma_regime"] == regime
    if gamma is None:
        assert doc["gamma"] is None
    else:
        assert doc["gamma"] == pytest.approx(gamma, abs=5e-5)
        assert doc["chi"] + doc["gamma"] == pytest.approx(doc["rho"])


def test_exponents_k_star_exponent_and_human_output():
    doc = run_json("exponents", "--a", "2", "--b", "2", "--g", "monomial:m=2,n=1.5")
    assert doc["k_star_exponent"] == pytest.approx(0.375)
    res = run("exponents", "--a", "3", "--b", "2")
    assert res.exit_code == 0
    assert "logarithmic" in res.stdout and "chi" in res.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--a", "1", "--b", "2"], "--a must be > 1"),
    (["--a", "0.5", "--b", "2"], "--a must be > 1"),
    (["--a", "1.5", "--b", "1"], "--b must be > 1"),
    (["--a", "abc", "--b", "2"], "must be a number"),
    (["--a", "1.5", "--b", "nan"], "finite"),
    (["--a", "1.5", "--b", "2", "--g", "ntkk"], "did you mean 'ntk'"),
    (["--a", "1.5", "--b", "2", "--g", "monomial:m=2"], "missing parameter"),
    (["--a", "1.5", "--b", "2", "--g", "monomial:m=-1,n=2"], "positive"),
    (["--a", "1.5", "--b", "2", "--g", "feature:beta=x"], "must be a number"),
    (["--a", "1.5", "--b", "2", "--t", "-3"], "--t must be > 0"),
])
def test_exponents_bad_values_exit_1_one_line(args, fragment):
    res = run("exponents", *args, "--format", "json")
    assert res.exit_code == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr


def test_unknown_option_and_missing_argument_exit_2():
    assert run("exponents", "--a", "1.5", "--b", "2", "--bogus", "1").exit_code == 2
    assert run("exponents", "--b", "2").exit_code == 2
    assert run("fit").exit_code == 2
    assert run("nosuchcommand").exit_code == 2


def test_curve_pruning_json():
    base = ("curve", "--a", "1.5", "--b", "2", "--k-max", "100000")
    doc = run_json(*base, "--k-star", "300", "--points", "12")
    assert doc["kind"] == "pruning" and len(doc["points"]) >= 10
    phases = [p["phase"] for p in doc["points"]]
    assert phases[0] == "saturation" and phases[-1] == "plateau" and "power-law" in phases
    assert 0 < doc["r_star"] < 1
    assert doc["critical"]["k_cut"] > doc["k_star"]
    assert doc["one_minus_r_star_t_exponent"] == pytest.approx(0.5)
    # r* by the true-loss rule shrinks the safe pruning as training proceeds: 1 − r* ∝ t^(ρ/b)
    later = run_json(*base, "--k-star", "3000", "--points", "3")
    ratio = (1 - later["r_star"]) / (1 - doc["r_star"])
    assert ratio == pytest.approx(10.0, rel=0.02)


def test_curve_pruning_past_the_capacity_has_no_t_exponent():
    """k* ≥ K_max: the cut is pinned by the capacity, so 1 − r* no longer scales as t^(ρ/b): no exponent, a note."""
    doc = run_json("curve", "--a", "1.5", "--b", "2", "--t", "1e4", "--g", "monomial:m=0.25,n=1", "--points", "4")
    assert doc["k_star"] >= doc["k_max"]
    assert doc["one_minus_r_star_t_exponent"] is None
    assert doc["note"].endswith("r* is set by the capacity and does not scale with t")
    assert "set by the capacity" in run("curve", "--a", "1.5", "--b", "2", "--t", "1e4", "--g", "monomial:m=0.25,n=1",
                                        "--points", "4").stdout


def test_curve_loss_and_bits_json():
    doc = run_json("curve", "--a", "1.5", "--b", "2", "--g", "feature:beta=0.2", "--kind", "loss",
                   "--k-star", "300", "--points", "6")
    assert doc["fitted_chi"] == pytest.approx(0.4167, rel=0.02)
    assert doc["fitted_sum_f2_slope"] == pytest.approx(1.25, rel=0.02)
    assert doc["k_max"] is None and doc["modes"] == "infinite"  # the loss curve has no capacity
    bits = run_json("curve", "--a", "1.5", "--b", "2", "--kind", "bits", "--k-star", "30", "--points", "6",
                    "--k-max", "200000")
    assert {c["noise"] for c in bits["curves"]} == {"additive", "relative", "rtn-zero"}
    assert bits["bit_laws"]["rtn-zero"]["log2_slope"] == pytest.approx(-(2 - 1 / 1.75))
    assert run("curve", "--a", "1.5", "--b", "2", "--t", "10", "--k-star", "3").exit_code == 1
    assert run("curve", "--a", "1.5", "--b", "2", "--k-max", "0").exit_code == 1
    assert run("curve", "--a", "1.5", "--b", "2", "--kind", "nope").exit_code == 2


def test_frontier_json():
    doc = run_json("frontier", "--b", "2", "--g", "monomial:m=2,n=1.5", "--t", "100", "--t", "1e6")
    assert [p["t"] for p in doc["points"]] == [100.0, 1e6]
    for p in doc["points"]:
        assert p["rho"] == pytest.approx(0.75, abs=1e-6)
        assert p["k_star"] == pytest.approx(p["lambda_star"] ** -0.5)
    assert doc["k_star_exponent"] == pytest.approx(0.375)
    assert run("frontier", "--b", "0.9").exit_code == 1


def test_density_json():
    doc = run_json("density", "--b", "2", "--s", "0.2", "--capacity-per-param", "1e30")
    assert doc["alpha"] == pytest.approx(0.5 * 0.8 - 0.2)
    assert doc["alpha_measured"] == pytest.approx(doc["alpha"], abs=1e-6)
    assert doc["alpha_paper"] == pytest.approx(0.4)
    opt = run_json("density", "--b", "2", "--g", "feature:beta=0.2")
    assert opt["s"] == pytest.approx(opt["s_opt"]) and opt["alpha"] == pytest.approx(0.0, abs=1e-12)
    assert run("density", "--b", "2", "--c-min", "1e10", "--c-max", "1e5").exit_code == 1


@pytest.fixture()
def loss_csv(tmp_path):
    a, b, g = 1.5, 2.0, "feature:beta=0.2"
    t = T.t_at_k_star(g, b, np.logspace(2.5, 4.0, 25))
    L = T.loss(T.Spectrum(a, b, n_exact=100_000), g, t)
    rng = np.random.default_rng(0)
    L = L * np.exp(0.01 * rng.standard_normal(L.size))
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n" + "\n".join(f"{float(x)!r},{float(y)!r}" for x, y in zip(t, L)) + "\n")
    return path


def test_fit_json_recovers_chi_and_checks_closure(loss_csv):
    doc = run_json("fit", str(loss_csv), "--a", "1.5", "--b", "2", "--bootstrap", "100")
    assert doc["chi"] == pytest.approx(0.4167, rel=0.02)
    assert doc["chi_stderr"] > 0 and len(doc["fit"]["chi_ci"]) == 2
    ident = doc["identification"]
    assert ident["rho"] == pytest.approx(5 / 3, rel=0.02)
    assert ident["gamma_predicted"] == pytest.approx(1.25, rel=0.02)
    ok = run_json("fit", str(loss_csv), "--a", "1.5", "--b", "2", "--gamma", "1.25", "--gamma-err", "0.02")
    assert ok["identification"]["consistent"] is True
    bad = run_json("fit", str(loss_csv), "--a", "1.5", "--b", "2", "--gamma", "2.0", "--gamma-err", "0.02")
    assert bad["identification"]["consistent"] is False
    only = run_json("fit", str(loss_csv), "--bootstrap", "0")
    assert only["identification"] is None and only["fit"]["chi_ci"] is None
    # same inputs, same JSON
    first, second = (run("fit", str(loss_csv), "--format", "json").stdout for _ in range(2))
    assert first == second


def test_fit_with_spectrum_csv(loss_csv, tmp_path):
    spec = tmp_path / "spectrum.csv"
    rows = (f"{k},{k ** -2.0!r},{k ** -1.5!r}" for k in range(1, 200))
    spec.write_text("k,lambda,energy\n" + "\n".join(rows))
    doc = run_json("fit", str(loss_csv), "--spectrum", str(spec))
    assert doc["spectrum_fit"]["b"]["exponent"] == pytest.approx(2.0, abs=1e-9)
    assert doc["identification"]["a"] == pytest.approx(1.5, abs=1e-9)
    assert doc["identification"]["rho"] == pytest.approx(5 / 3, rel=0.02)


def test_fit_bad_files_exit_1(tmp_path):
    res = run("fit", str(tmp_path / "missing.csv"))
    assert res.exit_code == 1 and "not found" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2\n2,oops\n")
    res = run("fit", str(bad), "--format", "json")
    assert res.exit_code == 1 and res.stdout == "" and "line 3" in res.stderr
    short = tmp_path / "short.csv"
    short.write_text("step,loss\n0,2\n1,1\n")
    assert run("fit", str(short)).exit_code == 1
    assert run("fit", str(bad), "--a", "1.5").exit_code == 1  # both a and b needed


@pytest.mark.parametrize("args", [
    ("exponents", "--a", "1.5", "--b", "2"),
    ("curve", "--a", "1.5", "--b", "2", "--t", "100"),
    ("frontier", "--b", "2", "--t", "100"),
    ("density", "--b", "2", "--s", "0.2", "--capacity-per-param", "1e30"),
], ids=lambda a: a[0])
@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_every_theory_command_takes_quiet(args, flag):
    """README: every command takes --format json, --quiet and --debug; quiet keeps the results."""
    res = run(*args, flag)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() and not res.stderr
    doc = json.loads(run(*args, flag, "--format", "json").stdout)
    assert doc == run_json(*args)


def test_theory_fit_takes_quiet(loss_csv):
    quiet = run_json("fit", str(loss_csv), "--bootstrap", "0", "-q")
    assert quiet == run_json("fit", str(loss_csv), "--bootstrap", "0")


def test_density_cap_is_consistent_with_the_rows():
    """QA F9: cap_binds is the C → ∞ statement; where the cap starts is given and agrees with the rows."""
    doc = run_json("density", "--b", "2", "--g", "ntk", "--s", "0.2")
    assert doc["cap_binds"] is True and doc["alpha_capped"] == 0.0
    assert not any(p["capped"] for p in doc["points"]) and doc["capped_in_range"] is False
    # δ = 1e-3 (C/1e12)^0.2 reaches K_max/P = 1 at C = 1e27, past --c-max
    assert doc["cap_onset_C"] == pytest.approx(1e27, rel=1e-6)
    human = " ".join(run("density", "--b", "2", "--g", "ntk", "--s", "0.2").stdout.split())
    assert "cap_binds (C → ∞)" in human and "binds from C ≈ 1e+27, beyond --c-max" in human
    # a smaller capacity: the cap starts inside the range, exactly where the rows turn "capped"
    inside = run_json("density", "--b", "2", "--s", "0.2", "--capacity-per-param", "0.01")
    assert inside["cap_onset_C"] == pytest.approx(1e17, rel=1e-6) and inside["capped_in_range"] is True
    assert all(p["capped"] == (p["C"] >= inside["cap_onset_C"] * (1 - 1e-9)) for p in inside["points"])
    assert "inside the range" in run("density", "--b", "2", "--s", "0.2", "--capacity-per-param", "0.01").stdout
    # capped at the start only (s > s_opt): not "binds over the whole range"
    low = run("density", "--b", "2", "--s", "0.5", "--capacity-per-param", "1e-4").stdout
    assert "low end of the range only" in " ".join(low.split())
    none = run_json("density", "--b", "2", "--s", "0.5")
    assert none["cap_binds"] is False and none["cap_onset_C"] is None


def test_density_exact_zero_is_printed_as_zero():
    """QA F10: at s = s_opt α is 0, not 5.55e-17 (and the measured slope not -6.4e-17)."""
    doc = run_json("density", "--b", "2")
    assert doc["alpha"] == 0.0 and doc["alpha_measured"] == 0.0
    out = run("density", "--b", "2").stdout
    assert "e-17" not in out and "e-16" not in out


def test_curve_default_t_is_stated():
    """QA F10: the default t of `theory curve` is in --help and said when used."""
    assert "default" in " ".join(run("curve", "--help").stdout.split()).split("--t ")[1].split("--k-star")[0]
    out = " ".join(run("curve", "--a", "1.5", "--b", "2", "--points", "3").stdout.split())
    assert "no --t or --k-star: t = 1e+06, where k* = 1000" in out
    doc = run_json("curve", "--a", "1.5", "--b", "2", "--points", "3")
    assert doc["t"] == pytest.approx(1e6) and "t_default" in doc
    assert "t_default" not in run_json("curve", "--a", "1.5", "--b", "2", "--points", "3", "--t", "1e6")


def test_fit_on_a_directory_says_so(tmp_path):
    res = run("fit", str(tmp_path))
    assert res.exit_code == 1 and "is a directory" in res.stderr and "not found" not in res.stderr


def test_exponents_absurd_b_has_no_meaningless_zeta():
    """QA F10: ζ(a − b) with a − b = −1e300 is not 0; it is not representable, so it is left out."""
    doc = run_json("exponents", "--a", "1.5", "--b", "1e300")
    assert doc["sum_f2_constant"] is None
    assert run_json("exponents", "--a", "1.5", "--b", "2")["sum_f2_constant"] == pytest.approx(-0.2078862, rel=1e-6)
