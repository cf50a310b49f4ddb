"""Benchmark: one language-model training step through ``LocalSGDStrategy`` (processes, between
syncs) against the same step in a hand-written loop, side by side in one run.

Each of the processes that torchrun starts (one thread each) trains the ``micro`` GPT
(localsgd.research.lm, 0.84M parameters, context 128) with AdamW on its own batches of 16
sequences:

* ``hand-written loop``: gather the batch from the data module's tensors, forward, backward,
  ``optimizer.step()``; no Lightning, no driver;
* ``LocalSGDStrategy``: ``Trainer(strategy=LocalSGDStrategy(sync_every=H))`` with H larger than
  the run, so every timed step is a local one, timed by a callback from one step's end to the
  next (the loader, Lightning's loop, the driver's step hook all included).

The loop runs before and after the Trainer, so that drift of the machine hits both alike; the
table shows each one's median ms per step (rank 0) and the ratio to the mean of the loop's two
medians. The target is <= 1.05.

Run:  python -m torch.distributed.run --nproc-per-node 2 bench/lm_step.py [--steps 60] [--quick]
(about a minute; JSON to bench/results/lm_step.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from localsgd import LocalSGDStrategy
from localsgd.research.lm import GPT, LanguageModel, TextDataModule

TARGET = 1.05
CONTEXT, BATCH = 128, 16


def text_file(folder: str) -> str:
    """Random printable text: the step's cost does not depend on what the bytes say."""
    g = torch.Generator().manual_seed(0)
    path = Path(folder) / "text.txt"
    path.write_bytes(bytes((torch.randint(32, 127, (400_000,), generator=g)).tolist()))
    return str(path)


def model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(GPT.sized("micro"), lr=1e-3)


def time_loop(data: TextDataModule, steps: int, rank: int) -> list[float]:
    lm = model()
    optimizer = lm.configure_optimizers()["optimizer"]
    draws = torch.Generator().manual_seed(rank)
    assert data.train_x is not None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        i = torch.randint(0, len(data.train_x), (BATCH,), generator=draws)
        x, y = data.eval_batch(i, split="train")
        optimizer.zero_grad()
        lm.loss((x, y)).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.marks.append(time.perf_counter())


def time_strategy(path: str, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=LocalSGDStrategy(sync_every=10 * steps),  # no sync inside the timed steps
        max_steps=steps + 1,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model(), TextDataModule(path=path, context=CONTEXT, batch_size=BATCH))
    return [b - a for a, b in itertools.pairwise(timer.marks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out at the start")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 timed steps")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lm_step.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 1
    if args.steps < 2 or args.warmup < 0:
        parser.error(f"--steps ({args.steps}) must be >= 2 and --warmup ({args.warmup}) >= 0")
    if "LOCAL_WORLD_SIZE" not in os.environ:
        parser.error(
            "run it under torchrun: python -m torch.distributed.run --nproc-per-node 2 bench/lm_step.py"
        )
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    with tempfile.TemporaryDirectory() as folder:
        path = text_file(folder)
        data = TextDataModule(path=path, context=CONTEXT, batch_size=BATCH)
        data.setup()
        n = args.warmup + args.steps
        before = statistics.median(time_loop(data, n, rank)[args.warmup :])
        strategy = statistics.median(time_strategy(path, n)[args.warmup :])
        after = statistics.median(time_loop(data, n, rank)[args.warmup :])
    loop = (before + after) / 2
    ratio = strategy / loop
    if rank == 0:
        world = int(os.environ["WORLD_SIZE"])
        print(f"\nmicro GPT (0.84M), {world} processes x {BATCH} x {CONTEXT} bytes, AdamW, 1 thread each")
        print(f"{'method':<28} {'ms / step':>10} {'x loop':>7}")
        for name, seconds in (("hand-written loop, before", before), ("LocalSGDStrategy", strategy)):
            print(f"{name:<28} {1e3 * seconds:>10.1f} {seconds / loop:>7.3f}")
        print(f"{'hand-written loop, after':<28} {1e3 * after:>10.1f} {after / loop:>7.3f}")
        verdict = "ok" if ratio <= TARGET else "MISSED"
        print(f"LocalSGDStrategy / loop = {ratio:.3f} (target <= {TARGET}: {verdict})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__,
            "processes": world,
            "steps": args.steps,
            "ms_per_step": {
                "loop before": 1e3 * before,
                "strategy": 1e3 * strategy,
                "loop after": 1e3 * after,
            },
            "strategy_over_loop": ratio,
            "target": TARGET,
        }
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
