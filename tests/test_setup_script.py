"""scripts/setup.sh says what it is doing, and keeps saying it while pip works (a fresh setup is
2-3 minutes of pip; with `pip install -q` alone it was silent that long)."""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checkout(folder: Path, *, pip: str, python: str) -> Path:
    """``folder`` holding the real scripts/setup.sh and a .venv whose pip and python are the
    given bash scripts."""
    (folder / "scripts").mkdir()
    (folder / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    (folder / ".venv" / "bin").mkdir(parents=True)
    for name, body in (("pip", pip), ("python", python)):
        path = folder / ".venv" / "bin" / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.slow
def test_setup_prints_what_it_does_at_least_every_heartbeat(tmp_path: Path) -> None:
    # a pip that takes 7 s, and a python that has torch
    pip = 'echo "pip $*" >> "$(dirname "$0")/pip.log"; sleep 7\n'
    _checkout(tmp_path, pip=pip, python='case "$*" in *localsgd*) echo "localsgd ready";; esac\n')
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "scripts/setup.sh"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LOCALSGD_SETUP_HEARTBEAT": "2"},
    )
    assert proc.stdout is not None
    lines = [(time.monotonic() - start, line.rstrip()) for line in proc.stdout]
    assert proc.wait(timeout=60) == 0, lines
    texts = [text for _, text in lines]
    assert texts[0].startswith("setup: installing localsgd") and texts[-1] == "localsgd ready", texts
    assert sum("setup: still installing localsgd" in t for t in texts) >= 2, texts
    times = [0.0] + [t for t, _ in lines]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 4, lines  # heartbeat 2 s, pip 7 s
    assert "install -q -e .[dev" in (tmp_path / ".venv" / "bin" / "pip.log").read_text()
    # and CI's default keeps the silence under 30 s
    default = re.search(r"LOCALSGD_SETUP_HEARTBEAT:-(\d+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert default and int(default[1]) <= 30


def test_setup_stops_with_the_step_that_failed(tmp_path: Path) -> None:
    _checkout(tmp_path, pip="echo 'ERROR: no matching distribution' >&2; exit 1\n", python="exit 0\n")
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "no matching distribution" in proc.stderr
    assert (
        "setup: installing localsgd and its dependencies (pip install -e .[dev,ft,docs,lm]) failed (exit 1)"
        in proc.stderr
    )
