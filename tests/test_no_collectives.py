"""No collective between syncs (2 gloo processes): Lightning's per-batch SIGTERM broadcast and
the preemption flag ride in the sync's control message; a SIGTERM or a preemption request stops
every rank at the next sync, with a checkpoint when the preemption callback is on."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from common import TIMEOUT, ToyModule, make_trainer, rank_file_of
from distributed import run

from localsgd import LocalSGDStrategy, SGDBaselineStrategy
from localsgd.lightning.preemption import Preempted, PreemptionCheckpoint

pytestmark = pytest.mark.distributed

COLLECTIVES = (
    "broadcast", "all_reduce", "barrier", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
    "all_to_all_single", "broadcast_object_list", "all_gather_object", "gather", "scatter", "reduce",
    "send", "recv", "isend", "irecv",
    "all_gather_single", "reduce_scatter_single",  # torch 2.13's names (FSDP2 calls them)
)  # fmt: skip


class _Calls(pl.Callback):
    """Counts the torch.distributed calls made during training, by the optimizer step being taken."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[int, str]] = Counter()
        self.trainer: pl.Trainer | None = None
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                if self.trainer is not None:
                    self.calls[self.trainer.global_step + 1, _name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.trainer = trainer

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.trainer = None


def _count(rank: int, strategy_name: str) -> dict[tuple[int, str], int]:
    pl.seed_everything(0, verbose=False)
    calls = _Calls()
    strategy: Any = (
        LocalSGDStrategy(sync_every=16, timeout=TIMEOUT)
        if strategy_name == "local"
        else SGDBaselineStrategy(timeout=TIMEOUT)
    )
    # batch 2: one epoch is 64 steps, so no epoch ends inside the run
    make_trainer(strategy, max_steps=64, callbacks=[calls]).fit(ToyModule(batch_size=2))
    return dict(calls.calls)


def test_local_sgd_runs_collectives_only_at_its_syncs_and_the_baseline_keeps_lightnings() -> None:
    for calls in run(_count, 2, "local"):
        steps = {step for step, _ in calls}
        assert steps == {16, 32, 48, 64}, sorted(calls.items())  # none in the 60 steps between
        for step in steps:  # the control message and one flat all-reduce (one dtype), nothing else
            assert {name: n for (s, name), n in calls.items() if s == step} == {"all_reduce": 2}
    for calls in run(_count, 2, "sgd"):
        # the baseline keeps Lightning's per-batch SIGTERM broadcast (DDP's own all-reduces are C++)
        assert {s for (s, name) in calls if name == "broadcast"} == set(range(1, 65))


class _SigtermAt(pl.Callback):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _sigterm(rank: int, folder: str, with_checkpoint: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    callbacks: list[pl.Callback] = [_SigtermAt(rank=1, step=5)]  # mid-round: H = 4 syncs at 4, 8, ...
    if with_checkpoint:
        callbacks.append(PreemptionCheckpoint(dirpath=folder))
    trainer = make_trainer(LocalSGDStrategy(sync_every=4, timeout=TIMEOUT), max_steps=40, callbacks=callbacks)
    outcome = "finished"
    try:
        trainer.fit(ToyModule())
    except Preempted as stop:
        outcome = f"preempted at {stop.global_step}"
    except SystemExit as stop:  # Lightning's SIGTERMException
        outcome = type(stop).__name__
    return {"outcome": outcome, "step": trainer.global_step, "sigterm": trainer.received_sigterm}


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["plain", "preemption-callback"])
def test_sigterm_on_one_rank_stops_both_at_the_next_sync(tmp_path: Path, with_checkpoint: bool) -> None:
    results = run(_sigterm, 2, str(tmp_path), with_checkpoint)
    for r in results:
        assert r["step"] == 8, results  # the sync after the signal, on both ranks
        if with_checkpoint:
            assert r["outcome"] == "preempted at 8"
        else:
            assert r["outcome"] == "SIGTERMException" and r["sigterm"]
    if with_checkpoint:
        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
        assert checkpoint["global_step"] == 8 and os.path.isfile(rank_file_of(tmp_path / "last.ckpt", 1))


def test_the_per_batch_broadcast_it_turns_off_exists_in_this_lightning() -> None:
    # pinned: if a Lightning upgrade removes it, quiet_per_batch_broadcast warns instead (below)
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from localsgd.lightning.stops import quiet_per_batch_broadcast

    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))

    class _Loop:
        pass

    class _Trainer:
        class fit_loop:
            epoch_loop = _Loop()

    with pytest.warns(UserWarning, match="a collective may run at every step"):
        quiet_per_batch_broadcast(_Trainer())
