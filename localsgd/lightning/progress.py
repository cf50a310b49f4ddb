"""What ``localsgd fit`` prints while it trains and when it is done.

A log-friendly line every tenth of the run (Lightning's bar redraws one terminal line, which a
SLURM log or a pipe turns into thousands), and one summary line at the end: steps, sync
rounds, bytes sent per worker, the last validation metrics and where the checkpoint went.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def _metrics(trainer: pl.Trainer, prefix: str) -> str:
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
    return " ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))


class StepLog(pl.Callback):
    """One line per ``every_n_steps`` optimizer steps (default: a tenth of the planned run).

    Args:
        every_n_steps: steps between two lines; ``None``: the planned steps / 10.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps ({every_n_steps!r}) must be an integer >= 1 or None")
        self.every_n_steps = every_n_steps
        self._every = 1
        self._start = 0.0
        self._total: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self._total = int(total) if total != float("inf") else None
        self._every = self.every_n_steps or max(1, (self._total or 1000) // 10)
        self._start, self._first = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self._first or (step % self._every and step != self._total):
            return
        rate = (step - self._first) / max(time.monotonic() - self._start, 1e-9)
        of = f"/{self._total}" if self._total else ""
        parts = [f"step {step}{of}", f"epoch {trainer.current_epoch}", f"{rate:.1f} steps/s"]
        parts += [m for m in (_metrics(trainer, "train"), _metrics(trainer, "comm/rounds")) if m]
        rank_zero_info(" | ".join(parts))


def summary(trainer: pl.Trainer) -> str:
    """The end-of-fit line: steps, rounds, bytes per worker, last validation metrics, checkpoint."""
    metrics = trainer.callback_metrics
    parts = [f"done: {trainer.global_step} optimizer steps"]
    comm = getattr(trainer.strategy, "comm", None)
    if comm is not None and comm.num_workers == 1:
        parts[0] += ", communication: none (1 worker)"  # one worker averages with nobody
    elif "comm/rounds" in metrics:
        parts[0] += f", {int(metrics['comm/rounds'])} sync rounds"
        parts[0] += f", {float(metrics['comm/bytes']) / 1e6:.2f} MB sent per worker"
    val = _metrics(trainer, "val")
    parts.append(val or "no validation metrics")
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
    parts.append(f"checkpoint {path}" if path else "no checkpoint saved")
    return " | ".join(parts)
