"""Small models, data and recorders shared by the tests."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

TIMEOUT = timedelta(seconds=60)


def toy_batches(worker: int, n: int, classes: int = 4) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches of 8 toy samples for ``worker`` (its own seeded stream, the same in every test)."""
    g = torch.Generator().manual_seed(100 + worker)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def train_step(net: nn.Module, opt: Any, batch: tuple[Tensor, Tensor]) -> None:
    """One optimizer step of ``net`` on ``batch`` (cross-entropy)."""
    opt.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    opt.step()


def flat_params(net: nn.Module) -> Tensor:
    """``net``'s parameters, detached, as one flat tensor."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def toy_dataset(n: int = 256, d: int = 8, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class ToyNet(nn.Module):
    def __init__(self, *, bn: bool = False, frozen: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            # no bias before BatchNorm: its gradient is rounding noise, which Adam would amplify
            nn.Linear(8, 16, bias=not bn),
            nn.BatchNorm1d(16) if bn else nn.Identity(),
            nn.ReLU(),
            nn.Linear(16, 4),
        )
        # a parameter no optimizer moves (requires_grad=False): still part of the model
        self.scale = nn.Parameter(torch.ones(4), requires_grad=not frozen)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.scale


class ToyModule(pl.LightningModule):
    def __init__(
        self,
        *,
        bn: bool = False,
        frozen: bool = False,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        batch_size: int = 8,
        val: bool = False,
    ) -> None:
        super().__init__()
        self.model = ToyNet(bn=bn, frozen=frozen)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.batch_size = batch_size
        self.val = val
        self.val_snapshots: list[dict[str, Tensor]] = []

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.val_snapshots.append(snapshot(self))
        self.log("val/loss", self.loss(batch), batch_size=len(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.lr, self.momentum, self.weight_decay)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(toy_dataset(), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(toy_dataset(64), batch_size=32)


def make_optimizer(params: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def momenta(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [
        optimizer.state[p]["momentum_buffer"].clone()
        for g in optimizer.param_groups
        for p in g["params"]
        if "momentum_buffer" in optimizer.state.get(p, {})
    ]


class Recorder(pl.Callback):
    """Records what each step saw and left: batches, buffers before the step, state after it."""

    def __init__(self) -> None:
        self.init: dict[str, Tensor] = {}
        self.batches: list[list[Tensor]] = []
        self.before_step: list[dict[str, Tensor]] = []
        self.after_step: list[dict[str, Tensor]] = []
        self.momenta: list[list[Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.init = snapshot(module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.before_step.append(snapshot(module))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.after_step.append(snapshot(module))
        self.momenta.append(momenta(trainer.optimizers[0]))

    def result(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "batches": self.batches,
            "before_step": self.before_step,
            "after_step": self.after_step,
            "momenta": self.momenta,
        }


class StopAt(pl.Callback):
    """Ends the run after global step ``step``, as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def make_trainer(
    strategy: Any, max_steps: int, callbacks: list[pl.Callback] | None = None, **kwargs: Any
) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=int(os.environ.get("TEST_WORLD_SIZE", "1")) // int(os.environ.get("TEST_NUM_NODES", "1")),
        num_nodes=int(os.environ.get("TEST_NUM_NODES", "1")),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, callbacks=callbacks or [], **defaults)


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def mean_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def newcomer_env() -> dict[str, str]:
    """A newcomer's shell: none of what other tests or a launcher may leave in this process's
    environment (a stale MASTER_PORT, a rank), so that a command starts its own job."""
    drop = (
        "PYTHON", "VIRTUAL_ENV", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
        "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT",
    )  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("PYTEST", "TORCHELASTIC", "PL_", "TEST_"))
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def rank_file_of(checkpoint: Any, rank: int) -> str:
    """The path of rank ``rank``'s own state for the checkpoint file ``checkpoint``: in the folder
    of its set, which the main file names."""
    from localsgd.core.files import rank_file

    folder = torch.load(checkpoint, map_location="cpu", weights_only=False)["localsgd"]["rank_files"]
    return rank_file(checkpoint, rank, folder)
