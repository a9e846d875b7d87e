"""`specprune theory ...`: the corrected spectral theory from the command line.

Numbers are taken as text and parsed here so that a malformed or out-of-range value is a known
error (one line, exit 1); exit 2 stays reserved for unknown options and missing arguments.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any

import numpy as np
import typer

from ..errors import SpecpruneError
from .common import Ctx, DebugOpt, FormatOpt, OutputFormat, QuietOpt, command, console

app = typer.Typer(
    help="The corrected generalized spectral theory: exponents, pruning/loss curves, frontier, density, "
    "fits.",
    no_args_is_help=True,
)

G_HELP = "Evolution g: ntk | feature:beta=B | monomial:m=M,n=N[,C=C] | plugin name[:key=val,...]"
AOpt = Annotated[str, typer.Option("--a", metavar="FLOAT",
                                   help="Target-energy exponent a > 1 (λ_k w_k² ~ k^-a).")]
BOpt = Annotated[str, typer.Option("--b", metavar="FLOAT", help="Eigenvalue exponent b > 1 (λ_k ~ k^-b).")]
GOpt = Annotated[str, typer.Option("--g", help=G_HELP)]
TOpt = Annotated[str | None, typer.Option("--t", metavar="FLOAT", help="Training time t > 0.")]


def _num(text: str | None, name: str, *, low: float | None = None, strict: bool = True,
         integer: bool = False) -> float | None:
    """Parse a number given on the command line; None stays None."""
    if text is None:
        return None
    try:
        val = float(text)
    except (TypeError, ValueError):
        raise SpecpruneError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(val):
        raise SpecpruneError(f"{name} must be finite, got {text!r}")
    if low is not None and (val <= low if strict else val < low):
        raise SpecpruneError(f"{name} must be {'>' if strict else '>='} {low:g}, got {text}")
    if integer:
        if val != math.floor(val):
            raise SpecpruneError(f"{name} must be an integer, got {text}")
        return int(val)
    return val


def _ab(a: str, b: str) -> tuple[float, float]:
    av = _num(a, "--a")
    bv = _num(b, "--b")
    if av <= 1:
        raise SpecpruneError(f"--a must be > 1 (λ_k w_k² ~ k^-a must be summable), got {a}")
    if bv <= 1:
        raise SpecpruneError(f"--b must be > 1 (λ_k ~ k^-b must be summable), got {b}")
    return av, bv


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _fmt(x: Any, digits: int = 6) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}" if math.isfinite(float(x)) else str(float(x))
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return str(x)


def _table(title: str, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        left = col in ("quantity", "phase", "noise", "note")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    return table


def _kv_table(title: str, d: dict[str, Any], keys: list[str]):
    return _table(title, ["quantity", "value"], [[k, d.get(k)] for k in keys])


def _print(*renderables: Any) -> None:
    con = console()
    for r in renderables:
        con.print(r)


# --------------------------------------------------------------------------------------------- exponents


@app.command("exponents")
@command
def exponents_cmd(
    a: AOpt,
    b: BOpt,
    g: GOpt = "ntk",
    t: TOpt = None,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Corrected ρ, χ, γ (with its regime) and the k* exponent ρ/b for spectrum exponents a, b and g."""
    from .. import theory

    ctx = Ctx(fmt, quiet)
    av, bv = _ab(a, b)
    tv = _num(t, "--t", low=0.0)
    ex = theory.exponents(av, bv, theory.parse_g(g), t=tv)
    out = _clean(ex.to_dict())

    def human(d: dict[str, Any]) -> None:
        _print(_kv_table(f"exponents  a={_fmt(av)}  b={_fmt(bv)}  g={d['g']}", d,
                         ["rho", "chi", "gamma", "gamma_regime", "gamma_effective", "k_star_exponent",
                          "chi_plus_gamma_equals_rho", "m", "n", "m_tail", "c", "sum_f2_constant",
                          "log_coefficient", "approach_exponent", "rho_source"]))
        for note in d["notes"]:
            console().print(f"note: {note}", highlight=False)

    ctx.emit(out, human)


# --------------------------------------------------------------------------------------------- curve


class CurveKind(str, enum.Enum):
    pruning = "pruning"
    loss = "loss"
    bits = "bits"


