"""Local SGD under the Lightning Trainer: ``Trainer(strategy="localsgd")``.

Run on 2 CPU processes (Lightning starts them):

    python examples/lightning_trainer.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from problem import BATCH_SIZE, EPOCHS, SYNC_EVERY, accuracy, dataset, model, optimizer
from torch.utils.data import DataLoader

import localsgd


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer(self.net)

    def train_dataloader(self) -> DataLoader:
        # Lightning shards it for each worker (its DistributedSampler), as the other examples do by hand
        return DataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)


def main() -> None:
    torch.set_num_threads(1)
    module = Module()
    trainer = pl.Trainer(
        strategy=localsgd.LocalSGDStrategy(sync_every=SYNC_EVERY),
        accelerator="cpu",
        devices=2,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)  # ends with the final average
    if trainer.is_global_zero:
        strategy = trainer.strategy
        steps, syncs = strategy.num_steps, strategy.comm.rounds("sync")
        print(f"lightning_trainer: {steps} steps, {syncs} syncs, accuracy {accuracy(module.net):.3f}")
    if torch.distributed.is_initialized():  # leave together (a rank gone early can abort its peer)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
