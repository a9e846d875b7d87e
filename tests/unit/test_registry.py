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
    with pytest.raises(registry.PluginConflict) as err:
        registry.available("compressors")
    msg = str(err.value)
    assert "'dup'" in msg and "fakeplug-one" in msg and "fakeplug-two" in msg
    with pytest.raises(registry.PluginConflict):
        registry.get("compressors", "dup")
    assert isinstance(err.value, SpecpruneError)  # the CLI turns it into one line, exit 1
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
                                           "builtin": False}
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
    dup = _cli("plugins", "--format", "json")
    assert dup.exit_code == 1 and dup.stdout == ""
    assert "fakeplug-good" in dup.stderr and "fakeplug-two" in dup.stderr
