"""``specprune plugins`` for plugin authors: ``--check`` runs the checks a plugin's first real use runs
(QA11 defect 8), a plugin under a name the CLI reserves is marked like a conflict (defect 7), and every
"plugin skipped" warning has one format, the one docs/plugins.md quotes (defect 9).

Plugins are throw-away distributions in a temporary directory on ``sys.path``
(``NAME-VERSION.dist-info/{METADATA,entry_points.txt}`` plus the module), as in tests/unit/test_registry.py."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import typing
import warnings
from pathlib import Path

import pytest

from specprune import registry
from specprune.errors import SpecpruneError

REPO = Path(__file__).resolve().parents[2]


def _install(root: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]], module: str,
             source: str) -> None:
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    lines = []
    for group, eps in entry_points.items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in eps.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site directory on sys.path; yields an ``install(dist, entry_points, module, source)`` function."""
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    root = tmp_path / "site"
    root.mkdir()
    modules: list[str] = []

    def install(dist, entry_points, module, source, version="0.1"):
        _install(root, dist, version, entry_points, module, source)
        modules.append(module)
        registry.clear_cache()

    sys.path.insert(0, str(root))
    registry.clear_cache()
    try:
        yield install
    finally:
        sys.path.remove(str(root))
        for mod in modules:
            sys.modules.pop(mod, None)
        registry.clear_cache()


def _cli(*args: str):
    from typer.testing import CliRunner

    from specprune.cli.app import app

    return CliRunner().invoke(app, list(args))


def _rows(*args: str) -> tuple[dict, str]:
    res = _cli("plugins", "--format", "json", *args)
    assert res.exit_code == 0, res.output
    return {(r["kind"], r["name"]): r for r in json.loads(res.stdout)}, res.stderr


# --------------------------------------------------------------------------------------------
# --check fails a plugin that its first use would refuse


FAILS_ON_USE = """
    import torch

    class NoKind:
        name = "no-kind"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            return None

    class InitRaises:
        name = "init-raises"
        kind = "prune"
        needs_covariance = False

        def __init__(self):
            raise RuntimeError("init boom")

        def apply(self, layer, layer_plan, covariance=None):
            return None

    class GoodPruner:
        name = "good-pruner"
        kind = "prune"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            return None

    def two_args(model, batch):
        return 1.0, 1

    class MetricNeedsArg:
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, model, batch, device=None):
            return 1.0, 1

    def good_metric(model, batch, device=None):
        return 1.0, 1

    class AdapterNeedsArg:
        name = "adapter-needs-arg"

        def __init__(self, x):
            self.x = x

    class GoodAdapter:
        name = "good-adapter"
        token_shaped = True

        def matches(self, module):
            return False
"""


def _install_fails_on_use(site):
    site("fakeplug-onuse", {
        "specprune.compressors": {"no-kind": "fakeplug_onuse:NoKind", "init-raises": "fakeplug_onuse:InitRaises",
                                  "good-pruner": "fakeplug_onuse:GoodPruner"},
        "specprune.metrics": {"two-args": "fakeplug_onuse:two_args", "needs-arg": "fakeplug_onuse:MetricNeedsArg",
                              "good-metric": "fakeplug_onuse:good_metric"},
        "specprune.adapters": {"adapter-needs-arg": "fakeplug_onuse:AdapterNeedsArg",
                               "good-adapter": "fakeplug_onuse:GoodAdapter"}},
        "fakeplug_onuse", FAILS_ON_USE)


def _use_error(fn, *args) -> str:
    with pytest.raises(SpecpruneError) as err:
        fn(*args)
    return str(err.value)


def test_check_reports_what_first_use_refuses(site):
    from specprune.compress.apply import get_compressor
    from specprune.evaluation import metric_function

    _install_fails_on_use(site)
    rows, stderr = _rows("--check")
    bad = {key: r for key, r in rows.items() if not r["loaded"]}
    assert set(bad) == {("compressors", "no-kind"), ("compressors", "init-raises"), ("metrics", "two-args"),
                        ("metrics", "needs-arg"), ("adapters", "adapter-needs-arg")}, bad
    assert all(r["error"] and "\n" not in r["error"] for r in bad.values())
    assert all(r["loaded"] and r["error"] is None for key, r in rows.items() if key not in bad)
    assert rows[("metrics", "output-mse")]["loaded"]  # a built-in marker, not a callable: still fine

    # the very error the first use gives, word for word
    registry.clear_cache()
    assert bad[("compressors", "no-kind")]["error"] == _use_error(get_compressor, "no-kind")
    assert "does not follow the compressor protocol" in bad[("compressors", "no-kind")]["error"]
    assert bad[("compressors", "init-raises")]["error"] == _use_error(get_compressor, "init-raises")
    assert "init boom" in bad[("compressors", "init-raises")]["error"]
    assert bad[("metrics", "two-args")]["error"] == _use_error(metric_function, "two-args")
    assert "must take (model, batch, device)" in bad[("metrics", "two-args")]["error"]
    assert bad[("metrics", "needs-arg")]["error"] == _use_error(metric_function, "needs-arg")
    assert "metric 'needs-arg' (fakeplug-onuse)" in bad[("metrics", "needs-arg")]["error"]

    adapter = bad[("adapters", "adapter-needs-arg")]["error"]
    assert adapter.startswith("adapters plugin 'adapter-needs-arg' (package fakeplug-onuse 0.1, entry point "
                              "fakeplug_onuse:AdapterNeedsArg) failed in __init__(): TypeError: ")
    registry.clear_cache()
    from specprune.layers import adapters

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapters()
    assert [str(w.message) for w in seen if issubclass(w.category, registry.PluginWarning)] == [adapter]
    assert stderr == ""  # the adapter's failure is its row's error, not a warning as well