@app.command("curve")
@command
def curve_cmd(
    a: AOpt,
    b: BOpt,
    g: GOpt = "ntk",
    t: Annotated[str | None, typer.Option(
        "--t", metavar="FLOAT", help="Training time t > 0 (default: the t where k* = min(1000, K_max/100); "
                                     "1e6 for g = ntk, b = 2 and the default --k-max).")] = None,
    k_star: Annotated[str | None, typer.Option(
        "--k-star", metavar="FLOAT", help="Give the time through the frontier index instead of --t.")] = None,
    kind: Annotated[CurveKind, typer.Option("--kind", help="pruning: pruned loss vs rate at t (with r*); "
                                            "loss: L(t) and Σf² over time; bits: quantization ΔL vs bits.")]
    = CurveKind.pruning,
    k_max: Annotated[str, typer.Option("--k-max", metavar="INT", help="Modes of the model (capacity K_max).")]
    = "100000",
    epsilon: Annotated[str, typer.Option("--epsilon", metavar="FLOAT",
                                         help="True-loss rule budget: pruned loss ≤ (1+ε) L(t).")] = "0.01",
    points: Annotated[str, typer.Option("--points", metavar="INT", help="Points on the curve.")] = "25",
    t_max: Annotated[str | None, typer.Option("--t-max", metavar="FLOAT",
                                                 help="kind=loss: last time (default 1000·t).")] = None,
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pruning curve (plateau / power law / saturation) and r*, the loss curve, or the bit law."""
    from .. import theory

    ctx = Ctx(fmt, quiet)
    av, bv = _ab(a, b)
    ev = theory.parse_g(g)
    kmax = _num(k_max, "--k-max", low=1, strict=False, integer=True)
    eps = _num(epsilon, "--epsilon", low=0.0)
    npts = _num(points, "--points", low=2, strict=False, integer=True)
    if npts > 10000:
        raise SpecpruneError(f"--points must be at most 10000, got {points}")
    default_k_star = min(1000.0, kmax / 100.0)
    tv = _time(ev, bv, t, k_star, default_k_star=default_k_star)
    t_note = None if t is not None or k_star is not None else \
        f"no --t or --k-star: t = {_fmt(tv)}, where k* = {_fmt(max(1.0, default_k_star))} (min(1000, K_max/100))"
    spec = theory.Spectrum(av, bv, n_exact=min(10**6, kmax), k_max=kmax)
    ex = theory.exponents(av, bv, ev)
    contract = ("rho", "chi", "gamma", "gamma_regime", "k_star_exponent")
    head = {"a": av, "b": bv, "g": ev.name, "t": tv, "k_max": kmax, "kind": kind.value,
            "exponents": {k: getattr(ex, k) for k in contract}}
    if kind == CurveKind.pruning:
        curve = theory.pruning_curve(spec, ev, tv, points=npts, epsilon=eps)
        doc = curve.to_dict()
        # past the capacity (k* ≥ K_max) the cut is pinned by K_max: 1 − r* no longer scales with t
        capped = doc.get("k_star") is not None and doc["k_star"] >= kmax
        out = _clean({**head, **doc, "r_star": curve.critical.rate,
                      "one_minus_r_star_t_exponent": None if capped else ex.k_star_exponent})
        if capped:
            out["note"] = (f"k* = {_fmt(doc['k_star'])} ≥ K_max = {kmax}: r* is set by the capacity and does not "
                           "scale with t")

        def human(d: dict[str, Any]) -> None:
            rows = [[p["k_cut"], p["rate"], p["pruned_loss"], p["delta_true"], p["distance_eq20"], p["phase"]]
                    for p in d["points"]]
            _print(_table(f"pruning curve at t={_fmt(tv)} (k*={_fmt(d['k_star'])}, L(t)={_fmt(d['loss'])}, "
                          f"L(0)={_fmt(d['loss_zero'])})",
                          ["k_cut", "rate", "pruned loss", "ΔL true", "eq20 distance", "phase"], rows))
            c = d["critical"]
            scaling = f"1 − r* ∝ t^{_fmt(ex.k_star_exponent)}" if d.get("one_minus_r_star_t_exponent") is not None \
                else d["note"]
            console().print(f"r* = {_fmt(d['r_star'])} (k_cut = {c['k_cut']}, ε = {_fmt(eps)}); {scaling}",
                            highlight=False)

    elif kind == CurveKind.loss:
        t_hi = _num(t_max, "--t-max", low=0.0) if t_max is not None else 1000.0 * tv
        if t_hi <= tv:
            raise SpecpruneError("--t-max must be larger than --t")
        ts = np.logspace(math.log10(tv), math.log10(t_hi), npts)
        L, F = theory.loss_and_f2(theory.Spectrum(av, bv), ev, ts)
        ks = theory.k_star(ev, bv, ts)
        pts = [{"t": float(ts[i]), "k_star": float(ks[i]), "loss": float(L[i]), "sum_f2": float(F[i])}
               for i in range(ts.size)]
        slopes = {"loss": -theory.loglog_slope(ts, L),
                  "sum_f2": theory.loglog_slope(ts, F) if np.all(np.isfinite(F)) else None}
        # the loss curve is the infinite-mode one (exact sums + analytic tail): no capacity enters it
        out = _clean({**head, "k_max": None, "modes": "infinite", "points": pts, "fitted_chi": slopes["loss"],
                      "fitted_sum_f2_slope": slopes["sum_f2"]})

        def human(d: dict[str, Any]) -> None:
            rows = [[p["t"], p["k_star"], p["loss"], p["sum_f2"]] for p in d["points"]]
            _print(_table("loss curve (infinite modes, exact sums + analytic tail)",
                          ["t", "k*", "L(t)", "Σf²"], rows))
            console().print(f"fitted χ = {_fmt(d['fitted_chi'])} (theory {_fmt(ex.chi)}); "
                            f"Σf² slope = {_fmt(d['fitted_sum_f2_slope'])} (γ: {_fmt(ex.gamma)}, "
                            f"{ex.gamma_regime})", highlight=False)

    else:
        bits = np.arange(2, 2 + min(npts, 15))
        rows = []
        laws = {}
        for noise in theory.NOISE_MODELS:
            vals = theory.quantization_excess_loss(spec, ev, tv, bits, noise)
            laws[noise] = theory.bit_law(av, bv, ev, noise).to_dict()
            rows.append({"noise": noise, "bits": bits.tolist(), "delta_loss": np.asarray(vals).tolist()})
        out = _clean({**head, "curves": rows, "bit_laws": laws})

        def human(d: dict[str, Any]) -> None:
            cols = ["bits"] + [r["noise"] for r in d["curves"]]
            body = [[int(bb)] + [r["delta_loss"][i] for r in d["curves"]] for i, bb in enumerate(bits)]
            _print(_table(f"quantization excess loss at t={_fmt(tv)} (orthonormal-basis convention)",
                          cols, body))
            law_rows = [[k, v["log2_slope"], v["t_exponent"], v["note"]] for k, v in d["bit_laws"].items()]
            _print(_table("bit laws: ΔL ∝ 2^(slope·B) t^exponent",
                          ["noise", "log2 slope", "t exponent", "note"], law_rows))

    if t_note is not None:
        out["t_default"] = t_note
        plot = human

        def human(d: dict[str, Any]) -> None:
            plot(d)
            console().print(t_note, highlight=False)

    ctx.emit(out, human)


def _time(ev, b: float, t: str | None, k_star: str | None, default_k_star: float) -> float:
    from .. import theory

    if t is not None and k_star is not None:
        raise SpecpruneError("give either --t or --k-star, not both")
    if t is not None:
        return _num(t, "--t", low=0.0)
    ks = _num(k_star, "--k-star", low=0.0) if k_star is not None else max(1.0, default_k_star)
    return float(theory.t_at_k_star(ev, b, [ks])[0])


# --------------------------------------------------------------------------------------------- frontier


@app.command("frontier")
@command
def frontier_cmd(
    b: BOpt,
    g: GOpt = "ntk",
    t: Annotated[list[str] | None, typer.Option("--t", metavar="FLOAT", help="Time(s) (repeatable).")] = None,
    t_min: Annotated[str, typer.Option("--t-min", metavar="FLOAT")] = "1e2",
    t_max: Annotated[str, typer.Option("--t-max", metavar="FLOAT")] = "1e8",
    points: Annotated[str, typer.Option("--points", metavar="INT")] = "7",
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """λ*(t), k*(t) (level set g = κ = 1) and the elasticities E_λ, E_t, ρ = E_t/E_λ on the frontier."""
    from .. import theory

    ctx = Ctx(fmt, quiet)
    bv = _num(b, "--b")
    if bv <= 1:
        raise SpecpruneError(f"--b must be > 1, got {b}")
    ev = theory.parse_g(g)
    if t:
        ts = np.asarray([_num(x, "--t", low=0.0) for x in t])
    else:
        lo, hi = _num(t_min, "--t-min", low=0.0), _num(t_max, "--t-max", low=0.0)
        n = _num(points, "--points", low=1, strict=False, integer=True)
        if hi < lo or n > 10000:
            raise SpecpruneError("need --t-min ≤ --t-max and --points ≤ 10000")
        ts = np.logspace(math.log10(lo), math.log10(hi), n)
    lam = theory.frontier_lambda(ev, ts)
    e_lam, e_t = theory.elasticities(ev, lam, ts)
    rows = [{"t": float(ts[i]), "lambda_star": float(lam[i]), "k_star": float(lam[i] ** (-1.0 / bv)),
             "E_lambda": float(e_lam[i]), "E_t": float(e_t[i]), "rho": float(e_t[i] / e_lam[i])}
            for i in range(ts.size)]
    asy = theory.asymptotics(ev)
    out = _clean({"b": bv, "g": ev.name, "kappa": theory.KAPPA, "points": rows,
                  "asymptotic": asy.to_dict(), "k_star_exponent": asy.rho / bv})

    def human(d: dict[str, Any]) -> None:
        _print(_table(f"frontier g(λ*, t) = κ = 1 for g = {d['g']}, b = {_fmt(bv)}",
                      ["t", "λ*", "k*", "E_λ", "E_t", "ρ"],
                      [[r["t"], r["lambda_star"], r["k_star"], r["E_lambda"], r["E_t"], r["rho"]]
                       for r in d["points"]]))
        console().print(f"asymptotic ρ = {_fmt(asy.rho)} ({asy.source}); k* ∝ t^{_fmt(d['k_star_exponent'])}",
                        highlight=False)

    ctx.emit(out, human)


# --------------------------------------------------------------------------------------------- density


@app.command("density")
@command
def density_cmd(
    b: BOpt,
    g: GOpt = "ntk",
    s: Annotated[str | None, typer.Option("--s", metavar="FLOAT",
                                             help="P ∝ C^s (default: compute-optimal ρ/(b+ρ)).")] = None,
    c_min: Annotated[str, typer.Option("--c-min", metavar="FLOAT", help="Smallest compute.")] = "1e12",
    c_max: Annotated[str, typer.Option("--c-max", metavar="FLOAT", help="Largest compute.")] = "1e20",
    p0: Annotated[str, typer.Option("--p0", metavar="FLOAT", help="Parameters at --c-min.")] = "1e6",
    capacity: Annotated[str, typer.Option("--capacity-per-param", metavar="FLOAT",
                                          help="K_max / P (modes per parameter).")] = "1",
    points: Annotated[str, typer.Option("--points", metavar="INT")] = "9",
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Density δ = k*/P along P ∝ C^s: corrected α = (ρ/b)(1−s) − s, the capacity cap, s_opt = ρ/(b+ρ)."""
    from .. import theory

    ctx = Ctx(fmt, quiet)
    bv = _num(b, "--b")
    if bv <= 1:
        raise SpecpruneError(f"--b must be > 1, got {b}")
    ev = theory.parse_g(g)
    rho = theory.asymptotics(ev).rho
    sv = _num(s, "--s") if s is not None else theory.compute_optimal_exponent(rho, bv)
    lo, hi = _num(c_min, "--c-min", low=0.0), _num(c_max, "--c-max", low=0.0)
    if hi <= lo:
        raise SpecpruneError("--c-max must exceed --c-min")
    P0 = _num(p0, "--p0", low=0.0)
    cap = _num(capacity, "--capacity-per-param", low=0.0)
    n = _num(points, "--points", low=2, strict=False, integer=True)
    if n > 10000:
        raise SpecpruneError("--points must be at most 10000")
    C = np.logspace(math.log10(lo), math.log10(hi), n)
    P = P0 * (C / lo) ** sv
    d = theory.density(C, P, bv, ev, capacity_per_param=cap)
    law = theory.density_law(bv, ev, sv)
    measured = round(theory.loglog_slope(C, d["density"]), 10) + 0.0  # a slope: no 1e-17 residue, no -0
    rows = [{"C": float(C[i]), "P": float(P[i]), "t": float(d["t"][i]), "k_star": float(d["k_star"][i]),
             "k_max": float(d["k_max"][i]), "density": float(d["density"][i]), "capped": bool(d["capped"][i])}
            for i in range(C.size)]
    # cap_binds / alpha_capped are the C → ∞ statements; where the cap starts along this path may lie
    # outside the range shown
    onset = theory.cap_onset(lo, P0, sv, bv, ev, capacity_per_param=cap)
    out = _clean({"b": bv, "g": ev.name, **law.to_dict(), "alpha_measured": measured,
                  "capped_in_range": any(r["capped"] for r in rows), "cap_onset_C": onset, "points": rows})

    def human(dd: dict[str, Any]) -> None:
        keys = [("rho", "rho"), ("s", "s"), ("s_opt", "s_opt"), ("alpha", "alpha (uncapped)"),
                ("alpha_paper", "alpha_paper"), ("alpha_capped", "alpha_capped (C → ∞)"),
                ("cap_binds", "cap_binds (C → ∞)"), ("cap_onset_C", "cap first binds at C"),
                ("alpha_measured", "alpha_measured (range shown)")]
        _print(_table(f"density along P ∝ C^{_fmt(sv)} (g = {ev.name}, b = {_fmt(bv)})", ["quantity", "value"],
                      [[label, dd.get(k)] for k, label in keys]),
               _table("points", ["C", "P", "t", "k*", "K_max", "δ", "capped"],
                      [[r["C"], r["P"], r["t"], r["k_star"], r["k_max"], r["density"], r["capped"]]
                       for r in dd["points"]]))
        console().print(_cap_sentence(dd, hi), highlight=False)

    ctx.emit(out, human)


def _cap_sentence(d: dict[str, Any], hi: float) -> str:
    """Where the capacity cap K_max binds along the path, in words consistent with the rows' "capped"."""
    onset, a = d.get("cap_onset_C"), _fmt(d["alpha"])
    capped = [r["capped"] for r in d["points"]]
    if all(capped):
        return "the cap K_max binds over the whole range shown (k* ≥ K_max): δ = K_max/P"
    if any(capped) and not d["cap_binds"]:
        return (f"the cap K_max binds at the low end of the range only (s ≥ s_opt): δ falls below it as C grows, "
                f"δ ∝ C^{a} (alpha) asymptotically")
    if onset is None:
        if d["cap_binds"]:
            return f"the cap K_max binds only as C → ∞ (s < s_opt), past any C searched: δ ∝ C^{a} (alpha)"
        return f"the cap K_max does not bind along this path (k* < K_max): δ ∝ C^{a} (alpha)"
    where = "inside the range (rows marked capped)" if any(capped) else f"beyond --c-max = {_fmt(hi)}"
    return (f"the cap K_max binds from C ≈ {_fmt(onset, 3)}, {where}: before it δ ∝ C^{a} (alpha; "
            f"{_fmt(d['alpha_measured'])} measured over the range shown), after it δ is constant (alpha_capped = "
            f"{_fmt(d['alpha_capped'])})")


# --------------------------------------------------------------------------------------------- fit


@app.command("fit")
@command
def fit_cmd(
    csv_path: Annotated[str, typer.Argument(metavar="CSV",
                                            help="Loss curve: columns step,loss (header optional).")],
    a: Annotated[str | None, typer.Option("--a", metavar="FLOAT",
                                          help="Target-energy exponent a (for ρ, γ).")] = None,
    b: Annotated[str | None, typer.Option("--b", metavar="FLOAT", help="Eigenvalue exponent b (for ρ, γ).")]
    = None,
    a_err: Annotated[str, typer.Option("--a-err", metavar="FLOAT", help="1-σ uncertainty of a.")] = "0",
    b_err: Annotated[str, typer.Option("--b-err", metavar="FLOAT", help="1-σ uncertainty of b.")] = "0",
    spectrum: Annotated[str | None, typer.Option(
        "--spectrum", metavar="CSV", help="Spectrum CSV k,lambda[,energy]: fit b (and a).")] = None,
    k_min: Annotated[str | None, typer.Option("--k-min", metavar="FLOAT", help="Spectrum fit range.")] = None,
    k_max: Annotated[str | None, typer.Option("--k-max", metavar="FLOAT", help="Spectrum fit range.")] = None,
    t_min: Annotated[str | None, typer.Option("--t-min", metavar="FLOAT", help="Fit window start.")] = None,
    t_max: Annotated[str | None, typer.Option("--t-max", metavar="FLOAT", help="Fit window end.")] = None,
    floor: Annotated[str, typer.Option("--floor", help="Irreducible loss: a number, or 'fit'.")] = "0",
    gamma: Annotated[str | None, typer.Option("--gamma", metavar="FLOAT",
                                                 help="Independently measured γ to check χ + γ = ρ.")] = None,
    gamma_err: Annotated[str, typer.Option("--gamma-err", metavar="FLOAT")] = "0",
    bootstrap: Annotated[str, typer.Option("--bootstrap", metavar="INT",
                                           help="Bootstrap resamples (0 = off).")] = "200",
    seed: Annotated[str, typer.Option("--seed", metavar="INT", help="Bootstrap seed.")] = "0",
    fmt: FormatOpt = OutputFormat.human,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fit χ from a loss curve (with uncertainty); with a, b (or --spectrum) infer ρ, γ, check χ + γ = ρ."""
    from .. import theory

    ctx = Ctx(fmt, quiet)
    step, loss = theory.read_loss_csv(csv_path)
    fl: Any = "fit" if floor.strip().lower() == "fit" else _num(floor, "--floor")
    nboot = _num(bootstrap, "--bootstrap", low=0, strict=False, integer=True)
    if nboot > 100000:
        raise SpecpruneError("--bootstrap must be at most 100000")
    fit = theory.fit_loss_curve(step, loss, t_min=_num(t_min, "--t-min"), t_max=_num(t_max, "--t-max"),
                                floor=fl, bootstrap=nboot, seed=_num(seed, "--seed", integer=True))
    av = _num(a, "--a")
    bv = _num(b, "--b")
    ae, be = _num(a_err, "--a-err", low=0, strict=False), _num(b_err, "--b-err", low=0, strict=False)
    spec_fit = {}
    if spectrum is not None:
        cols = theory.read_spectrum_csv(spectrum)
        kmn, kmx = _num(k_min, "--k-min"), _num(k_max, "--k-max")
        bf = theory.fit_spectrum(cols["lambda"], cols["k"], kmn, kmx)
        spec_fit["b"] = bf.to_dict()
        if bv is None:
            bv, be = bf.exponent, bf.stderr
        if "energy" in cols:
            af = theory.fit_spectrum(cols["energy"], cols["k"], kmn, kmx)
            spec_fit["a"] = af.to_dict()
            if av is None:
                av, ae = af.exponent, af.stderr
    ident = None
    if (av is None) != (bv is None):
        raise SpecpruneError("give both a and b (or a spectrum with lambda and energy columns) to infer ρ")
    if av is not None:
        av, bv = _ab(str(av), str(bv))
        sigma = fit.chi_bootstrap_stderr if fit.chi_bootstrap_stderr is not None else fit.chi_stderr
        gv = _num(gamma, "--gamma")
        ident = theory.identify(fit.chi, max(sigma, fit.chi_stderr), av, bv, ae, be, gamma=gv,
                                gamma_stderr=_num(gamma_err, "--gamma-err", low=0, strict=False))
    out = _clean({"csv": csv_path, "chi": fit.chi, "chi_stderr": fit.chi_stderr, "fit": fit.to_dict(),
                  "spectrum_fit": spec_fit or None,
                  "identification": None if ident is None else ident.to_dict()})

    def human(d: dict[str, Any]) -> None:
        _print(_kv_table(f"loss-curve fit ({csv_path})", d["fit"],
                         ["chi", "chi_stderr", "chi_bootstrap_stderr", "chi_ci", "floor", "r2", "n_points",
                          "t_min", "t_max"]))
        if d["identification"]:
            _print(_kv_table("identification", d["identification"],
                             ["a", "b", "rho", "rho_stderr", "k_star_exponent", "gamma_regime",
                              "gamma_predicted", "gamma_predicted_stderr", "gamma_measured", "closure",
                              "closure_z", "consistent"]))

    ctx.emit(out, human)
