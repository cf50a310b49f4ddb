"""Local SGD under Lightning Fabric: ``Fabric(strategy="localsgd")``.

A Fabric strategy over the framework-free driver (:class:`localsgd.LocalSGD`): the model is not
wrapped in DistributedDataParallel (no gradient all-reduce), and every ``optimizer.step()`` of
the optimizer Fabric set up counts one step and syncs when the schedule says so. ``fabric.save``
writes the averaged model to the checkpoint and each rank's own state beside it
(``<path>.ranks/step<N>/rank<R>.pt``; sharded workers: one ``torch.distributed.checkpoint`` folder);
``fabric.load`` restores both, so a resumed run continues exactly.
Call :meth:`LocalSGDFabricStrategy.finish` after the loop for the final average.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from torch import nn
from torch.optim import Optimizer

from localsgd.core import files
from localsgd.core.comm import destroy_at_exit_if_created, worker_mesh
from localsgd.core.driver import LocalSGD
from localsgd.core.options import (
    BufferPolicy,
    H1Sync,
    NonfinitePolicy,
    OptimizerStatePolicy,
    Options,
    Setting,
    SyncEvery,
    check_count,
    check_rules,
    with_option_docs,
)
from localsgd.core.outer import OuterOptimizer
from localsgd.core.wire import Wire
from localsgd.sharding import (
    check_sharded,
    full_model_state,
    full_optimizer_state,
    is_dcp_checkpoint,
    load_checkpoint,
    load_full_model_state,
    load_full_optimizer_state,
    save_checkpoint,
)

_KEY = "localsgd"


class LocalSGDFabricStrategy(DDPStrategy):
    """Local SGD for Fabric: the algorithm's keyword arguments (the fields of
    :class:`localsgd.core.options.Options`), then Fabric's DDP arguments (``accelerator``,
    ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision``,
    ``process_group_backend``, ``timeout``, ``start_method``), which Fabric fills in.

    Args:
        {options}
        shards_per_worker: S > 1: each worker is S processes that shard one model with FSDP2. The
            strategy builds the (K, S) device mesh named ``("replicate", "shard")`` and shards the
            model with ``parallelize_fn(model, device_mesh)`` in ``fabric.setup_module``, as Fabric's
            ``ModelParallelStrategy`` does; then ``fabric.setup_optimizers`` (the optimizer made
            from the sharded parameters). 1: one process per worker.
        parallelize_fn: with ``shards_per_worker`` > 1, shards the model:
            ``fully_shard(..., mesh=device_mesh["shard"])`` for each block and the root.
    """

    strategy_name = "localsgd"

    def __init__(
        self,
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
        shards_per_worker: int = 1,
        parallelize_fn: Callable[[nn.Module, Any], nn.Module] | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        self.options = Options.pick(locals())  # the one options object, as every front end builds it
        self.shards_per_worker = check_count("shards_per_worker", shards_per_worker, 1)
        if shards_per_worker > 1:
            check_rules(self.options, Setting(sharded=True))
            if not callable(parallelize_fn):
                raise ValueError(
                    f"shards_per_worker ({shards_per_worker}) > 1 needs parallelize_fn(model, device_mesh), "
                    "which shards the model (fully_shard(..., mesh=device_mesh['shard'])), as Fabric's "
                    "ModelParallelStrategy takes it"
                )
        self._parallelize_fn = parallelize_fn
        self._device_mesh: Any = None
        self._sharded_module: nn.Module | None = None
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._backward_sync_control = None  # no gradient all-reduce to skip
        self.driver: LocalSGD | None = None
        """The algorithm, made when ``fabric.setup`` sees the model and its optimizers."""

    def setup_environment(self) -> None:
        # a group Fabric creates here is this library's to tear down at exit (see destroy_at_exit);
        # one the user made before is theirs
        with destroy_at_exit_if_created():
            super().setup_environment()
        if self.shards_per_worker > 1:
            self._device_mesh = worker_mesh(self.root_device.type, self.shards_per_worker)

    @property
    def device_mesh(self) -> Any:
        """The (K, S) mesh of sharded workers (``shards_per_worker`` > 1), else ``None``."""
        return self._device_mesh

    def process_dataloader(self, dataloader: Any) -> Any:
        """Every loader's batches in train mode are offered to the driver, which fingerprints the
        first one for the identical-stream check at the first sync (DESIGN pitfall 10)."""
        return _TrainingBatchesNoted(super().process_dataloader(dataloader), self._note_batch)

    def _note_batch(self, batch: Any) -> None:
        # a loader read in eval mode (validation) may be the same on every rank: not a training stream
        if self.driver is not None and self.driver.models[0].training:
            self.driver.note_batch(batch)

    def setup_module(self, module: nn.Module) -> nn.Module:  # type: ignore[override]
        """No DistributedDataParallel wrapper: workers must not all-reduce gradients. Sharded
        workers: ``parallelize_fn`` shards the model (the driver is made with its optimizer)."""
        if self._device_mesh is None:
            return module
        assert self._parallelize_fn is not None
        self._sharded_module = self._parallelize_fn(module, self._device_mesh)
        check_sharded(self._sharded_module, self.shards_per_worker)
        return self._sharded_module

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        optimizer = super().setup_optimizer(optimizer)
        if self._sharded_module is not None:  # sharded workers: the model was set up first
            self._make_driver(self._sharded_module, [optimizer])
        return optimizer

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        if self._device_mesh is not None:
            raise ValueError(
                f"shards_per_worker ({self.shards_per_worker}) > 1: the optimizer must be made from the "
                "sharded parameters. HINT: model = fabric.setup_module(model), then optimizer = "
                "fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))"
            )
        optimizers = [super(LocalSGDFabricStrategy, self).setup_optimizer(o) for o in optimizers]
        self._make_driver(module, optimizers)
        return module, optimizers, scheduler

    def _make_driver(self, module: nn.Module, optimizers: list[Optimizer]) -> None:
        if self.driver is not None:
            raise ValueError(
                "Fabric(strategy='localsgd') runs one model with its optimizer: fabric.setup was called twice"
            )
        self.driver = LocalSGD(
            module,
            optimizers,
            options=self.options,
            mesh=self._device_mesh,
            local_world_size=self.num_processes,
            hook=False,
            timeout=self._timeout,
        )

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self.driver is None:
            return super().optimizer_step(optimizer, **kwargs)
        self.driver.before_step()
        output = super().optimizer_step(optimizer, **kwargs)
        self.driver.after_step(float(optimizer.param_groups[0]["lr"]))
        return output

    def finish(self) -> None:
        """The final average: every worker ends with the global model."""
        if self.driver is not None:
            self.driver.finish()

    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        """The averaged model in ``path`` (rank 0 writes it), each rank's own state beside it.
        Sharded workers: a DCP folder, each process its own shards (:mod:`localsgd.sharding`)."""
        if self.driver is None:
            return super().save_checkpoint(path, state, storage_options, filter)
        if self._sharded_module is not None:
            if filter is not None or storage_options is not None:
                raise ValueError(
                    "fabric.save(..., filter=/storage_options=) with shards_per_worker > 1: the "
                    "checkpoint is a torch.distributed.checkpoint folder of every process's shards; "
                    "save without them"
                )
            return save_checkpoint(path, state, self.driver, barrier=lambda: self.barrier("localsgd save"))
        driver, step = self.driver, self.driver.num_steps
        own = {"driver": driver.state_dict(), "rng": files.rng_state()}
        sync = {
            **driver.sync_state_dict(),
            "world_size": self.world_size,
            "rank_files": files.generation(step),
        }
        state = {**state, _KEY: sync}
        save = super().save_checkpoint

        def write_main() -> None:  # rank 0 writes it
            with driver.averaged("checkpoint"):
                files.write_atomically(lambda p: save(p, state, storage_options, filter), path)

        # whole or absent: every rank's own state, then the main file naming them (localsgd.core.files)
        files.save_set(path, self.global_rank, step, own, write_main, lambda: self.barrier("localsgd save"))

    def load_checkpoint(
        self,
        path: _PATH,
        state: Any = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if self._sharded_module is not None and is_dcp_checkpoint(path):
            if not isinstance(state, dict):
                raise ValueError("fabric.load of sharded workers: pass a state dict holding the model")
            return load_checkpoint(path, state, self.driver, mesh=self._device_mesh, strict=strict)
        optimizers: dict[str, Optimizer] = {}
        sharded_module = self._sharded_module
        if sharded_module is not None and isinstance(state, dict):
            # Fabric loads an optimizer's state as it is; full tensors need the sharded model
            optimizers = {name: o for name, o in state.items() if isinstance(o, Optimizer)}
            state = {name: o for name, o in state.items() if name not in optimizers}
        remainder = super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        for name, optimizer in optimizers.items():
            if name in remainder:
                assert sharded_module is not None
                load_full_optimizer_state(sharded_module, optimizer, remainder.pop(name))
        sync = remainder.pop(_KEY, None) if isinstance(remainder, dict) else None
        if sync is None or self.driver is None:
            return remainder
        # in the folder of its set (none named: the flat layout of earlier versions)
        own_path = files.rank_file(path, self.global_rank, sync.get("rank_files"))
        if sync.get("world_size") == self.world_size and files.exists(own_path):
            own = files.load(own_path, f"rank {self.global_rank}'s state file")
            self.driver.load_state_dict(own["driver"])  # this rank's own model, not the average
            files.set_rng_state(own["rng"])
        else:  # another world size: every worker starts from the average in the main file
            self.driver.load_sync_state_dict(sync)
        return remainder

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        if self._device_mesh is None:
            return super().get_module_state_dict(module)
        return full_model_state(module)  # full tensors on global rank 0

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        if self._device_mesh is None:
            return super().load_module_state_dict(module, state_dict, strict=strict)
        load_full_model_state(module, state_dict, strict)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self._sharded_module is None:
            return super().get_optimizer_state(optimizer)
        return full_optimizer_state(self._sharded_module, optimizer)  # worker 0's, on rank 0

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Local SGD: local optimizer steps, averaging every H steps"
        )


LocalSGDFabricStrategy.__doc__ = with_option_docs(LocalSGDFabricStrategy.__doc__)


class _TrainingBatchesNoted:
    """A loader whose batches go through ``note`` first (Fabric wraps it in its own loader)."""

    def __init__(self, loader: Any, note: Callable[[Any], None]) -> None:
        self.loader, self._note = loader, note
        # what Fabric's loader reads (it sets the sampler's epoch through them)
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = getattr(loader, "batch_sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self._note(batch)  # free after the first batch
            yield batch


if LocalSGDFabricStrategy.strategy_name not in STRATEGY_REGISTRY:
    LocalSGDFabricStrategy.register_strategies(STRATEGY_REGISTRY)
