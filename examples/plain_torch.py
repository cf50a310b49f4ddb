"""Local SGD in a plain PyTorch loop: the loop stays yours, the driver hooks the optimizer step.

Run on 2 CPU processes:

    python -m torch.distributed.run --nproc-per-node 2 examples/plain_torch.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from problem import EPOCHS, SYNC_EVERY, accuracy, loader, model, optimizer

import localsgd


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    net = model()
    opt = optimizer(net)
    data = loader(rank, world_size)
    # every opt.step() counts one step; every SYNC_EVERY steps the workers average their models
    with localsgd.LocalSGD(net, opt, sync_every=SYNC_EVERY) as ls:
        for epoch in range(EPOCHS):
            data.sampler.set_epoch(epoch)
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    # leaving the block took the final average: every rank holds the same model
    if rank == 0:
        print(
            f"plain_torch: {ls.num_steps} steps, {ls.comm.rounds('sync')} syncs, accuracy {accuracy(net):.3f}"
        )
    dist.barrier()  # leave together: a peer's gloo threads must not outlive this process's group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
