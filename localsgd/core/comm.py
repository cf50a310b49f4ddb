"""All communication between workers goes through a :class:`Communicator`.

This is the only module of the library that imports ``torch.distributed``. Two
implementations share one interface:

* :class:`ProcessGroupCommunicator`: one worker per process, collectives over a
  ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU);
* :class:`InProcessCommunicator`: ``K`` workers held in one process (the simulator
  and the unit tests run the real averaging code through it).

A collective takes one tensor per *local* worker (one for a process group, ``K``
in-process) and leaves the result in every one of them.

Accounting: a *round* is one logical exchange (one averaging of the model),
opened with :meth:`Communicator.round`; every collective inside it adds its
payload (``numel * element_size`` of the tensor one worker contributes) to that
round's tag. Collectives outside a round (the initial broadcast, control flags)
are not counted, so ``comm/bytes`` is the model-averaging traffic per worker.
The wire traffic of a ring all-reduce is about ``2 (K - 1) / K`` times the payload.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

ReduceOpName = Literal["mean", "sum", "max"]


@dataclass
class CommStats:
    """Cumulative traffic of one tag (for example ``"sync"``), per worker."""

    rounds: int = 0
    """Number of rounds opened under this tag."""
    bytes: int = 0
    """Payload bytes one worker contributed to collectives inside those rounds."""


class Pending:
    """A collective started in the background; :meth:`wait` finishes it (once)."""

    def __init__(self, work: Any = None, then: Any = None) -> None:
        self._work, self._then = work, then

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._then is not None:
            then, self._then = self._then, None
            then()


class WorkersApart(RuntimeError):
    """The workers met in a collective at different points of the run (out of step)."""


def between_workers(err: BaseException) -> bool:
    """Whether ``err`` is a failure between workers (a collective that timed out or lost its
    peer, workers out of step), not one of this process's own (out of memory, a shape mismatch)."""
    if isinstance(err, (dist.DistError, WorkersApart)):
        return True
    text = str(err)
    return any(
        sign in text for sign in ("Timed out", "timed out", "Connection closed", "Connection reset", "gloo")
    )


class RoundFailed(RuntimeError):
    """A collective of an elastic communicator failed (a peer was lost): the round is skipped."""


