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
import functools
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from localsgd.core.comm import Communicator, worker_mesh
from localsgd.core.control import StopRequests, check_equal_lengths
from localsgd.core.driver import LocalSGD
from localsgd.core.driver_state import sync_state
from localsgd.core.files import generation, set_rng_state
from localsgd.core.gradients import gradients_of
from localsgd.core.options import (
    BufferPolicy,
    H1Sync,
    NonfinitePolicy,
    OptimizerStatePolicy,
    Options,
    Setting,
    SyncEvery,
    check_choice,
    check_count,
    check_rules,
    with_option_docs,
)
from localsgd.core.outer import OuterOptimizer
from localsgd.core.replicas import WorkerReplicas
from localsgd.core.wire import Wire
from localsgd.lightning import ft, resume
from localsgd.lightning.batched import BatchedWorkers
from localsgd.lightning.common import _CHECKPOINT_KEY, StartMethod, StrategyCommon, raw_optimizer, register
from localsgd.lightning.simulation import Simulation, deal_shards
from localsgd.lightning.stops import act_on_agreed_stops, install_sigterm_handler, quiet_per_batch_broadcast
from localsgd.sharding import (
    check_sharded,
    is_dcp_checkpoint,
    load_full_model_state,
    load_full_optimizer_state,
    load_global_model,
    load_meta,
    sharded_model_state,
    sharded_optimizer_state,
)

log = logging.getLogger(__name__)


