"""Exact resume: what a checkpoint needs beyond the averaged model, per rank, written atomically.

A Local SGD checkpoint taken mid-round holds the *average* (what evaluation and users want),
but continuing as if never stopped needs every worker's own parameters, optimizer state
and RNG streams, and the data position inside the epoch. Each rank writes its part to
``<checkpoint>.ranks/rank<R>.pt`` next to the main file (all ranks save at the same step;
Lightning calls ``save_checkpoint`` on every rank), each file through a temporary name and
an atomic rename, so a crash mid-write never leaves a truncated file under the real name.
:class:`ExactResume` is the part of :class:`~localsgd.LocalSGDStrategy` that writes, checks and
restores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from localsgd.core.delayed import DelayedRound
from localsgd.core.files import (
    atomic_save,
    exists,
    load,
    rank_file,
    remove,
    rng_state,
    set_rng_state,
)


class ResumedLoader:
    """A training loader whose first pass starts where the checkpoint's epoch stopped.

    Lightning restarts a non-resumable loader from the epoch's first batch while its own
    counters go on from the checkpoint; skipping the batches the epoch already trained on
    (same sampler, same epoch, so the same order) puts data and counters back in line.

    How many to skip is read at the first ``next()``, not when the loader is made: Lightning
    processes the training loader before its loops decide whether the checkpoint's epoch was
    complete (saved at its end, or after its last batch: skip none, the next epoch starts) or
    not (skip ``done()`` batches). ``restore`` runs once the data is back in position: before the
    epoch's iterator is made at an epoch boundary (making it draws from the RNG in the
    uninterrupted run too), after the skipped batches otherwise.

    Args:
        loader: the training loader.
        done: batches of the current epoch already trained on, read at the first ``next()``.
        restore: puts the checkpoint's RNG streams back.
    """

    def __init__(self, loader: Any, done: Callable[[], int], restore: Callable[[], None]) -> None:
        self.loader = loader
        self._first: tuple[Callable[[], int], Callable[[], None]] | None = (done, restore)
        self.sampler = getattr(loader, "sampler", None)  # Lightning sets the epoch through it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # Runs at the first next(): Lightning makes the iterator before it sets the sampler's
        # epoch and before its loops restart, and may make one it never uses.
        first, self._first = self._first, None
        if first is None:
            yield from self.loader
            return
        done, restore = first
        skip = done()
        if not skip:
            restore()
        it = iter(self.loader)
        for _ in range(skip):
            next(it, None)
        if skip:
            restore()
        yield from it


def _raw(optimizer: Optimizer) -> Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one


class ExactResume:
    """What :class:`~localsgd.LocalSGDStrategy` adds to Lightning's checkpoints: each rank's own
    state in ``<checkpoint>.ranks/rank<R>.pt`` (written with every checkpoint, removed with it),
    checked and restored on resume, and the RNG streams put back once the epoch's iterator exists.
    The strategy's ``state_dict`` (step count, schedule, counters) goes in the main file."""

    # the strategy's, used here
    averager: Any
    driver: Any
    replicas: Any
    batched: Any
    schedule: Any
    lightning_module: Any
    optimizers: list[Optimizer]
    precision_plugin: Any
    global_rank: int
    world_size: int
    workers_per_device: int
    num_steps: int
    _dirty: bool
    _pending_local: dict[str, Any] | None
    _pending_rng: dict[str, Any] | None
    _pending_state: dict[str, Any] | None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self.averager is not None:
            # a checkpoint saved during validation (ModelCheckpoint's on_validation_end runs before
            # the strategy's) would otherwise store the average swapped in for evaluation
            with self.averager.own_models():
                local = self._local_state()
            atomic_save(local, rank_file(filepath, self.global_rank))
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        remove(rank_file(filepath, self.global_rank))

    def _local_state(self) -> dict[str, Any]:
        """This rank's own part: its workers' models (not the average), optimizer state, RNG."""
        assert self.lightning_module is not None
        state: dict[str, Any] = {"dirty": self._dirty, "rng": rng_state(), "num_steps": self.num_steps}
        # each process's own loss scale (16-mixed): the main file holds rank 0's only
        state["precision"] = self.precision_plugin.state_dict()
        if self.averager.wire is not None:  # error-feedback residuals: each rank's own
            state["wire"] = self.averager.wire.state_dict()
        if self.driver.in_flight is not None:  # an overlapped round: its mean and this rank's snapshot
            state["in_flight"] = self.driver.in_flight.state_dict()
        if self.replicas is not None:
            state["replicas"] = self.replicas.state_dict()
            if self.batched is not None:
                state["batched_optimizer"] = self.batched.stacked_optimizer.state_dict()
        else:
            state["module"] = {k: v.clone() for k, v in self.lightning_module.state_dict().items()}
            state["optimizers"] = [_raw(o).state_dict() for o in self.optimizers]
        return state

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self._pending_state is None:
            return checkpoint  # evaluating, or nothing of this library's to restore
        saved = checkpoint.get("localsgd") or {}
        schedule = type(self.schedule).__name__
        if saved.get("schedule_type", schedule) != schedule:
            raise ValueError(
                f"checkpoint {checkpoint_path} was written with sync schedule {saved['schedule_type']}, this "
                f"run uses {schedule}: its schedule state does not fit. HINT: resume with the same sync_every"
            )
        if not saved.get("rank_files") or self._pending_state is None:  # None: evaluating
            return checkpoint
        layout = (saved["world_size"], saved.get("workers_per_device", 1))
        if layout != (self.world_size, self.workers_per_device):
            rank_zero_warn(
                f"checkpoint {checkpoint_path} comes from {layout[0]} processes x {layout[1]} workers, this "
                f"run has {self.world_size} x {self.workers_per_device}: every worker restarts from the "
                "averaged model in it (the workers' own models and optimizer states are not carried over)"
            )
            return checkpoint
        path = rank_file(checkpoint_path, self.global_rank)
        if not exists(path):
            raise ValueError(
                f"checkpoint {checkpoint_path} needs rank {self.global_rank}'s state file {path}, which is "
                "missing. HINT: copy the whole checkpoint, its .ranks folder included"
            )
        local = load(path, f"rank {self.global_rank}'s state file")
        # each file is written atomically, the set is not: a rank killed while they are written
        # leaves files of two steps, and resuming from both would mix two points of the run
        if local.get("num_steps", saved["num_steps"]) != saved["num_steps"]:
            raise ValueError(
                f"rank {self.global_rank}'s state file {path} is from optimizer step {local['num_steps']}, "
                f"the checkpoint {checkpoint_path} from step {saved['num_steps']} (a rank died while they "
                "were written). HINT: resume from an earlier checkpoint"
            )
        self._pending_local = local
        return checkpoint

    def _load_local_state(self, local: dict[str, Any]) -> None:
        assert self.lightning_module is not None
        if self.replicas is not None:
            self.replicas.load_state_dict(local["replicas"])
            if self.batched is not None:
                self.batched.stacked_optimizer.load_state_dict(local["batched_optimizer"])
                self.batched._share_state()
        else:
            self.lightning_module.load_state_dict(local["module"])  # copies into the flat buckets
            for opt, saved in zip(self.optimizers, local["optimizers"]):
                _raw(opt).load_state_dict(saved)
        if local.get("wire") and self.averager.wire is not None:
            self.averager.wire.load_state_dict(local["wire"])
        if local.get("in_flight"):
            self.driver.in_flight = DelayedRound.from_state_dict(local["in_flight"])
        if local.get("precision"):
            self.precision_plugin.load_state_dict(local["precision"])
        self._dirty = bool(local["dirty"])
        self._pending_rng = local["rng"]

    def _restore_rng(self) -> None:
        """The checkpoint's RNG streams, once (the resumed loader calls it when the data is in place)."""
        rng, self._pending_rng = self._pending_rng, None
        if rng is not None:
            set_rng_state(rng)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._restore_rng()  # a no-op unless the training loader never reached its first batch
        super().on_train_batch_start(batch, batch_idx)