class Communicator(ABC):
    """Collectives over ``num_workers`` workers, ``num_local_workers`` of them in this process.

    An *elastic* communicator (:mod:`localsgd.ft`) may change its workers from round to round:
    :meth:`begin_round` forms a round's membership, a collective may raise :class:`RoundFailed`,
    and :meth:`commit_round` says whether the round's result may be applied.
    """

    elastic = False
    group: Communicator | None = None
    """The processes of this worker (an elastic worker may be a group of devices)."""
    control: Communicator | None = None
    """Where control messages go when it is wider than this one: over sharded workers, this
    communicator reaches the same shard of every worker, and the control message every process
    (a sharded worker's processes must take the same decisions)."""

    def __init__(self) -> None:
        self.stats: dict[str, CommStats] = {}
        self._open_tag: str | None = None

    def begin_round(self) -> dict[str, Any] | None:
        """Form the coming round's membership; the state a peer sent for this worker to take first
        (it rejoined, or fell behind), else ``None``."""
        return None

    def commit_round(self, ok: bool = True) -> bool:
        """Whether every worker may apply the round (``ok``: this one's collectives succeeded)."""
        return ok

    def serve_state(self, state: Callable[[], dict[str, Any]]) -> None:  # noqa: B027
        """What this worker sends a peer that needs to heal (only an elastic communicator does)."""

    @property
    @abstractmethod
    def num_workers(self) -> int:
        """Total number of workers taking part in every collective."""

    @property
    @abstractmethod
    def num_local_workers(self) -> int:
        """Number of workers held by this process (length of the lists collectives take)."""

    @property
    @abstractmethod
    def first_local_worker(self) -> int:
        """Global index of this process's first worker."""

    @abstractmethod
    def _all_reduce(self, tensors: Sequence[Tensor], op: ReduceOpName) -> None: ...

    @abstractmethod
    def _broadcast(self, tensors: Sequence[Tensor], src: int) -> None: ...

    def all_reduce_(
        self, tensors: Sequence[Tensor], op: ReduceOpName = "mean", *, counted: bool = True
    ) -> None:
        """Reduce ``tensors`` (one per local worker) over all workers, in place, into each of them.

        ``counted=False`` marks a control message (a flag, a size check): it is not model
        traffic and is left out of the round's bytes.
        """
        self._prepare(tensors, op, counted)
        self._all_reduce(tensors, op)

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Copy worker ``src``'s tensor into every worker's tensor, in place."""
        self._check(tensors)
        if not 0 <= src < self.num_workers:
            raise ValueError(f"src ({src}) must be a worker index in [0, {self.num_workers})")
        self._count(tensors[0])
        self._broadcast(tensors, src)

    def all_reduce_start_(
        self, tensors: Sequence[Tensor], op: ReduceOpName = "mean", *, counted: bool = True
    ) -> Pending:
        """:meth:`all_reduce_`, started in the background: the result is in ``tensors`` once the
        returned :class:`Pending` is waited on. In one process it is computed at once."""
        self._prepare(tensors, op, counted)
        return self._all_reduce_start(tensors, op)

    def _all_reduce_start(self, tensors: Sequence[Tensor], op: ReduceOpName) -> Pending:
        self._all_reduce(tensors, op)
        return Pending()

    def _prepare(self, tensors: Sequence[Tensor], op: ReduceOpName, counted: bool) -> None:
        self._check(tensors)
        if op not in ("mean", "sum", "max"):
            raise ValueError(f"op ({op!r}) must be one of 'mean', 'sum', 'max'")
        if counted:
            self._count(tensors[0])

    def exchange_(self, tensor: Tensor) -> Tensor:
        """All-to-all across processes: row ``p`` of ``tensor`` (shape ``(processes, ...)``) goes to
        process ``p``; row ``p`` of the result came from process ``p``. One process: itself."""
        return tensor

    def gather_(self, shard: Tensor) -> Tensor:
        """All-gather across processes: the processes' ``shard`` tensors stacked in process order."""
        return shard.unsqueeze(0)

    def exchange_start_(self, tensor: Tensor) -> tuple[Tensor, Pending]:
        """:meth:`exchange_` started in the background: the result is valid once waited on."""
        return self.exchange_(tensor), Pending()

    def gather_start_(self, shard: Tensor) -> tuple[Tensor, Pending]:
        """:meth:`gather_` started in the background: the result is valid once waited on."""
        return self.gather_(shard), Pending()

    def count_(self, num_bytes: int) -> None:
        """Add ``num_bytes`` (what one worker sent) to the open round's payload."""
        if self._open_tag is not None:
            self.stats[self._open_tag].bytes += num_bytes

    @contextlib.contextmanager
    def round(self, tag: str = "sync") -> Iterator[None]:
        """Count one round under ``tag``; collectives inside add their payload to it."""
        if self._open_tag is not None:
            raise RuntimeError(f"round {tag!r} opened inside round {self._open_tag!r}")
        self.stats.setdefault(tag, CommStats()).rounds += 1
        self._open_tag = tag
        try:
            yield
        finally:
            self._open_tag = None

    def rounds(self, tag: str = "sync") -> int:
        return self.stats.get(tag, CommStats()).rounds

    def bytes(self, tag: str = "sync") -> int:
        return self.stats.get(tag, CommStats()).bytes

    def state_dict(self) -> dict[str, Any]:
        return {tag: {"rounds": s.rounds, "bytes": s.bytes} for tag, s in self.stats.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {tag: CommStats(int(s["rounds"]), int(s["bytes"])) for tag, s in state.items()}

    def _count(self, tensor: Tensor) -> None:
        if self._open_tag is not None:
            self.stats[self._open_tag].bytes += tensor.numel() * tensor.element_size()

    def _check(self, tensors: Sequence[Tensor]) -> None:
        if len(tensors) != self.num_local_workers:
            raise ValueError(
                f"a collective takes one tensor per local worker: got {len(tensors)}, "
                f"this process holds {self.num_local_workers}"
            )


def _reduce_into_first(tensors: Sequence[Tensor], op: ReduceOpName) -> None:
    """Reduce the local workers' tensors into ``tensors[0]``, in worker order (mean: the sum)."""
    acc = tensors[0]
    for t in tensors[1:]:
        if op == "max":
            torch.maximum(acc, t, out=acc)
        else:
            acc.add_(t)


def _copy_from_first(tensors: Sequence[Tensor]) -> None:
    for t in tensors[1:]:
        t.copy_(tensors[0])


class ProcessGroupCommunicator(Communicator):
    """Workers in processes: collectives over a ``torch.distributed`` process group.

    Each process holds ``workers_per_process`` workers (more than one when it simulates
    several, see :mod:`localsgd.core.replicas`): they are reduced locally, in worker order,
    then across processes. ``mean`` is NCCL's fused average (``ReduceOp.AVG``: no separate
    division pass) on NCCL, and a SUM followed by a division by the number of workers on
    other backends (gloo has no native mean).

    Args:
        group: the process group (``None``: the default, all processes).
        workers_per_process: workers held by each process.
    """

    def __init__(self, group: Any = None, *, workers_per_process: int = 1) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ProcessGroupCommunicator needs an initialized torch.distributed process group "
                "(the Lightning strategy initializes it in setup)"
            )
        if (
            isinstance(workers_per_process, bool)
            or not isinstance(workers_per_process, int)
            or workers_per_process < 1
        ):
            raise ValueError(f"workers_per_process ({workers_per_process!r}) must be an integer >= 1")
        self.process_group = group
        """The torch.distributed process group (``None``: the default one)."""
        self._per_process = workers_per_process
        self._processes = dist.get_world_size(group)
        self._rank = dist.get_rank(group)
        self.fused_average = dist.get_backend(group) == "nccl"
        """Whether ``mean`` uses the backend's ``ReduceOp.AVG``."""
        # no destroy_at_exit here: the group is the user's (or a front end's, which registers it)

    @property
    def num_workers(self) -> int:
        return self._processes * self._per_process

    @property
    def num_local_workers(self) -> int:
        return self._per_process

    @property
    def first_local_worker(self) -> int:
        return self._rank * self._per_process

    def _all_reduce(self, tensors: Sequence[Tensor], op: ReduceOpName) -> None:
        # every blocking round's hot path: a plain blocking collective, without the background
        # path's closure (bench/averaging.py gave x1.03 and x1.08 of raw + divide written so, one
        # noisy x1.14 through the background path)
        _reduce_into_first(tensors, op)
        if op == "mean" and self.fused_average:
            if len(tensors) > 1:  # every process holds as many workers: the mean of the means
                tensors[0].div_(len(tensors))
            dist.all_reduce(tensors[0], op=dist.ReduceOp.AVG, group=self.process_group)
        else:
            dist_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
            dist.all_reduce(tensors[0], op=dist_op, group=self.process_group)
            if op == "mean" and self.num_workers > 1:
                tensors[0].div_(self.num_workers)
        _copy_from_first(tensors)

    def _all_reduce_start(self, tensors: Sequence[Tensor], op: ReduceOpName) -> Pending:
        _reduce_into_first(tensors, op)
        divide = op == "mean" and self.num_workers > 1
        if op == "mean" and self.fused_average:
            if len(tensors) > 1:  # every process holds as many workers: the mean of the means
                tensors[0].div_(len(tensors))
            dist_op, divide = dist.ReduceOp.AVG, False
        else:
            dist_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        work = dist.all_reduce(tensors[0], op=dist_op, group=self.process_group, async_op=True)

        def then() -> None:  # gloo has no mean: the division once the sum has arrived
            if divide:
                tensors[0].div_(self.num_workers)
            _copy_from_first(tensors)

        return Pending(work, then)

    def exchange_(self, tensor: Tensor) -> Tensor:
        out, pending = self.exchange_start_(tensor)
        pending.wait()
        return out

    def gather_(self, shard: Tensor) -> Tensor:
        out, pending = self.gather_start_(shard)
        pending.wait()
        return out

    def exchange_start_(self, tensor: Tensor) -> tuple[Tensor, Pending]:
        out = torch.empty_like(tensor)
        work = dist.all_to_all_single(out, tensor, group=self.process_group, async_op=True)
        return out, Pending(work)

    def gather_start_(self, shard: Tensor) -> tuple[Tensor, Pending]:
        out = torch.empty(self._processes * shard.numel(), dtype=shard.dtype, device=shard.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
        work = gather(out, shard.contiguous().view(-1), group=self.process_group, async_op=True)
        return out.view(self._processes, *shard.shape), Pending(work)

    def _broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        src_process, src_local = divmod(src, self._per_process)
        if self._rank == src_process and src_local != 0:
            tensors[0].copy_(tensors[src_local])
        group: Any = self.process_group  # a torch.distributed process group (or None: the default one)
        global_src = dist.get_global_rank(group, src_process) if group is not None else src_process
        dist.broadcast(tensors[0], src=global_src, group=group)
        _copy_from_first(tensors)


@contextlib.contextmanager
def destroy_at_exit_if_created() -> Iterator[None]:
    """Around code that may initialize the default process group (a front end's setup, where
    Lightning and Fabric create it): if the group did not exist before and does after, it is this
    library's to tear down, and :func:`destroy_at_exit` is registered. A group that existed before
    is the user's, and outlives everything here (they may still use it in their own exit code)."""
    existed = dist.is_available() and dist.is_initialized()
    yield
    if not existed and dist.is_available() and dist.is_initialized():
        destroy_at_exit()


@functools.cache
def destroy_at_exit() -> None:
    """Destroy the default process group when the program exits, while the interpreter is still
    whole (Lightning does so for NCCL only). Left to interpreter finalization, a gloo worker
    thread can still hold a finished background collective's tensors, whose release then needs a
    GIL that is gone: the process aborts ("terminate called without an active exception") after
    training has ended. Destroying it is local (no collective); a group already destroyed is left
    alone. Only for a group this library's front ends created (:func:`destroy_at_exit_if_created`):
    one the user created is theirs to destroy."""
    atexit.register(_destroy_default_group)


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_communicator(workers_per_process: int) -> Communicator:
    """Over the default process group where one is initialized; else this process's workers alone."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroupCommunicator(workers_per_process=workers_per_process)
    return InProcessCommunicator(workers_per_process)


def node_communicator(local_world_size: int, *, workers_per_process: int = 1) -> ProcessGroupCommunicator:
    """A communicator over this process's node: consecutive ranks in groups of ``local_world_size``.

    Creating the groups is collective: every rank must call this at the same point.
    """
    world = dist.get_world_size()
    if local_world_size < 1 or world % local_world_size != 0:
        raise ValueError(
            f"local_world_size ({local_world_size}) must be >= 1 and divide the world size ({world})"
        )
    group, _ = dist.new_subgroups(group_size=local_world_size)
    return ProcessGroupCommunicator(group, workers_per_process=workers_per_process)


MESH_DIMS = ("replicate", "shard")
"""A mesh of sharded workers: one row per worker, its processes shard the model (FSDP2)."""


def worker_mesh(device_type: str, shards_per_worker: int) -> Any:
    """The (K, S) device mesh of K workers of ``shards_per_worker`` processes each, named
    :data:`MESH_DIMS`, over every process of the default group (creating it is collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % shards_per_worker:
        raise ValueError(
            f"shards_per_worker ({shards_per_worker}) must divide the number of processes ({world}): "
            f"each worker is {shards_per_worker} processes. HINT: devices x num_nodes a multiple of it"
        )
    return init_device_mesh(
        device_type, (world // shards_per_worker, shards_per_worker), mesh_dim_names=MESH_DIMS
    )


def mesh_communicator(mesh: Any) -> ProcessGroupCommunicator:
    """For workers that are groups of processes sharding one model (FSDP2 over ``mesh["shard"]``):
    a communicator over ``mesh["replicate"]``, so that each process averages its own shards with
    the same shards of the other workers; its control messages go to every process of the mesh.

    Args:
        mesh: a 2-D ``DeviceMesh`` of shape (K workers, S shards per worker) whose dimensions are
            named ``("replicate", "shard")``.
    """
    names = getattr(mesh, "mesh_dim_names", None)
    if getattr(mesh, "ndim", None) != 2 or tuple(names or ()) != MESH_DIMS:
        raise ValueError(
            f"mesh ({mesh!r}) must be a 2-D DeviceMesh with mesh_dim_names {MESH_DIMS} (one row per "
            "worker, its processes sharding the model). HINT: init_device_mesh(device_type, (K, S), "
            "mesh_dim_names=('replicate', 'shard')), and fully_shard(model, mesh=mesh['shard'])"
        )
    if not dist.is_available() or not dist.is_initialized() or mesh.size() != dist.get_world_size():
        world = dist.get_world_size() if dist.is_initialized() else "no process group"
        raise ValueError(
            f"mesh (shape {tuple(mesh.shape)}) must span every process of the default process group "
            f"({world}): its control messages go to all of them"
        )
    comm = ProcessGroupCommunicator(mesh.get_group("replicate"))
    comm.control = ProcessGroupCommunicator()  # every process: a worker's shards decide together
    return comm


class InProcessCommunicator(Communicator):
    """``num_workers`` workers held in one process: the collectives are local tensor math,
    reducing into the first worker's tensor in worker order, then copying it to the others.
    """

    def __init__(self, num_workers: int) -> None:
        super().__init__()
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers ({num_workers!r}) must be an integer >= 1")
        self._num_workers = num_workers

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def num_local_workers(self) -> int:
        return self._num_workers

    @property
    def first_local_worker(self) -> int:
        return 0

    def _all_reduce(self, tensors: Sequence[Tensor], op: ReduceOpName) -> None:
        _reduce_into_first(tensors, op)
        if op == "mean" and len(tensors) > 1:
            tensors[0].div_(len(tensors))
        _copy_from_first(tensors)

    def _broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        if src != 0:
            tensors[0].copy_(tensors[src])
        _copy_from_first(tensors)
