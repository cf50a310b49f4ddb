"""Benchmark: simulated workers on one GPU, batched path vs sequential path vs one big model.

ResNet-56 at CIFAR size (3x32x32 inputs, random data resident on the device), K simulated
workers x local batch B on one device, SGD with momentum, Local SGD with H steps per
round. Throughput in images/s of:

* ``batched``: ``LocalSGDStrategy(workers_per_device=K, simulation="batched")``;
* ``sequential``: the same with ``simulation="sequential"``;
* ``one model``: a plain loop over one ResNet-56 at batch K x B (the synchronous-SGD
  compute for the same images, without the K models).

The data are pre-made batches on the device, dealt to the workers by the strategy's
DistributedSampler shards, so the data pipeline costs next to nothing. Target on a GPU:
batched >= 3x sequential. Defaults: K = 32, B = 128, H = 8.

Run:  bash bench/gpu_simulate.sh   (or python bench/gpu_simulate.py [--device cpu --quick] to check it runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from localsgd import LocalSGDStrategy
from localsgd.research.models import resnet

TARGET = 3.0


class Module(pl.LightningModule):
    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.net = resnet(56, num_classes=10)
        self.batches = batches

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> DataLoader:
        # items are whole local batches: no per-image indexing or collation
        return DataLoader(self.batches, batch_size=None, shuffle=True)


class Throughput(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def make_batches(args: argparse.Namespace, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = args.workers * (args.steps + args.warmup + 1)
    return [
        (
            torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (args.batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def simulated(args: argparse.Namespace, path: str, batches: list[tuple[Tensor, Tensor]]) -> float:
    torch.manual_seed(0)
    timer = Throughput(args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        strategy=LocalSGDStrategy(
            sync_every=args.sync_every, workers_per_device=args.workers, simulation=path
        ),
        max_steps=args.warmup + args.steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(batches))
    return args.workers * args.batch * timer.steps / (timer.end - timer.start)


def one_model(args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]]) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = resnet(56, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    big = [
        (
            torch.cat([x for x, _ in batches[i : i + args.workers]]),
            torch.cat([y for _, y in batches[i : i + args.workers]]),
        )
        for i in range(0, args.workers * (args.steps + args.warmup), args.workers)
    ]
    start = 0.0
    for step, (x, y) in enumerate(big):
        if step == args.warmup:
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return args.workers * args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="K = 2, B = 4, 2 steps: checks that it runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_simulate.json"))
    args = parser.parse_args()
    if args.quick:
        args.workers, args.batch, args.steps, args.warmup, args.sync_every = 2, 4, 2, 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_simulate.py needs a CUDA device (or --device cpu to check that it runs)")
    batches = make_batches(args, torch.device(args.device))
    results = {
        "batched": simulated(args, "batched", batches),
        "sequential": simulated(args, "sequential", batches),
        "one model": one_model(args, batches),
    }
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nResNet-56, 3x32x32, K = {args.workers} x B = {args.batch}, H = {args.sync_every}, {device}")
    print(f"{'method':<14} {'images/s':>10} {'x sequential':>13}")
    for name, ips in results.items():
        print(f"{name:<14} {ips:>10.0f} {ips / results['sequential']:>13.2f}")
    ratio = results["batched"] / results["sequential"]
    print(f"batched / sequential = {ratio:.2f} (target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([sys.executable, *sys.argv]), "device": device, "torch": torch.__version__}
    payload |= {
        "images_per_s": results,
        "batched_over_sequential": ratio,
        "workers": args.workers,
        "batch": args.batch,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
