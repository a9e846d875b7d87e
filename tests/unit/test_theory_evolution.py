"""Evolution functions: built-in factories, spec parsing, plugins and plain callables."""

from __future__ import annotations

import numpy as np
import pytest

from specprune import registry
from specprune import theory as T
from specprune.errors import SpecpruneError
from specprune.theory import evolution as E


def test_builtin_factories_registered_and_vectorised():
    names = {info.name for info in registry.available("evolution")}
    assert {"ntk", "feature", "monomial"} <= names
    lam = np.logspace(-6, 0, 7)
    ntk = T.parse_g("ntk")
    assert (ntk.m, ntk.n, ntk.C) == (1.0, 1.0, 1.0) and ntk.name == "ntk"
    np.testing.assert_allclose(ntk(lam, 10.0), lam * 10.0)
    feat = T.parse_g("feature:beta=0.2")
    assert feat.n == pytest.approx(5 / 3) and feat.m == 1.0
    np.testing.assert_allclose(feat(lam, 8.0), lam * 8.0 ** (5 / 3))
    mono = T.parse_g("monomial:m=2,n=1.5,C=3")
    assert (mono.m, mono.n, mono.C) == (2.0, 1.5, 3.0)
    np.testing.assert_allclose(mono(lam, 4.0), 3 * lam**2 * 8.0)
    assert mono(lam[:, None], np.array([1.0, 2.0])[None, :]).shape == (7, 2)


@pytest.mark.parametrize("spec,fragment", [
    ("ntkk", "did you mean 'ntk'"),
    ("monomial:m=2", "missing parameter(s) n"),
    ("monomial:m=2,n=1,z=3", "unknown parameter(s) z"),
    ("monomial:m=abc,n=1", "must be a number"),
    ("monomial:m=2,,n=1", "expected key=value"),
    ("monomial:m=2,m=3,n=1", "given twice"),
    ("monomial:m=0,n=1", "positive"),
    ("feature", "missing parameter beta"),
    ("feature:beta=-2", "beta > -1"),
    ("ntk:beta=1", "unknown parameter"),
    ("", "non-empty"),
    (":m=1", "no name"),
])
def test_bad_specs_are_one_line_known_errors(spec, fragment):
    with pytest.raises(SpecpruneError) as err:
        T.parse_g(spec)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_plugin_factory_and_plain_g(monkeypatch):
    calls = {}

    def factory(**params):
        calls.update(params)
        k = float(params.get("k", 1.0))
        return lambda lam, t: lam * t**k

    def plain_g(lam, t):
        return lam**2 * t

    real_get = registry.get

    def fake_get(kind, name):
        if kind == "evolution" and name == "myplug":
            return factory
        if kind == "evolution" and name == "plain":
            return plain_g
        return real_get(kind, name)

    monkeypatch.setattr(registry, "get", fake_get)
    ev = T.parse_g("myplug:k=2.5,mode=fast")
    assert calls == {"k": 2.5, "mode": "fast"}  # numbers parsed, other values kept as text
    assert isinstance(ev, T.CallableEvolution) and ev.name == "myplug:k=2.5,mode=fast"
    assert T.exponents(1.5, 2.0, ev).rho == pytest.approx(2.5, abs=1e-6)
    plain = T.parse_g("plain")
    assert T.exponents(1.5, 2.0, plain).rho == pytest.approx(0.5, abs=1e-6)


def test_broken_plugin_reports_one_line(monkeypatch):
    def factory(**params):
        raise RuntimeError("boom")

    monkeypatch.setattr(registry, "get", lambda kind, name: factory)
    with pytest.raises(SpecpruneError, match="failed to build: RuntimeError: boom"):
        T.parse_g("broken")
    monkeypatch.setattr(registry, "get", lambda kind, name: (lambda **p: 42))
    with pytest.raises(SpecpruneError, match="not a callable"):
        T.parse_g("weird")


def test_callable_failures_are_known_errors():
    def bad(lam, t):
        raise ZeroDivisionError("nope")

    with pytest.raises(SpecpruneError, match="ZeroDivisionError"):
        T.exponents(1.5, 2.0, bad)
    with pytest.raises(SpecpruneError):
        T.frontier_lambda(lambda lam, t: -lam * t, 1.0)  # negative g
    with pytest.raises(SpecpruneError):
        T.as_evolution(3.0)


def test_polynomial_factory():
    ev = E.polynomial_factory(m1=1, n1=1, m2=2, n2=3, C2=0.5)
    assert ev.terms == ((1.0, 1.0, 1.0), (0.5, 2.0, 3.0))
    lam = np.array([1e-3, 1e-2])
    np.testing.assert_allclose(ev(lam, 10.0), lam * 10 + 0.5 * lam**2 * 1000)
    assert T.asymptotics(ev).rho == 1.5
    with pytest.raises(SpecpruneError):
        E.polynomial_factory(m1=1)
    with pytest.raises(SpecpruneError):
        E.polynomial_factory(x1=1, m1=1, n1=1)


def test_numeric_asymptotics_survive_extreme_exponents():
    def g(lam, t):  # the frontier time overflows double range for tiny λ*: the probe must stop, not fail
        return lam**0.5 * t**0.02

    ex = T.exponents(1.5, 2.0, g)
    assert ex.rho == pytest.approx(0.04, abs=1e-6) and ex.rho_converged
    assert ex.gamma_regime == "power"
