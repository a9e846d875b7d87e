"""QA pass 9 (F9, F10, F12, F15, F16): density cap onset, exported warning classes, quiet toy training,
the demo directory's marker."""

from __future__ import annotations

import subprocess
import sys

import pytest

import specprune
from specprune import theory as T


def test_cap_onset_matches_the_closed_form_for_ntk():
    # g = ntk, b = 2: k* = t^(1/2); along P = p0 (C/c0)^s, δ = k*/P = δ0 (C/c0)^α, α = (1 − s)/2 − s
    c0, p0, s, cap = 1e12, 1e6, 0.2, 1.0
    delta0 = (c0 / p0) ** 0.5 / p0
    alpha = T.density_law(2.0, "ntk", s).alpha
    assert T.cap_onset(c0, p0, s, 2.0, "ntk", capacity_per_param=cap) == pytest.approx(
        c0 * (cap / delta0) ** (1 / alpha), rel=1e-9)
    assert T.cap_onset(c0, p0, s, 2.0, capacity_per_param=1e-4) == c0  # capped from the start
    assert T.cap_onset(c0, p0, 0.5, 2.0) is None  # s > s_opt: density falls, never capped
    # consistent with density(): just below the onset uncapped, at it capped
    on = T.cap_onset(c0, p0, s, 2.0, "feature:beta=0.2")
    below, at = (T.density(c, p0 * (c / c0) ** s, 2.0, "feature:beta=0.2")["capped"] for c in (on * 0.999, on))
    assert not below and at


def test_density_exponent_snaps_the_cancellation_to_zero():
    law = T.density_law(2.0, "ntk", T.compute_optimal_exponent(1.0, 2.0))
    assert law.alpha == 0.0 and law.cap_binds is False
    assert T.density_law(2.0, "ntk", 0.2).alpha == pytest.approx(0.2)


@pytest.mark.parametrize("name,module", [("InSampleVerificationWarning", "specprune.recommender"),
                                         ("IdentityCovarianceWarning", "specprune.compress.apply"),
                                         ("PluginWarning", "specprune.registry")])
def test_warning_classes_are_exported(name, module):
    """README names the warning classes; they are `specprune.<Name>` (QA F16)."""
    import importlib

    cls = getattr(specprune, name)
    assert cls is getattr(importlib.import_module(module), name) and issubclass(cls, Warning)
    assert name in specprune.__all__


def test_exported_warnings_keep_the_import_lazy():
    code = "import sys, specprune; assert 'torch' not in sys.modules; print(specprune.PluginWarning.__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_train_llama_writes_no_progress_bar(tmp_path, capfd):
    """`demo --quiet` with the Llama leaked transformers' "Writing model shards" bar (QA F15)."""
    from transformers.utils import logging as hf_logging

    from specprune.toy import train_llama

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        train_llama(tmp_path / "m", steps=1, hidden=32)
        err = capfd.readouterr().err
        assert "Writing model shards" not in err and "it/s" not in err
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting is restored
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert (tmp_path / "m" / "config.json").is_file()


def test_demo_directory_names_its_writer(tmp_path):
    from specprune.demo import MARKER, demo_directory

    with demo_directory(tmp_path / "o", what="examples/x.py") as d:
        assert (d / MARKER).read_text().startswith("examples/x.py running")
    assert not (tmp_path / "o" / MARKER).exists()
