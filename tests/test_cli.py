"""The README's main command, end to end, at a reduced size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Single-process fits earlier in this pytest process leave their rendezvous variables behind.
_CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
}


@pytest.mark.integration
def test_quickstart_trains_both_methods_and_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "quickstart", "--epochs", "1", "--sync-every", "4"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_CLEAN_ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    baseline = next(line for line in lines if line.startswith("SGD baseline"))
    local = next(line for line in lines if line.startswith("Local SGD, H=4"))
    steps = int(baseline.split()[-2])
    assert steps > 20
    assert int(local.split()[-2]) == steps // 4  # comm rounds
    assert 0.1 < float(local.split()[-4]) <= 1.0  # a test accuracy


def test_quickstart_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "quickstart", "--sync-every", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--sync-every: must be an integer >= 1, got '0'" in out.stderr
