"""The small problem every example trains: a 2-layer MLP on a synthetic 4-class task.

No download: 2048 points in 16 dimensions, labelled by a fixed random linear map. Each worker
reads its own shard through a DistributedSampler, as a multi-process job does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
SYNC_EVERY = 16  # H: optimizer steps between two averages
EPOCHS, BATCH_SIZE = 4, 32


def dataset(n: int = 2048, d: int = 16, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def loader(rank: int, world_size: int) -> DataLoader:
    sampler = DistributedSampler(dataset(), num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    return DataLoader(dataset(), batch_size=BATCH_SIZE, sampler=sampler, drop_last=True)


@torch.no_grad()
def accuracy(net: nn.Module) -> float:
    x, y = dataset().tensors
    return float((net(x).argmax(dim=1) == y).float().mean())
