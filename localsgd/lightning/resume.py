"""Exact resume: what a checkpoint needs beyond the averaged model, per rank, written atomically.

A Local SGD checkpoint taken mid-round holds the *average* (what evaluation and users want),
but continuing as if never stopped needs every worker's own parameters, optimizer state
and RNG streams, and the data position inside the epoch. Each rank writes its part to
``<checkpoint>.ranks/step<N>/rank<R>.pt`` next to the main file (all ranks save at the same
step; Lightning calls ``save_checkpoint`` on every rank), each file through a temporary name and
an atomic rename, and the main file last, naming the set: a crash never leaves a truncated file
under a real name, nor a main file with part of its set (:mod:`localsgd.core.files`).
Sharded workers write the same parts into one ``torch.distributed.checkpoint`` folder instead
(:mod:`localsgd.sharding`), each process its own shards. This module writes, checks and restores
them; :class:`~localsgd.LocalSGDStrategy`'s checkpoint hooks call its functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from localsgd.core.files import exists, load, rank_file, retire, rng_state, save_set
from localsgd.sharding import (
    load_packed,
    load_worker_state,
    packed,
    save_dcp,
    sharded_model_state,
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

    # Lightning asks whether a loader resumes mid-epoch (its _Stateful protocol: these two methods)
    # and otherwise warns of "unreliable results". This one does, by skipping what the epoch
    # trained on, and says so itself; its position is Lightning's batch counter, so no state.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

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
            rank_zero_info(
                f"Resuming mid-epoch: skipped the {skip} batches this epoch had trained on (the same "
                "sampler and epoch, so the same order); training continues as if never stopped"
            )
        yield from it


def _raw(optimizer: Optimizer) -> Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one


def rank_state(strategy: Any) -> dict[str, Any]:
    """``strategy``'s rank's own part of the sync state (a :class:`~localsgd.LocalSGDStrategy`
    with a driver): whether its workers differ from the average, error-feedback residuals, a round
    in flight, sharded workers' part of the outer state; its RNG streams and loss scale."""
    driver = strategy.driver
    state: dict[str, Any] = {**driver.own_state_dict(), "rng": rng_state(), "num_steps": driver.num_steps}
    # each process's own loss scale (16-mixed): the main file holds rank 0's only
    state["precision"] = strategy.precision_plugin.state_dict()
    return state


def local_state(strategy: Any) -> dict[str, Any]:
    """``strategy``'s rank's own part: :func:`rank_state`, and its workers' models (not the
    average) and optimizer states."""
    module = strategy.lightning_module
    state = rank_state(strategy)
    if strategy.replicas is not None:
        state["replicas"] = strategy.replicas.state_dict()
        if strategy.batched is not None:
            state["batched_optimizer"] = strategy.batched.stacked_optimizer.state_dict()
    else:
        state["module"] = {k: v.clone() for k, v in module.state_dict().items()}
        state["optimizers"] = [_raw(o).state_dict() for o in strategy.optimizers]
    return state


def save_with_rank_files(strategy: Any, filepath: Any, write_main: Callable[[], None]) -> None:
    """The checkpoint ``filepath`` as a set that is whole or absent (:func:`~localsgd.core.files.save_set`):
    ``strategy``'s rank's own state beside it, then the main file (``write_main``)."""
    # a checkpoint saved during validation (ModelCheckpoint's on_validation_end runs before the
    # strategy's) would otherwise store the average swapped in for evaluation
    with strategy.driver.averager.own_models():
        local = local_state(strategy)
    barrier = lambda: strategy.barrier("localsgd save")  # noqa: E731
    save_set(filepath, strategy.global_rank, strategy.driver.num_steps, local, write_main, barrier)


def remove_rank_files(filepath: Any, rank: int) -> None:
    retire(filepath, rank, keep=None)


