"""The CIFAR-10 / ResNet-56 configs build what their comments say: 32 workers x 128 = 4,096, plain
SGD with weight decay on conv / linear weights only, 12 steps per epoch, lr schedules and sync
schedules that add up; and one of them runs end to end (shrunk) on a fake CIFAR archive."""

from __future__ import annotations

import csv
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from localsgd import QSR, DiLoCo, LocalSGDStrategy, PostLocal, SGDBaselineStrategy
from localsgd.cli import lightning_cli
from localsgd.core.scaling import WarmupDecayLR, warmup_decay_factor
from localsgd.core.schedules import Constant
from localsgd.research.models import Classifier, ResNet

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = sorted((ROOT / "configs").glob("cifar10_resnet56_*.yaml"))
NUM_TRAIN = 50_000
# what each file's comments promise: (sync schedule, lr, epochs)
EXPECTED = {
    "sgd": ("H=1", "step", 500),
    "localsgd": ("H=12", "step", 500),
    "post_local": ("post_local 600 @250", "step", 500),
    "diloco": ("H=500 diloco", "step", 500),
    "qsr": ("qsr", "cosine", 500),
    "qsr_sgd": ("H=1", "cosine", 500),
    "label_noise": ("post_local 384 @500", "constant 0.1", 2100),
    "label_noise_sgd": ("baseline", "constant 0.1", 2100),
}
_CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
}


def test_every_experiment_has_a_config() -> None:
    assert {p.stem.removeprefix("cifar10_resnet56_") for p in CIFAR_CONFIGS} == set(EXPECTED)


def _build(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Instantiate trainer, model and data from ``config`` (on the CPU; nothing is loaded or run)."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lightning_cli(
            ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False
        )


