"""Checkpoint on a cluster's warning signal, at a step boundary all ranks agree on.

SLURM warns a job before its time limit (``sbatch --signal=USR2@120``) and on preemption when
configured to; ``scancel --signal=USR2 JOBID`` sends the same warning by hand. Saving the
checkpoint inside the signal handler, as Lightning's own SLURM auto-requeue does, is unsafe
here: saving averages the workers (a collective), and each rank may be interrupted at a
different point of its step, so the collectives would pair up wrongly or hang. Instead the
handler only records the signal; the ranks then agree on it (at the next sync under Local SGD,
after each training batch otherwise), and once any rank was signalled they all save the same
checkpoint after the same step and stop.

The stop is a :class:`Preempted` exception (a ``SystemExit``), so the process ends quietly.
Who requeues is the launcher's choice: ``launch/slurm.py`` (submitit) requeues through
submitit's checkpoint protocol; the ``sbatch`` template sets ``requeue=True`` and this callback
runs ``scontrol requeue`` itself, on rank 0, after the checkpoint is on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

CHECKPOINT_NAME = "last.ckpt"


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written.

    Attributes:
        path: the checkpoint written.
        global_step: the trainer's global step at the checkpoint.
        start_step: the global step this run started from (0, or the resumed checkpoint's).
        requeued: whether this callback asked SLURM to requeue the job.
    """

    def __init__(self, *, path: Path, global_step: int, start_step: int, requeued: bool) -> None:
        super().__init__(0)
        self.path = path
        self.global_step = global_step
        self.start_step = start_step
        self.requeued = requeued

    def __str__(self) -> str:
        return f"preempted at global step {self.global_step}, checkpoint {self.path}"


def signal_number(name: str) -> signal.Signals:
    """``"USR2"``, ``"SIGUSR2"`` or ``"12"`` as a signal; a ValueError names anything else."""
    text = str(name).strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[f"SIG{text.removeprefix('SIG')}"]
    except (KeyError, ValueError):
        raise ValueError(
            f"signal ({name!r}) must be a signal name such as 'USR2' or 'SIGUSR1', or its number"
        ) from None


def _leaving(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while a preempted process winds down: it is ending anyway."""


class PreemptionCheckpoint(pl.Callback):
    """Save ``dirpath/last.ckpt`` and stop when the job is signalled (see the module docstring).

    Under :class:`~localsgd.LocalSGDStrategy` the request travels in the next sync's control
    message, with no collective of its own, so the checkpoint follows within H steps of the
    signal (a SIGTERM agreed at a sync saves it too); under other strategies it costs one 1-element
    all-reduce per training batch. Validation is not interrupted: a signal that arrives during
    validation is acted on after a later training batch.

    Args:
        dirpath: folder of the checkpoint; the next run resumes from ``dirpath/last.ckpt``.
        signal: the warning signal (``"USR2"``: submitit's and the sbatch template's choice; not
            ``"USR1"``, which Lightning's own SLURM auto-requeue and NCCL may claim).
        requeue: after saving, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (for jobs
            submitted with sbatch; leave False under submitit, which requeues itself).
        max_requeues: with ``requeue``, stop requeueing once ``SLURM_RESTART_COUNT`` reaches this.
    """

    def __init__(
        self, *, dirpath: str | Path, signal: str = "USR2", requeue: bool = False, max_requeues: int = 3
    ) -> None:
        super().__init__()
        if not str(dirpath):
            raise ValueError("dirpath ('') must name a folder for the preemption checkpoint")
        if isinstance(max_requeues, bool) or not isinstance(max_requeues, int) or max_requeues < 0:
            raise ValueError(f"max_requeues ({max_requeues!r}) must be an integer >= 0")
        self.dirpath = Path(dirpath)
        self.signal = signal_number(signal)
        self.requeue = bool(requeue)
        self.max_requeues = max_requeues
        self.requested = False
        """Set by the signal handler on this rank."""
        self.start_step = 0
        """The global step this run started from."""
        self._previous: Any = None  # the handler of ``self.signal`` before this fit, while ours is in

    @property
    def path(self) -> Path:
        return self.dirpath / CHECKPOINT_NAME

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: the handler may run in the middle of a collective.
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        # Replaces submitit's handler (slurm_job.py calls that one itself after the checkpoint)
        # for this fit only: the handler from before is back when the fit ends, however it ends.
        self._previous = signal.signal(self.signal, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_signal(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # a fit that raises (Preempted included) skips the teardown hooks
        self._restore_signal(trainer)

    def _restore_signal(self, trainer: pl.Trainer) -> None:
        previous, self._previous = self._previous, None
        if previous is None:  # not installed, or over a handler not set from Python (none to put back)
            return
        signal.signal(self.signal, previous)
        # Lightning records every handler after ``setup`` (ours among them) and puts those back
        # when the fit ends, after ``on_exception``: its record must hold the one from before fit
        recorded = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(recorded, dict) and recorded.get(self.signal) == self._on_signal:
            recorded[self.signal] = previous

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        rank_zero_info(
            f"PreemptionCheckpoint: training starts at global step {self.start_step} "
            f"(SLURM_RESTART_COUNT={restarts}); on SIG{self.signal.name.removeprefix('SIG')} "
            f"it saves {self.path}"
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stops = getattr(trainer.strategy, "stops", None)
        if stops is not None and trainer.world_size > 1:
            # Local SGD: the request rides in the next sync's control message (no collective
            # here); all ranks learn of it, or of a SIGTERM, at the same sync and save together
            stops.request("preempt", self.requested)
            if not (stops.agreed["preempt"] or stops.agreed["sigterm"]):
                return
        elif not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return  # rank-consistent: every rank takes part in this reduction after every batch
        self.dirpath.mkdir(parents=True, exist_ok=True)
        # all ranks: averaging for the checkpoint is a collective, and each rank writes its own
        # state beside it; localsgd's strategies write every file atomically (temporary + rename),
        # so a job killed while saving leaves the previous checkpoint
        trainer.save_checkpoint(self.path)
        if threading.current_thread() is threading.main_thread():
            # This process is leaving. SLURM answers a requeue with SIGTERM, and Lightning's SIGTERM
            # handler runs a collective with ranks that may be gone; Lightning puts back the
            # handler from before fit when fit unwinds.
            signal.signal(signal.SIGTERM, _leaving)
        requeued = False
        if trainer.is_global_zero:
            rank_zero_info(f"PreemptionCheckpoint: saved {self.path} at global step {trainer.global_step}")
            if self.requeue:
                requeued = self._requeue()
        raise Preempted(
            path=self.path, global_step=trainer.global_step, start_step=self.start_step, requeued=requeued
        )

    def _requeue(self) -> bool:
        if "SLURM_ARRAY_JOB_ID" in os.environ:
            job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        else:
            job_id = os.environ.get("SLURM_JOB_ID", "")
        if not job_id:
            rank_zero_warn("PreemptionCheckpoint(requeue=True): SLURM_JOB_ID is not set; not requeueing")
            return False
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            rank_zero_warn(
                f"PreemptionCheckpoint: job {job_id} was requeued {restarts} times (max_requeues="
                f"{self.max_requeues}); not requeueing. Resume it with --ckpt_path {self.path}"
            )
            return False
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        rank_zero_info(f"PreemptionCheckpoint: requeued SLURM job {job_id}")
        return True
