"""Lightning strategies: Local SGD and the synchronous SGD baseline.

Both are DDPStrategy subclasses, so process-group setup, launchers, cluster
environments and distributed samplers are Lightning's own. Local SGD differs in
two places only: the model is *not* wrapped in DistributedDataParallel (no
gradient all-reduce), and ``optimizer_step`` calls the ordinary step and then,
when the schedule says so, averages the workers. Every sync happens in
``LocalSGDStrategy._after_step``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from localsgd.core.averager import Averager
from localsgd.core.comm import Communicator, ProcessGroupCommunicator, node_communicator
from localsgd.core.control import StopRequests, batch_digest
from localsgd.core.gradients import GradientAverager, gradients_of
from localsgd.core.options import BufferPolicy, NonfinitePolicy, OptimizerStatePolicy, check_choice
from localsgd.core.outer import OuterOptimizer
from localsgd.core.replicas import WorkerReplicas
from localsgd.core.schedules import SyncSchedule, as_schedule
from localsgd.lightning.common import StartMethod, StrategyCommon, raw_optimizer, register
from localsgd.lightning.resume import ExactResume
from localsgd.lightning.simulation import (
    BatchedWorkers,
    WorkerLogs,
    check_batched,
    check_simulation,
    deal_shards,
)
from localsgd.lightning.stops import act_on_agreed_stops, install_sigterm_handler, quiet_per_batch_broadcast

log = logging.getLogger(__name__)

H1Sync = Literal["auto", "gradients", "parameters"]


class LocalSGDStrategy(ExactResume, StrategyCommon, DDPStrategy):
    """Local SGD: each worker takes optimizer steps on its own data; every ``sync_every`` steps
    the workers average their parameters (one all-reduce per device and dtype).

    Args:
        sync_every: H, the number of optimizer steps per round (an integer >= 1), or a
            :class:`~localsgd.core.schedules.SyncSchedule` (``PostLocal``, ``QSR``, ``Hierarchical``,
            your own), or a function ``(step, lr) -> bool``. One step is one ``optimizer.step``
            call (not one per param group, not one per micro-batch under gradient accumulation).
        buffers: ``"average"`` averages floating-point buffers (BatchNorm running stats) with
            the parameters at each sync; ``"local"`` keeps each worker's own.
        optimizer_state: at each sync, ``"local"`` keeps each worker's optimizer state,
            ``"average"`` averages it (with ``sync_every=1`` this is exactly synchronous SGD),
            ``"reset"`` zeroes it.
        outer_optimizer: steps the global model on the pseudo-gradient ``anchor - average`` at
            each sync across all workers (:class:`~localsgd.core.outer.SlowMo`,
            :class:`~localsgd.core.outer.DiLoCo`, any :class:`~localsgd.core.outer.OuterOptimizer`);
            ``None`` is plain averaging.
        workers_per_device: simulated workers in each process (see :mod:`localsgd.core.replicas`):
            P processes x ``workers_per_device`` = K workers, each with its own data shard
            (the one rank ``process_rank * workers_per_device + i`` of a K-process run would
            get), parameters, BatchNorm statistics, optimizer state and RNG stream. The
            LightningModule is unchanged; ``comm/*`` count what K processes would send.
        simulation: how a process runs its simulated workers: ``"sequential"`` (one after
            another, the fastest on CPU; exactly K processes' math), ``"batched"`` (one
            ``vmap``-ed forward/backward and one optimizer step over stacked tensors, for GPUs
            where per-worker batches are too small to fill the device; elementwise optimizers
            only), or ``"auto"`` (batched on CUDA, sequential otherwise).
        log_divergence: at each sync across all workers, log ``localsgd/divergence``, the
            workers' mean squared distance to their average just before it (costs a copy of
            the model and one scalar all-reduce per sync).
        nonfinite: before each sync the workers agree (one small all-reduce) whether any holds
            NaN/Inf parameters or buffers, and that all are at the same step: ``"raise"`` fails
            on every rank naming the workers and the step; ``"skip_worker"`` leaves them out
            of that average and restarts them from it, optimizer state zeroed.
        h1_sync: how a round of one step (``sync_every=1``, ``PostLocal``'s first phase) makes the
            workers synchronous: ``"gradients"`` all-reduces the gradients before the step (DDP's
            arithmetic: synchronous training for every optimizer), ``"parameters"`` averages the
            parameters and optimizer state after it (the same for SGD with momentum and weight
            decay, not for Adam and the like), ``"auto"``: gradients for every optimizer but SGD.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; by default NCCL on GPUs, gloo on CPU.
        timeout: timeout of every collective.
        start_method: how Lightning starts the worker processes when it launches them itself.
        cluster_environment, checkpoint_io, precision_plugin, accelerator, parallel_devices:
            as for Lightning's DDPStrategy (the Trainer fills them in).
    """

    strategy_name = "localsgd"
    description = "Local SGD: local optimizer steps, parameter averaging every H steps"

    def __init__(
        self,
        *,
        sync_every: int | SyncSchedule | Callable[[int, float], bool] = 8,
        buffers: BufferPolicy = "average",
        optimizer_state: OptimizerStatePolicy = "local",
        outer_optimizer: OuterOptimizer | None = None,
        workers_per_device: int = 1,
        simulation: Literal["auto", "sequential", "batched"] = "auto",
        log_divergence: bool = False,
        nonfinite: NonfinitePolicy = "raise",
        h1_sync: H1Sync = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: StartMethod = "popen",
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
    ) -> None:
        if (
            isinstance(workers_per_device, bool)
            or not isinstance(workers_per_device, int)
            or workers_per_device < 1
        ):
            raise ValueError(f"workers_per_device ({workers_per_device!r}) must be an integer >= 1")
        self.workers_per_device = workers_per_device
        self.simulation = check_choice("simulation", simulation, ("auto", "sequential", "batched"))
        if not isinstance(log_divergence, bool):
            raise ValueError(f"log_divergence ({log_divergence!r}) must be True or False")
        self.log_divergence = log_divergence
        self.divergence: float | None = None
        """The last ``localsgd/divergence`` measured (with ``log_divergence=True``)."""
        self.nonfinite_policy = check_choice("nonfinite", nonfinite, ("raise", "skip_worker"))
        self.h1_sync = check_choice("h1_sync", h1_sync, get_args(H1Sync))
        self.schedule: SyncSchedule = as_schedule(sync_every, "sync_every")
        if outer_optimizer is not None and not isinstance(outer_optimizer, OuterOptimizer):
            raise ValueError(
                f"outer_optimizer ({outer_optimizer!r}) must be None (plain averaging) or a "
                "localsgd.core.outer.OuterOptimizer such as SlowMo or DiLoCo"
            )
        self.outer_optimizer = outer_optimizer
        self.buffer_policy = check_choice("buffers", buffers, ("average", "local"))
        self.optimizer_state_policy = check_choice(
            "optimizer_state", optimizer_state, ("local", "average", "reset")
        )
        check_choice("start_method", start_method, ("popen", "spawn", "fork", "forkserver"))
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.comm: Communicator | None = None
        """All workers."""
        self.node_comm: Communicator | None = None
        """The workers of this node, built at the first ``"inner"`` sync."""
        self.averager: Averager | None = None
        self.replicas: WorkerReplicas | None = None
        """The simulated workers of this process (``workers_per_device`` > 1)."""
        self.batched: BatchedWorkers | None = None
        """The batched simulation path, when it is the one in use."""
        self._batched_step = False
        self._worker_logs: WorkerLogs | None = None
        self._first_batches: list[float] | None = None
        self._parameters_equal = False
        self.stops = StopRequests()
        """Stop requests (SIGTERM, preemption) for the next sync, and what the last one agreed on."""
        """Whether this step's gradients were all-reduced (a round of one step through the gradients)."""
        """Per local worker, a digest of its first training batch, until the first sync compares them."""
        self.num_steps = 0
        """Optimizer steps taken so far in this fit (rank-consistent: every rank counts every call)."""
        self._dirty = False
        self._eval_average: contextlib.ExitStack | None = None
        self._pending_local: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: workers must not all-reduce gradients."""

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) all-reduces BatchNorm statistics at every forward pass, which "
                "defeats Local SGD. HINT: drop sync_batchnorm; LocalSGDStrategy(buffers='average') averages "
                "BatchNorm statistics at each sync instead"
            )
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        assert self.lightning_module is not None
        optimizers = [raw_optimizer(o) for o in self.optimizers]
        k = self.workers_per_device
        self.comm = ProcessGroupCommunicator(workers_per_process=k)
        if k > 1:
            check_simulation(trainer, self.lightning_module, k)
            if getattr(self.precision_plugin, "scaler", None) is not None:
                raise ValueError(
                    f"precision={trainer.precision!r} with workers_per_device ({k}) > 1 is not supported: "
                    "its loss scaling would need one GradScaler per simulated worker, as K processes have. "
                    "HINT: precision='bf16-mixed' (no loss scaling), or one worker per process"
                )
            self.replicas = WorkerReplicas(self.lightning_module, optimizers, k)
            self._worker_logs = WorkerLogs(self.lightning_module)
            modules: list[torch.nn.Module] = list(self.replicas.replicas)
            worker_optimizers: list[list[Any]] = [list(v) for v in self.replicas.optimizer_views]
        else:
            self.replicas = None
            modules, worker_optimizers = [self.lightning_module], [optimizers]
        self.averager = Averager(
            modules,
            self.comm,
            buffers=self.buffer_policy,  # type: ignore[arg-type]
            optimizer_state=self.optimizer_state_policy,  # type: ignore[arg-type]
            optimizers=worker_optimizers,
            outer=self.outer_optimizer,
        )
        # Replicas start identical, whatever each rank's initialization drew.
        self.averager.broadcast(src=0)
        self.batched = None
        if self.replicas is not None:
            self.replicas.point_at(0)
            path = self.simulation
            if path == "auto":
                path = "batched" if self.root_device.type == "cuda" else "sequential"
            if path == "batched":
                check_batched(trainer, optimizers)
                if self.nonfinite_policy == "skip_worker" and type(optimizers[0]) is not torch.optim.SGD:
                    raise ValueError(
                        f"nonfinite='skip_worker' with simulation='batched' cannot restart one worker's "
                        f"{type(optimizers[0]).__name__} state alone: the stacked optimizer keeps one step "
                        "count for all workers. HINT: simulation='sequential', or nonfinite='raise'"
                    )
                self.batched = BatchedWorkers(
                    self.lightning_module, optimizers[0], self.replicas, self.averager.stacked_views()
                )
                self.averager.after_reset = self.batched.reset_state
        self.node_comm = None
        self.num_steps = 0
        self._dirty = False
        self._first_batches = [0.0] * k if self.comm.num_workers > 1 else None
        self.stops = StopRequests()
        self._gradients = GradientAverager(self.comm)
        linear = all(type(o) is torch.optim.SGD for o in optimizers)
        self._h1_gradients = self.h1_sync == "gradients" or (self.h1_sync == "auto" and not linear)
        self._seed_workers_apart(trainer, self.global_rank)
        if self.comm.num_workers == 1:
            rank_zero_warn(
                "LocalSGDStrategy has one worker (1 process x 1 simulated worker): there is nobody to "
                "average with, so this is plain SGD (its comm/* counters count rounds, nothing is sent). "
                "HINT: Trainer(devices=N) for N processes, or LocalSGDStrategy(workers_per_device=k) for k "
                "simulated workers per process"
            )
        rank_zero_info(
            f"LocalSGD: {self.comm.num_workers} workers ({self.world_size} processes x {k}), "
            f"schedule {self.schedule!r}, "
            f"buffers={self.buffer_policy!r}, optimizer_state={self.optimizer_state_policy!r}, "
            f"outer_optimizer={self.outer_optimizer!r}, rounds of one step through the "
            f"{'gradients' if self._h1_gradients else 'parameters'}, "
            f"{self.averager.num_bytes} bytes per worker per sync"
        )

    def process_dataloader(self, dataloader: object) -> object:
        """Checks that every rank has as many training batches; under simulation, deals each
        simulated worker its own shard."""
        dataloader = super().process_dataloader(dataloader)
        module = self.lightning_module
        if module is None or not module.trainer.training or self.comm is None:
            return dataloader
        if self.workers_per_device > 1:
            dataloader = deal_shards(
                dataloader,
                num_processes=self.world_size,
                rank=self.global_rank,
                workers_per_process=self.workers_per_device,
            )
        self._check_batches_per_epoch(dataloader)
        return self._resumed(dataloader)

    def _check_batches_per_epoch(self, dataloader: object) -> None:
        # Pitfall 2 / desync: ranks with different numbers of batches would stop taking
        # steps at different times, and the one still stepping would wait for a sync forever.
        assert self.comm is not None
        try:
            count = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            return  # no length: the step check before each sync catches the drift instead
        counts = [
            torch.tensor([count, -count], dtype=torch.float64, device=self.root_device)
            for _ in range(self.comm.num_local_workers)
        ]
        self.comm.all_reduce_(counts, op="max", counted=False)
        most, fewest = int(counts[0][0]), int(-counts[0][1])
        if most != fewest:
            raise ValueError(
                f"the training dataloader has {count} batches on rank {self.global_rank}, and between "
                f"{fewest} and {most} across ranks: every worker must take the same number of optimizer "
                "steps per epoch. HINT: let Lightning shard the data (use_distributed_sampler=True), or "
                "give every rank a sampler with the same length (drop_last)"
            )

    def on_train_start(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self.averager is not None:
            total = trainer.estimated_stepping_batches
            per_epoch = None
            if isinstance(trainer.num_training_batches, int):
                per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
            self.schedule.configure(
                total_steps=int(total) if total != float("inf") else None, steps_per_epoch=per_epoch
            )
        if trainer is not None and self.averager is not None and self.world_size > 1:
            # no collective between syncs: a SIGTERM waits for the next sync's control message
            quiet_per_batch_broadcast(trainer)
            install_sigterm_handler(self)
        super().on_train_start()  # restores a checkpoint's sync state
        local, self._pending_local = self._pending_local, None
        if local is not None:
            self._load_local_state(local)

    # ------------------------------------------------------------------ the sync
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._dirty = True  # a forward pass in train mode moves BatchNorm statistics
        if self._first_batches is not None:
            self._fingerprint(args[0] if args else kwargs["batch"])
        if self.batched is not None and self._batched_step:
            batch, batch_idx = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs.get("batch_idx", 0))
            with self.precision_plugin.train_step_context():  # autocast under bf16-mixed, as K processes
                return self.batched.forward_backward(batch, batch_idx)
        if self.replicas is not None and self.replicas.active is not None:
            batch = args[0] if args else kwargs.pop("batch")
            args = (batch[self.replicas.active], *args[1:])
            assert self._worker_logs is not None
            with self._worker_logs.recording():
                output = super().training_step(*args, **kwargs)
            if self.replicas.active == self.replicas.num_workers - 1:
                self._worker_logs.flush()  # the step's metrics: the mean over the simulated workers
            return output
        return super().training_step(*args, **kwargs)

    def _fingerprint(self, batch: Any) -> None:
        """Pitfall 10: each worker's first batch of the fit, compared across workers at the first
        sync (identical streams make averaging a no-op, and nothing else would notice)."""
        assert self._first_batches is not None
        if self.batched is not None and self._batched_step:
            for i, worker_batch in enumerate(batch):
                self._first_batches[i] = self._first_batches[i] or batch_digest(worker_batch)
            return
        i = 0 if self.replicas is None or self.replicas.active is None else self.replicas.active
        if not self._first_batches[i]:
            self._first_batches[i] = batch_digest(batch[i] if self.replicas is not None else batch)

    def backward(
        self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Any:
        if self._batched_step:
            # the batched path computed every worker's gradients already; the hooks still run
            assert self.lightning_module is not None
            closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
            return self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        # a round of one step from equal models, for an optimizer whose update is not linear in
        # the gradient: all-reduce the gradients before the step, as DDP does
        through_gradients = (
            self.averager is not None
            and self._h1_gradients
            and not self._dirty
            and self.schedule.synchronous_at(self.num_steps + 1)
        )
        if self.replicas is None:
            if through_gradients:
                closure = self._averaging_gradients(closure)
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        elif self.batched is not None:
            # the closure runs the batched forward/backward; the module's own parameters have
            # no gradients, so the user's optimizer step is a no-op, and the stacked one steps
            self._batched_step = True
            try:
                output = super().optimizer_step(optimizer, closure, model, **kwargs)
            finally:
                self._batched_step = False
            if through_gradients:
                stacked = gradients_of(list(self.batched.trainable.values()))
                self._gradients.all_reduce(
                    [[g[w] for g in stacked] for w in range(self.replicas.num_workers)]
                )
            self.batched.step()
        elif through_gradients:
            output = self._sequential_gradient_step(optimizer, closure, model, **kwargs)
        else:
            # every simulated worker runs the closure (its training_step, backward) and the step
            for worker in range(self.replicas.num_workers):
                self.replicas.activate(worker)
                output = super().optimizer_step(optimizer, closure, model, **kwargs)
            self.replicas.deactivate()
        if self.averager is not None:
            self._parameters_equal = through_gradients
            self._after_step(optimizer)
        return output

    def _trainable(self) -> list[torch.nn.Parameter]:
        assert self.lightning_module is not None
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def _averaging_gradients(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def closure_then_average() -> Any:
            output = closure()  # forward and backward
            self._gradients.all_reduce([gradients_of(self._trainable())])
            return output

        return closure_then_average

    def _sequential_gradient_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any, **kwargs: Any
    ) -> Any:
        """Simulated workers, one after another, in a round of one step through the gradients:
        every worker's forward and backward, the all-reduce, then every worker's step."""
        assert self.replicas is not None
        params = self._trainable()
        outputs, grads = [], []
        for worker in range(self.replicas.num_workers):
            self.replicas.activate(worker)
            outputs.append(closure())
            grads.append(gradients_of(params))  # kept: the next activation clears .grad
        self._gradients.all_reduce(grads)
        for worker, (out, worker_grads) in enumerate(zip(outputs, grads)):
            self.replicas.activate(worker)
            for p, g in zip(params, worker_grads):
                p.grad = g
            output = super().optimizer_step(optimizer, lambda out=out: out, model, **kwargs)
        self.replicas.deactivate()
        return output

    def _after_step(self, optimizer: Optimizer) -> None:
        # Counted on every rank for every call, also when AMP skipped the update or the
        # closure returned None, so all ranks reach the same collectives (pitfall 2).
        assert self.averager is not None
        self.num_steps += 1
        self._dirty = True
        decision = self.schedule.should_sync(self.num_steps, float(optimizer.param_groups[0]["lr"]))
        if decision:
            if self.replicas is not None:
                self.replicas.check_unchanged()
            policy = self._schedule_policy()
            checks: dict[str, Any] = {"step": self.num_steps, "nonfinite": self.nonfinite_policy}
            if decision == "inner":
                with self._reported("inner sync"):
                    self.averager.average(
                        "inner", comm=self._node_comm(), optimizer_state=policy, outer=False, **checks
                    )
            else:
                digests, self._first_batches = self._first_batches, None
                with self._reported("sync"):
                    divergence = self.averager.average(
                        "sync",
                        optimizer_state=policy,
                        divergence=self.log_divergence,
                        digests=digests,
                        flags=self.stops.message(),
                        parameters=not self._parameters_equal,
                        **checks,
                    )
                self.stops.record(self.averager.agreed_flags)
                act_on_agreed_stops(self, self.lightning_module.trainer, self.num_steps)
                self._dirty = False
                if divergence is not None:
                    self.divergence = divergence
                    # straight to the loggers: a value logged through the module would be
                    # repeated in every later row of the epoch, as if measured there
                    self._log_now({"localsgd/divergence": divergence})
        self._log_step(optimizer, self._comm_metrics())

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Lightning's cross-rank decisions (stop training? at each epoch end) travel in the same
        control message as the sync checks, with the step count, so a rank that ran out of
        batches early meets the others' next sync with an error on both sides, not a hang."""
        if self.averager is None:
            return super().reduce_boolean_decision(decision, all=all)
        value = float(not decision) if all else float(decision)
        with self._reported("decision"):
            _, reduced = self.averager.agree(self.num_steps, value=value)
        return reduced == 0.0 if all else reduced == 1.0

    @contextlib.contextmanager
    def _reported(self, what: str) -> Iterator[None]:
        """Say which sync failed: a timed-out or broken collective names the step and the operation."""
        try:
            yield
        except (FloatingPointError, ValueError):
            raise
        except RuntimeError as err:
            assert self.comm is not None and self.averager is not None
            raise RuntimeError(
                f"LocalSGD {what} at optimizer step {self.num_steps} failed (all-reduce of "
                f"{self.averager.num_bytes} bytes per worker over {self.comm.num_workers} workers, "
                f"timeout {self._timeout}): {err}. HINT: another rank stopped taking steps (it died, or "
                "ran out of batches first: uneven data across ranks) or is much slower"
            ) from err

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
                self.num_processes, workers_per_process=self.workers_per_device
            )
        return self.node_comm

    def _comm_metrics(self) -> dict[str, float]:
        assert self.comm is not None
        outer_rounds, outer_bytes = self.comm.rounds("sync"), self.comm.bytes("sync")
        metrics: dict[str, float] = {
            "comm/rounds": outer_rounds,
            "comm/bytes": outer_bytes + self.comm.bytes("grad"),  # rounds of one step through gradients
            "localsgd/sync_every": self.schedule.period,
            "localsgd/round": outer_rounds,
        }
        if self.node_comm is not None:
            inner_rounds, inner_bytes = self.node_comm.rounds("inner"), self.node_comm.bytes("inner")
            metrics["comm/rounds"] += inner_rounds
            metrics["comm/bytes"] += inner_bytes
            metrics["comm/inner_rounds"] = inner_rounds
            metrics["comm/outer_rounds"] = outer_rounds
        return metrics

    # ------------------------------------------------------------------ what others see
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.averager is not None and self._dirty and self._eval_average is None:
            self._eval_average = contextlib.ExitStack()
            self._eval_average.enter_context(self.averager.averaged("eval"))

    def on_validation_end(self) -> None:
        if self._eval_average is not None:
            self._eval_average.close()  # back to each worker's own model
            self._eval_average = None
        super().on_validation_end()

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.averager is not None and self._dirty:
            # the fit's result is the average, also when the last round was cut short
            with self._reported("final average"):
                self.averager.average(
                    "final", optimizer_state="local", step=self.num_steps, nonfinite=self.nonfinite_policy
                )
            self._dirty = False
        if self.comm is not None:
            metrics = self._comm_metrics()
            # one worker averages with nobody: its rounds are bookkeeping (an outer optimizer still
            # steps), and what a report shows as communication is "none (1 worker)"
            sent = f"{int(metrics['comm/bytes'])} bytes per worker"
            rank_zero_info(
                f"LocalSGD: {self.num_steps} optimizer steps, {int(metrics['comm/rounds'])} sync rounds, "
                + (sent if self.comm.num_workers > 1 else "communication: none (1 worker)")
            )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The averaged model (each rank's local model is left as it is)."""
        assert self.lightning_module is not None
        if self.averager is None or not self._dirty or self._eval_average is not None:
            return self.lightning_module.state_dict()
        with self.averager.averaged("checkpoint"):
            return {k: v.clone() for k, v in self.lightning_module.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The sync state: step count, schedule and communication counters."""
        return {
            "strategy": self.strategy_name,
            "num_steps": self.num_steps,
            "schedule": self.schedule.state_dict(),
            "comm": self.comm.state_dict() if self.comm is not None else {},
            "node_comm": self.node_comm.state_dict() if self.node_comm is not None else {},
            "outer": self.outer_optimizer.state_dict() if self.outer_optimizer is not None else {},
            "world_size": self.world_size,
            "workers_per_device": self.workers_per_device,
            "schedule_type": type(self.schedule).__name__,
            "rank_files": self.averager is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint holds the averaged model, so a resumed run starts a round from it.
        self.num_steps = int(state["num_steps"])
        written_by = self._checkpoint_strategy(state)
        if written_by != self.strategy_name:
            # post-local SGD by hand: synchronous SGD first, then Local SGD from its checkpoint
            self._dirty = False
            rank_zero_info(
                f"LocalSGD: starting from a {written_by or 'non-localsgd'} checkpoint at optimizer step "
                f"{self.num_steps}: every worker starts from its model and optimizer state; the sync "
                f"schedule {self.schedule!r} and the comm/* counters start fresh"
            )
            return
        self.schedule.load_state_dict(state["schedule"])
        if self.comm is not None:
            self.comm.load_state_dict(state["comm"])
        if state.get("node_comm"):
            self._node_comm().load_state_dict(state["node_comm"])
        if self.outer_optimizer is not None and state.get("outer"):
            self.outer_optimizer.load_state_dict(state["outer"])
        self._dirty = False  # the averaged model; a rank's own state (if any) says otherwise


register(LocalSGDStrategy)
