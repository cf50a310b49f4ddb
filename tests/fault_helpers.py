"""Callbacks that torchrun's workers import in the fault test (it puts this folder on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class KillRank(pl.Callback):
    """SIGKILLs rank ``rank`` after optimizer step ``step``, in torchrun's first attempt only (a
    restart must get past that step). ``step: null`` never kills: the uninterrupted run.

    It first sleeps ``delay_s``, so that the other ranks wait in their next sync when it dies (the
    usual way a rank dies: the slow one) and fail there, before torchrun's agent, which polls its
    workers every 0.1 s, notices the death and SIGTERMs them wherever they are."""

    def __init__(self, *, step: int | None, rank: int = 1, delay_s: float = 2.0) -> None:
        self.step, self.rank, self.delay_s = step, rank, delay_s

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if _attempt() == 0 and trainer.global_rank == self.rank and trainer.global_step == self.step:
            time.sleep(self.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no traceback: as the OOM killer does


class Attempts(pl.Callback):
    """Writes ``attempt<A>-rank<R>.json`` into ``folder``: the step each attempt started training
    at (after any checkpoint was restored), whether its workers share torchrun's agent store
    (which outlives the attempt, keys included), and, once it ends, the step it ended at."""

    def __init__(self, *, folder: str) -> None:
        self.folder = Path(folder)

    def _write(self, trainer: pl.Trainer, **record: Any) -> None:
        path = self.folder / f"attempt{_attempt()}-rank{trainer.global_rank}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **record}))

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        self._write(trainer, start_step=trainer.global_step, agent_store=agent_store)

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._write(trainer, end_step=trainer.global_step)
