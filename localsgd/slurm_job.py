"""What every SLURM task runs when ``launch/slurm.py`` submits a training run through submitit.

:class:`TrainingJob` is a submitit *checkpointable* callable: each task runs ``localsgd fit`` on
the config, with Lightning's :class:`~lightning.pytorch.plugins.environments.SLURMEnvironment`
reading ranks from SLURM, and resumes from ``<job folder>/checkpoints/last.ckpt`` when that
exists. On submitit's warning signal (USR2 ``signal_delay_s`` before the time limit, or
``scancel --signal=USR2 JOBID``) the ranks save that checkpoint after the same step
(:class:`~localsgd.lightning.preemption.PreemptionCheckpoint`); then rank 0 hands over to submitit, which
calls :meth:`TrainingJob.checkpoint`, pickles the returned submission and requeues the job.

Who owns the signal: submitit (USR2). Lightning's own SLURM auto-requeue (SIGUSR1, saving inside
the signal handler) is switched off with ``SLURMEnvironment(auto_requeue=False)``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission

from localsgd.cli import lightning_cli
from localsgd.lightning.preemption import CHECKPOINT_NAME, Preempted, PreemptionCheckpoint

log = logging.getLogger(__name__)

# submitit's preemption signal; it reads the same variable
_SIGNAL = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


class TrainingJob:
    """``localsgd fit --config CONFIG OVERRIDES...`` on every task of a SLURM job, requeued on
    the warning signal at most ``max_requeues`` times, each time resuming from its checkpoint.

    Args:
        config: path of the YAML config.
        overrides: extra ``localsgd fit`` arguments (``--trainer.max_steps=1000``, ...), including
            ``--trainer.num_nodes`` and ``--trainer.devices`` matching the allocation.
        max_requeues: requeues allowed after the warning signal (time limit or preemption).
    """

    def __init__(self, *, config: str | Path, overrides: Sequence[str] = (), max_requeues: int = 3) -> None:
        if isinstance(max_requeues, bool) or not isinstance(max_requeues, int) or max_requeues < 0:
            raise ValueError(f"max_requeues ({max_requeues!r}) must be an integer >= 0")
        self.config = str(config)
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def fit_args(self, folder: Path) -> list[str]:
        """The ``localsgd`` arguments one task runs with, given the job's folder."""
        checkpoint = folder / "checkpoints" / CHECKPOINT_NAME
        args = [
            "fit",
            f"--config={self.config}",
            *self.overrides,
            "--trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment",
            "--trainer.plugins.auto_requeue=false",
            "--trainer.callbacks+=localsgd.lightning.preemption.PreemptionCheckpoint",
            f"--trainer.callbacks.dirpath={checkpoint.parent}",
            f"--trainer.callbacks.signal={_SIGNAL}",
        ]
        if checkpoint.is_file():
            args.append(f"--ckpt_path={checkpoint}")
        return args

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        folder = Path(env.paths.folder)
        record: dict[str, Any] = {
            "rank": env.global_rank,
            "num_tasks": env.num_tasks,
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        }
        submitit_handler = signal.getsignal(signal.Signals[f"SIG{_SIGNAL}"])
        try:
            with warnings.catch_warnings():
                # under submitit sys.argv holds submitit's own arguments, which LightningCLI ignores
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                cli = lightning_cli(self.fit_args(folder))
        except Preempted as stop:
            record.update(event="preempted", start_step=stop.start_step, global_step=stop.global_step)
            _append_event(folder, record)
            if env.global_rank == 0 and callable(submitit_handler):
                # submitit's handler calls self.checkpoint(), saves the returned submission,
                # runs `scontrol requeue` and exits; the other ranks just end (no result file).
                submitit_handler(signal.Signals[f"SIG{_SIGNAL}"], None)
            raise
        trainer = cli.trainer
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at run time
        callback = next(c for c in callbacks if isinstance(c, PreemptionCheckpoint))
        metrics = trainer.callback_metrics
        record.update(
            event="finished",
            world_size=trainer.world_size,
            start_step=callback.start_step,
            global_step=trainer.global_step,
            comm_rounds=int(metrics["comm/rounds"]) if "comm/rounds" in metrics else None,
        )
        _append_event(folder, record)
        return record

    def checkpoint(self) -> DelayedSubmission | None:
        """submitit's hook, on rank 0 after the checkpoint is saved: the submission to requeue
        (this same job: it resumes from the checkpoint), or None after ``max_requeues``."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            log.warning(f"requeued {restarts} times (max_requeues={self.max_requeues}): not again")
            return None
        return DelayedSubmission(self)


def _append_event(folder: Path, record: dict[str, Any]) -> None:
    """One JSON line per rank and run in ``events_rank<R>.jsonl``: what started and where it ended."""
    line = json.dumps({**record, "time": time.time()})
    with open(folder / f"events_rank{record['rank']}.jsonl", "a") as f:
        f.write(line + "\n")
