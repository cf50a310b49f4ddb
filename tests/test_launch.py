"""Launchers: torchrun end to end, the preemption checkpoint, and launch/slurm.py's options
(the Slurm cluster itself is in test_slurm.py)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import ToyModule, make_trainer
from submitit.helpers import DelayedSubmission

from localsgd import LocalSGDStrategy
from localsgd.lightning.preemption import Preempted, PreemptionCheckpoint, signal_number
from localsgd.research.models import Classifier, SmallCNN
from localsgd.slurm_job import TrainingJob

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/quickstart.yaml"
CLEAN_ENV = {
    **{
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    },
    "OMP_NUM_THREADS": "1",
}


def _load_slurm_launcher() -> Any:
    spec = importlib.util.spec_from_file_location("launch_slurm", ROOT / "launch/slurm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch_slurm"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


slurm_launcher = _load_slurm_launcher()


# ---------------------------------------------------------------- torchrun
@pytest.mark.integration
def test_torchrun_two_cpu_processes_fit_and_the_checkpoint_loads(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), str(QUICKSTART), "--trainer.max_steps=16"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**CLEAN_ENV, "NPROC_PER_NODE": "2", "PYTHON": sys.executable},
        cwd=tmp_path,  # the config writes under runs/ here
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr
    (run,) = (tmp_path / "runs/quickstart/localsgd").iterdir()
    path = run / "checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 16
    state = checkpoint["localsgd"]
    assert state["world_size"] == 2 and state["num_steps"] == 16
    assert state["comm"]["sync"]["rounds"] == 16 // 8  # H = 8 in the config
    model = Classifier.load_from_checkpoint(path, net=SmallCNN(in_channels=1, num_classes=10))
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name
    assert model.hparams.lr == 0.05


def test_torchrun_script_rejects_a_bad_process_count(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), str(QUICKSTART)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**CLEAN_ENV, "NPROC_PER_NODE": "0"},
    )
    assert out.returncode == 2
    assert "NPROC_PER_NODE (0) must be an integer >= 1" in out.stderr
    out = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "missing.yaml' is not a file" in out.stderr


def test_torchrun_script_rejects_restarts_it_cannot_make() -> None:
    def launch(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(ROOT / "launch/torchrun.sh"), str(QUICKSTART)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**CLEAN_ENV, "NPROC_PER_NODE": "2", **env},
        )

    out = launch(MAX_RESTARTS="-1")
    assert out.returncode == 2 and "MAX_RESTARTS (-1) must be an integer >= 0" in out.stderr
    # static rendezvous hands every attempt the same store: a restart would read dead addresses
    out = launch(MAX_RESTARTS="1", NODE_RANK="0", MASTER_ADDR="node0", MASTER_PORT="29400")
    assert out.returncode == 2
    assert "MAX_RESTARTS (1) needs c10d rendezvous" in out.stderr
    assert "HINT: unset NODE_RANK and set RDZV_ENDPOINT=node0:29400" in out.stderr


# ---------------------------------------------------------------- preemption checkpoint
@pytest.fixture
def restore_sigusr2() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


class SignalAt(pl.Callback):
    """Sends this process SIGUSR2 after the given global step (as ``scancel --signal`` would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR2)


