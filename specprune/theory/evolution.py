"""Evolution functions g(λ, t; β): how far mode λ has been learned after time t.

Each mode evolves as f_k(t) = w_k (1 − exp(−g(λ_k, t))). Built-ins:

* NTK (lazy) ........... g = λ t                         (m = n = 1)
* feature learning ..... g = λ t^p,  p(β) = max(1, 2/(1+β))   (m = 1, n = p)
* monomial ............. g = C λ^m t^n
* polynomial ........... g = Σ_i C_i λ^(m_i) t^(n_i)     (non-monomial; asymptotically monomial)
* any Python callable g(lam, t) (vectorised over numpy arrays), or a registered plugin
  (entry-point group ``specprune.evolution``: a factory taking ``**params``).

A g must be positive, smooth and increasing in both arguments. ``m`` and ``n`` are the
asymptotic elasticities when known (None for an opaque callable: they are then measured
numerically, see :mod:`specprune.theory.frontier`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import SpecpruneError

ArrayLike = Any
GFunc = Callable[[np.ndarray, Any], np.ndarray]

__all__ = [
    "CallableEvolution",
    "Evolution",
    "Monomial",
    "Polynomial",
    "as_evolution",
    "feature_exponent",
    "feature_factory",
    "monomial_factory",
    "ntk_factory",
    "parse_g",
    "polynomial_factory",
]


class Evolution:
    """Base class: a vectorised g(λ, t) with a name and (when known) asymptotic m, n."""

    name: str = "g"
    m: float | None = None
    n: float | None = None
    C: float | None = None

    def __call__(self, lam: ArrayLike, t: ArrayLike) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_monomial(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "n": self.n, "C": self.C, "monomial": self.is_monomial}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Monomial(Evolution):
    """g = C λ^m t^n. The frontier g(λ*, t) = κ is analytic: λ* = (κ / (C t^n))^(1/m)."""

    def __init__(self, m: float = 1.0, n: float = 1.0, C: float = 1.0, name: str | None = None):
        for key, val in (("m", m), ("n", n), ("C", C)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise SpecpruneError(f"evolution parameter {key} must be a positive number, got {val!r}")
        self.m, self.n, self.C = float(m), float(n), float(C)
        self.name = name or f"monomial(C={self.C:g},m={self.m:g},n={self.n:g})"

    @property
    def is_monomial(self) -> bool:
        return True

    def __call__(self, lam: ArrayLike, t: ArrayLike) -> np.ndarray:
        lam = np.asarray(lam, dtype=float)
        t = np.asarray(t, dtype=float)
        lm = lam if self.m == 1.0 else np.power(lam, self.m)
        tn = t if self.n == 1.0 else np.power(t, self.n)
        out = lm * tn
        return out if self.C == 1.0 else self.C * out

    def frontier_lambda(self, t: ArrayLike, kappa: float) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        return np.exp((math.log(kappa / self.C) - self.n * np.log(t)) / self.m)

    def frontier_time(self, lam: ArrayLike, kappa: float) -> np.ndarray:
        lam = np.asarray(lam, dtype=float)
        return np.exp((math.log(kappa / self.C) - self.m * np.log(lam)) / self.n)


class Polynomial(Evolution):
    """g = Σ_i C_i λ^(m_i) t^(n_i): a smooth non-monomial g (e.g. λt + λ²t³).

    On the frontier at large t the term with the largest n/m wins, so ρ → max n_i/m_i;
    deep in the tail (λ → 0 at fixed t) the smallest m_i wins. ``m``/``n`` are left None:
    they differ between the two limits and are measured numerically where needed."""

    def __init__(self, terms: list[tuple[float, float, float]], name: str | None = None):
        if not terms:
            raise SpecpruneError("polynomial evolution needs at least one term")
        clean = []
        for C, m, n in terms:
            for key, val in (("C", C), ("m", m), ("n", n)):
                if not (math.isfinite(val) and val > 0):
                    raise SpecpruneError(f"polynomial term parameter {key} must be positive, got {val!r}")
            clean.append((float(C), float(m), float(n)))
        self.terms = tuple(clean)
        if len(self.terms) == 1:
            self.C, self.m, self.n = self.terms[0]
        self.name = name or " + ".join(f"{C:g}*lam^{m:g}*t^{n:g}" for C, m, n in self.terms)

    def __call__(self, lam: ArrayLike, t: ArrayLike) -> np.ndarray:
        lam = np.asarray(lam, dtype=float)
        t = np.asarray(t, dtype=float)
        out = 0.0
        for C, m, n in self.terms:
            out = out + C * (lam if m == 1.0 else np.power(lam, m)) * (t if n == 1.0 else np.power(t, n))
        return np.asarray(out, dtype=float)


class CallableEvolution(Evolution):
    """Wrap any vectorised callable g(lam, t) (user function or plugin object)."""

    def __init__(self, fn: GFunc, name: str | None = None, m: float | None = None,
                 n: float | None = None, C: float | None = None):
        if not callable(fn):
            raise SpecpruneError(f"evolution function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", "callable")
        self.m = _opt_float(m if m is not None else getattr(fn, "m", None))
        self.n = _opt_float(n if n is not None else getattr(fn, "n", None))
        self.C = _opt_float(C if C is not None else getattr(fn, "C", None))

    def __call__(self, lam: ArrayLike, t: ArrayLike) -> np.ndarray:
        lam = np.asarray(lam, dtype=float)
        t = np.asarray(t, dtype=float)
        try:
            out = self.fn(lam, t)
        except Exception as err:  # user code: report in one line
            raise SpecpruneError(
                f"evolution function {self.name!r} failed: {type(err).__name__}: {err}"
            ) from err
        out = np.asarray(out, dtype=float)
        if out.shape != np.broadcast_shapes(lam.shape, t.shape):
            out = np.broadcast_to(out, np.broadcast_shapes(lam.shape, t.shape, out.shape))
        return out


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def feature_exponent(beta: float) -> float:
    """Temporal exponent of feature learning (Bordelon & Pehlevan): p(β) = max(1, 2/(1+β))."""
    if not (math.isfinite(beta) and beta > -1):
        raise SpecpruneError(f"feature learning needs beta > -1, got {beta!r}")
    return max(1.0, 2.0 / (1.0 + beta))


def _take(params: dict[str, Any], allowed: set[str], what: str) -> dict[str, float]:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SpecpruneError(
            f"{what}: unknown parameter(s) {', '.join(unknown)} "
            f"(accepted: {', '.join(sorted(allowed)) or 'none'})"
        )
    out = {}
    for key, val in params.items():
        try:
            out[key] = float(val)
        except (TypeError, ValueError):
            raise SpecpruneError(f"{what}: parameter {key} must be a number, got {val!r}") from None
        if not math.isfinite(out[key]):
            raise SpecpruneError(f"{what}: parameter {key} must be finite, got {val!r}")
    return out


def ntk_factory(**params: Any) -> Monomial:
    """NTK / lazy regime: g = λ t (optionally C λ t with ``C=``)."""
    p = _take(params, {"C", "c"}, "ntk")
    C = p.get("C", p.get("c", 1.0))
    return Monomial(1.0, 1.0, C, name="ntk" if C == 1.0 else f"ntk(C={C:g})")


def feature_factory(**params: Any) -> Monomial:
    """Feature learning: g = λ t^p(β), p(β) = max(1, 2/(1+β)). Needs ``beta``."""
    p = _take(params, {"beta", "C", "c"}, "feature")
    if "beta" not in p:
        raise SpecpruneError("feature: missing parameter beta (e.g. feature:beta=0.5)")
    C = p.get("C", p.get("c", 1.0))
    expo = feature_exponent(p["beta"])
    suffix = "" if C == 1.0 else f",C={C:g}"
    return Monomial(1.0, expo, C, name=f"feature(beta={p['beta']:g}{suffix})")


def monomial_factory(**params: Any) -> Monomial:
    """g = C λ^m t^n. Needs ``m`` and ``n``; ``C`` defaults to 1."""
    p = _take(params, {"m", "n", "C", "c"}, "monomial")
    missing = [k for k in ("m", "n") if k not in p]
    if missing:
        raise SpecpruneError(f"monomial: missing parameter(s) {', '.join(missing)} (e.g. monomial:m=2,n=1.5)")
    return Monomial(p["m"], p["n"], p.get("C", p.get("c", 1.0)))


def polynomial_factory(**params: Any) -> Polynomial:
    """Σ_i C_i λ^(m_i) t^(n_i) from ``m1=,n1=[,C1=],m2=,n2=[,C2=],...`` (C_i default 1)."""
    groups: dict[int, dict[str, float]] = {}
    for key, val in params.items():
        head, idx = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
        if head.lower() not in ("m", "n", "c") or not idx:
            raise SpecpruneError(f"polynomial: unknown parameter {key} (use m1,n1,C1,m2,n2,C2,...)")
        groups.setdefault(int(idx), {})[head.upper() if head.lower() == "c" else head] = \
            _take({key: val}, {key}, "polynomial")[key]
    terms = []
    for i in sorted(groups):
        grp = groups[i]
        if "m" not in grp or "n" not in grp:
            raise SpecpruneError(f"polynomial: term {i} needs both m{i} and n{i}")
        terms.append((grp.get("C", 1.0), grp["m"], grp["n"]))
    return Polynomial(terms)


def _parse_value(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name:key=val,key=val`` into (name, params); numbers become floats."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecpruneError("evolution spec must be a non-empty string such as ntk, feature:beta=0.5")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise SpecpruneError(f"evolution spec {spec!r} has no name")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not key or not val:
                raise SpecpruneError(f"evolution spec {spec!r}: expected key=value, got {item.strip()!r}")
            if key in params:
                raise SpecpruneError(f"evolution spec {spec!r}: parameter {key} given twice")
            params[key] = _parse_value(val)
    return name, params


def as_evolution(obj: Any, name: str | None = None) -> Evolution:
    """Coerce an Evolution, a plain callable g(lam, t) or a spec string into an Evolution."""
    if isinstance(obj, Evolution):
        return obj
    if isinstance(obj, str):
        return parse_g(obj)
    if callable(obj):
        return CallableEvolution(obj, name=name)
    raise SpecpruneError(f"cannot use {type(obj).__name__} as an evolution function g(lam, t)")


def _is_plain_g(obj: Any) -> bool:
    """True for a function with two required positional parameters (g(lam, t)), not a factory."""
    import inspect

    if isinstance(obj, type) or not callable(obj):
        return False
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    required = [p for p in sig.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def parse_g(spec: str | GFunc | Evolution) -> Evolution:
    """Resolve a g spec: ``ntk``, ``feature:beta=0.5``, ``monomial:m=2,n=1.5[,C=..]``, a registered
    plugin name (``name`` or ``name:key=val,...``), or a Python callable g(lam, t).

    Plugins are factories registered in the ``specprune.evolution`` entry-point group; they are
    called with the parsed params and may return an :class:`Evolution` or any vectorised callable."""
    if not isinstance(spec, str):
        return as_evolution(spec)
    from .. import registry

    name, params = parse_spec(spec)
    factory = registry.get("evolution", name)
    if not params and _is_plain_g(factory):  # a plugin may register g(lam, t) itself
        return CallableEvolution(factory, name=name)
    try:
        obj = factory(**params)
    except SpecpruneError:
        raise
    except TypeError as err:
        raise SpecpruneError(f"evolution {name!r}: bad parameters {params}: {err}") from err
    except Exception as err:  # plugin code
        raise SpecpruneError(f"evolution {name!r} failed to build: {type(err).__name__}: {err}") from err
    if isinstance(obj, Evolution):
        return obj
    if callable(obj):
        return CallableEvolution(obj, name=spec.strip())
    raise SpecpruneError(f"evolution plugin {name!r} returned {type(obj).__name__}, not a callable g(lam, t)")
