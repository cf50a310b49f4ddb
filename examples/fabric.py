"""Local SGD under Lightning Fabric: ``Fabric(strategy="localsgd")``, the loop stays yours.

Run on 2 CPU processes (Fabric starts them):

    python examples/fabric.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from problem import EPOCHS, SYNC_EVERY, accuracy, loader, model, optimizer

from localsgd.fabric import LocalSGDFabricStrategy


def main() -> None:
    torch.set_num_threads(1)
    fabric = Fabric(strategy=LocalSGDFabricStrategy(sync_every=SYNC_EVERY), accelerator="cpu", devices=2)
    fabric.launch()
    net = model()
    net, opt = fabric.setup(net, optimizer(net))
    data = loader(fabric.global_rank, fabric.world_size)  # each worker's own shard
    for epoch in range(EPOCHS):
        data.sampler.set_epoch(epoch)
        for x, y in data:
            opt.zero_grad()
            fabric.backward(F.cross_entropy(net(x), y))
            opt.step()  # syncs every SYNC_EVERY steps
    fabric.strategy.finish()  # the final average
    driver = fabric.strategy.driver
    if fabric.global_rank == 0:
        syncs = driver.comm.rounds("sync")
        print(f"fabric: {driver.num_steps} steps, {syncs} syncs, accuracy {accuracy(net):.3f}")
    # leave together: a rank that exits while its peer's gloo threads still talk to it aborts the peer
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
