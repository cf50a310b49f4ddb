"""The strategies' arguments, registration and single-process behaviour (fast, no spawn)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from common import ToyModule, make_trainer, rank_file_of

from localsgd import Constant, LocalSGDStrategy, SGDBaselineStrategy


@pytest.mark.parametrize("value", [0, -1, 2.5, "x", True, None])
def test_sync_every_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match=rf"sync_every \({value!r}\) must be an integer >= 1"):
        LocalSGDStrategy(sync_every=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffers": "mean"}, r"buffers \('mean'\) must be one of 'average', 'local'"),
        (
            {"optimizer_state": "sync"},
            r"optimizer_state \('sync'\) must be one of 'local', 'average', 'reset'",
        ),
        ({"start_method": "thread"}, r"start_method \('thread'\) must be one of 'popen', 'spawn'"),
    ],
)
def test_unknown_policy_names(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(**kwargs)


def test_schedule_arguments() -> None:
    assert LocalSGDStrategy(sync_every=5).options.schedule.period == 5
    schedule = Constant(3)
    assert LocalSGDStrategy(sync_every=schedule).options.schedule is schedule
    with pytest.raises(ValueError, match=r"every \(0\) must be an integer >= 1"):
        Constant(0)
    with pytest.raises(ValueError, match=r"find_unused_parameters \('yes'\) must be True or False"):
        SGDBaselineStrategy(find_unused_parameters="yes")  # type: ignore[arg-type]


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        LocalSGDStrategy(4)  # type: ignore[misc]


def test_registered_names_build_the_strategies() -> None:
    assert isinstance(
        pl.Trainer(strategy="localsgd", accelerator="cpu", devices=1, logger=False).strategy, LocalSGDStrategy
    )
    assert isinstance(
        pl.Trainer(strategy="sgd_baseline", accelerator="cpu", devices=1, logger=False).strategy,
        SGDBaselineStrategy,
    )


def test_sync_batchnorm_is_refused() -> None:
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=2, sync_batchnorm=True)
    with pytest.raises(ValueError, match=r"Trainer\(sync_batchnorm=True\) all-reduces BatchNorm statistics"):
        trainer.fit(ToyModule(bn=True))


def test_single_process_fit_counts_rounds_and_checkpoints_sync_state(tmp_path) -> None:
    # one worker: averaging is an identity, but the bookkeeping is the same as with many
    trainer = make_trainer(LocalSGDStrategy(sync_every=3), max_steps=10, default_root_dir=tmp_path)
    module = ToyModule(momentum=0.9)
    trainer.fit(module)
    assert float(trainer.callback_metrics["comm/rounds"]) == 3
    assert trainer.strategy.num_steps == 10
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["localsgd"]["num_steps"] == 10
    assert ckpt["localsgd"]["comm"]["sync"]["rounds"] == 3
    # resuming restores the step count and the counters, and goes on from there
    trainer = make_trainer(LocalSGDStrategy(sync_every=3), max_steps=16, default_root_dir=tmp_path)
    trainer.fit(ToyModule(momentum=0.9), ckpt_path=path)
    assert trainer.strategy.num_steps == 16
    assert float(trainer.callback_metrics["comm/rounds"]) == 16 // 3


class _TwoGroups(ToyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        first, second = self.model.net[0], self.model.net[3]
        return torch.optim.SGD(
            [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}], lr=0.1
        )


def test_one_step_per_optimizer_step_not_per_group_or_micro_batch(tmp_path) -> None:
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=3),
        max_steps=6,
        accumulate_grad_batches=2,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
    )
    trainer.fit(_TwoGroups())
    assert trainer.global_step == 6
    assert trainer.strategy.num_steps == 6  # 12 micro-batches, 2 param groups: still 6 steps
    assert float(trainer.callback_metrics["comm/rounds"]) == 2
    # the metrics reach the Trainer's loggers, step by step
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    rounds = [float(r["comm/rounds"]) for r in rows if r.get("comm/rounds")]
    assert rounds == [0, 0, 1, 1, 1, 2]


def test_removed_checkpoints_take_their_rank_files_along(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    keep = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, monitor="step", mode="max")
    strategy = LocalSGDStrategy(sync_every=3, workers_per_device=2)
    make_trainer(strategy, max_steps=6, callbacks=[keep], enable_checkpointing=True).fit(ToyModule())
    checkpoints = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert checkpoints == ["epoch=0-step=6.ckpt"]
    # steps 2 and 4 were removed with their rank files and folders; step 6 keeps its own
    assert sorted(p.name for p in tmp_path.glob("*.ranks")) == ["epoch=0-step=6.ckpt.ranks"]
    assert os.path.isfile(rank_file_of(tmp_path / "epoch=0-step=6.ckpt", 0))


def test_one_worker_warns_that_it_is_plain_sgd_and_reports_no_communication(caplog) -> None:
    import logging
    import warnings

    trainer = make_trainer(LocalSGDStrategy(sync_every=3), max_steps=6)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer.fit(ToyModule())
    one = [w for w in caught if "LocalSGDStrategy has one worker" in str(w.message)]
    assert (
        len(one) == 1 and "workers_per_device=k" in str(one[0].message) and "devices=N" in str(one[0].message)
    )
    assert "6 optimizer steps, 2 sync rounds, communication: none (1 worker)" in caplog.text
    from localsgd.lightning.progress import summary

    assert summary(trainer).startswith("done: 6 optimizer steps, communication: none (1 worker)")
    # with simulated workers there is somebody to average with: no warning, bytes reported
    trainer = make_trainer(LocalSGDStrategy(sync_every=3, workers_per_device=2), max_steps=6)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer.fit(ToyModule())
    assert not [w for w in caught if "one worker" in str(w.message)]
    assert "bytes per worker" in caplog.text


@pytest.mark.slow
def test_the_baseline_destroys_the_process_group_at_exit() -> None:
    # DDP's gradient all-reduces run in the background as overlapped rounds do; left to interpreter
    # finalization, the gloo group aborted a spawned quickstart process after its fit ("terminate
    # called without an active exception", seen in CI). A handler registered before the fit runs
    # after the strategy's own (atexit is last in, first out) and sees the group gone.
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distributed import free_port

    code = """
import atexit, torch, torch.distributed as dist, lightning.pytorch as pl
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
import sys; sys.path.insert(0, "tests")
from common import ToyModule, make_trainer
from localsgd import SGDBaselineStrategy
make_trainer(SGDBaselineStrategy(), max_steps=2).fit(ToyModule())
print("fit done, initialized:", dist.is_initialized())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fit done, initialized: True" in done.stdout, done.stdout  # the group outlives the fit
    assert "initialized at exit: False" in done.stdout, done.stdout
