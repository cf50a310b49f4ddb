"""Fault-tolerant Local SGD on torchft: training goes on through a lost worker.

A worker is a *replica group*: one Lightning job or one torchrun of one or more processes, whose
processes all-reduce their gradients every step as DDP does. Across groups every sync is a round
run through torchft (``pip install 'localsgd[ft]'``): a Lighthouse forms a quorum of the live
groups, the collective runs over the groups in it (the mean is over the participants, not a fixed
K), and the commit decision is torchft's. The algorithm, the schedule and the state a peer heals
from are this project's (:mod:`localsgd.core.elastic`): a restarted group receives the global
model, the outer optimizer, the schedule, the step count and the counters, and continues at the
same round as the others.

Each process of group ``g`` talks to the same-rank process of every other group: with two
processes per group, rank 0 of every group averages with the others' rank 0, rank 1 with rank 1
(their models are equal inside a group, so every process sends the whole model).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import AllreduceOptions, ReduceOp

from localsgd.core.comm import Communicator, ProcessGroupCommunicator, ReduceOpName, RoundFailed

log = logging.getLogger(__name__)

EXTRA_HINT = "HINT: pip install 'localsgd[ft]' (torchft>=0.2,<0.3)"


def require_torchft() -> None:
    """An ImportError naming the extra when torchft is not installed."""
    if importlib.util.find_spec("torchft") is None:
        raise ImportError(f"fault_tolerance needs torchft, which is not installed. {EXTRA_HINT}")


@dataclass(kw_only=True, frozen=True)
class FaultTolerance:
    """Where this replica group stands in a fault-tolerant run (see :mod:`localsgd.ft`)."""

    replica_group: int
    """This group's index in ``[0, num_replica_groups)``: it names the group to torchft and picks its
    shard of the data (as torchft's own sampler does)."""
    num_replica_groups: int
    """K, the groups of a full run: the data is cut into K shards, and the first round waits (up to
    ``start_timeout``) for all K groups so that a run without faults is K ordinary workers."""
    lighthouse: str | None = None
    """The Lighthouse's address, ``http://host:29510``; ``None``: the ``TORCHFT_LIGHTHOUSE`` variable."""
    min_replicas: int = 1
    """A round commits only with at least this many groups in it."""
    timeout: float = 60.0
    """Seconds a collective, a commit or a healing transfer may take before the round fails."""
    quorum_timeout: float = 900.0
    """Seconds a sync waits for its quorum: more than one round's duration (a restarted group waits
    for the others' next sync)."""
    start_timeout: float = 60.0
    """Seconds the first round waits for all ``num_replica_groups`` groups before starting with fewer."""

    def __post_init__(self) -> None:
        for name, least in (("replica_group", 0), ("num_replica_groups", 1), ("min_replicas", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"FaultTolerance.{name} ({value!r}) must be an integer >= {least}")
        if self.replica_group >= self.num_replica_groups:
            raise ValueError(
                f"FaultTolerance.replica_group ({self.replica_group}) must be < num_replica_groups "
                f"({self.num_replica_groups}): groups are numbered 0 .. K-1"
            )
        if self.min_replicas > self.num_replica_groups:
            raise ValueError(
                f"FaultTolerance.min_replicas ({self.min_replicas}) must be <= num_replica_groups "
                f"({self.num_replica_groups})"
            )
        for name in ("timeout", "quorum_timeout", "start_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"FaultTolerance.{name} ({value!r}) must be a number of seconds > 0")
        if self.lighthouse is not None and not (isinstance(self.lighthouse, str) and self.lighthouse):
            raise ValueError(
                f"FaultTolerance.lighthouse ({self.lighthouse!r}) must be an address such as "
                "'http://localhost:29510', or None for $TORCHFT_LIGHTHOUSE"
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> FaultTolerance:
        """From ``REPLICA_GROUP_ID``, ``NUM_REPLICA_GROUPS`` and ``TORCHFT_LIGHTHOUSE`` (torchft's names)."""
        values: dict[str, Any] = {}
        names = (("replica_group", "REPLICA_GROUP_ID"), ("num_replica_groups", "NUM_REPLICA_GROUPS"))
        for name, var in names:
            if name not in overrides:
                if var not in os.environ:
                    raise ValueError(f"FaultTolerance.{name}: not given, and ${var} is not set")
                try:
                    values[name] = int(os.environ[var])
                except ValueError:
                    raise ValueError(f"${var} ({os.environ[var]!r}) must be an integer") from None
        return cls(**{**values, **overrides})

    def lighthouse_address(self) -> str:
        address = self.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        if not address:
            raise ValueError(
                "FaultTolerance.lighthouse: not given, and $TORCHFT_LIGHTHOUSE is not set. HINT: start one "
                "with launch/ft.sh lighthouse, and pass its address"
            )
        return address


class FaultTolerantCommunicator(Communicator):
    """The syncs' collectives across replica groups, through a torchft Manager (an elastic
    communicator: its workers are the groups in the current round's quorum).

    Args:
        config: this group's place in the run.
        group: the processes of this group (``None``: the default process group if one is
            initialized, else this process alone); the group's rank 0 hosts its torchft Manager.
    """

    elastic = True

    def __init__(self, config: FaultTolerance, *, group: Communicator | None = None) -> None:
        super().__init__()
        require_torchft()
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        self.config = config
        distributed = dist.is_available() and dist.is_initialized()
        if group is None and distributed:
            group = ProcessGroupCommunicator()
        self.group = group
        group_rank = dist.get_rank() if distributed else 0
        group_size = dist.get_world_size() if distributed else 1
        self._store, addr, port = _group_store(group_rank, distributed)
        cuda = distributed and dist.get_backend() == "nccl"
        timeout = timedelta(seconds=config.timeout)
        self._pg = ProcessGroupNCCL(timeout=timeout) if cuda else ProcessGroupGloo(timeout=timeout)
        self._device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self._state_fn: Any = None
        self._received: dict[str, Any] | None = None
        self._failed: BaseException | None = None
        self._participants = config.num_replica_groups
        self._rank = config.replica_group
        self.quorum_seconds = 0.0
        """How long the last round's quorum (and healing) took."""
        self.manager = Manager(
            pg=self._pg,
            load_state_dict=self._receive,
            state_dict=self._send,
            min_replica_size=config.min_replicas,
            use_async_quorum=False,  # a healing group takes the state before the round's collectives
            timeout=timeout,
            quorum_timeout=timedelta(seconds=config.quorum_timeout),
            connect_timeout=timeout,
            rank=group_rank,
            world_size=group_size,
            store_addr=addr,
            store_port=port,
            lighthouse_addr=config.lighthouse_address(),
            replica_id=f"localsgd_group_{config.replica_group}",
            init_sync=True,
        )

    # ------------------------------------------------------------------ membership
    @property
    def num_workers(self) -> int:
        """The replica groups in the current round."""
        return self._participants

    @property
    def num_local_workers(self) -> int:
        return 1

    @property
    def first_local_worker(self) -> int:
        """This group's index among the current round's groups."""
        return self._rank

    def serve_state(self, state: Any) -> None:
        self._state_fn = state

    def _send(self) -> dict[str, Any]:
        assert self._state_fn is not None, "serve_state() before the first round"
        return self._state_fn()

    def _receive(self, state: dict[str, Any]) -> None:
        self._received = state

    def begin_round(self) -> dict[str, Any] | None:
        start = time.monotonic()
        deadline = start + self.config.start_timeout
        previous = self._participants
        while True:
            self._failed, self._received = None, None
            self.manager.start_quorum(timeout=timedelta(seconds=self.config.quorum_timeout))
            self._participants = self.manager.num_participants()
            self._rank = self.manager.participating_rank() or 0
            fresh = self.manager.current_step() == 0  # nobody has committed a round yet
            if fresh and self._participants < self.config.num_replica_groups and time.monotonic() < deadline:
                time.sleep(0.2)  # the first round waits for every group, so that no group starts alone
                continue
            break
        self._failed = self.manager.errored()
        self.quorum_seconds = time.monotonic() - start
        if self._participants != previous or self._received is not None:
            log.info(
                "LocalSGD ft: group %d in a round of %d replica groups (torchft step %d)%s",
                self.config.replica_group,
                self._participants,
                self.manager.current_step(),
                ", healed from a peer" if self._received is not None else "",
            )
        state, self._received = self._received, None
        return state

    def commit_round(self, ok: bool = True) -> bool:
        if not ok and self.manager.errored() is None:
            self.manager.report_error(RoundFailed("a collective of this round failed"))
        return bool(self.manager.should_commit())

    def close(self) -> None:
        """Leave the run: the Manager (and its server on the group's rank 0) shut down."""
        self.manager.shutdown(wait=False)

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, tensors: list[Tensor] | Any, op: ReduceOpName) -> None:
        if self._failed is not None:
            raise RoundFailed(f"an earlier collective of this round failed: {self._failed}")
        t = tensors[0]
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.MAX if op == "max" else ReduceOp.SUM  # type: ignore[assignment]
        try:
            self._pg.allreduce([t], opts).wait()
        except Exception as err:  # a lost peer: torchft reconfigures at the next quorum
            self.manager.report_error(err)
            self._failed = err
            raise RoundFailed(f"all-reduce over {self._participants} replica groups failed: {err}") from err
        if op == "mean" and self._participants > 1:
            t.div_(self._participants)

    def _broadcast(self, tensors: Any, src: int) -> None:
        """Inside this group only (across groups, a worker takes a peer's state by healing)."""
        if self.group is not None:
            self.group.broadcast_(tensors, src=0)


def _group_store(group_rank: int, distributed: bool) -> tuple[Any, str, int]:
    """A fresh TCPStore for this incarnation of the group (its rank 0 hosts it; the port travels
    over the group's process group), so that a restarted group never reads a dead Manager's address."""
    host = os.environ.get("MASTER_ADDR", "localhost")
    store = None
    port = torch.zeros(1, dtype=torch.int64)
    if group_rank == 0:
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        port[0] = store.port
    if distributed:
        if dist.get_backend() == "nccl":
            port = port.cuda()
        dist.broadcast(port, src=0)
    return store, host, int(port[0])
