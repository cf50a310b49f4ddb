"""Helpers that launched jobs import (the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class Throttle(pl.Callback):
    """Sleeps after every training batch and writes the global step to ``progress`` (rank 0), so a
    test can signal a job in the middle of its training."""

    def __init__(self, *, seconds: float, progress: str) -> None:
        self.seconds = seconds
        self.progress = Path(progress)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(self.seconds)
        if trainer.is_global_zero:
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(str(trainer.global_step))
            os.replace(tmp, self.progress)


class DumpState(pl.Callback):
    """At the end of fit, each rank writes its parameters and ``comm/*`` metrics to
    ``<folder>/rank<R>.pt`` (a launched job's ranks compared by the test)."""

    def __init__(self, *, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        import torch

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")}
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"state": state, "metrics": metrics, "step": trainer.global_step},
            self.folder / f"rank{trainer.global_rank}.pt",
        )
