"""The synchronous SGD baseline: DDP with the Local SGD strategy's data, seeds and metrics.

Kept apart from :mod:`localsgd.lightning.strategy` so that each file has one job; both share
:class:`~localsgd.lightning.strategy.StrategyCommon`, so a comparison differs only in how the
workers communicate.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from localsgd.core.options import check_choice
from localsgd.lightning.common import StartMethod, StrategyCommon, register


class SGDBaselineStrategy(StrategyCommon):
    """Synchronous mini-batch SGD (a gradient all-reduce every step, as DDP), with the same data
    sharding, seeding and ``comm/*`` metrics as :class:`LocalSGDStrategy`.

    ``comm/rounds`` counts optimizer steps (one gradient all-reduce each) and ``comm/bytes`` the
    gradient payload of the trainable parameters per worker.

    Args:
        find_unused_parameters: as for DistributedDataParallel.

    The other arguments (``process_group_backend``, ``timeout``, ``start_method``,
    ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``, ``accelerator``,
    ``parallel_devices``) are as for Lightning's DDPStrategy.
    """

    strategy_name = "sgd_baseline"
    description = "Synchronous mini-batch SGD (DDP) with the same data, seeds and metrics as localsgd"

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: StartMethod = "popen",
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
    ) -> None:
        if not isinstance(find_unused_parameters, bool):
            raise ValueError(f"find_unused_parameters ({find_unused_parameters!r}) must be True or False")
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
            find_unused_parameters=find_unused_parameters,
        )
        self.num_steps = 0
        self._grad_bytes = 0

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        assert self.lightning_module is not None
        self._grad_bytes = sum(
            p.numel() * p.element_size() for p in self.lightning_module.parameters() if p.requires_grad
        )
        self.num_steps = 0
        self._seed_workers_apart(trainer, self.global_rank)

    def process_dataloader(self, dataloader: object) -> object:
        """Resuming mid-epoch skips what the epoch already trained on, as Local SGD does."""
        dataloader = super().process_dataloader(dataloader)
        module = self.lightning_module
        if module is None or not module.trainer.training:
            return dataloader
        return self._resumed(dataloader)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.num_steps += 1
        metrics = {"comm/rounds": self.num_steps, "comm/bytes": self.num_steps * self._grad_bytes}
        self._log_step(optimizer, {**metrics, "localsgd/sync_every": 1, "localsgd/round": self.num_steps})
        return output

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy_name, "num_steps": self.num_steps, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        written_by = self._checkpoint_strategy(state)
        if written_by != self.strategy_name:
            # the checkpoint's model is the average of the workers' (what Local SGD saves)
            rank_zero_info(
                f"SGD baseline: resuming from a {written_by or 'non-localsgd'} checkpoint at optimizer step "
                f"{self.num_steps}: training goes on synchronously from its model and optimizer state"
            )


register(SGDBaselineStrategy)
