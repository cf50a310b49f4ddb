"""The Local SGD driver: where every sync happens, for every front end.

:class:`LocalSGD` owns the algorithm: the step counter, the sync schedule, and its parts, each an
object: the averager (the workers' models as flat buckets), the kind of round chosen once from
the options (:mod:`localsgd.core.rounds`), the optimizer hooks, the stop requests. It imports no
training framework. A plain PyTorch loop uses it through a post-step hook on the optimizer (every
``optimizer.step()`` counts one step and syncs when the schedule says so); the Lightning and
Fabric strategies are thin adapters that call :meth:`LocalSGD.after_step` from their own
``optimizer_step``, and never set the driver's fields.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, get_args

import torch
from torch import nn
from torch.optim import Optimizer

from localsgd.core import control
from localsgd.core.averager import Averager
from localsgd.core.comm import (
    Communicator,
    InProcessCommunicator,
    between_workers,
    default_communicator,
    mesh_communicator,
    node_communicator,
)
from localsgd.core.control import StopRequests, batch_digest
from localsgd.core.delayed import DelayedRound, OverlappedRound, in_flight_round
from localsgd.core.driver_state import sync_state
from localsgd.core.elastic import ElasticRound
from localsgd.core.files import add_note
from localsgd.core.gradients import GradientAverager, gradients_of
from localsgd.core.hooks import OptimizerHooks, per_worker
from localsgd.core.options import (
    BufferPolicy,
    H1Sync,
    NonfinitePolicy,
    OptimizerStatePolicy,
    Options,
    Setting,
    SyncEvery,
    Wire,
    check_choice,
    check_rules,
    with_option_docs,
)
from localsgd.core.outer import OuterOptimizer
from localsgd.core.rounds import (
    CompressedRound,
    ExactRound,
    InnerRound,
    Round,
    RoundKind,
    land_round,
    run_round,
)
from localsgd.core.wire import CompressedMean

log = logging.getLogger(__name__)


class LocalSGD:
    """Local SGD over ``model``'s workers: every H optimizer steps their parameters are averaged.

    Each rank holds ``model`` (one worker), or a list of models (that many simulated workers in
    this process, each stepped by its own optimizer). On creation the driver makes every worker
    equal to worker 0 (rank 0's model) and, with ``hook=True``, registers a post-step hook on the
    optimizers: the training loop stays the user's own. Leave its ``with`` block (or call
    :meth:`finish` and :meth:`close`) to take the final average and remove the hooks; a driver
    dropped without either takes its hooks off when it is collected.

    Args:
        model: this process's model, or one model per simulated worker.
        optimizer: its optimizer (or optimizers); with a list of models, one entry per model (an
            optimizer or a list of them).
        {options}
        comm: the communicator over all workers; by default the default process group (one
            worker per model), or, without one, the models of this process alone (with a
            warning: each process then trains on its own). An elastic one
            (:class:`localsgd.ft.FaultTolerantCommunicator`) makes every sync a round whose workers
            may change (:mod:`localsgd.core.elastic`); this process joins its run on creation.
        mesh: workers that are groups of processes sharding one model: a 2-D ``DeviceMesh`` of
            shape (K workers, S processes each) named ``("replicate", "shard")``, the model sharded
            with ``fully_shard(..., mesh=mesh["shard"])``. Each process averages its own shards
            with the same shards of the other workers (over ``mesh["replicate"]``); between syncs
            nothing crosses that dimension. Not with ``comm``.
        local_world_size: processes per node, for ``Hierarchical`` schedules (default: the
            ``LOCAL_WORLD_SIZE`` torchrun sets, else 1).
        hook: register the optimizer hooks (``False``: the caller calls :meth:`before_step` and
            :meth:`after_step`, as the Lightning and Fabric strategies do).
        options: the algorithm's options as one object (instead of its keyword arguments).
        timeout: the collectives' timeout, named in the error when a sync fails.
        before_sync: called before every sync's first collective (a front end's own checks).
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
        h1_sync: H1Sync = "auto",
        nonfinite: NonfinitePolicy = "raise",
        wire: Wire = "fp32",
        error_feedback: bool = False,
        sync_delay: int = 0,
        num_fragments: int = 1,
        log_divergence: bool = False,
        comm: Communicator | None = None,
        mesh: Any = None,
        local_world_size: int | None = None,
        hook: bool = True,
        options: Options | None = None,
        timeout: object = None,
        before_sync: Callable[[], None] | None = None,
    ) -> None:
        self.options = options = options or Options.pick(locals())
        self.models = [model] if isinstance(model, nn.Module) else list(model)
        if not self.models or not all(isinstance(m, nn.Module) for m in self.models):
            raise ValueError(f"model ({model!r}) must be an nn.Module or a non-empty list of them")
        elastic = comm is not None and comm.elastic
        if elastic or mesh is not None:
            sharded = mesh is not None
            check_rules(
                options,
                Setting(fault_tolerance=elastic, workers_per_process=len(self.models), sharded=sharded),
            )
        if mesh is not None:
            if comm is not None:
                raise ValueError(
                    "pass comm or mesh, not both: with a mesh the driver averages over mesh['replicate']"
                )
            comm = mesh_communicator(mesh)
        self.optimizers = per_worker(optimizer, len(self.models))
        given, self.comm = comm, comm or default_communicator(len(self.models))
        self.sharded = mesh is not None
        """Whether each worker is a group of processes sharding its model (``mesh``)."""
        self.mesh = mesh
        """The (K, S) ``DeviceMesh`` of sharded workers (``None``: whole workers)."""
        comm = self.comm
        if given is None and isinstance(comm, InProcessCommunicator) and comm.num_workers == 1:
            warnings.warn(
                "LocalSGD: no torch.distributed process group is initialized, so this process trains one "
                "worker on its own (nothing is averaged with other processes). HINT: call "
                "torch.distributed.init_process_group() first (torchrun sets its environment), or pass "
                "several models for simulated workers",
                stacklevel=2,
            )
        self.local_world_size = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.schedule = options.schedule
        self.timeout, self.before_sync = timeout, before_sync
        self.averager = Averager(
            self.models,
            comm,
            buffers=options.buffers,
            optimizer_state=options.optimizer_state,
            optimizers=self.optimizers,
            outer=options.outer_optimizer,
            num_fragments=options.num_fragments,
        )
        self.averager.broadcast(src=0)  # workers start equal, whatever each rank's initialization drew
        self.gradients = GradientAverager(comm)
        group = comm.group
        self.group_gradients = GradientAverager(group) if group and group.num_workers > 1 else None
        """A worker that is a group of processes: its gradients all-reduced inside it every step."""
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
        self.stops = StopRequests()
        """Stop requests (SIGTERM, preemption) for the next sync, and what the last one agreed on."""
        self._first_batches: list[float] | None = (
            [0.0] * comm.num_local_workers if comm.num_workers > 1 else None
        )
        self._flight: Round | None = None
        self.elastic: ElasticRound | None = None
        """The rounds of an elastic communicator (fault tolerance), else ``None``."""
        self.rounds = self._choose_rounds()
        """The kind of round every sync runs (chosen once, from the options and the communicator)."""
        self.inner: RoundKind | None = None
        """The rounds inside this node (``Hierarchical``), made at the first ``"inner"`` sync."""
        self.h1_gradients = self._rounds_of_one_step_through_gradients()
        """Whether a round of one step all-reduces the gradients (else: averages after the step)."""
        self.hooks = OptimizerHooks(self, self.optimizers) if hook else None
        """The optimizer hooks of a plain loop (``hook=True``)."""
        if self.elastic is not None:
            self.elastic.join(self.num_steps)

    def _choose_rounds(self) -> RoundKind:
        options = self.options
        kind: RoundKind
        if self.comm.elastic:
            kind = self.elastic = ElasticRound(
                self.averager, sync_state=self.sync_state_dict, take_sync_state=self._take_sync_state
            )
        elif options.wire != "fp32":
            kind = CompressedRound(self.averager, options.wire, error_feedback=options.error_feedback)
        else:
            kind = ExactRound(self.averager)
        return OverlappedRound(kind, options.sync_delay) if options.sync_delay else kind

    def _rounds_of_one_step_through_gradients(self) -> bool:
        h1 = self.options.h1_sync
        if self.sharded:
            return False  # FSDP2 reduces the gradients inside a worker; across workers: parameters
        if self.elastic is not None:
            if h1 == "auto":
                log.info("LocalSGD: fault tolerance: a round of one step averages the parameters (h1_sync)")
            return False
        # a simulated worker's optimizer is a view; its source is the optimizer it stands for
        linear = all(
            type(getattr(o, "source", o)) is torch.optim.SGD for opts in self.optimizers for o in opts
        )
        return h1 == "gradients" or (h1 == "auto" and not linear)

    # ------------------------------------------------------------------ the step
    def through_gradients(self) -> bool:
        """Whether the coming step is a round of one step that all-reduces the gradients first."""
        return self.h1_gradients and not self.dirty and self.schedule.synchronous_at(self.num_steps + 1)

    def note_batch(self, batch: Any, worker: int = 0) -> None:
        """Fingerprint local ``worker``'s first training batch, compared with the other workers' at
        the first sync (DESIGN pitfall 10); later batches cost nothing. The Lightning and Fabric
        front ends call it; a plain loop calls it with each batch (or its first)."""
        if self._first_batches is not None and not self._first_batches[worker]:
            self._first_batches[worker] = batch_digest(batch)

    def mark_dirty(self) -> None:
        """The workers may now differ from their last average (a forward pass in train mode moves
        BatchNorm statistics, before any step)."""
        self.dirty = True

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

    def after_step(self, lr: float | None = None, *, gradients_averaged: bool = False) -> str | bool:
        """One optimizer step was taken (by every local worker): count it and sync if the schedule
        says so (``gradients_averaged``: the caller all-reduced this step's gradients, so the
        parameters are equal). Returns the schedule's decision (falsy: no sync; ``"inner"``:
        inside the node)."""
        # Counted on every rank for every call, also when AMP skipped the update, so all ranks
        # reach the same collectives (pitfall 2).
        self.num_steps += 1
        self.dirty = True
        self.parameters_equal = self.parameters_equal or gradients_averaged
        if lr is None:
            lr = float(self.optimizers[0][0].param_groups[0]["lr"])
        if self._flight is not None:
            self.rounds.tick(self._flight, self.num_steps)
            if self._flight.due == self.num_steps:
                self._land()
        self.sync_divergence = None
        fragments = self.options.num_fragments
        decision: str | bool
        if fragments > 1:
            # fragment f syncs where the schedule would sync f * H / F steps later
            shift = self.schedule.period // fragments
            due = [f for f in range(fragments) if self.schedule.should_sync(self.num_steps + f * shift, lr)]
            for fragment in due:
                self._sync(True, fragment)
            self.dirty = True  # the other fragments still differ
            decision = bool(due)
        else:
            decision = self.schedule.should_sync(self.num_steps, lr)
            if decision:
                self._sync(decision)
        self.parameters_equal = False
        return decision

    def _sync(self, decision: str | bool, fragment: int | None = None) -> None:
        """One sync: the round the schedule asks for, through the kind of round chosen at creation."""
        if self.before_sync is not None:
            self.before_sync()
        policy = self._schedule_policy()
        if decision == "inner":
            with self.reported("inner sync"):
                run_round(self._inner(), Round(tag="inner", step=self.num_steps, optimizer_state=policy))
            return
        if self._flight is not None:
            self._land()  # never two rounds in flight: a round shorter than the delay lands now
        digests, self._first_batches = self._first_batches, None
        r = Round(
            tag="sync",
            step=self.num_steps,
            nonfinite=self.options.nonfinite,
            optimizer_state=policy,
            fragment=fragment,
            parameters=not self.parameters_equal,
            divergence=self.options.log_divergence,
            digests=digests,
            flags=self.stops.message(),
        )
        # a round whose parameters are equal already (through the gradients) has nothing to overlap
        kind = self.rounds if r.parameters else self.rounds.blocking
        with self.reported("sync"):
            if run_round(kind, r):
                self._committed(r)
            elif r.due is not None:
                self._flight = r

    def _land(self) -> None:
        """The round in flight arrives: applied keeping each worker's progress since its snapshot."""
        assert self._flight is not None
        r, self._flight = self._flight, None
        with self.reported("delayed sync"):
            land_round(self.rounds, r)
        self.stops.record(r.agreed_flags)

    def _committed(self, r: Round) -> None:
        self.stops.record(r.agreed_flags)
        self.dirty = False
        if r.measured is not None:
            self.divergence = self.sync_divergence = r.measured

    def _schedule_policy(self) -> OptimizerStatePolicy | None:
        policy = self.schedule.optimizer_state_policy(self.num_steps)
        if policy is None:
            return None
        name = f"{type(self.schedule).__name__}.optimizer_state_policy({self.num_steps})"
        return check_choice(name, policy, get_args(OptimizerStatePolicy))

    def _inner(self) -> RoundKind:
        if self.inner is None:
            # collective, but rank-consistent: every rank gets the same "inner" decision
            node = node_communicator(self.local_world_size, workers_per_process=self.comm.num_local_workers)
            self.inner = InnerRound(self.averager, node)
        return self.inner

    @property
    def in_flight(self) -> DelayedRound | None:
        """The overlapped round whose mean is still travelling (``sync_delay`` > 0)."""
        return None if self._flight is None else self._flight.pending

    @property
    def node_comm(self) -> Communicator | None:
        """The workers of this node, built at the first ``"inner"`` sync."""
        return None if self.inner is None else self.inner.comm

    @property
    def wire(self) -> CompressedMean | None:
        """The compressed wire of the syncs, with its error-feedback residuals (``None``: fp32)."""
        return getattr(self.rounds, "wire", None)

    def agree(self, value: float) -> float:
        """A decision all ranks must share (stop training?), in a control message with the step count:
        the max of ``value`` over all workers (with fault tolerance: over this worker's processes)."""
        comm = self.comm.group if self.elastic is not None else self.comm.control or self.comm
        if comm is None:
            return value
        with self.reported("decision"):
            _, reduced, _, _ = control.agree(comm, self.averager.worker_flats(), self.num_steps, value=value)
        return reduced

    @contextlib.contextmanager
    def reported(self, what: str) -> Iterator[None]:
        """Say which sync failed. A failure between workers (a collective that timed out or lost
        its peer, workers out of step) is raised naming the step, the operation and what to look
        for; any other error (an out-of-memory, a shape mismatch) keeps its type and message, with
        the same context added as a note."""
        try:
            yield
        except (FloatingPointError, ValueError):
            raise
        except RuntimeError as err:
            context = (
                f"LocalSGD {what} at optimizer step {self.num_steps} failed (all-reduce of "
                f"{self.averager.num_bytes} bytes per worker over {self.comm.num_workers} workers, "
                f"timeout {self.timeout})"
            )
            if not between_workers(err):
                add_note(err, context)
                raise
            raise RuntimeError(
                f"{context}: {err}. HINT: another rank stopped taking steps (it died, or ran out of "
                "batches first: uneven data across ranks) or is much slower"
            ) from err

    # ------------------------------------------------------------------ what others see
    def finish(self) -> None:
        """The final average: every worker ends with the global model, also after a cut-short round."""
        if self._flight is not None:
            self._land()
        if not self.dirty:
            return
        r = Round(tag="final", step=self.num_steps, nonfinite=self.options.nonfinite, optimizer_state="local")
        with self.reported("final average"):
            if not run_round(self.rounds.blocking, r):
                log.warning("LocalSGD: the final average failed: each worker keeps its own model")
                return
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
        node = self.node_comm
        if node is not None:
            inner_rounds, inner_bytes = node.rounds("inner"), node.bytes("inner")
            metrics["comm/rounds"] += inner_rounds
            metrics["comm/bytes"] += inner_bytes
            metrics["comm/inner_rounds"] = inner_rounds
            metrics["comm/outer_rounds"] = outer_rounds
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def sync_state_dict(self) -> dict[str, Any]:
        """The global sync state, equal on every rank: step count, schedule, counters, outer optimizer
        (sharded workers: the outer optimizer is sharded like the parameters, each rank's own state
        holds its part)."""
        state = sync_state(self.options, self.num_steps, self.comm, self.node_comm)
        if self.sharded:
            state["outer"] = {}
        return state

    def load_sync_state_dict(self, state: dict[str, Any]) -> None:
        self._take_sync_state(state)

    def _take_sync_state(self, state: dict[str, Any]) -> int:
        self._set_step(int(state["num_steps"]))
        self.schedule.load_state_dict(state["schedule"])
        self.comm.load_state_dict(state["comm"])
        if state.get("node_comm"):
            self._inner().comm.load_state_dict(state["node_comm"])
        outer = self.options.outer_optimizer
        if outer is not None and state.get("outer"):
            outer.load_state_dict(state["outer"])
        elif outer is not None and self.sharded:
            # each rank's own state brings its part back; without one (another layout), the outer
            # optimizer starts afresh from the model the checkpoint holds
            self.averager.restart_outer()
        self.dirty = False  # the averaged model; a rank's own state (if any) says otherwise
        return self.num_steps

    def start_at(self, num_steps: int) -> None:
        """Continue at optimizer step ``num_steps`` from the models as they are (a checkpoint of
        another strategy: synchronous SGD before post-local SGD); the schedule starts fresh."""
        self._set_step(num_steps)
        self.dirty = False

    def _set_step(self, num_steps: int) -> None:
        self.num_steps = num_steps
        if self.hooks is not None:
            self.hooks.align(num_steps)

    def own_state_dict(self) -> dict[str, Any]:
        """This rank's own part of the sync state: whether its workers differ from the average,
        the error-feedback residuals, and a round in flight (its mean and this rank's snapshot)."""
        # a round in flight first: waiting for it may advance the error-feedback residuals
        in_flight = self._flight.pending.state_dict() if self._flight is not None else None
        wire, outer = self.wire, self.options.outer_optimizer
        return {
            "dirty": self.dirty,
            "wire": wire.state_dict() if wire is not None else {},
            "in_flight": in_flight,
            "outer": outer.state_dict() if outer is not None and self.sharded else {},
        }

    def load_own_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("wire") and self.wire is not None:
            self.wire.load_state_dict(state["wire"])  # error-feedback residuals
        outer = self.options.outer_optimizer
        if state.get("outer") and outer is not None:
            outer.load_state_dict(state["outer"])  # sharded workers: this rank's part
        in_flight = state.get("in_flight")
        self._flight = in_flight_round(in_flight) if in_flight else None
        self.dirty = bool(state["dirty"])

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume this rank exactly: the sync state and its workers' own models and
        optimizer states (not the average), mid-round included."""
        with self.averager.own_models():
            workers = [
                {
                    "model": {k: v.clone() for k, v in m.state_dict().items()},
                    "optimizers": [o.state_dict() for o in opts],
                }
                for m, opts in zip(self.models, self.optimizers)
            ]
        own = self.own_state_dict()
        return {"sync": self.sync_state_dict(), "workers": workers, **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["workers"]) != len(self.models):
            raise ValueError(
                f"the state holds {len(state['workers'])} workers, this driver {len(self.models)}: "
                "resume with as many models per process"
            )
        self.load_sync_state_dict(state["sync"])
        for m, opts, saved in zip(self.models, self.optimizers, state["workers"]):
            m.load_state_dict(saved["model"])  # copies into the flat buckets
            for o, o_state in zip(opts, saved["optimizers"]):
                o.load_state_dict(o_state)
        self.load_own_state_dict(state)

    # ------------------------------------------------------------------ a plain loop's block
    def close(self) -> None:
        """Remove the optimizer hooks (the models keep their current, possibly unaveraged, parameters)."""
        if self.hooks is not None:
            self.hooks.close()

    def __enter__(self) -> LocalSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self.close()


# the algorithm's options, documented once in Options (the same text in every front end)
LocalSGD.__doc__ = with_option_docs(LocalSGD.__doc__)