def _lr(model: Classifier, step: int) -> float:
    """The lr the model's optimizer uses at optimizer step ``step`` (0-based)."""
    if model.lr_schedule is None:
        return model.hparams["lr"]
    probe = model.lr_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=model.hparams["lr"]))
    assert isinstance(probe, WarmupDecayLR)
    kwargs = {k: getattr(probe, k) for k in ("warmup_steps", "total_steps", "decay", "milestones", "gamma")}
    return model.hparams["lr"] * warmup_decay_factor(step, **kwargs)


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda p: p.name)
def test_cifar_config_adds_up(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sync, lr_kind, epochs = EXPECTED[config.stem.removeprefix("cifar10_resnet56_")]
    cli = _build(config, monkeypatch, tmp_path)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    strategy = trainer.strategy

    # 32 workers x 128 local batch = 4,096, whatever stands for the workers
    processes = trainer.num_devices * trainer.num_nodes
    if isinstance(strategy, LocalSGDStrategy):
        workers = processes * strategy.workers_per_device
        assert (workers, data.batch_size) == (32, 128)
        # DistributedSampler pads each of the 32 shards to ceil(50,000 / 32); the loader drops the rest
        steps_per_epoch = math.ceil(NUM_TRAIN / workers) // data.batch_size
    else:
        assert isinstance(strategy, SGDBaselineStrategy)
        assert (processes, data.batch_size) == (1, 4096)  # exact only without BatchNorm: see below
        assert model.net[1].__class__ is nn.GroupNorm
        steps_per_epoch = NUM_TRAIN // data.batch_size
    assert steps_per_epoch == 12
    assert trainer.max_epochs == epochs
    total = epochs * steps_per_epoch

    # ResNet-56, plain SGD, weight decay 5e-4 on conv / linear weights only
    assert isinstance(model, Classifier) and isinstance(model.net, ResNet)
    assert sum(isinstance(m, nn.Conv2d) for m in model.net.modules()) == 55
    configured = model.configure_optimizers()
    optimizer = configured if isinstance(configured, torch.optim.Optimizer) else configured["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["momentum"]) == (5e-4, 0.0, 0.0)
    weights = [m.weight for m in model.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(map(id, decay["params"])) == sorted(map(id, weights))

    # the lr schedule ends with the run and has the values the comments give
    if lr_kind == "constant 0.1":
        assert model.lr_schedule is None and model.hparams["lr"] == 0.1
    else:
        assert configured["lr_scheduler"]["interval"] == "step"
        assert configured["lr_scheduler"]["scheduler"].total_steps == total
        assert _lr(model, 599) == pytest.approx(3.2)  # end of the 50-epoch warmup
        if lr_kind == "step":
            assert _lr(model, 2999) == pytest.approx(3.2)
            assert _lr(model, 3000) == pytest.approx(0.32)  # epoch 250: the paper's lr
            assert _lr(model, total - 1) == pytest.approx(0.32)
        else:
            assert 0 < _lr(model, total - 1) < 1e-6

    # the sync schedule: rounds as the comments count them
    if sync == "baseline":
        return
    schedule = strategy.options.schedule
    schedule.configure(total_steps=total, steps_per_epoch=steps_per_epoch)
    rounds = sum(bool(schedule.should_sync(step, _lr(model, step - 1))) for step in range(1, total + 1))
    if sync.startswith("H="):
        assert isinstance(schedule, Constant)
        assert schedule.every == int(sync.split()[0][2:])
        assert rounds == total // schedule.every
        if sync == "H=1":
            assert strategy.options.optimizer_state == "average"  # exactly synchronous SGD
    elif sync.startswith("post_local"):
        every, switch = (int(x) for x in sync.removeprefix("post_local ").split(" @"))
        assert isinstance(schedule, PostLocal) and schedule.every == every
        assert schedule.switch_step == switch * steps_per_epoch
        assert (total - schedule.switch_step) % every == 0
        assert rounds == schedule.switch_step + (total - schedule.switch_step) // every  # 3,005 / 6,050
    else:
        assert isinstance(schedule, QSR) and (schedule.base, schedule.alpha) == (2, 3.2)
        assert rounds == 1774
    assert isinstance(strategy.options.outer_optimizer, DiLoCo) == sync.endswith("diloco")
    if sync.endswith("diloco"):
        outer = strategy.options.outer_optimizer
        assert (outer.lr, outer.momentum, outer.nesterov) == (0.7, 0.9, True)


def _fake_cifar(root: Path, *, per_batch: int, test: int) -> None:
    """A CIFAR-10 python-pickle archive of random images, in the layout CIFARDataModule reads."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        entry = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.integration
def test_post_local_config_runs_shrunk_on_a_fake_archive(tmp_path: Path) -> None:
    # 5 x 32 = 160 images; 4 simulated workers x 8 = 32 per step; 160 / 4 = 40 per shard, 40 // 8 = 5
    # steps per epoch; 3 epochs = 15 steps; switch after epoch 1 (step 5), then H = 3: syncs at
    # steps 1-5, 8, 11, 14 = 8 rounds
    _fake_cifar(tmp_path / "data/cifar10", per_batch=32, test=32)
    config = ROOT / "configs/cifar10_resnet56_post_local.yaml"
    overrides = [
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=3",
        "--trainer.check_val_every_n_epoch=3",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.strategy.init_args.workers_per_device=4",
        "--trainer.strategy.init_args.sync_every.init_args.every=3",
        "--trainer.strategy.init_args.sync_every.init_args.switch_epoch=1",
        "--model.init_args.net.init_args.depth=8",
        "--model.init_args.net.init_args.width=4",
        "--model.init_args.lr=0.05",
        "--model.init_args.lr_schedule.init_args.warmup_steps=2",
        "--model.init_args.lr_schedule.init_args.total_steps=15",
        "--model.init_args.lr_schedule.init_args.milestones=[5]",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=32",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "fit", "--config", str(config), *overrides],
        capture_output=True,
        text=True,
        timeout=240,
        env={**_CLEAN_ENV, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs/cifar10_resnet56/post_local").iterdir()
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("comm/rounds")]
    by_step = {int(r["step"]): r for r in rows}
    assert sorted(by_step) == list(range(15))  # one row per optimizer step, not per simulated worker
    # the lr schedule stepped once per optimizer step: warmup over 2, x 0.1 from step 5 (0-based)
    lrs = [float(by_step[s]["lr"]) for s in range(15)]
    assert lrs == pytest.approx([0.025] + [0.05] * 4 + [0.005] * 10)
    # weight decay is logged from the first (decayed) group
    assert float(by_step[0]["intrinsic_lr"]) == pytest.approx(0.025 * 5e-4)
    assert [int(float(by_step[s]["localsgd/sync_every"])) for s in (0, 3, 5, 14)] == [1, 1, 3, 3]
    assert int(float(by_step[14]["comm/rounds"])) == 8
    assert (run / "checkpoints/last.ckpt").is_file()
