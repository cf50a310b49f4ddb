"""Faults on 2 gloo processes: NaN on one worker, ranks out of step. Every rank fails fast and
clearly, or (skip_worker) the run goes on from the healthy workers' average."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import Recorder, StopAt, ToyModule, make_trainer, max_diff, rank_file_of, snapshot, toy_dataset
from distributed import run
from torch.utils.data import DataLoader, IterableDataset, Subset

from localsgd import QSR, DiLoCo, LocalSGDStrategy

pytestmark = pytest.mark.distributed

FAST = timedelta(seconds=20)


class _PoisonRank1(pl.Callback):
    """Rank 1's model turns NaN after optimizer step 3 (mid-round for H = 2: the sync is at 4)."""

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 3:
            with torch.no_grad():
                module.model.net[0].weight[0, 0] = float("nan")


class _Probe(LocalSGDStrategy):
    """Records each rank's model right before the strategy's sync decision."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.before_sync: list[dict[str, torch.Tensor]] = []

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.before_sync.append(snapshot(self.lightning_module))
        super()._after_step(optimizer)


def _nonfinite(rank: int, policy: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    strategy = _Probe(sync_every=2, nonfinite=policy, timeout=FAST)
    module = ToyModule(lr=0.1, momentum=0.9)
    recorder = Recorder()
    trainer = make_trainer(strategy, max_steps=6, callbacks=[_PoisonRank1(), recorder])
    start = time.monotonic()
    try:
        trainer.fit(module)
    except Exception as err:  # every rank must fail, and say why
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {
        "final": snapshot(module),
        "before_sync": strategy.before_sync,
        "after_step": recorder.after_step,
        "seconds": time.monotonic() - start,
    }


def test_nan_on_one_worker_raises_on_every_rank_within_the_round() -> None:
    for r in run(_nonfinite, 2, "raise"):
        assert "FloatingPointError" in r["error"]
        assert "worker(s) [1] of 2 at optimizer step 4" in r["error"]
        assert r["seconds"] < FAST.total_seconds()  # no rank waited for a collective to time out


def test_nan_on_one_worker_is_skipped_and_restarts_from_the_healthy_average() -> None:
    results = run(_nonfinite, 2, "skip_worker")
    healthy = results[0]["before_sync"][3]  # step 4, rank 0: the only healthy worker
    assert any(torch.isnan(v).any() for v in results[1]["before_sync"][3].values())
    for r in results:
        # after the sync at step 4 both ranks hold the healthy workers' average, exactly
        assert max_diff(r["after_step"][3], healthy) == 0.0
        assert all(torch.isfinite(v).all() for v in r["final"].values())
    assert max_diff(results[0]["final"], results[1]["final"]) == 0.0


class _Uneven(ToyModule):
    """Rank 0 gets 10 batches per epoch, rank 1 gets 8, through a sampler Lightning does not touch."""

    def train_dataloader(self) -> DataLoader:
        n = 80 if self.trainer.global_rank == 0 else 64
        return DataLoader(Subset(toy_dataset(), range(n)), batch_size=8)


class _UnevenStream(IterableDataset):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self):  # type: ignore[no-untyped-def]
        data = toy_dataset()
        first = 0 if self.rank == 0 else 10  # each rank its own samples (identical streams fail early)
        for i in range(first, first + (10 if self.rank == 0 else 7)):
            yield data[8 * i : 8 * (i + 1)]


class _UnevenIterable(ToyModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_UnevenStream(self.trainer.global_rank), batch_size=None)


def _desync(rank: int, which: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module = _Uneven() if which == "sized" else _UnevenIterable()
    strategy = LocalSGDStrategy(sync_every=3, timeout=FAST)
    trainer = make_trainer(strategy, max_steps=-1, max_epochs=1, use_distributed_sampler=False)
    start = time.monotonic()
    try:
        trainer.fit(module)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_uneven_batches_per_rank_fail_before_training() -> None:
    for r in run(_desync, 2, "sized"):
        assert "ValueError" in r["error"]
        assert "between 8 and 10 across ranks" in r["error"]


def test_ranks_out_of_step_fail_clearly_within_the_collective_timeout() -> None:
    # Without a length there is nothing to compare before training; Lightning's own per-step
    # broadcast then meets a sync on the other rank, and the collective times out: each rank
    # must fail then, saying where, instead of waiting forever.
    results = run(_desync, 2, "iterable")
    for r in results:
        assert r["error"] is not None and "HINT: another rank stopped taking steps" in r["error"], r["error"]
        assert r["seconds"] < 3 * FAST.total_seconds()
    assert "at optimizer step 9" in results[0]["error"]  # rank 0 was at its sync after step 9
    assert "at optimizer step 7" in results[1]["error"]  # rank 1 stopped after step 7


def _variant(name: str) -> dict[str, Any]:
    if name == "qsr":
        return {"sync_every": QSR(2, 0.18)}  # H = floor((0.18 / 0.1)^2) = 3, the last round clamped
    if name == "diloco":
        return {"sync_every": 4, "outer_optimizer": DiLoCo()}
    if name == "simulated":  # 2 processes x 2 workers: each worker's own state comes back
        return {"sync_every": 4, "workers_per_device": 2}
    return {"sync_every": 4}


def _resume(rank: int, ckpt_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("constant", "qsr", "diloco", "simulated"):
        runs = {}
        for run_name, ckpt in (("full", None), ("first", None), ("resumed", "s13")):
            pl.seed_everything(0, verbose=False)
            module = ToyModule(lr=0.1, momentum=0.9, weight_decay=1e-3)
            callbacks: list[pl.Callback] = []
            if run_name == "first":  # preempted after a checkpoint mid-epoch (16 steps each) and mid-round
                callbacks.append(
                    pl.callbacks.ModelCheckpoint(
                        dirpath=f"{ckpt_dir}/{name}", every_n_train_steps=13, filename="s13"
                    )
                )
                callbacks.append(StopAt(13))
            trainer = make_trainer(
                LocalSGDStrategy(**_variant(name), timeout=FAST),
                max_steps=30,
                callbacks=callbacks,
                enable_checkpointing=bool(callbacks),
            )
            trainer.fit(module, ckpt_path=f"{ckpt_dir}/{name}/s13.ckpt" if ckpt else None)
            runs[run_name] = snapshot(module)
            if run_name == "resumed":
                runs["rounds"] = float(trainer.callback_metrics["comm/rounds"])
        out[name] = runs
    return out


def test_resume_mid_round_and_mid_epoch_is_bitwise_exact(tmp_path: Any) -> None:
    results = run(_resume, 2, str(tmp_path))
    for r in results:
        for name in ("constant", "qsr", "diloco", "simulated"):
            assert max_diff(r[name]["resumed"], r[name]["full"]) == 0.0, name
            assert max_diff(r[name]["first"], r[name]["full"]) > 1e-4  # the stop was real
    assert os.path.isfile(rank_file_of(tmp_path / "constant" / "s13.ckpt", 1))


def test_truncated_or_mismatched_checkpoints_fail_clearly(tmp_path: Any) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=2)
    with pytest.raises(ValueError, match=r"broken.ckpt cannot be read \(truncated, or not a checkpoint\)"):
        trainer.fit(ToyModule(), ckpt_path=str(broken))
    good = tmp_path / "good.ckpt"
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=3)
    trainer.fit(ToyModule())
    trainer.save_checkpoint(good)
    trainer = make_trainer(LocalSGDStrategy(sync_every=QSR(2, 0.1)), max_steps=4)
    with pytest.raises(ValueError, match=r"written with sync schedule Constant, this run uses QSR"):
        trainer.fit(ToyModule(), ckpt_path=str(good))
    os.unlink(rank_file_of(good, 0))
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=4)
    with pytest.raises(ValueError, match=r"needs rank 0's state file .*rank0.pt, which is missing"):
        trainer.fit(ToyModule(), ckpt_path=str(good))