def test_signal_saves_a_checkpoint_after_the_step_and_the_next_run_resumes_from_it(
    tmp_path: Path, restore_sigusr2: None
) -> None:
    pl.seed_everything(0)
    saver = PreemptionCheckpoint(dirpath=tmp_path)
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=8, callbacks=[SignalAt(3), saver])
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        trainer.fit(ToyModule())
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ignored only while unwinding
    assert stop.value.code == 0  # ends the process quietly
    assert (stop.value.global_step, stop.value.start_step, stop.value.requeued) == (3, 0, False)
    assert stop.value.path == tmp_path / "last.ckpt"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["localsgd"]["num_steps"] == 3
    assert checkpoint["localsgd"]["comm"]["sync"]["rounds"] == 1  # synced at step 2
    assert not list(tmp_path.glob("*.partial"))

    resumed = PreemptionCheckpoint(dirpath=tmp_path)
    strategy = LocalSGDStrategy(sync_every=2)
    trainer = make_trainer(strategy, max_steps=8, callbacks=[resumed])
    trainer.fit(ToyModule(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.start_step == 3
    assert trainer.global_step == 8 and strategy.num_steps == 8
    assert int(trainer.callback_metrics["comm/rounds"]) == 8 // 2


def test_no_signal_no_checkpoint(tmp_path: Path, restore_sigusr2: None) -> None:
    saver = PreemptionCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=4, callbacks=[saver])
    trainer.fit(ToyModule())
    assert trainer.global_step == 4
    assert not (tmp_path / "ckpt").exists()


def test_signal_names() -> None:
    assert signal_number("USR2") == signal_number("SIGUSR2") == signal_number("12") == signal.SIGUSR2
    assert signal_number("term") == signal.SIGTERM
    with pytest.raises(ValueError, match=r"signal \('USR9'\) must be a signal name"):
        signal_number("USR9")
    with pytest.raises(ValueError, match=r"signal \('USR9'\) must be a signal name"):
        PreemptionCheckpoint(dirpath="x", signal="USR9")
    with pytest.raises(ValueError, match=r"max_requeues \(-1\) must be an integer >= 0"):
        PreemptionCheckpoint(dirpath="x", max_requeues=-1)


# ---------------------------------------------------------------- the submitit job
def test_training_job_requeues_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    job = TrainingJob(config=QUICKSTART, overrides=["--trainer.max_steps=5"], max_requeues=2)
    for restarts in ("0", "1"):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        again = job.checkpoint()
        assert isinstance(again, DelayedSubmission) and again.function is job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None
    with pytest.raises(ValueError, match=r"max_requeues \(-1\) must be an integer >= 0"):
        TrainingJob(config=QUICKSTART, max_requeues=-1)


def test_training_job_resumes_from_its_checkpoint_when_there_is_one(tmp_path: Path) -> None:
    job = TrainingJob(config=QUICKSTART, overrides=["--trainer.max_steps=5"])
    args = job.fit_args(tmp_path)
    assert args[:3] == ["fit", f"--config={QUICKSTART}", "--trainer.max_steps=5"]
    assert "--trainer.plugins.auto_requeue=false" in args  # submitit owns the signal
    assert f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}" in args
    assert not any(a.startswith("--ckpt_path") for a in args)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/last.ckpt").write_bytes(b"")
    assert job.fit_args(tmp_path)[-1] == f"--ckpt_path={tmp_path / 'checkpoints/last.ckpt'}"


# ---------------------------------------------------------------- launch/slurm.py options
def options(**kwargs: Any) -> Any:
    return slurm_launcher.SlurmOptions(**{"config": str(QUICKSTART), **kwargs})


def test_slurm_options_one_task_per_gpu() -> None:
    assert options().tasks_per_node == 1
    assert options(gpus_per_node=8).tasks_per_node == 8
    assert options(tasks_per_node=2, nodes=3).num_tasks == 6
    job = options(nodes=2, gpus_per_node=4, overrides=["--trainer.max_steps=9"]).job()
    assert job.overrides == ["--trainer.max_steps=9", "--trainer.num_nodes=2", "--trainer.devices=4"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, r"nodes \(0\) must be an integer >= 1"),
        ({"cpus_per_task": 0}, r"cpus_per_task \(0\) must be an integer >= 1"),
        ({"tasks_per_node": 0}, r"tasks_per_node \(0\) must be an integer >= 1"),
        ({"gpus_per_node": -1}, r"gpus_per_node \(-1\) must be an integer >= 0"),
        ({"gpus_per_node": 4, "tasks_per_node": 2}, r"tasks_per_node \(2\) must equal gpus_per_node \(4\)"),
        ({"time_min": 2, "signal_delay_s": 120}, r"signal_delay_s \(120\) must be shorter than the time"),
        ({"max_requeues": -1}, r"max_requeues \(-1\) must be an integer >= 0"),
        ({"mem_gb": 0}, r"mem_gb \(0\) must be > 0"),
        ({"config": "nope.yaml"}, r"config \('nope.yaml'\) is not a file"),
    ],
)
def test_slurm_options_name_the_bad_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options(**kwargs)


@pytest.mark.integration
def test_slurm_launcher_rejects_bad_input_before_submitting() -> None:
    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "launch/slurm.py"), "--config", str(QUICKSTART), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=CLEAN_ENV,
        )

    out = launch("--nodes", "0")
    assert out.returncode == 2 and "nodes (0) must be an integer >= 1" in out.stderr
    out = launch("--", "--trainer.max_stepz=5")  # the config is parsed before submitting
    assert out.returncode == 2 and "--trainer.max_stepz" in out.stderr