def check_rank_file(strategy: Any, checkpoint_path: Any, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The rank file to resume from, checked against the checkpoint (``None``: every worker
    restarts from the averaged model in the main file)."""
    saved = checkpoint.get("localsgd") or {}
    schedule = type(strategy.options.schedule).__name__
    if saved.get("schedule_type", schedule) != schedule:
        raise ValueError(
            f"checkpoint {checkpoint_path} was written with sync schedule {saved['schedule_type']}, this "
            f"run uses {schedule}: its schedule state does not fit. HINT: resume with the same sync_every"
        )
    if not saved.get("rank_files"):
        return None
    if not same_layout(strategy, checkpoint_path, saved):
        return None
    rank = strategy.global_rank
    path = rank_file(checkpoint_path, rank, saved["rank_files"])  # in the folder of its set
    if not exists(path):
        raise ValueError(
            f"checkpoint {checkpoint_path} needs rank {rank}'s state file {path}, which is "
            "missing. HINT: copy the whole checkpoint, its .ranks folder included"
        )
    local = load(path, f"rank {rank}'s state file")
    # a set is whole by construction; files copied or moved by hand from another save are not
    if local.get("num_steps", saved["num_steps"]) != saved["num_steps"]:
        raise ValueError(
            f"rank {rank}'s state file {path} is from optimizer step {local['num_steps']}, "
            f"the checkpoint {checkpoint_path} from step {saved['num_steps']} (files of two saves mixed). "
            "HINT: resume from an earlier checkpoint"
        )
    return local


def same_layout(strategy: Any, checkpoint_path: Any, saved: dict[str, Any]) -> bool:
    """Whether the checkpoint's processes and workers are this run's (if not, a warning: every
    worker restarts from the checkpoint's global model)."""
    layout = (saved["world_size"], saved.get("workers_per_device", 1), saved.get("shards_per_worker", 1))
    if layout == (strategy.world_size, strategy.workers_per_device, strategy.shards_per_worker):
        return True
    rank_zero_warn(
        f"checkpoint {checkpoint_path} comes from {layout[0]} processes x {layout[1]} workers each, "
        f"{layout[2]} processes per worker; this run has {strategy.world_size} x "
        f"{strategy.workers_per_device}, {strategy.shards_per_worker}: every worker restarts from the "
        "averaged model in it (the workers' own models and optimizer states are not carried over)"
    )
    return False


def save_sharded(strategy: Any, checkpoint: dict[str, Any], filepath: Any) -> None:
    """A sharded run's checkpoint: a DCP folder (see :mod:`localsgd.sharding`) in which each process
    writes its shards of the global model, of its worker's own model and optimizer states, and its
    own part of the sync state; rank 0 adds the rest of ``checkpoint``."""
    module, mesh = strategy.lightning_module, strategy.device_mesh
    optimizers = checkpoint.pop("optimizer_states", [])  # this worker's shards (optimizer_state)
    state = {"state_dict": checkpoint.pop("state_dict")}  # the global model's shards
    barrier = lambda: strategy.barrier("localsgd save")  # noqa: E731
    if strategy.driver is None:  # not fitting: the model is all there is
        save_dcp(filepath, state, checkpoint, strategy.global_rank, barrier)
        return
    with strategy.driver.averager.own_models():
        own = {f"optimizer_{i}": o for i, o in enumerate(optimizers)}
        state[f"worker{mesh.get_coordinate()[0]}"] = {"state_dict": sharded_model_state(module), **own}
        state[f"rank{strategy.global_rank}"] = packed(rank_state(strategy))
        save_dcp(filepath, state, checkpoint, strategy.global_rank, barrier)


def load_sharded(strategy: Any, checkpoint_path: Any, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """Read a sharded run's checkpoint folder into ``strategy``'s optimizers (its worker's state on
    the same layout, worker 0's on another, resharded by DCP); returns this rank's own state to
    resume from (``None``: every worker restarts from the global model, already loaded)."""
    module, mesh = strategy.lightning_module, strategy.device_mesh
    saved = checkpoint.get("localsgd") or {}
    if not saved.get("rank_files"):  # saved while not fitting: the global model only
        return None
    same = same_layout(strategy, checkpoint_path, saved)
    optimizers = {f"optimizer_{i}": _raw(o) for i, o in enumerate(strategy.optimizers)}
    worker = mesh.get_coordinate()[0] if same else 0
    own = load_worker_state(checkpoint_path, module, optimizers, worker, "state_dict" if same else None)
    if not same:
        return None
    local: dict[str, Any] = load_packed(checkpoint_path, f"rank{strategy.global_rank}")
    local["module"] = own
    return local


def load_local_state(strategy: Any, local: dict[str, Any]) -> None:
    """Put ``strategy``'s rank's own state back (its RNG streams stay in ``local["rng"]``)."""
    if strategy.replicas is not None:
        strategy.replicas.load_state_dict(local["replicas"])
        if strategy.batched is not None:
            strategy.batched.stacked_optimizer.load_state_dict(local["batched_optimizer"])
            strategy.batched._share_state()
    else:
        strategy.lightning_module.load_state_dict(local["module"])  # copies into the flat buckets
        for opt, saved in zip(strategy.optimizers, local.get("optimizers", ())):  # sharded: loaded
            _raw(opt).load_state_dict(saved)
    strategy.driver.load_own_state_dict(local)
    if local.get("precision"):
        strategy.precision_plugin.load_state_dict(local["precision"])