def test_check_human_table_and_kind_filter(site):
    _install_fails_on_use(site)
    res = _cli("plugins", "--check", "--kind", "metrics")
    assert res.exit_code == 0, res.output
    assert "two-args" in res.stdout and "must take" in res.stdout
    rows, _ = _rows("--check", "--kind", "compressors")
    assert {k for k, _ in rows} == {"compressors"}
    assert not rows[("compressors", "no-kind")]["loaded"] and rows[("compressors", "good-pruner")]["loaded"]


# --------------------------------------------------------------------------------------------
# reserved names


RESERVED = """
    def metric(model, batch, device=None):
        return 1.0, 1

    def factory(**params):
        return lambda lam, t: lam * t

    class Quant:
        name = "fake"
        kind = "quantize"
        needs_covariance = False

        def apply(self, layer, layer_plan, covariance=None):
            return None
"""


def test_reserved_names_are_marked_like_conflicts(site):
    site("fakeplug-reserved", {
        "specprune.metrics": {"auto": "fakeplug_reserved:metric", "pkg:fn": "fakeplug_reserved:metric",
                              "fine-metric": "fakeplug_reserved:metric"},
        "specprune.evolution": {"g:x": "fakeplug_reserved:factory"},
        "specprune.compressors": {"fake": "fakeplug_reserved:Quant"}}, "fakeplug_reserved", RESERVED, version="2.0")
    rows, stderr = _rows("--check")
    reserved = {("metrics", "auto"): "--metric auto is specprune's automatic choice",
                ("metrics", "pkg:fn"): "module:callable", ("evolution", "g:x"): "--g reads what follows ':'",
                ("compressors", "fake"): "--backend fake is specprune's own RTN quantizer"}
    for key, why in reserved.items():
        row = rows[key]
        msg = row["conflict"]
        assert msg and msg.startswith(f"{key[0]} plugin {key[1]!r} of fakeplug-reserved (fakeplug_reserved:"), msg
        assert "reserved name" in msg and why in msg and msg.endswith("rename it") and "\n" not in msg
        assert row["loaded"] is False and row["error"] == msg
        assert f"specprune: warning: {msg}" in stderr.splitlines()
    fine = rows[("metrics", "fine-metric")]
    assert fine["conflict"] is None and fine["loaded"] is True
    assert len(stderr.splitlines()) == len(reserved)

    listing = _cli("plugins", "--kind", "metrics")  # the table marks the row too
    assert listing.exit_code == 0 and "reserved name" in listing.stdout
    assert registry.info("metrics", "auto").reserved == rows[("metrics", "auto")]["conflict"]
    assert registry.info("metrics", "fine-metric").reserved is None


# --------------------------------------------------------------------------------------------
# one format for every skipped-plugin warning, the one the docs quote


ADAPTERS = """
    class InitRaises:
        name = "init-raises"

        def __init__(self):
            raise ValueError("init boom")
"""

SKIP_LINE = re.compile(r"adapters plugin '[\w-]+' \(package \S+ \S+, entry point \S+:\w+\) "
                       r"failed (to load|in __init__\(\)|in matches\(\)): \w+: .*; skipped")


def test_skipped_plugin_warnings_share_one_format_and_the_docs_quote_it(site):
    from specprune.layers import adapters

    site("fakeplug-skip", {"specprune.adapters": {"init-raises": "fakeplug_skip:InitRaises",
                                                  "no-module": "fakeplug_nonexistent_module:A"}},
         "fakeplug_skip", ADAPTERS, version="1.5")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapters()
    texts = sorted(str(w.message) for w in seen if issubclass(w.category, registry.PluginWarning))
    assert texts == [
        ("adapters plugin 'init-raises' (package fakeplug-skip 1.5, entry point fakeplug_skip:InitRaises) failed in "
         "__init__(): ValueError: init boom; skipped"),
        ("adapters plugin 'no-module' (package fakeplug-skip 1.5, entry point fakeplug_nonexistent_module:A) failed "
         "to load: ModuleNotFoundError: No module named 'fakeplug_nonexistent_module'; skipped")]
    assert all(SKIP_LINE.fullmatch(t) for t in texts)
    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    quoted = re.findall(r"`specprune: warning: (adapters plugin [^`]*)`", docs)
    assert quoted and all(SKIP_LINE.fullmatch(q) for q in quoted), quoted


def test_docs_json_fields_and_metric_help_name_what_is_there():
    from specprune.cli.common import MetricOpt

    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    fields, = re.findall(r"`--format json` prints a list of `\{([^}]*)\}`", docs)
    assert [f.strip().strip('"') for f in fields.split(",")] == ["kind", "name", "package", "version", "value",
                                                                 "builtin", "conflict"]
    assert "candidate_delta" not in docs  # nothing in specprune calls it
    help_text = typing.get_args(MetricOpt)[1].help
    assert "plugin" in help_text and "auto" in help_text and "module:callable" in help_text
