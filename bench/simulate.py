"""Benchmark: K simulated workers on one CPU process, against the floor and the big-batch baseline.

One process, one thread, a small CNN (localsgd.research.models.small_cnn, BatchNorm) on random
3x32x32 images, K = 8 workers x local batch B, SGD with momentum, H local steps per round.
Time per round (H steps of every worker, then the average) of:

* ``simulator``: ``Trainer(strategy=LocalSGDStrategy(sync_every=H, workers_per_device=K))``,
  the LightningModule unchanged, timed by a callback between sync steps;
* ``plain loop``: K model copies and K optimizers stepped one after another in a loop
  written here, then their parameters and buffers averaged with torch: the floor on CPU;
* ``one model, batch K*B``: the same number of optimizer steps on one model at the total
  batch (what synchronous SGD computes per step, without communication).

All three draw their batches through DataLoaders (one per worker, each over its own
DistributedSampler shard), so the data pipeline costs the same. The table shows the
median per round over the timed rounds and the ratio to the plain loop; the target is
simulator <= 1.15x the plain loop.

Run:  python bench/simulate.py [--workers 8] [--batch 16] [--sync-every 4] [--rounds 12] [--quick]
(about a minute; JSON to bench/results/simulate.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from localsgd import LocalSGDStrategy
from localsgd.research.models import small_cnn

TARGET = 1.15


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def worker_loaders(data: TensorDataset, workers: int, batch: int) -> list[DataLoader]:
    return [
        DataLoader(
            data, batch_size=batch, sampler=DistributedSampler(data, workers, w, seed=0), drop_last=True
        )
        for w in range(workers)
    ]


class Module(pl.LightningModule):
    def __init__(self, lr: float, data: TensorDataset, batch: int) -> None:
        super().__init__()
        self.net = small_cnn(3, 10)
        self.lr, self.data, self.batch = lr, data, batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch, shuffle=True, drop_last=True)


class RoundTimer(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.marks = every, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.marks.append(time.perf_counter())


def time_simulator(args: argparse.Namespace, data: TensorDataset) -> list[float]:
    torch.manual_seed(0)
    timer = RoundTimer(args.sync_every)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=LocalSGDStrategy(sync_every=args.sync_every, workers_per_device=args.workers),
        max_steps=(args.rounds + args.warmup) * args.sync_every,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(args.lr, data, args.batch))
    marks = timer.marks[args.warmup - 1 :]
    return [b - a for a, b in itertools.pairwise(marks)]


def time_plain_loop(args: argparse.Namespace, data: TensorDataset) -> list[float]:
    torch.manual_seed(0)
    base = small_cnn(3, 10)
    models = [small_cnn(3, 10) for _ in range(args.workers)]
    for m in models:
        m.load_state_dict(base.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for m in models]
    iters = [iter(loader) for loader in worker_loaders(data, args.workers, args.batch)]
    times = []
    for r in range(args.warmup + args.rounds):
        start = time.perf_counter()
        for _ in range(args.sync_every):
            for m, opt, it in zip(models, opts, iters):
                x, y = next(it)
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
        with torch.no_grad():
            states = [m.state_dict() for m in models]
            for key, value in states[0].items():
                if value.is_floating_point():
                    value.copy_(torch.stack([s[key] for s in states]).mean(0))
                    for s in states[1:]:
                        s[key].copy_(value)
        if r >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def time_one_model(args: argparse.Namespace, data: TensorDataset) -> list[float]:
    torch.manual_seed(0)
    model = small_cnn(3, 10)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loaders = worker_loaders(data, args.workers, args.batch)
    iters = [iter(loader) for loader in loaders]
    times = []
    for r in range(args.warmup + args.rounds):
        start = time.perf_counter()
        for _ in range(args.sync_every):
            batches = [next(it) for it in iters]
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if r >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="local batch per worker")
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 timed rounds, K = 2")
    parser.add_argument("--out", type=Path, default=Path("bench/results/simulate.json"))
    args = parser.parse_args()
    if args.quick:
        args.workers, args.rounds, args.warmup = 2, 2, 1
    for name in ("workers", "batch", "sync_every", "rounds", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    torch.set_num_threads(1)
    steps = (args.warmup + args.rounds + 1) * args.sync_every
    data = dataset(args.workers * args.batch * steps)
    results = {}
    # the simulator runs between the two others, so that drift of the machine hits all alike
    for name, fn in (
        ("plain loop", time_plain_loop),
        ("simulator", time_simulator),
        ("one model, batch K*B", time_one_model),
    ):
        results[name] = statistics.median(fn(args, data))
    floor = results["plain loop"]
    print(f"\nsmall CNN, 3x32x32, K = {args.workers} x B = {args.batch}, H = {args.sync_every}, 1 thread")
    print(f"{'method':<22} {'ms / round':>11} {'x plain loop':>13}")
    for name, seconds in results.items():
        print(f"{name:<22} {1e3 * seconds:>11.1f} {seconds / floor:>13.2f}")
    ratio = results["simulator"] / floor
    print(
        f"simulator / plain loop = {ratio:.2f} (target <= {TARGET}: {'ok' if ratio <= TARGET else 'MISSED'})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "workers": args.workers,
        "batch": args.batch,
        "sync_every": args.sync_every,
        "rounds": args.rounds,
        "ms_per_round": {k: 1e3 * v for k, v in results.items()},
        "simulator_over_plain_loop": ratio,
        "target": TARGET,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
