"""The docs site builds as CI builds it (`mkdocs build --strict`: a broken link, a missing
snippet or a docstring mkdocstrings cannot parse fails), and its API page is read from the
docstrings."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from common import newcomer_env

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_mkdocs_build_strict_renders_the_api_from_the_docstrings(tmp_path: Path) -> None:
    mkdocs = str(MKDOCS) if MKDOCS.exists() else shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (scripts/setup.sh does)")
    site = tmp_path / "site"
    env = {**newcomer_env(), "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    api = html.unescape(re.sub(r"<[^>]+>", "", (site / "reference/api/index.html").read_text()))
    api = " ".join(api.split())
    # LocalSGDStrategy's own docstring, and an option's entry filled into its Args at import
    assert "Local SGD: each worker takes optimizer steps on its own data" in api
    assert "One step is one optimizer.step() call" in api
    # the pages that include BENCHMARKS.md and EXPERIMENTS.md (snippets), and the figures it links
    assert "Every benchmark prints a table" in (site / "benchmarks/index.html").read_text()
    assert '<h2 id="the-main-comparison-readme">' in (site / "experiments/index.html").read_text()
    assert (site / "experiments/compare_quickstart/report.png").is_file()
