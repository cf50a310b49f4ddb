"""What both Lightning strategies share: per-step metrics, seeding, checkpointed sync state
and registration, so that a Local SGD run and its SGD baseline differ only in how the
workers communicate."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from localsgd.core.comm import destroy_at_exit_if_created
from localsgd.core.files import add_note, unreadable, write_atomically
from localsgd.core.scaling import intrinsic_lr
from localsgd.lightning.resume import ResumedLoader
from localsgd.sharding import is_dcp_checkpoint, load_meta

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]
_CHECKPOINT_KEY = "localsgd"


def register(cls: type[DDPStrategy]) -> None:
    """Make ``Trainer(strategy=cls.strategy_name)`` build ``cls`` (once per process)."""
    if cls.strategy_name not in StrategyRegistry:  # type: ignore[attr-defined]
        cls.register_strategies(StrategyRegistry)


def raw_optimizer(optimizer: Optimizer) -> Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class StrategyCommon(DDPStrategy):
    """What both strategies share (each subclasses it): metrics, seeding and checkpointed state,
    so their runs compare."""

    strategy_name: str
    description: str
    """What ``Trainer(strategy=strategy_name)`` builds, as Lightning lists it."""
    _pending_state: dict[str, Any] | None = None

    def setup_environment(self) -> None:
        # the process group's background collectives (Local SGD's averaging, DDP's gradient
        # all-reduces) must end before interpreter finalization: see ``destroy_at_exit``. Only a
        # group Lightning creates here is torn down at exit; one the user made before fit is theirs
        with destroy_at_exit_if_created():
            super().setup_environment()

    def _log_step(self, optimizer: Optimizer, metrics: dict[str, float]) -> None:
        """Log ``metrics`` and the step's learning rate through the Trainer's loggers."""
        module = self.lightning_module
        if module is None or module._trainer is None:
            return
        group = optimizer.param_groups[0]
        lr, weight_decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        metrics = {**metrics, "lr": lr, "intrinsic_lr": intrinsic_lr(lr, weight_decay)}
        # float64: byte counts pass float32's 2**24 exact-integer range within minutes
        values = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()}
        module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)

    def _log_now(self, metrics: dict[str, float]) -> None:
        """Write ``metrics`` to the loggers in this step's row, once (global rank 0)."""
        module = self.lightning_module
        trainer = None if module is None else module._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        row = trainer.fit_loop.epoch_loop._batches_that_stepped  # the row of this step's metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.description)

    # The sync state travels in the checkpoint under "localsgd"; it is restored once the
    # strategy is set up (Lightning loads the checkpoint file before that).
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.state_dict()
        # atomic: a crash mid-write leaves the previous file, never a truncated one
        save = super().save_checkpoint
        write_atomically(lambda path: save(checkpoint, path, storage_options), filepath)

    def _read_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None) -> Any:
        """The checkpoint's dict (sharded workers' folders: its non-tensor part)."""
        if is_dcp_checkpoint(checkpoint_path):
            saved = load_meta(checkpoint_path).get(_CHECKPOINT_KEY) or {}
            raise ValueError(
                f"checkpoint {checkpoint_path} is a folder of sharded workers' shards "
                f"(torch.distributed.checkpoint; {saved.get('shards_per_worker', 'several')} processes "
                f"per worker); {self.strategy_name} here runs whole workers. HINT: resume it with "
                "LocalSGDStrategy(shards_per_worker=S) and a model that shards itself in "
                "configure_model; torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "
                "file) writes it as one file, its global model under 'state_dict'"
            )
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = self._read_checkpoint(checkpoint_path, weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            # "truncated" only where it is so: any other cause (a class that moved, a type that
            # weights_only refuses) is the user's error to see, as it is, with the file named
            if unreadable(err):
                raise ValueError(
                    f"checkpoint {checkpoint_path} cannot be read (truncated, or not a checkpoint): "
                    f"{type(err).__name__}: {err}"
                ) from err
            add_note(err, f"while loading checkpoint {checkpoint_path}")
            raise
        if not isinstance(checkpoint, dict):
            raise ValueError(
                f"checkpoint {checkpoint_path} holds a {type(checkpoint).__name__}, not a Lightning "
                "checkpoint (a dict). HINT: pass the path of a file that Trainer.save_checkpoint wrote"
            )
        trainer = None if self.lightning_module is None else self.lightning_module._trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            # validate/test/predict evaluate the averaged model in the main file; the sync state
            # and the workers' own states are for resuming a fit, and none follows from here
            self._pending_state = None
            return checkpoint
        self._pending_state = checkpoint.get(_CHECKPOINT_KEY)
        if self._pending_state is None and "global_step" in checkpoint:
            # written by another strategy (Lightning's DDP, ...): carry on at its step
            self._pending_state = {"strategy": None, "num_steps": int(checkpoint["global_step"])}
        return checkpoint

    def _resumed(self, dataloader: object) -> object:
        """When resuming, the training loader's first pass starts where the checkpoint's epoch stopped."""
        module = self.lightning_module
        if self._pending_state is None or module is None:
            return dataloader
        progress = module.trainer.fit_loop.epoch_loop.batch_progress

        def done() -> int:
            return progress.current.processed  # type: ignore[attr-defined]  # a _ProcessedTracker when run

        return ResumedLoader(dataloader, done=done, restore=self._restore_rng)

    @staticmethod
    def _checkpoint_strategy(state: dict[str, Any]) -> str | None:
        """Which strategy wrote a checkpoint's sync state (None: not one of this library's)."""
        if "strategy" in state:
            return state["strategy"]
        return "localsgd" if "schedule" in state else "sgd_baseline"  # written before the field existed

    def _restore_rng(self) -> None:
        """Put back the checkpoint's RNG streams, where a strategy keeps them."""

    def on_train_start(self) -> None:
        super().on_train_start()
        state, self._pending_state = self._pending_state, None
        if state is not None:
            self.load_state_dict(state)

    def _seed_workers_apart(self, trainer: pl.Trainer, global_rank: int) -> None:
        """Pitfall 10: identical streams on every rank would make averaging a no-op."""
        if trainer._accelerator_connector.use_distributed_sampler:
            return
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed_everything(base + global_rank, verbose=False)
        rank_zero_warn(
            "use_distributed_sampler=False: Lightning will not shard the training data, so each worker "
            f"now draws from its own random stream seeded with seed + rank ({base} + rank). Make sure "
            "your dataloader gives each worker different samples."
        )