class LocalSGDStrategy(StrategyCommon):
    """Local SGD: each worker takes optimizer steps on its own data; every ``sync_every`` steps
    the workers average their parameters (one all-reduce per device and dtype).

    A DDPStrategy (through :class:`~localsgd.lightning.common.StrategyCommon`, which it shares
    with the SGD baseline) whose parts are objects: the driver (:class:`localsgd.LocalSGD`, made
    in ``setup``), the simulated workers (:class:`~localsgd.lightning.simulation.Simulation`),
    the rank files (:mod:`localsgd.lightning.resume`) and fault tolerance
    (:mod:`localsgd.lightning.ft`).

    Args:
        {options}
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
        shards_per_worker: S > 1: each worker is S processes that shard one model with FSDP2. The
            strategy builds the (K, S) device mesh named ``("replicate", "shard")`` and exposes it as
            ``self.device_mesh`` in the LightningModule's ``configure_model``, where the module shards
            itself (``fully_shard(..., mesh=self.device_mesh["shard"])``), as under Lightning's
            ``ModelParallelStrategy``; each process then averages its own shards with the other
            workers (the how-to page "Models that need several devices per worker"). 1: one
            process per worker.
        fault_tolerance: a :class:`localsgd.ft.FaultTolerance` (needs ``pip install 'localsgd[ft]'``):
            this Trainer is one replica group of a run that goes on through lost groups; its
            processes all-reduce their gradients every step, and the syncs across groups run
            through torchft (see docs/how-to/fault-tolerance.md).
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
        sync_every: SyncEvery = 8,
        buffers: BufferPolicy = "average",
        optimizer_state: OptimizerStatePolicy = "local",
        outer_optimizer: OuterOptimizer | None = None,
        workers_per_device: int = 1,
        simulation: Literal["auto", "sequential", "batched"] = "auto",
        shards_per_worker: int = 1,
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
        self.workers_per_device = check_count("workers_per_device", workers_per_device, 1)
        self.simulation = check_choice("simulation", simulation, ("auto", "sequential", "batched"))
        # the one options object (and its combination rules), as every front end builds it
        self.options = Options.pick(locals())
        self.shards_per_worker = check_count("shards_per_worker", shards_per_worker, 1)
        if shards_per_worker > 1:
            setting = Setting(
                fault_tolerance=fault_tolerance is not None,
                workers_per_process=workers_per_device,
                sharded=True,
            )
            check_rules(self.options, setting)
        self._device_mesh: Any = None
        self.fault_tolerance = ft.checked_fault_tolerance(fault_tolerance, self.options, workers_per_device)
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
        self.simulated: Simulation | None = None
        """The simulated workers of this process (``workers_per_device`` > 1)."""
        self._stops = StopRequests()
        self._gradients_averaged = False  # this step's gradients were all-reduced (a round of one step)
        self._eval_average: contextlib.ExitStack | None = None
        self._pending_local: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._folder: Any = None  # a sharded checkpoint being restored: a DCP folder read in place

    @property
    def replicas(self) -> WorkerReplicas | None:
        """The simulated workers' tensors and optimizer states (``workers_per_device`` > 1)."""
        return None if self.simulated is None else self.simulated.replicas

    @property
    def batched(self) -> BatchedWorkers | None:
        """The batched simulation path, when it is the one in use."""
        return None if self.simulated is None else self.simulated.batched

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken so far in this fit (rank-consistent: every rank counts every call)."""
        return 0 if self.driver is None else self.driver.num_steps

    @property
    def stops(self) -> StopRequests:
        """Stop requests (SIGTERM, preemption) for the next sync, and what the last one agreed on."""
        return self._stops if self.driver is None else self.driver.stops

    @property
    def device_mesh(self) -> Any:
        """The (K, S) mesh of sharded workers (``shards_per_worker`` > 1), built in
        ``setup_environment``; ``None`` for one process per worker."""
        return self._device_mesh

    # ------------------------------------------------------------------ setup
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.shards_per_worker > 1:
            self._device_mesh = worker_mesh(self.root_device.type, self.shards_per_worker)
            assert self.lightning_module is not None
            self.lightning_module._device_mesh = self._device_mesh  # read in configure_model

    @override
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
        mesh = self._device_mesh
        if mesh is not None:
            check_sharded(self.lightning_module, self.shards_per_worker)
        self.comm = None if mesh is not None else ft.communicator(self.fault_tolerance, k)
        self.simulated = None
        if k > 1:
            self.simulated = Simulation(trainer, self.lightning_module, optimizers, k, self.precision_plugin)
            modules, worker_optimizers = self.simulated.models, self.simulated.optimizers
        else:
            modules, worker_optimizers = [self.lightning_module], [optimizers]
        self.driver = LocalSGD(
            modules,
            worker_optimizers,
            options=self.options,
            comm=self.comm,
            mesh=mesh,
            local_world_size=self.num_processes,
            hook=False,  # Lightning's optimizer_step calls the driver, once per step of all workers
            timeout=self._timeout,
            before_sync=self.replicas.check_unchanged if self.replicas is not None else None,
        )
        self.comm = self.driver.comm
        ft.continue_where_healed(trainer, self.driver, self.fault_tolerance)
        if self.simulated is not None:
            self.simulated.choose_path(trainer, optimizers, self.driver, self.simulation, self.root_device)
        self._seed_workers_apart(trainer, self.global_rank)
        if self.comm.num_workers == 1:
            rank_zero_warn(
                "LocalSGDStrategy has one worker (1 process x 1 simulated worker): there is nobody to "
                "average with, so this is plain SGD (its comm/* counters count rounds, nothing is sent). "
                "HINT: Trainer(devices=N) for N processes, or LocalSGDStrategy(workers_per_device=k) for k "
                "simulated workers per process"
            )
        rank_zero_info(
            f"LocalSGD: {_count(self.comm.num_workers, 'worker')} "
            f"({_count(self.world_size, 'process')} x {_count(k, 'simulated worker')} each), "
            f"schedule {self.options.schedule!r}, "
            f"buffers={self.options.buffers!r}, optimizer_state={self.options.optimizer_state!r}, "
            f"outer_optimizer={self.options.outer_optimizer!r}, a sync after a single step (H = 1) averages "
            f"the {'gradients' if self.driver.h1_gradients else 'parameters'}, "
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
        # across groups: the step check; sharded workers: every process
        comm = self.comm.group if self.comm.elastic else self.comm.control or self.comm
        if comm is not None:
            check_equal_lengths(comm, dataloader, self.root_device, self.global_rank)

    def on_train_start(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self.driver is not None:
            total = trainer.estimated_stepping_batches
            per_epoch = None
            if isinstance(trainer.num_training_batches, int):
                per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
            self.options.schedule.configure(
                total_steps=int(total) if total != float("inf") else None, steps_per_epoch=per_epoch
            )
        if trainer is not None and self.driver is not None and self.world_size > 1:
            # no collective between syncs: a SIGTERM waits for the next sync's control message
            quiet_per_batch_broadcast(trainer)
            install_sigterm_handler(self)
        super().on_train_start()  # restores a checkpoint's sync state
        local, self._pending_local = self._pending_local, None
        if local is not None:
            resume.load_local_state(self, local)
            self._pending_rng = local["rng"]

    # ------------------------------------------------------------------ the sync
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.driver is not None:
            self.driver.mark_dirty()  # a forward pass in train mode moves BatchNorm statistics
            batch = args[0] if args else kwargs["batch"]
            if self.simulated is None:
                self.driver.note_batch(batch)  # pitfall 10: compared across workers at the first sync
            else:
                self.simulated.fingerprint(self.driver, batch)
        if self.simulated is not None and self.simulated.in_step:
            return self.simulated.training_step(super().training_step, args, kwargs)
        return super().training_step(*args, **kwargs)

    @override
    def backward(
        self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Any:
        if self.simulated is not None and self.simulated.batched_step:
            return self.simulated.backward(closure_loss)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

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
        if self.simulated is None:
            output = step(self._averaging_gradients(closure) if through_gradients else closure)
        elif through_gradients and self.simulated.batched is None:
            output = self.simulated.gradient_step(closure, step, self.driver)
        else:
            output = self.simulated.step(step, through_gradients, self.driver)
        self._gradients_averaged = through_gradients
        self._after_step(optimizer)
        return output

    def _after_step(self, optimizer: Optimizer) -> None:
        """Every sync happens here, through the driver; then what is Lightning's: stops, logging."""
        assert self.driver is not None
        lr = float(optimizer.param_groups[0]["lr"])
        decision = self.driver.after_step(lr, gradients_averaged=self._gradients_averaged)
        if decision and decision != "inner":
            module = self.lightning_module
            assert module is not None
            act_on_agreed_stops(self, module.trainer, self.num_steps)
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

    @override
    def teardown(self) -> None:
        if self.comm is not None and self.comm.elastic:
            self.comm.close()  # type: ignore[attr-defined]  # a replica group leaves the fault-tolerant run
        super().teardown()

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        kwargs = super().distributed_sampler_kwargs
        return ft.sampler_kwargs(kwargs, self.fault_tolerance, self.world_size, self.global_rank)

    # ------------------------------------------------------------------ what validation and checkpoints see
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.driver is not None and self.driver.dirty and self._eval_average is None:
            self._eval_average = contextlib.ExitStack()
            self._eval_average.enter_context(self.driver.averaged("eval"))

    @override
    def on_validation_end(self) -> None:
        if self._eval_average is not None:
            self._eval_average.close()  # back to each worker's own model
            self._eval_average = None
        super().on_validation_end()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The averaged model (each rank's local model is left as it is); sharded workers: this
        process's shards of it."""
        assert self.lightning_module is not None
        module = self.lightning_module
        if self.driver is None or not self.driver.dirty or self._eval_average is not None:
            return sharded_model_state(module) if self._device_mesh is not None else module.state_dict()
        with self.driver.averaged("checkpoint"):
            if self._device_mesh is not None:
                return sharded_model_state(module)  # copies
            return {k: v.clone() for k, v in module.state_dict().items()}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._device_mesh is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        assert self.lightning_module is not None
        if self._folder is not None:  # resharded by DCP to this run's layout, into the module
            load_global_model(self._folder, self.lightning_module, "state_dict")
        else:  # full tensors (a checkpoint of whole workers)
            load_full_model_state(self.lightning_module, checkpoint["state_dict"], strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Worker 0's optimizer state (sharded workers: each worker's shards, see save_checkpoint)."""
        if self._device_mesh is None:
            return super().optimizer_state(optimizer)
        assert self.lightning_module is not None
        return sharded_optimizer_state(self.lightning_module, raw_optimizer(optimizer))

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._device_mesh is None:
            return super().load_optimizer_state_dict(checkpoint)
        assert self.lightning_module is not None
        if self._folder is not None:  # the optimizers exist by now: the worker's state, and its own
            folder, self._folder = self._folder, None
            self._pending_local = resume.load_sharded(self, folder, dict(checkpoint))
            return
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_full_optimizer_state(self.lightning_module, raw_optimizer(optimizer), state)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._device_mesh is not None:  # a DCP folder, every process its own shards
            checkpoint[_CHECKPOINT_KEY] = self.state_dict()
            resume.save_sharded(self, checkpoint, filepath)
            return
        if self.driver is None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        save = functools.partial(super().save_checkpoint, checkpoint, filepath, storage_options)
        resume.save_with_rank_files(self, filepath, save)  # each rank's own state, then the main file

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)  # rank 0: the main file first, so no set is ever named
        if self.driver is not None:  # but incomplete; every rank calls this (ModelCheckpoint)
            self.barrier("localsgd remove checkpoint")
        resume.remove_rank_files(filepath, self.global_rank)

    @override
    def _read_checkpoint(self, checkpoint_path: Any, weights_only: bool | None) -> Any:
        self._folder = None
        if self._device_mesh is None or not is_dcp_checkpoint(checkpoint_path):
            return super()._read_checkpoint(checkpoint_path, weights_only)
        self._folder = checkpoint_path  # the model's and optimizers' shards are read in place
        checkpoint = load_meta(checkpoint_path)
        checkpoint.setdefault("optimizer_states", [])  # in the folder: see load_optimizer_state_dict
        return checkpoint

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # None: evaluating, or nothing of this library's to restore; a folder: see load_optimizer_state_dict
        if self._pending_state is not None and self._folder is None:
            self._pending_local = resume.check_rank_file(self, checkpoint_path, checkpoint)
        return checkpoint

    @override
    def _restore_rng(self) -> None:
        """The checkpoint's RNG streams, once (the resumed loader calls it when the data is in place)."""
        rng, self._pending_rng = self._pending_rng, None
        if rng is not None:
            set_rng_state(rng)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._restore_rng()  # a no-op unless the training loader never reached its first batch
        super().on_train_batch_start(batch, batch_idx)

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
            "shards_per_worker": self.shards_per_worker,
            # the folder of this save's rank files (False: none were written)
            "rank_files": generation(self.driver.num_steps) if self.driver is not None else False,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint holds the averaged model, so a resumed run starts a round from it.
        assert self.driver is not None
        written_by = self._checkpoint_strategy(state)
        if written_by != self.strategy_name:
            # post-local SGD by hand: synchronous SGD first, then Local SGD from its checkpoint
            self.driver.start_at(int(state["num_steps"]))
            rank_zero_info(
                f"LocalSGD: starting from a {written_by or 'non-localsgd'} checkpoint at optimizer step "
                f"{self.num_steps}: every worker starts from its model and optimizer state; the sync "
                f"schedule {self.options.schedule!r} and the comm/* counters start fresh"
            )
            return
        self.driver.load_sync_state_dict(state)


def _then(closure: Callable[[], Any], after: Callable[[], None]) -> Callable[[], Any]:
    def closure_then() -> Any:
        output = closure()  # forward and backward
        after()
        return output

    return closure_then


# the algorithm's options, documented once in Options, for help() and LightningCLI's --help
LocalSGDStrategy.__doc__ = with_option_docs(LocalSGDStrategy.__doc__)
register(LocalSGDStrategy)


def _count(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``, ``2 processes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"
