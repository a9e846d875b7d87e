"""The report renders in a real browser: headless Chromium loads report.html offline, every embedded
image decodes (complete, non-zero natural size), and a screenshot of the page is not blank.

Needs ``chromium`` on PATH (CI: ``apt-get install -y chromium``); skipped otherwise."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

_CHECK = ("<script>window.addEventListener('load',function(){var r=[];for(var i=0;i<document.images.length;i++)"
          "{var m=document.images[i];r.push([m.complete?1:0,m.naturalWidth,m.naturalHeight]);}"
          "document.body.setAttribute('data-images',JSON.stringify(r));});</script>")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_dirs) -> Path:
    """A report of a real compress run (tiny BERT, generated text) with the demo's sweep."""
    from specprune.demo import DemoSettings, run_sweep
    from specprune.io import dumps
    from specprune.models import load_model
    from specprune.pipeline import DataSpec, compress
    from specprune.report.document import write_report
    from specprune.textgen import write_text

    root = tmp_path_factory.mktemp("render")
    text = write_text(root / "text.txt", max_words=3000)
    src = str(tiny_dirs["bert"])
    spec = DataSpec([str(text)], None, 16, 32, 8, 0)
    compress(load_model(src), spec, 0.05, root / "compressed", inputs=[src, str(text)])
    sweep = run_sweep(src, root / "compressed" / "analysis", root / "compressed" / "plan.json", spec,
                      DemoSettings.make(0.05, fast=True))
    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.json").write_text(dumps(sweep), encoding="utf-8")
    write_report([root / "compressed", root / "sweep"], root / "report")
    return root / "report"


def test_report_renders_with_all_images_loaded(report_dir, tmp_path):
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    n_png = len(list(report_dir.glob("*.png")))
    assert n_png >= 5 and html.count("<img ") == n_png
    # a copy with a probe script: the report itself stays script-free
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    res = _chromium(tmp_path / "profile-dom", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    m = re.search(r'data-images="([^"]*)"', res.stdout)
    assert m, f"chromium did not load the page: {res.stderr[-2000:]}"
    images = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(images) == n_png
    for complete, width, height in images:
        assert complete == 1 and width > 100 and height > 100, images


def test_report_screenshot_is_not_blank(report_dir, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path / "profile-shot", "--window-size=1200,5000", "--virtual-time-budget=15000",
                    f"--screenshot={shot}", (report_dir / "report.html").as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    img = imread(str(shot))[..., :3]
    assert img.shape[0] == 5000 and img.shape[1] == 1200
    ink = np.any(img < 0.9, axis=-1)
    assert ink.mean() > 0.05, f"page is nearly blank ({ink.mean():.1%} non-white)"
    rows = ink.any(axis=1)
    assert rows.mean() > 0.5, "content covers less than half of the page height"
    # colour is present (the figures), not just black text
    colourful = (img.max(axis=-1) - img.min(axis=-1)) > 0.2
    assert colourful.mean() > 0.005
