"""What the project's commands print: true lines, not known noise (issue: a new user's first runs).

Lightning's "resuming from a checkpoint that ended before the epoch ended ... unreliable results"
is false here (the resumed loader skips the epoch's finished batches: tested bitwise elsewhere), so
the library answers Lightning's resumability check and says what it did instead; deprecation notes
for Lightning's maintainers, cloud-service tips and a once-per-rank "dirpath has changed" are
filtered in every process of a run, spawned ones included (`localsgd quickstart`, whose ranks
Lightning spawns, is checked in test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from common import newcomer_env

from localsgd.lightning.strategy import _count

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("LeafSpec", "srun", "dirpath has changed", "💡 Tip", "ended before the epoch ended")


def _localsgd(*args: str, cwd: Path) -> str:
    env = (
        newcomer_env()
    )  # a LOCAL_RANK an earlier test left made Lightning wait for a rank 1 it never started
    proc = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_counts_read_as_english() -> None:
    assert _count(1, "worker") == "1 worker" and _count(4, "worker") == "4 workers"
    assert _count(1, "process") == "1 process" and _count(2, "process") == "2 processes"


@pytest.mark.integration
def test_a_mid_epoch_resume_says_what_it_skipped_and_nothing_false(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "quickstart.yaml")
    first = _localsgd("fit", "--config", config, "--trainer.max_steps=12", cwd=tmp_path)
    assert "LocalSGD: 2 workers (2 processes x 1 simulated worker each)" in first
    assert "a sync after a single step (H = 1) averages the parameters" in first
    assert "rounds of one step" not in first
    (checkpoint,) = tmp_path.glob("runs/quickstart/localsgd/version_0/checkpoints/last.ckpt")
    resumed = _localsgd(
        "fit", "--config", config, "--trainer.max_steps=20", f"--ckpt_path={checkpoint}", cwd=tmp_path
    )
    assert "Resuming mid-epoch: skipped the 12 batches this epoch had trained on" in resumed
    assert resumed.count("Resuming mid-epoch") == 1  # rank 0 says it for both
    for noise in NOISE:
        assert noise not in first + resumed, noise
