"""DiLoCo on a language model under Lightning Fabric: a small GPT over bytes of the King James
Bible (the embedded corpus; scripts/setup.sh installs it), AdamW inside each worker, Nesterov
outside every 20 steps.

Run on 2 CPU processes (Fabric starts them; well under a minute):

    python examples/lm.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from localsgd import DiLoCo
from localsgd.fabric import LocalSGDFabricStrategy
from localsgd.research.lm import GPT, LanguageModel, TextDataModule

STEPS, SYNC_EVERY, BATCH, CONTEXT = 200, 20, 16, 64


def main() -> None:
    torch.set_num_threads(1)
    strategy = LocalSGDFabricStrategy(sync_every=SYNC_EVERY, outer_optimizer=DiLoCo())
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=2)
    fabric.launch()
    fabric.seed_everything(0)
    data = TextDataModule(context=CONTEXT)
    data.setup()
    train_x, train_y = data.train_x, data.train_y
    assert train_x is not None and train_y is not None
    model = LanguageModel(GPT.sized("nano", context=CONTEXT), lr=3e-3, warmup_steps=20, decay_steps=STEPS)
    optimizer = model.configure_optimizers()["optimizer"]
    lm, optimizer = fabric.setup(model, optimizer)
    draws = torch.Generator().manual_seed(fabric.global_rank)  # each worker its own sequences
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = model.lr * model.lr_factor(step)
        i = torch.randint(0, len(train_x), (BATCH,), generator=draws)
        optimizer.zero_grad()
        logits = lm(train_x[i])  # through Fabric's wrapper: its precision and hooks apply
        fabric.backward(F.cross_entropy(logits.flatten(0, 1), train_y[i].flatten().long()))
        optimizer.step()  # DiLoCo's outer step every SYNC_EVERY steps
    fabric.strategy.finish()  # the final average
    driver = fabric.strategy.driver
    if fabric.global_rank == 0:
        with torch.no_grad():
            bpb = float(model.loss(data.eval_batch(torch.arange(256)))) / math.log(2)
        syncs = driver.comm.rounds("sync")
        print(f"lm: {driver.num_steps} steps, {syncs} syncs, validation {bpb:.2f} bits per byte")
    fabric.barrier()  # leave together (see examples/fabric.py)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
