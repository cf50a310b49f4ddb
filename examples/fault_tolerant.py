"""One replica group of a fault-tolerant Local SGD run (Lightning Trainer + torchft).

Start a Lighthouse, then one torchrun per group, each restarting its own group when it dies
(``launch/ft.sh`` does both; see docs/how-to/fault-tolerance.md):

    launch/ft.sh lighthouse &                       # on one machine, port 29510
    export TORCHFT_LIGHTHOUSE=http://localhost:29510 NUM_REPLICA_GROUPS=3
    REPLICA_GROUP_ID=0 launch/ft.sh group 1 examples/fault_tolerant.py &
    REPLICA_GROUP_ID=1 launch/ft.sh group 1 examples/fault_tolerant.py &
    REPLICA_GROUP_ID=2 launch/ft.sh group 1 examples/fault_tolerant.py

Without ``REPLICA_GROUP_ID`` it is an ordinary Local SGD job of the same problem (the baseline the
fault-tolerant run without faults equals). ``--record DIR`` writes each optimizer step (time,
participants) and the final parameters there; ``--kill-at STEP`` SIGKILLs the first incarnation
of group ``--kill-group`` at that step (the tests' fault), ``--kill-in-sync`` inside that step's
sync, between its quorum and its all-reduce.
"""

from __future__ import annotations

import time

START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: for problem.py

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from problem import BATCH_SIZE, dataset, model, optimizer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import localsgd  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.net = model()
        self.sleep = sleep

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)  # a slower step, so that a restarted group finds the others still training
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer(self.net)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=True, drop_last=True)


class Record(pl.Callback):
    """Each optimizer step's time and participants; the fault (``--kill-at``)."""

    def __init__(self, path: Path | None, kill_at: int | None, in_sync: bool) -> None:
        self.path, self.kill_at, self.in_sync = path, kill_at, in_sync
        self.file: Any = None

    def _write(self, **row: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")
        driver = trainer.strategy.driver
        healed = driver.elastic.healed_at if driver.elastic is not None else None
        self._write(
            event="joined",
            step=driver.num_steps,
            healed_at=healed,
            seconds=time.time() - START,  # from this process's start to its first round
            pid=os.getpid(),
        )
        if self.kill_at is not None and self.in_sync:  # die inside the sync's collective, after its quorum
            comm, average = trainer.strategy.comm, trainer.strategy.comm._all_reduce

            def dying(tensors: Any, op: str) -> None:
                if op == "mean" and driver.num_steps == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                average(tensors, op)

            comm._all_reduce = dying

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        metrics = trainer.strategy.driver.metrics()
        step = trainer.global_step
        self._write(
            event="step",
            step=step,
            time=time.time(),
            pid=os.getpid(),
            participants=metrics.get("ft/participants"),
            skipped=metrics.get("ft/skipped_rounds"),
        )
        if self.kill_at is not None and step == self.kill_at and not self.in_sync:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-round: no checkpoint, no goodbye


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--diloco", action="store_true", help="outer_optimizer=DiLoCo()")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds added to every step")
    parser.add_argument(
        "--record", type=Path, default=None, help="folder for the step log and final parameters"
    )
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--kill-group", type=int, default=1)
    parser.add_argument(
        "--kill-in-sync", action="store_true", help="die in the sync's all-reduce at --kill-at"
    )
    args = parser.parse_args()

    ft = localsgd.FaultTolerance.from_env(timeout=30.0) if "REPLICA_GROUP_ID" in os.environ else None
    group = ft.replica_group if ft is not None else None
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    name = f"g{group}.r{rank}" if ft is not None else f"r{rank}"
    kill = args.kill_at if (ft is not None and group == args.kill_group and attempt == 0) else None
    strategy = localsgd.LocalSGDStrategy(
        sync_every=args.sync_every,
        outer_optimizer=localsgd.DiLoCo() if args.diloco else None,
        fault_tolerance=ft,
    )
    record = Record(
        args.record / f"{name}.a{attempt}.jsonl" if args.record else None, kill, args.kill_in_sync
    )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        max_steps=args.steps,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module(args.sleep)
    trainer.fit(module)
    elastic = strategy.driver.elastic if strategy.driver is not None else None
    if elastic is not None:
        healed = f", joined by healing at step {elastic.healed_at}" if elastic.healed_at else ""
        print(f"  {name} (start {attempt + 1}) ended at optimizer step {trainer.global_step}{healed}")
    if args.record is not None:
        torch.save(module.net.state_dict(), args.record / f"final.{name}.pt")


if __name__ == "__main__":
    main()
