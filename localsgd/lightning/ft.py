"""The Lightning side of fault tolerance (:mod:`localsgd.ft`): each replica group is its own
Lightning job; across groups the syncs run through torchft.

What is Lightning's here: the data shard of each process (its group's index among the groups,
then its rank inside the group), the Trainer's step counter of a group that healed (it continues
at the others' step, so that ``max_steps`` ends every group at the same round), and the
Manager's shutdown.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from localsgd.core.comm import Communicator, ProcessGroupCommunicator
from localsgd.core.options import Options, Setting, check_rules


def communicator(fault_tolerance: Any, workers_per_process: int) -> Communicator:
    """All workers: this job's processes, or (with fault tolerance) the replica groups."""
    if fault_tolerance is None:
        return ProcessGroupCommunicator(workers_per_process=workers_per_process)
    from localsgd.ft import FaultTolerantCommunicator

    return FaultTolerantCommunicator(fault_tolerance, group=ProcessGroupCommunicator())


def sampler_kwargs(
    kwargs: dict[str, Any], fault_tolerance: Any, world_size: int, rank: int
) -> dict[str, Any]:
    """A replica group's processes read shard ``group x processes + rank`` of ``K x processes``."""
    if fault_tolerance is None:
        return kwargs
    ft = fault_tolerance
    return {
        **kwargs,
        "num_replicas": ft.num_replica_groups * world_size,
        "rank": ft.replica_group * world_size + rank,
    }


def continue_where_healed(trainer: pl.Trainer, driver: Any, fault_tolerance: Any) -> None:
    """A group that joined a run in progress took the others' step count: so does the Trainer."""
    if driver.elastic is None or not driver.num_steps:
        return
    steps = driver.num_steps
    loop = trainer.fit_loop.epoch_loop
    for progress in (
        loop.automatic_optimization.optim_progress.optimizer.step.total,
        loop.manual_optimization.optim_step_progress.total,
    ):
        progress.ready = progress.completed = steps
    loop._batches_that_stepped = steps
    rank_zero_info(
        f"LocalSGD: replica group {fault_tolerance.replica_group} joined the run at optimizer step "
        f"{steps}, healed from a live group; its data restarts at the start of its shard"
    )


def checked_fault_tolerance(value: Any, options: Options, workers_per_device: int) -> Any:
    """``fault_tolerance`` as given (``None``, or a :class:`localsgd.ft.FaultTolerance` whose
    options fault-tolerant rounds support); an ImportError naming the extra without torchft."""
    if value is None:
        return None
    from localsgd.ft import FaultTolerance, require_torchft

    if not isinstance(value, FaultTolerance):
        raise ValueError(f"fault_tolerance ({value!r}) must be None or a localsgd.ft.FaultTolerance")
    require_torchft()
    check_rules(options, Setting(fault_tolerance=True, workers_per_process=workers_per_device))
    return value
