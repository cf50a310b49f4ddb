"""The Lightning Trainer front end of Local SGD: a thin adapter over :class:`localsgd.LocalSGD`.

A DDPStrategy subclass, so process-group setup, launchers, cluster environments and
distributed samplers are Lightning's own. It differs in two places: the model is *not*
wrapped in DistributedDataParallel (no gradient all-reduce), and ``optimizer_step`` takes the
ordinary step and then hands it to the driver (``_after_step``), which syncs when the
schedule says so. What is Lightning's stays here: dataloaders, the checkpoint file, callbacks,
logging, SIGTERM handling and the simulated workers' Lightning glue.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from localsgd.core.comm import Communicator
from localsgd.core.control import StopRequests, check_equal_lengths
from localsgd.core.driver import LocalSGD
from localsgd.core.driver_state import sync_state
from localsgd.core.gradients import gradients_of
from localsgd.core.options import (
    BufferPolicy,
    H1Sync,
    NonfinitePolicy,
    OptimizerStatePolicy,
    Options,
    check_choice,
)
from localsgd.core.outer import OuterOptimizer
from localsgd.core.replicas import WorkerReplicas
from localsgd.core.schedules import SyncSchedule
from localsgd.core.wire import Wire
from localsgd.lightning.common import DriverView, StartMethod, StrategyCommon, raw_optimizer, register
from localsgd.lightning.ft import FaultTolerantJob, checked_fault_tolerance
from localsgd.lightning.resume import ExactResume
from localsgd.lightning.simulation import BatchedWorkers, SimulatedSteps, WorkerLogs, deal_shards
from localsgd.lightning.stops import act_on_agreed_stops, install_sigterm_handler, quiet_per_batch_broadcast

log = logging.getLogger(__name__)


class LocalSGDStrategy(
    FaultTolerantJob, SimulatedSteps, DriverView, ExactResume, StrategyCommon, DDPStrategy
):
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
        wire: what a sync sends: ``"fp32"`` (exact), or each worker's delta from the global model
            in ``"bf16"`` (half the bytes) or ``"int8"`` (blockwise absmax scales, about a quarter).
        error_feedback: with a lossy wire, each worker (and each shard of the mean) carries what
            its encoding lost into the next sync.
        sync_delay: tau >= 0: a sync's mean travels while the workers take tau more steps, then
            lands keeping their progress (``theta_new + theta_now - theta_snapshot``); 0 blocks.
        num_fragments: F >= 1 dividing a constant H: the model cut into F fragments of near-equal
            bytes, fragment f syncing every H steps offset by f * H / F (streaming: each sync
            sends about 1/F of the model).
        fault_tolerance: a :class:`localsgd.ft.FaultTolerance` (needs ``pip install 'localsgd[ft]'``):
            this Trainer is one replica group of a run that goes on through lost groups; its
            processes all-reduce their gradients every step, and the syncs across groups run
            through torchft (see README, "Training through a lost worker").
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
        wire: Wire = "fp32",
        error_feedback: bool = False,
        sync_delay: int = 0,
        num_fragments: int = 1,
        fault_tolerance: Any = None,
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
        # the driver's own checks, so that both front ends name a bad argument alike
        self.options = Options.checked(
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
        self.schedule: SyncSchedule = self.options.schedule
        self.fault_tolerance = checked_fault_tolerance(fault_tolerance, self.options, workers_per_device)
        self.outer_optimizer = self.options.outer_optimizer
        self.buffer_policy = self.options.buffers
        self.optimizer_state_policy = self.options.optimizer_state
        self.nonfinite_policy = self.options.nonfinite
        self.log_divergence = self.options.log_divergence
        self.h1_sync = self.options.h1_sync
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
        self.driver: LocalSGD | None = None
        """The algorithm (step counter, schedule, syncs), made in ``setup`` for a fit."""
        self.comm: Communicator | None = None
        """All workers."""
        self.replicas: WorkerReplicas | None = None
        """The simulated workers of this process (``workers_per_device`` > 1)."""
        self.batched: BatchedWorkers | None = None
        """The batched simulation path, when it is the one in use."""
        self._batched_step = False
        self._worker_logs: WorkerLogs | None = None
        self._stops = StopRequests()
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
        self.comm = self._communicator(k)
        self.replicas, self.batched = None, None
        if k > 1:
            modules, worker_optimizers = self._simulated_workers(trainer, optimizers)
        else:
            modules, worker_optimizers = [self.lightning_module], [optimizers]
        self.driver = LocalSGD(
            modules,
            worker_optimizers,
            options=self.options,
            comm=self.comm,
            local_world_size=self.num_processes,
            hook=False,  # Lightning's optimizer_step calls the driver, once per step of all workers
        )
        self._continue_where_healed(trainer)
        self.driver.timeout = self._timeout
        if self.replicas is not None:
            self.driver.before_sync = self.replicas.check_unchanged
            self._choose_path(trainer, optimizers)
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
            f"{'gradients' if self.driver.h1_gradients else 'parameters'}, "
            f"{self.driver.averager.num_bytes} bytes per worker per sync"
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
        assert self.comm is not None
        comm = self.comm.group if self.comm.elastic else self.comm  # across groups: the step check
        if comm is not None:
            check_equal_lengths(comm, dataloader, self.root_device, self.global_rank)

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
        if self.driver is not None:
            self.driver.dirty = True  # a forward pass in train mode moves BatchNorm statistics
            self._fingerprint(args[0] if args else kwargs["batch"])
        if self.replicas is not None and (self._batched_step or self.replicas.active is not None):
            return self._simulated_training_step(super().training_step, args, kwargs)
        return super().training_step(*args, **kwargs)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.driver is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        # a round of one step from equal models, for an optimizer whose update is not linear in
        # the gradient: all-reduce the gradients before the step, as DDP does
        through_gradients = self.driver.through_gradients()

        def step(closure: Callable[[], Any] = closure) -> Any:
            return super(LocalSGDStrategy, self).optimizer_step(optimizer, closure, model, **kwargs)

        if self.driver.group_gradients is not None:  # a replica group: DDP's mean inside it, every step
            closure = _then(closure, self.driver.average_group_gradients)
        if self.replicas is None:
            output = step(self._averaging_gradients(closure) if through_gradients else closure)
        elif through_gradients and self.batched is None:
            output = self._sequential_gradient_step(closure, step)
        else:
            output = self._simulated_step(step, through_gradients)
        self.driver.parameters_equal = through_gradients
        self._after_step(optimizer)
        return output

    def _after_step(self, optimizer: Optimizer) -> None:
        """Every sync happens here, through the driver; then what is Lightning's: stops, logging."""
        assert self.driver is not None
        decision = self.driver.after_step(float(optimizer.param_groups[0]["lr"]))
        if decision and decision != "inner":
            act_on_agreed_stops(self, self.lightning_module.trainer, self.num_steps)
            if self.driver.sync_divergence is not None:
                # straight to the loggers: a value logged through the module would be
                # repeated in every later row of the epoch, as if measured there
                self._log_now({"localsgd/divergence": self.driver.sync_divergence})
        self._log_step(optimizer, self.driver.metrics())

    def _averaging_gradients(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        assert self.driver is not None and self.lightning_module is not None
        driver, module = self.driver, self.lightning_module

        def closure_then_average() -> Any:
            output = closure()  # forward and backward
            driver.gradients.all_reduce([gradients_of([p for p in module.parameters() if p.requires_grad])])
            return output

        return closure_then_average

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Lightning's cross-rank decisions (stop training? at each epoch end) travel in the same
        control message as the sync checks, with the step count, so a rank that ran out of
        batches early meets the others' next sync with an error on both sides, not a hang."""
        if self.driver is None:
            return super().reduce_boolean_decision(decision, all=all)
        reduced = self.driver.agree(float(not decision) if all else float(decision))
        return reduced == 0.0 if all else reduced == 1.0

    # ------------------------------------------------------------------ what others see
    def on_train_end(self) -> None:
        super().on_train_end()
        if self.driver is None:
            return
        self.driver.finish()  # the fit's result is the average, also when the last round was cut short
        metrics = self.driver.metrics()
        # one worker averages with nobody: its rounds are bookkeeping (an outer optimizer still
        # steps), and what a report shows as communication is "none (1 worker)"
        sent = f"{int(metrics['comm/bytes'])} bytes per worker"
        rank_zero_info(
            f"LocalSGD: {self.num_steps} optimizer steps, {int(metrics['comm/rounds'])} sync rounds, "
            + (sent if self.driver.comm.num_workers > 1 else "communication: none (1 worker)")
        )

    def teardown(self) -> None:
        self._leave()  # a replica group leaves the fault-tolerant run
        super().teardown()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The sync state: step count, schedule and communication counters."""
        sync = (
            self.driver.sync_state_dict()
            if self.driver is not None
            else sync_state(self.options, self.num_steps, self.comm, None)
        )
        return {
            "strategy": self.strategy_name,
            **sync,
            "world_size": self.world_size,
            "workers_per_device": self.workers_per_device,
            "rank_files": self.driver is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint holds the averaged model, so a resumed run starts a round from it.
        assert self.driver is not None
        written_by = self._checkpoint_strategy(state)
        if written_by != self.strategy_name:
            # post-local SGD by hand: synchronous SGD first, then Local SGD from its checkpoint
            self.driver.num_steps = int(state["num_steps"])
            self.driver.dirty = False
            rank_zero_info(
                f"LocalSGD: starting from a {written_by or 'non-localsgd'} checkpoint at optimizer step "
                f"{self.num_steps}: every worker starts from its model and optimizer state; the sync "
                f"schedule {self.schedule!r} and the comm/* counters start fresh"
            )
            return
        self.driver.load_sync_state_dict(state)


def _then(closure: Callable[[], Any], after: Callable[[], None]) -> Callable[[], Any]:
    def closure_then() -> Any:
        output = closure()  # forward and backward
        after()
        return output

    return closure_then


register(LocalSGDStrategy)
