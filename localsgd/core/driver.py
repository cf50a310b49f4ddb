"""The Local SGD driver: where every sync happens, for every front end.

:class:`LocalSGD` owns the algorithm: the step counter, the sync schedule, the averager, the
outer optimizer, the control message before each sync and its checks, the communication
counters, and the state a checkpoint needs. It imports no training framework. A plain PyTorch
loop uses it through a post-step hook on the optimizer (every ``optimizer.step()`` counts one
step and syncs when the schedule says so); the Lightning and Fabric strategies are thin adapters
that call :meth:`LocalSGD.after_step` from their own ``optimizer_step``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, get_args

import torch
from torch import nn
from torch.optim import Optimizer

from localsgd.core.averager import Averager
from localsgd.core.comm import Communicator, default_communicator, node_communicator
from localsgd.core.control import StopRequests, batch_digest
from localsgd.core.delayed import DelayedRound
from localsgd.core.driver_state import DriverState
from localsgd.core.elastic import ElasticRounds
from localsgd.core.gradients import GradientAverager, gradients_of
from localsgd.core.hooks import OptimizerHooks, per_worker
from localsgd.core.options import (
    BufferPolicy,
    H1Sync,
    NonfinitePolicy,
    OptimizerStatePolicy,
    Options,
    SyncEvery,
    check_choice,
)
from localsgd.core.outer import OuterOptimizer
from localsgd.core.wire import Wire

log = logging.getLogger(__name__)


class LocalSGD(OptimizerHooks, DriverState):
    """Local SGD over ``model``'s workers: every H optimizer steps their parameters are averaged.

    Each rank holds ``model`` (one worker), or a list of models (that many simulated workers in
    this process, each stepped by its own optimizer). On creation the driver makes every worker
    equal to worker 0 (rank 0's model) and, with ``hook=True``, registers a post-step hook on the
    optimizers: the training loop stays the user's own.

    Args:
        model: this process's model, or one model per simulated worker.
        optimizer: its optimizer (or optimizers); with a list of models, one entry per model (an
            optimizer or a list of them).
        sync_every: H (an integer >= 1), a :class:`~localsgd.core.schedules.SyncSchedule`, or a
            function ``(step, lr) -> bool``. One step is one ``optimizer.step()``; with several
            models, one step of every model.
        buffers: ``"average"`` averages floating-point buffers (BatchNorm statistics) at each
            sync; ``"local"`` keeps each worker's own.
        optimizer_state: at each sync ``"local"`` keeps each worker's optimizer state,
            ``"average"`` averages it, ``"reset"`` restarts it as a fresh optimizer's.
        outer_optimizer: steps the global model on ``anchor - average`` at each sync (SlowMo,
            DiLoCo); ``None`` is plain averaging.
        nonfinite: workers holding NaN/Inf at a sync: ``"raise"`` on every rank, or
            ``"skip_worker"`` (left out of the average, restarted from it).
        log_divergence: measure the workers' mean squared distance to their average at each sync
            (:attr:`divergence`).
        h1_sync: how a round of one step makes workers synchronous: ``"gradients"`` (all-reduce
            them before the step), ``"parameters"`` (average after it), ``"auto"`` (gradients for
            every optimizer but SGD).
        wire: what a sync sends: ``"fp32"`` (exact), or each worker's delta from the global model
            in ``"bf16"`` or ``"int8"`` (blockwise scales), see :mod:`localsgd.core.wire`.
        error_feedback: with a lossy wire, carry what each encoding lost into the next sync.
        sync_delay: tau >= 0 steps between a sync's start and its result (an overlapped round,
            see :mod:`localsgd.core.delayed`); 0 blocks.
        num_fragments: F >= 1 (dividing a constant H): the model's tensors cut into F fragments of
            near-equal bytes; fragment f syncs every H steps, offset by f * H / F (streaming).
        comm: the communicator over all workers; by default the default process group (one
            worker per model), or, without one, the models of this process alone. An elastic one
            (:class:`localsgd.ft.FaultTolerantCommunicator`) makes every sync a round whose workers
            may change (:mod:`localsgd.core.elastic`); this process joins its run on creation.
        local_world_size: processes per node, for ``Hierarchical`` schedules (default: the
            ``LOCAL_WORLD_SIZE`` torchrun sets, else 1).
        hook: register the optimizer hooks (``False``: the caller calls :meth:`after_step`).
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        optimizer: Optimizer | Sequence[Any],
        *,
        sync_every: SyncEvery = 8,
        buffers: BufferPolicy = "average",
        optimizer_state: OptimizerStatePolicy = "local",
        outer_optimizer: OuterOptimizer | None = None,
        nonfinite: NonfinitePolicy = "raise",
        log_divergence: bool = False,
        h1_sync: H1Sync = "auto",
        wire: Wire = "fp32",
        error_feedback: bool = False,
        sync_delay: int = 0,
        num_fragments: int = 1,
        comm: Communicator | None = None,
        local_world_size: int | None = None,
        hook: bool = True,
        options: Options | None = None,
    ) -> None:
        self.options = options or Options.checked(
            sync_every=sync_every,
            buffers=buffers,
            optimizer_state=optimizer_state,
            outer_optimizer=outer_optimizer,
            nonfinite=nonfinite,
            log_divergence=log_divergence,
            h1_sync=h1_sync,
            wire=wire,
            error_feedback=error_feedback,
            sync_delay=sync_delay,
            num_fragments=num_fragments,
        )
        self.models = [model] if isinstance(model, nn.Module) else list(model)
        if not self.models or not all(isinstance(m, nn.Module) for m in self.models):
            raise ValueError(f"model ({model!r}) must be an nn.Module or a non-empty list of them")
        self.optimizers = per_worker(optimizer, len(self.models))
        self.comm = comm = comm or default_communicator(len(self.models))
        self.local_world_size = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.node_comm: Communicator | None = None
        """The workers of this node, built at the first ``"inner"`` sync."""
        self.schedule = self.options.schedule
        self.averager = Averager(
            self.models,
            comm,
            buffers=self.options.buffers,
            optimizer_state=self.options.optimizer_state,
            optimizers=self.optimizers,
            outer=self.options.outer_optimizer,
            wire=self.options.wire,
            error_feedback=self.options.error_feedback,
            num_fragments=self.options.num_fragments,
        )
        self.averager.broadcast(src=0)  # workers start equal, whatever each rank's initialization drew
        self.gradients = GradientAverager(comm)
        group = comm.group
        self.group_gradients = GradientAverager(group) if group and group.num_workers > 1 else None
        """A worker that is a group of processes: its gradients all-reduced inside it every step."""
        # a simulated worker's optimizer is a view; its source is the optimizer it stands for
        linear = all(
            type(getattr(o, "source", o)) is torch.optim.SGD for opts in self.optimizers for o in opts
        )
        h1 = self.options.h1_sync
        self.h1_gradients = h1 == "gradients" or (h1 == "auto" and not linear)
        """Whether a round of one step all-reduces the gradients (else: averages after the step)."""
        self.num_steps = 0
        """Optimizer steps taken so far (rank-consistent: every rank counts every step)."""
        self.dirty = False
        """Whether the workers may differ from their last average (a step or a forward in train mode)."""
        self.parameters_equal = False
        """Whether this step's gradients were all-reduced, so the parameters are equal already."""
        self.divergence: float | None = None
        """The last divergence measured (``log_divergence=True``)."""
        self.sync_divergence: float | None = None
        """The divergence measured at this step's sync, if it synced and measured one."""
        self.before_sync: Callable[[], None] | None = None
        """Called before every sync's first collective (a front end's own checks)."""
        self.stops = StopRequests()
        """Stop requests (SIGTERM, preemption) for the next sync, and what the last one agreed on."""
        self.timeout: object = None
        """The collectives' timeout, named in the error when a sync fails."""
        self._first_batches: list[float] | None = (
            [0.0] * comm.num_local_workers if comm.num_workers > 1 else None
        )
        self.in_flight: DelayedRound | None = None
        """The overlapped round whose mean is still travelling (``sync_delay`` > 0)."""
        self._handles: list[Any] = []
        self._worker_steps = [0] * len(self.models)
        self.elastic = ElasticRounds(self) if comm.elastic else None
        """The rounds of an elastic communicator (fault tolerance), else ``None``."""
        if self.elastic is not None:
            self.h1_gradients = False  # a round of one step averages the parameters
            self.elastic.join()
        if hook:
            self._register_hooks()

    # ------------------------------------------------------------------ the step
    def through_gradients(self) -> bool:
        """Whether the coming step is a round of one step that all-reduces the gradients first."""
        return self.h1_gradients and not self.dirty and self.schedule.synchronous_at(self.num_steps + 1)

    def note_batch(self, batch: Any, worker: int = 0) -> None:
        """Fingerprint local ``worker``'s first training batch, compared with the other workers' at
        the first sync (DESIGN pitfall 10); later batches cost nothing."""
        if self._first_batches is not None and not self._first_batches[worker]:
            self._first_batches[worker] = batch_digest(batch)

    def before_step(self) -> None:
        """The optimizer is about to step: in a round of one step through the gradients, all-reduce
        them first (as DDP does), so that every worker takes the same step. A worker that is a
        group of processes all-reduces its gradients inside the group at every step."""
        if self.group_gradients is not None:
            self.average_group_gradients()
        if not self.through_gradients():
            return
        if len(self.models) > 1:
            raise RuntimeError(
                "a round of one step through the gradients (h1_sync='gradients', or 'auto' with an "
                "optimizer other than SGD) needs every model's gradients before the first model's step, "
                "which the driver cannot see with several models in one process. HINT: "
                "h1_sync='parameters', or one model per process"
            )
        trainable = [p for p in self.models[0].parameters() if p.requires_grad]
        self.gradients.all_reduce([gradients_of(trainable)])
        self.parameters_equal = True

    def average_group_gradients(self) -> None:
        """Inside a worker that is a group of processes (a replica group of devices), the mean of
        their gradients, as DDP computes it, before every step."""
        assert self.group_gradients is not None
        trainable = [p for p in self.models[0].parameters() if p.requires_grad]
        self.group_gradients.all_reduce([gradients_of(trainable)], tag="group")

    def after_step(self, lr: float | None = None) -> str | bool:
        """One optimizer step was taken (by every local worker): count it and sync if the schedule
        says so. Returns the schedule's decision (falsy: no sync; ``"inner"``: inside the node)."""
        # Counted on every rank for every call, also when AMP skipped the update, so all ranks
        # reach the same collectives (pitfall 2).
        self.num_steps += 1
        self.dirty = True
        if lr is None:
            lr = float(self.optimizers[0][0].param_groups[0]["lr"])
        if self.in_flight is not None:
            if self.in_flight.reduce_at == self.num_steps:
                self.in_flight.reduce()  # a compressed round's second collective
            if self.in_flight.due == self.num_steps:
                self._land()
        self.sync_divergence = None
        decision: str | bool
        if self.options.num_fragments > 1:
            decision = self._sync_fragments(lr)
        else:
            decision = self.schedule.should_sync(self.num_steps, lr)
            if decision:
                if self.before_sync is not None:
                    self.before_sync()
                self._sync(decision)
        self.parameters_equal = False
        return decision

    def _sync_fragments(self, lr: float) -> bool:
        """Streaming: fragment f syncs where the schedule would sync f * H / F steps later, so that
        with ``Constant(H)`` each fragment syncs every H steps and some fragment every H / F."""
        shift = self.schedule.period // self.options.num_fragments
        due = [
            f
            for f in range(self.options.num_fragments)
            if self.schedule.should_sync(self.num_steps + f * shift, lr)
        ]
        for fragment in due:
            if self.before_sync is not None:
                self.before_sync()
            self._sync(True, fragment)
        self.dirty = True  # the other fragments still differ
        return bool(due)

    def _sync(self, decision: str | bool, fragment: int | None = None) -> None:
        policy = self._schedule_policy()
        checks: dict[str, Any] = {"step": self.num_steps, "nonfinite": self.options.nonfinite}
        if decision == "inner":
            with self.reported("inner sync"):
                self.averager.average(
                    "inner", comm=self._node_comm(), optimizer_state=policy, outer=False, **checks
                )
            return
        digests, self._first_batches = self._first_batches, None
        if self.in_flight is not None:
            self._land()  # never two rounds in flight: a round shorter than the delay lands now
        delay = self.options.sync_delay
        if delay and not self.parameters_equal:
            with self.reported("sync"):
                self.in_flight = self.averager.start_delayed(
                    "sync",
                    self.num_steps + delay,
                    step=self.num_steps,
                    digests=digests,
                    flags=self.stops.message(),
                    fragment=fragment,
                )
            return  # its control message's flags are recorded when it lands
        with self.reported("sync"):
            if self.elastic is not None:
                committed, divergence = self.elastic.sync(
                    divergence=self.options.log_divergence, digests=digests, flags=self.stops.message()
                )
            else:
                committed, divergence = (
                    True,
                    self.averager.average(
                        "sync",
                        optimizer_state=policy,
                        divergence=self.options.log_divergence,
                        digests=digests,
                        flags=self.stops.message(),
                        parameters=not self.parameters_equal,
                        fragment=fragment,
                        **checks,
                    ),
                )
        if not committed:
            return  # skipped: every worker keeps its own model
        self.stops.record(self.averager.agreed_flags)
        self.dirty = False
        if divergence is not None:
            self.divergence = self.sync_divergence = divergence

    def _land(self) -> None:
        """The round in flight arrives: applied keeping each worker's progress since its snapshot."""
        assert self.in_flight is not None
        round_, self.in_flight = self.in_flight, None
        with self.reported("delayed sync"):
            self.averager.apply_delayed(round_)
        self.stops.record(self.averager.agreed_flags)

    def _schedule_policy(self) -> OptimizerStatePolicy | None:
        policy = self.schedule.optimizer_state_policy(self.num_steps)
        if policy is None:
            return None
        name = f"{type(self.schedule).__name__}.optimizer_state_policy({self.num_steps})"
        return check_choice(name, policy, get_args(OptimizerStatePolicy))

    def _node_comm(self) -> Communicator:
        if self.node_comm is None:
            # collective, but rank-consistent: every rank gets the same "inner" decision
            self.node_comm = node_communicator(
                self.local_world_size, workers_per_process=self.comm.num_local_workers
            )
        return self.node_comm

    def agree(self, value: float) -> float:
        """A decision all ranks must share (stop training?), in a control message with the step count:
        the max of ``value`` over all workers (with fault tolerance: over this worker's processes)."""
        if self.elastic is not None:
            if self.comm.group is None:
                return value
            with self.reported("decision"):
                _, reduced = self.averager.agree(self.num_steps, value=value, comm=self.comm.group)
            return reduced
        with self.reported("decision"):
            _, reduced = self.averager.agree(self.num_steps, value=value)
        return reduced

    @contextlib.contextmanager
    def reported(self, what: str) -> Iterator[None]:
        """Say which sync failed: a timed-out or broken collective names the step and the operation."""
        try:
            yield
        except (FloatingPointError, ValueError):
            raise
        except RuntimeError as err:
            raise RuntimeError(
                f"LocalSGD {what} at optimizer step {self.num_steps} failed (all-reduce of "
                f"{self.averager.num_bytes} bytes per worker over {self.comm.num_workers} workers, "
                f"timeout {self.timeout}): {err}. HINT: another rank stopped taking steps (it died, or "
                "ran out of batches first: uneven data across ranks) or is much slower"
            ) from err

    # ------------------------------------------------------------------ what others see
    def finish(self) -> None:
        """The final average: every worker ends with the global model, also after a cut-short round."""
        if self.in_flight is not None:
            self._land()
        if self.dirty:
            with self.reported("final average"):
                if self.elastic is not None:
                    if not self.elastic.sync("final")[0]:
                        log.warning("LocalSGD: the final average failed: each worker keeps its own model")
                        return
                else:
                    options = self.options
                    self.averager.average(
                        "final", optimizer_state="local", step=self.num_steps, nonfinite=options.nonfinite
                    )
            self.dirty = False

    @contextlib.contextmanager
    def averaged(self, tag: str = "eval") -> Iterator[None]:
        """The global model a sync now would give (for evaluation); each worker's own model back on exit."""
        if not self.dirty:
            yield
            return
        swap = self.elastic.averaged() if self.elastic is not None else self.averager.averaged(tag)
        with swap:
            yield

    def metrics(self) -> dict[str, float]:
        """The ``comm/*`` counters and the schedule's current period."""
        outer_rounds, outer_bytes = self.comm.rounds("sync"), self.comm.bytes("sync")
        metrics: dict[str, float] = {
            "comm/rounds": outer_rounds,
            "comm/bytes": outer_bytes + self.comm.bytes("grad"),  # rounds of one step through gradients
            "localsgd/sync_every": self.schedule.period,
            "localsgd/round": outer_rounds,
        }
        if self.elastic is not None:
            metrics["ft/participants"] = self.comm.num_workers  # in the last round
            metrics["ft/skipped_rounds"] = self.elastic.skipped
        if self.node_comm is not None:
            inner_rounds, inner_bytes = self.node_comm.rounds("inner"), self.node_comm.bytes("inner")
            metrics["comm/rounds"] += inner_rounds
            metrics["comm/bytes"] += inner_bytes
            metrics["comm/inner_rounds"] = inner_rounds
            metrics["comm/outer_rounds"] = outer_rounds
        return metrics
