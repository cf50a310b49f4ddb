"""Local SGD over workers that are groups of processes: each worker shards its model with FSDP2.

A (K, S) device mesh named ("replicate", "shard"): K workers, each S processes that shard one
model (FSDP2's all-gathers and reduce-scatters stay inside a worker, every step). Every
SYNC_EVERY steps each process averages its own shards with the same shards of the other workers,
over mesh["replicate"]: each process sends 1/S of the model.

Run on 4 CPU processes (2 workers x 2 shards):

    python -m torch.distributed.run --nproc-per-node 4 examples/sharded.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from problem import EPOCHS, SYNC_EVERY, accuracy, loader, model, optimizer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import localsgd

SHARDS = 2  # S: processes per worker


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size // SHARDS, SHARDS), mesh_dim_names=("replicate", "shard"))
    net = model()
    for layer in net:  # FSDP2, as its docs show: each layer, then the root, over the worker's processes
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(net, mesh=mesh["shard"])
    opt = optimizer(net)
    data = loader(rank, world_size)  # every process its own batches, also inside a worker
    with localsgd.LocalSGD(net, opt, sync_every=SYNC_EVERY, mesh=mesh) as ls:
        for epoch in range(EPOCHS):
            data.sampler.set_epoch(epoch)
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    # leaving the block took the final average; every process runs the sharded forward
    score = accuracy(net)
    if rank == 0:
        workers = mesh.shape[0]
        print(
            f"sharded: {workers} workers x {SHARDS} shards, {ls.num_steps} steps, "
            f"{ls.comm.rounds('sync')} syncs, {ls.averager.num_bytes} bytes per process per sync, "
            f"accuracy {score:.3f}"
        )
    dist.barrier()  # leave together: a peer's gloo threads must not outlive this process's group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
