"""specprune.registry: entry-point discovery (lazy, cached), broken plugins, duplicate names,
near-match suggestions, the autoload switch, and ``specprune plugins``.

Third-party plugins are real installed distributions: a temporary directory on ``sys.path`` holding
``NAME-VERSION.dist-info/{METADATA,entry_points.txt}`` and the plugin's module, which is exactly what
``importlib.metadata`` reads for a pip-installed package."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from specprune import registry
from specprune.errors import SpecpruneError


class FakeSite:
    """A directory on sys.path that 'installs' distributions with entry points."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def install(self, dist: str, version: str, entry_points: dict[str, dict[str, str]],
                modules: dict[str, str] | None = None) -> None:
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
                                       encoding="utf-8")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{name} = {value}" for name, value in eps.items()]
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
        for mod, source in (modules or {}).items():
            (self.root / f"{mod}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            self.modules.append(mod)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    root = tmp_path / "site"
    root.mkdir()
    fake = FakeSite(root)
    sys.path.insert(0, str(root))
    registry.clear_cache()
    try:
        yield fake
    finally:
        sys.path.remove(str(root))
        for mod in fake.modules:
            sys.modules.pop(mod, None)
        registry.clear_cache()


GOOD_G = """
    LOADED = True

    def factory(**params):
        k = float(params.get("k", 2.0))

        def g(lam, t):
            return lam * t ** k

        return g
"""


def _names(kind: str) -> list[str]:
    return [p.name for p in registry.available(kind)]


# --------------------------------------------------------------------------------------------
# built-ins go through the same path


def test_builtins_are_entry_points_with_package_and_version():
    from importlib import metadata

    registry.clear_cache()
    version = metadata.version("specprune")
    evo = {p.name: p for p in registry.available("evolution")}
    assert {"ntk", "feature", "monomial"} <= set(evo)
    ntk = evo["ntk"]
    assert (ntk.kind, ntk.package, ntk.version, ntk.builtin) == ("evolution", "specprune", version, True)
    assert ntk.value == "specprune.theory.evolution:ntk_factory"
    assert {"spectral", "whitened", "magnitude", "rtn"} <= set(_names("compressors"))
    assert {"linear", "conv1d-hf", "conv"} <= set(_names("adapters"))
    assert _names("evolution") == sorted(_names("evolution"))
    from specprune.theory.evolution import ntk_factory

    assert registry.get("evolution", "ntk") is ntk_factory


def test_unknown_kind_is_a_known_error():
    with pytest.raises(SpecpruneError, match="unknown plugin kind 'evolutions'"):
        registry.available("evolutions")


# --------------------------------------------------------------------------------------------
# lazy and cached


def test_discovery_is_lazy_nothing_imported_until_get(site):
    site.install("fakeplug-good", "1.2.3", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    info = {p.name: p for p in registry.available("evolution")}["fake-g"]
    assert (info.package, info.version, info.builtin, info.value) == ("fakeplug-good", "1.2.3", False,
                                                                      "fakeplug_good:factory")
    assert "fakeplug_good" not in sys.modules  # listing reads metadata only
    factory = registry.get("evolution", "fake-g")
    assert "fakeplug_good" in sys.modules
    assert factory is sys.modules["fakeplug_good"].factory
    assert registry.get("evolution", "fake-g") is factory  # loaded once, cached


def test_discovery_is_cached_until_clear_cache(site):
    before = _names("evolution")
    site.install("fakeplug-late", "0.1", {"specprune.evolution": {"late-g": "fakeplug_late:factory"}},
                 {"fakeplug_late": GOOD_G})
    assert _names("evolution") == before  # the scan is cached: no rescan per call
    registry.clear_cache()
    assert "late-g" in _names("evolution")


def test_plugin_g_works_through_parse_g(site):
    import numpy as np

    from specprune.theory.evolution import parse_g

    site.install("fakeplug-good", "1.0", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    g = parse_g("fake-g:k=3")
    assert np.allclose(g(np.array([2.0]), np.array([2.0])), [16.0])


# --------------------------------------------------------------------------------------------
# broken plugins


BROKEN = """
    raise RuntimeError("this plugin is broken on purpose")
"""


def test_broken_plugin_warns_and_is_skipped_by_load_all(site):
    site.install("fakeplug-broken", "0.0.1", {"specprune.evolution": {"broken-g": "fakeplug_broken:factory"},
                                              "specprune.adapters": {"broken-adapter": "fakeplug_broken:A"}},
                 {"fakeplug_broken": BROKEN})
    site.install("fakeplug-good", "1.0", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    assert "broken-g" in _names("evolution")  # listed: discovery does not import it
    with pytest.warns(RuntimeWarning, match="broken-g.*failed to load.*broken on purpose"):
        loaded = registry.load_all("evolution")
    assert "broken-g" not in loaded
    assert {"fake-g", "ntk", "monomial"} <= set(loaded)


def test_broken_plugin_get_is_one_line_error(site):
    site.install("fakeplug-broken", "0.0.1", {"specprune.evolution": {"broken-g": "fakeplug_broken:factory"}},
                 {"fakeplug_broken": BROKEN})
    site.install("fakeplug-noattr", "0.0.1", {"specprune.evolution": {"noattr-g": "fakeplug_noattr:missing"}},
                 {"fakeplug_noattr": "X = 1\n"})
    registry.clear_cache()
    with pytest.raises(SpecpruneError) as err:
        registry.get("evolution", "broken-g")
    msg = str(err.value)
    assert "\n" not in msg and "broken-g" in msg and "RuntimeError" in msg
    with pytest.raises(SpecpruneError, match="noattr-g.*failed to load.*AttributeError"):
        registry.get("evolution", "noattr-g")


def test_broken_adapter_plugin_does_not_break_layer_selection(site):
    from torch import nn

    from specprune.layers import select_layers

    site.install("fakeplug-broken", "0.0.1", {"specprune.adapters": {"broken-adapter": "fakeplug_broken:A"}},
                 {"fakeplug_broken": BROKEN})
    registry.clear_cache()
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(RuntimeWarning, match="broken-adapter"):
        layers = select_layers(model)
    assert [t.name for t in layers] == ["0", "2"]


# --------------------------------------------------------------------------------------------
# duplicates


def test_duplicate_names_error_names_both_packages(site):
    site.install("fakeplug-one", "1.0", {"specprune.compressors": {"dup": "fakeplug_one:C"}},
                 {"fakeplug_one": "class C: pass\n"})
    site.install("fakeplug-two", "2.0", {"specprune.compressors": {"dup": "fakeplug_two:C"}},
                 {"fakeplug_two": "class C: pass\n"})
    registry.clear_cache()
    listed = [p for p in registry.available("compressors") if p.name == "dup"]  # listing does not fail
    assert sorted(p.package for p in listed) == ["fakeplug-one", "fakeplug-two"]
    assert all(p.conflict and "fakeplug-one" in p.conflict and "fakeplug-two" in p.conflict for p in listed)
    assert not any(p.conflict for p in registry.available("compressors") if p.name != "dup")
    with pytest.raises(registry.PluginConflict) as err:
        registry.get("compressors", "dup")  # using the name does
    msg = str(err.value)
    assert "'dup'" in msg and "fakeplug-one" in msg and "fakeplug-two" in msg and "\n" not in msg
    assert isinstance(err.value, SpecpruneError)  # the CLI turns it into one line, exit 1
    assert registry.get("compressors", "magnitude") is not None  # other names of the kind still work
    assert "ntk" in _names("evolution")  # other kinds are unaffected


def test_shadowing_a_builtin_is_a_conflict_too(site):
    site.install("fakeplug-shadow", "1.0", {"specprune.evolution": {"ntk": "fakeplug_shadow:factory"}},
                 {"fakeplug_shadow": GOOD_G})
    registry.clear_cache()
    both = "specprune.*fakeplug-shadow|fakeplug-shadow.*specprune"
    with pytest.raises(registry.PluginConflict, match=both):
        registry.get("evolution", "ntk")


# --------------------------------------------------------------------------------------------
# unknown names


def test_unknown_name_gets_near_match_suggestion():
    registry.clear_cache()
    with pytest.raises(SpecpruneError, match=r"unknown evolution 'ntkk'; did you mean 'ntk'\?"):
        registry.get("evolution", "ntkk")
    with pytest.raises(SpecpruneError, match=r"did you mean 'magnitude'\?"):
        registry.get("compressors", "magnitud")
    with pytest.raises(SpecpruneError) as err:
        registry.get("compressors", "zzzzzz")
    assert "did you mean" not in str(err.value) and "known:" in str(err.value)


# --------------------------------------------------------------------------------------------
# autoload switch


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_autoload_env_disables_third_party_but_keeps_builtins(site, monkeypatch, value):
    site.install("fakeplug-good", "1.0", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    assert "fake-g" in _names("evolution")
    monkeypatch.setenv(registry.AUTOLOAD_ENV, value)
    names = _names("evolution")
    assert "fake-g" not in names and {"ntk", "feature", "monomial"} <= set(names)
    assert all(p.builtin for kind in registry.KINDS for p in registry.available(kind))
    with pytest.raises(SpecpruneError, match="unknown evolution 'fake-g'"):
        registry.get("evolution", "fake-g")
    assert "fakeplug_good" not in sys.modules
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "0")
    assert "fake-g" in _names("evolution")


# --------------------------------------------------------------------------------------------
# specprune plugins


def _cli(*args: str):
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return CliRunner().invoke(app, list(args))


def test_plugins_command_json_lists_third_party_and_builtins(site):
    site.install("fakeplug-good", "1.2.3", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    res = _cli("plugins", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    by = {(r["kind"], r["name"]): r for r in rows}
    assert by[("evolution", "fake-g")] == {"kind": "evolution", "name": "fake-g", "package": "fakeplug-good",
                                           "version": "1.2.3", "value": "fakeplug_good:factory",
                                           "builtin": False, "conflict": None}
    assert by[("compressors", "rtn")]["builtin"] is True
    assert {r["kind"] for r in rows} == set(registry.KINDS)
    assert "fakeplug_good" not in sys.modules  # listing does not import plugins


def test_plugins_command_check_reports_broken_plugin(site):
    site.install("fakeplug-broken", "0.0.1", {"specprune.evolution": {"broken-g": "fakeplug_broken:factory"}},
                 {"fakeplug_broken": BROKEN})
    registry.clear_cache()
    res = _cli("plugins", "--kind", "evolution", "--check", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["broken-g"]["loaded"] is False and "broken on purpose" in rows["broken-g"]["error"]
    assert rows["ntk"]["loaded"] is True and rows["ntk"]["error"] is None
    assert {r["kind"] for r in rows.values()} == {"evolution"}


def test_plugins_command_human_table_and_errors(site):
    site.install("fakeplug-good", "1.2.3", {"specprune.evolution": {"fake-g": "fakeplug_good:factory"}},
                 {"fakeplug_good": GOOD_G})
    registry.clear_cache()
    res = _cli("plugins")
    assert res.exit_code == 0, res.output
    assert "fake-g" in res.stdout and "fakeplug-good" in res.stdout and "1.2.3" in res.stdout
    bad = _cli("plugins", "--kind", "metric")
    assert bad.exit_code == 1 and "did you mean 'metrics'" in bad.stderr
    site.install("fakeplug-two", "2.0", {"specprune.evolution": {"fake-g": "fakeplug_two:factory"}})
    registry.clear_cache()
    dup = _cli("plugins")  # a conflict is listed and marked, not an error of the listing
    assert dup.exit_code == 0, dup.output
    assert "fakeplug-good" in dup.stdout and "fakeplug-two" in dup.stdout and "conflict" in dup.stdout
    warning, = dup.stderr.splitlines()
    assert warning.startswith("specprune: warning: evolution plugin 'fake-g' is registered by both")


# --------------------------------------------------------------------------------------------
# plugins that fail while in use (QA findings F3-F8): skipped with one warning where specprune
# loads every plugin of a kind, one line naming the plugin where it is used by name


RAISING_ADAPTER = """
    CALLS = []

    class Raises:
        name = "raises-adapter"
        token_shaped = True

        def matches(self, module):
            CALLS.append(type(module).__name__)
            raise RuntimeError("matches boom")

    class BadInit:
        name = "badinit-adapter"

        def __init__(self):
            raise ValueError("init boom")
"""

TINY_MODEL = """
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))
"""

COMPRESSORS = """
    class RaisesInit:
        name = "raises-init"
        kind = "prune"
        needs_covariance = False

        def __init__(self):
            raise RuntimeError("init boom")

        def apply(self, layer, layer_plan, covariance=None):
            return None

    class ApplyRaises:
        name = "apply-raises"
        kind = "prune"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            layer.module.weight.data.zero_()  # touched first: must be put back
            raise ValueError("apply boom")

    class ReturnsJunk:
        name = "returns-junk"
        kind = "prune"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            layer.module.weight.data.zero_()
            return "junk"

    class QuantJunk:
        name = "quant-junk"
        kind = "quantize"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            return 42

    NOT_CALLABLE = 3

    def metric_raises(model, batch, device=None):
        raise RuntimeError("metric boom")

    def metric_nan(model, batch, device=None):
        return float("nan"), 1

    def metric(model, batch, device=None):
        return 1.0, 1
"""


def _install_adapters(site, **extra):
    site.install("fakeplug-badadapter", "0.3", {"specprune.adapters": {
        "raises-adapter": "fakeplug_badadapter:Raises", "badinit-adapter": "fakeplug_badadapter:BadInit",
        "missing-adapter": "fakeplug_nonexistent_module:A", **extra}},
        {"fakeplug_badadapter": RAISING_ADAPTER})
    registry.clear_cache()


def test_adapter_whose_matches_raises_is_skipped_with_one_warning(site):
    import warnings

    from torch import nn

    from specprune.layers import adapter_for, select_layers

    _install_adapters(site)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 2), nn.Tanh())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layers = select_layers(model)
        assert adapter_for(nn.GELU()) is None  # later lookups skip it silently
        select_layers(model)
    assert [t.name for t in layers] == ["0", "3"]
    mine = [w for w in seen if issubclass(w.category, registry.PluginWarning)]
    texts = [str(w.message) for w in mine]
    raising = [t for t in texts if "raises-adapter" in t]
    assert len(raising) == 1, texts  # once per adapter, not once per module or per call
    assert "fakeplug-badadapter" in raising[0] and "fakeplug_badadapter:Raises" in raising[0]
    assert "matches()" in raising[0] and "RuntimeError" in raising[0] and "matches boom" in raising[0]
    assert len([t for t in texts if "badinit-adapter" in t and "init boom" in t]) == 1
    assert len([t for t in texts if "missing-adapter" in t and "failed to load" in t]) == 1
    assert len(mine) == 3 and all(issubclass(w.category, RuntimeWarning) for w in mine)
    calls = sys.modules["fakeplug_badadapter"].CALLS
    assert calls == ["LayerNorm"]  # asked once (the first module no built-in reads), then never again
    registry.clear_cache()  # forgets the failure: a fixed plugin would be tried again
    assert not registry.is_disabled("adapters", "raises-adapter")


def _tiny_model_file(site, tmp_path) -> Path:
    import torch

    site.install("fakeplug-models", "1.0", {}, {"fakeplug_models": TINY_MODEL})
    import fakeplug_models

    path = tmp_path / "tiny.pt"
    torch.save(fakeplug_models.build().state_dict(), path)
    return path


def test_cli_prints_plugin_warnings_as_one_line_each(site, tmp_path):
    _install_adapters(site)
    model = _tiny_model_file(site, tmp_path)
    res = _cli("prune", str(model), "--arch", "fakeplug_models:build", "--rate", "0.5", "--method", "magnitude",
               "--out", str(tmp_path / "out"), "--format", "json")
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)
    lines = res.stderr.splitlines()
    plugin_lines = [ln for ln in lines if "adapter" in ln]
    assert len(plugin_lines) == 3, res.stderr  # each once, however many modules and lookups
    assert all(ln.startswith("specprune: warning: ") for ln in plugin_lines), res.stderr
    assert not any("RuntimeWarning" in ln or ".py:" in ln or "warnings.warn" in ln for ln in lines), res.stderr
    raising, = [ln for ln in plugin_lines if "raises-adapter" in ln]
    assert "fakeplug-badadapter" in raising and "matches boom" in raising


def test_conflict_fails_only_where_the_name_is_used(site, tmp_path):
    site.install("fakeplug-shadow", "1.0", {"specprune.compressors": {"magnitude": "fakeplug_shadow:C"}},
                 {"fakeplug_shadow": "class C: pass\n"})
    registry.clear_cache()
    model = _tiny_model_file(site, tmp_path)
    common = [str(model), "--arch", "fakeplug_models:build", "--format", "json"]
    ok = _cli("prune", *common, "--rate", "0.5", "--method", "spectral", "--out", str(tmp_path / "a"))
    assert ok.exit_code == 0, ok.output  # compressors are usable: only 'magnitude' is not
    bad = _cli("prune", *common, "--rate", "0.5", "--method", "magnitude", "--out", str(tmp_path / "b"))
    assert bad.exit_code == 1 and bad.stdout == ""
    line, = bad.stderr.splitlines()
    assert line.startswith("specprune: error: compressors plugin 'magnitude' is registered by both specprune (")
    assert "fakeplug-shadow (fakeplug_shadow:C)" in line
    listing = _cli("plugins", "--kind", "compressors", "--check", "--format", "json")
    assert listing.exit_code == 0, listing.output
    rows = [r for r in json.loads(listing.stdout) if r["name"] == "magnitude"]
    assert [(r["package"], r["builtin"]) for r in rows] == [("specprune", True), ("fakeplug-shadow", False)]
    assert all(r["conflict"] and r["loaded"] is False and r["error"] == r["conflict"] for r in rows)
    assert listing.stderr.count("specprune: warning: compressors plugin 'magnitude' is registered by both") == 1
    others = [r for r in json.loads(listing.stdout) if r["name"] != "magnitude"]
    assert others and all(r["conflict"] is None and r["loaded"] for r in others)


def _install_compressors(site):
    site.install("fakeplug-comp", "0.2", {
        "specprune.compressors": {"raises-init": "fakeplug_comp:RaisesInit",
                                  "apply-raises": "fakeplug_comp:ApplyRaises",
                                  "returns-junk": "fakeplug_comp:ReturnsJunk", "quant-junk": "fakeplug_comp:QuantJunk"},
        "specprune.evolution": {"evo-notcallable": "fakeplug_comp:NOT_CALLABLE"},
        "specprune.metrics": {"metric-notcallable": "fakeplug_comp:NOT_CALLABLE", "metric-ok": "fakeplug_comp:metric",
                              "metric-raises": "fakeplug_comp:metric_raises",
                              "metric-nan": "fakeplug_comp:metric_nan"}},
        {"fakeplug_comp": COMPRESSORS})
    registry.clear_cache()


def _plan(layers):
    from specprune.plan import Plan

    return Plan(model={"source": "test", "fingerprint": ""}, tolerance=0.0, metric="none", layers=layers)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_errors_inside_plugin_code_name_the_plugin(site):
    import torch
    from torch import nn

    from specprune.compress.apply import apply_, get_compressor
    from specprune.plan import LayerPlan

    _install_compressors(site)
    with pytest.raises(SpecpruneError) as err:
        get_compressor("raises-init")
    assert str(err.value) == "compressor 'raises-init' (fakeplug-comp) failed: RuntimeError: init boom"
    assert isinstance(err.value.__cause__, RuntimeError)  # kept for --debug

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _state(model)
    plan = _plan({"0": LayerPlan(method="magnitude", prune_rate=0.5),
                  "2": LayerPlan(method="apply-raises", prune_rate=0.5)})
    with pytest.raises(SpecpruneError) as err:
        apply_(model, plan)
    assert str(err.value) == "compressor 'apply-raises' (fakeplug-comp) failed on layer 2: ValueError: apply boom"
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # every touched layer put back

    with pytest.raises(SpecpruneError, match=r"^evolution 'evo-notcallable' \(fakeplug-comp\): its entry point "
                                             r"fakeplug_comp:NOT_CALLABLE is not callable \(an object of type int"):
        registry.get("evolution", "evo-notcallable")
    with pytest.raises(SpecpruneError, match="metric 'metric-notcallable' .* is not callable"):
        registry.get("metrics", "metric-notcallable")
    assert callable(registry.get("metrics", "metric-ok"))


def test_builtin_compressor_errors_are_not_reworded(site):
    _install_compressors(site)
    # a bug in specprune itself keeps its type (and a trace with --debug)
    with pytest.raises(ZeroDivisionError), registry.blame("compressors", "magnitude"):
        raise ZeroDivisionError("x")
    # not a registered plugin (e.g. an object handed in directly)
    with pytest.raises(KeyError), registry.blame("compressors", "no-such-plugin"):
        raise KeyError("x")
    with pytest.raises(KeyboardInterrupt), registry.blame("compressors", "apply-raises"):
        raise KeyboardInterrupt
    # known errors pass as they are
    with pytest.raises(SpecpruneError, match="^plugin's own words$"), registry.blame("compressors", "apply-raises"):
        raise SpecpruneError("plugin's own words")


def test_apply_returning_something_else_is_a_protocol_error(site):
    import torch
    from torch import nn

    from specprune.compress.apply import apply_
    from specprune.plan import LayerPlan

    _install_compressors(site)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _state(model)
    for method, bits in (("returns-junk", None), ("quant-junk", 4)):
        plan = _plan({"0": LayerPlan(method=method, prune_rate=0.0 if bits else 0.5, bits=bits)})
        with pytest.raises(SpecpruneError) as err:
            apply_(model, plan)
        msg = str(err.value)
        assert msg.startswith(f"compressor {method!r} (fakeplug-comp) does not follow the compressor protocol: "
                              "apply() on layer 0 returned a "), msg
        assert msg.endswith("not None or an nn.Module")
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)  # the zeroed weight is put back


def test_cli_plugin_failures_are_one_line_naming_the_plugin(site, tmp_path):
    _install_compressors(site)
    model = _tiny_model_file(site, tmp_path)
    common = [str(model), "--arch", "fakeplug_models:build", "--rate", "0.5", "--format", "json"]
    expect = {
        "raises-init": "compressor 'raises-init' (fakeplug-comp) failed: RuntimeError: init boom",
        "apply-raises": "compressor 'apply-raises' (fakeplug-comp) failed on layer 0: ValueError: apply boom",
        "returns-junk": "compressor 'returns-junk' (fakeplug-comp) does not follow the compressor protocol: "
                        "apply() on layer 0 returned a str, not None or an nn.Module",
        "rtn": "plan layer 0: 'rtn' is a quantizer, not a prune method (a layer using it needs bits)",
    }
    for method, line in expect.items():
        out = tmp_path / f"out-{method}"
        res = _cli("prune", *common, "--method", method, "--out", str(out))
        assert res.exit_code == 1, (method, res.output)
        assert res.stderr.splitlines() == [f"specprune: error: {line}"], res.stderr
        assert res.stdout == "" and not out.exists()
    res = _cli("theory", "exponents", "--a", "1.5", "--b", "2", "--g", "evo-notcallable")
    assert res.exit_code == 1
    line, = res.stderr.splitlines()
    assert "evo-notcallable" in line and "fakeplug-comp" in line and "not callable" in line
    assert "bad parameters" not in line


def test_metric_plugin_failures_name_the_metric(site):
    """A metric plugin that raises names itself and its package; one returning NaN is blamed, not the data."""
    import torch
    from torch import nn

    from specprune.errors import InputError
    from specprune.evaluation import evaluate

    _install_compressors(site)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    x = torch.randn(8, 6)
    with pytest.raises(SpecpruneError) as err:
        evaluate(model, [x], reference=model, metric="metric-raises")
    assert str(err.value) == "metric 'metric-raises' (fakeplug-comp) failed: RuntimeError: metric boom"
    with pytest.raises(InputError, match=r"^the reference metric-nan is nan: the metric function 'metric-nan' "
                                         r"returned a non-finite \(sum, count\)"):
        evaluate(model, [x], reference=model, metric="metric-nan")


# ------------------------------------------------------------- plugin compressors through apply_ and save
PLUGIN_COMPRESSORS = """
    import torch
    from torch import nn

    from specprune.compress.quantize import fake_quantize_

    class HalfRTN:  # a real quantizer unlike the built-in one: halves W, then rounds to nearest
        name = "half-rtn"
        kind = "quantize"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            with torch.no_grad():
                layer.module.weight.mul_(0.5)
            fake_quantize_(layer.module, layer_plan.bits, layer_plan.group_size)

    class NoRecord:  # rounds in place but leaves no QuantRecord
        name = "no-record"
        kind = "quantize"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            with torch.no_grad():
                layer.module.weight.copy_((layer.module.weight * 8).round() / 8)

    class DenseLowRank:  # low_rank, but writes the truncation back in place
        name = "dense-lr"
        kind = "prune"
        low_rank = True
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            w = layer.module.weight.detach()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = layer_plan.rank
            with torch.no_grad():
                layer.module.weight.copy_((u[:, :k] * s[:k]) @ vh[:k])

    class SequentialLowRank:  # returns a replacement module that load cannot rebuild
        name = "seq-lr"
        kind = "prune"
        low_rank = True
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            m = layer.module
            return nn.Sequential(nn.Linear(m.in_features, layer_plan.rank, bias=False),
                                 nn.Linear(layer_plan.rank, m.out_features))
"""


@pytest.fixture
def plugin_compressors(site):
    site.install("fakeplug-comp", "1.0", {"specprune.compressors": {
        "half-rtn": "fakeplug_comp:HalfRTN", "no-record": "fakeplug_comp:NoRecord",
        "dense-lr": "fakeplug_comp:DenseLowRank", "seq-lr": "fakeplug_comp:SequentialLowRank"}},
        {"fakeplug_comp": PLUGIN_COMPRESSORS})
    registry.clear_cache()


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


def _plan0(**layer):
    from specprune.plan import LayerPlan

    return _plan({"0": LayerPlan(**layer)})


def test_a_plan_is_reapplied_with_the_quantizer_it_records(plugin_compressors):
    import torch

    from specprune.compress.apply import apply_
    from specprune.errors import InputError
    from specprune.plan import Plan

    first, plan = _mlp(), _plan0(bits=4)
    apply_(first, plan, quantizer="half-rtn")
    assert plan.details["quantizer"] == "half-rtn"
    again = _mlp()
    apply_(again, Plan.from_dict(plan.to_dict()))  # no quantizer given: the recorded one
    assert torch.equal(again[0].weight, first[0].weight)
    rtn, replan = _mlp(), Plan.from_dict(plan.to_dict())
    apply_(rtn, replan, quantizer="rtn")  # asked for explicitly: used, and recorded (no entry = rtn)
    assert not torch.equal(rtn[0].weight, first[0].weight) and "quantizer" not in replan.details
    missing = Plan.from_dict(dict(plan.to_dict(), details={"quantizer": "gone-q"}))
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"quantized with 'gone-q' \(details.quantizer\), which is not installed"):
        apply_(model, missing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_quantizer_that_leaves_no_record_breaks_the_protocol(plugin_compressors):
    import torch

    from specprune.compress.apply import apply_

    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecpruneError, match=r"'no-record' \(fakeplug-comp\) does not follow the compressor "
                                             r"protocol: apply\(\) on layer 0 left no QuantRecord"):
        apply_(model, _plan0(bits=3), quantizer="no-record")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # rolled back


def test_a_low_rank_layer_kept_dense_is_sized_dense_and_a_foreign_replacement_is_not_saved(
        plugin_compressors, tmp_path):
    from specprune.compress.apply import apply_
    from specprune.compress.saved import save_compressed
    from specprune.errors import InputError

    dense, plan = _mlp(), _plan0(method="dense-lr", rank=4)
    apply_(dense, plan)
    assert plan.size["params_after"] == plan.size["params_before"]  # truncated in place: nothing saved
    factored, fplan = _mlp(), _plan0(method="spectral", rank=4)
    with pytest.warns(UserWarning, match="plain SVD"):  # no covariance given: Σ = I
        apply_(factored, fplan)
    assert fplan.size["params_after"] == fplan.size["params_before"] - 32 * 32 + 4 * 64
    seq, splan = _mlp(), _plan0(method="seq-lr", rank=4)
    apply_(seq, splan)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="layer 0 was replaced by a Sequential, which specprune cannot rebuild"):
        save_compressed(seq, splan, out)
    assert list(out.iterdir()) == []


def test_a_plugin_shadowing_a_built_in_metric_makes_that_name_an_error(site):
    import torch
    from torch import nn

    from specprune.data import from_iterable
    from specprune.evaluation import Evaluator, check_metric

    site.install("fakeplug-shadows", "1.0", {"specprune.metrics": {
        "lm-loss": "fakeplug_shadows:metric", "output-mse": "fakeplug_shadows:metric"}},
        {"fakeplug_shadows": "def metric(model, batch, device=None):\n    return 1.0, 1\n"})
    registry.clear_cache()
    with pytest.raises(SpecpruneError, match="metrics plugin 'lm-loss' is registered by both specprune"):
        check_metric("lm-loss")
    check_metric("task-loss")  # the other names stay usable
    model = nn.Linear(4, 2)
    with pytest.raises(SpecpruneError, match="metrics plugin 'output-mse' is registered by both"):
        Evaluator(model, from_iterable([torch.randn(3, 4)]), metric="output-mse")
