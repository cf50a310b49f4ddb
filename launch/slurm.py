"""Submit a ``localsgd fit`` run to SLURM through submitit.

    python launch/slurm.py --config configs/quickstart.yaml --nodes 2 --gpus-per-node 8 \\
        --cpus-per-task 8 --time 240 --partition gpu --account myproj -- --trainer.max_steps=100000

Everything after ``--`` goes to ``localsgd fit`` as overrides. One SLURM task per GPU (per
process on CPU): ``--trainer.num_nodes`` and ``--trainer.devices`` are set from ``--nodes`` and
the tasks per node, and Lightning's SLURMEnvironment reads the ranks from SLURM.

Preemption and time limits: SLURM sends USR2 ``--signal-delay`` seconds before the time limit
(``scancel --signal=USR2 JOBID`` does the same by hand). All ranks then save
``<folder>/checkpoints/last.ckpt`` after the same step, submitit requeues the job (at most
``--max-requeues`` times), and the requeued job resumes from that checkpoint. submitit owns the
signal; Lightning's own SLURM auto-requeue (SIGUSR1) is switched off. Job files (submitit logs,
``events_rank<R>.jsonl``, checkpoints) go to ``--folder`` with ``%j`` replaced by the job id.

The config is parsed before submitting, so a typo fails here and not in the queue.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from localsgd.cli import check_args, error_reason
from localsgd.slurm_job import TrainingJob

# In a task, SLURMEnvironment derives the rendezvous from SLURM; a MASTER_PORT or RANK left in the
# submitting shell would be exported into every task (sbatch --export=ALL) and override it.
_STALE = "MASTER_ADDR MASTER_PORT WORLD_SIZE RANK LOCAL_RANK NODE_RANK LOCAL_WORLD_SIZE GROUP_RANK"


@dataclass(kw_only=True)
class SlurmOptions:
    """What to ask SLURM for. Counts are checked here; a ValueError names the bad one."""

    config: str
    """YAML config passed to ``localsgd fit --config``."""
    overrides: Sequence[str] = ()
    """Extra ``localsgd fit`` arguments."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU nodes)."""
    tasks_per_node: int | None = None
    """Processes (workers) per node; one per GPU, so by default ``gpus_per_node`` (1 on CPU)."""
    cpus_per_task: int = 1
    """CPU cores per task (OMP_NUM_THREADS is set to it)."""
    mem_gb: float | None = None
    """Memory per node in GB; None: the partition's default."""
    time_min: int = 60
    """Time limit in minutes."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends USR2 (time to save a checkpoint)."""
    max_requeues: int = 3
    """Requeues allowed after the warning signal; the job then ends with an error."""
    job_name: str = "localsgd"
    folder: str = "runs/slurm/%j"
    """submitit's folder (logs, pickles) and the job's (checkpoints, events); ``%j``: job id."""

    def __post_init__(self) -> None:
        if not Path(self.config).is_file():
            raise ValueError(f"config ({self.config!r}) is not a file")
        for name, low in (
            ("nodes", 1),
            ("gpus_per_node", 0),
            ("cpus_per_task", 1),
            ("time_min", 1),
            ("signal_delay_s", 1),
            ("max_requeues", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} ({value!r}) must be an integer >= {low}")
        if self.tasks_per_node is None:
            self.tasks_per_node = max(1, self.gpus_per_node)
        if isinstance(self.tasks_per_node, bool) or not isinstance(self.tasks_per_node, int):
            raise ValueError(f"tasks_per_node ({self.tasks_per_node!r}) must be an integer >= 1")
        if self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node ({self.tasks_per_node}) must be an integer >= 1")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(
                f"tasks_per_node ({self.tasks_per_node}) must equal gpus_per_node ({self.gpus_per_node}): "
                "one task per GPU. HINT: leave tasks_per_node out"
            )
        if self.signal_delay_s >= 60 * self.time_min:
            raise ValueError(
                f"signal_delay_s ({self.signal_delay_s}) must be shorter than the time limit "
                f"({self.time_min} min = {60 * self.time_min} s)"
            )
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"mem_gb ({self.mem_gb!r}) must be > 0")

    @property
    def num_tasks(self) -> int:
        assert self.tasks_per_node is not None
        return self.nodes * self.tasks_per_node

    def job(self) -> TrainingJob:
        overrides = [
            *self.overrides,
            # after the user's overrides: the allocation decides the world size
            f"--trainer.num_nodes={self.nodes}",
            f"--trainer.devices={self.tasks_per_node}",
        ]
        return TrainingJob(config=self.config, overrides=overrides, max_requeues=self.max_requeues)

    def executor(self) -> submitit.AutoExecutor:
        executor = submitit.AutoExecutor(
            folder=self.folder, cluster="slurm", slurm_max_num_timeout=self.max_requeues
        )
        params: dict[str, Any] = dict(
            name=self.job_name,
            nodes=self.nodes,
            tasks_per_node=self.tasks_per_node,
            cpus_per_task=self.cpus_per_task,
            timeout_min=self.time_min,
            slurm_signal_delay_s=self.signal_delay_s,
            slurm_setup=[f"unset {_STALE}", f"export OMP_NUM_THREADS={self.cpus_per_task}"],
        )
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        for name in ("partition", "account", "qos"):
            if getattr(self, name) is not None:
                params[f"slurm_{name}"] = getattr(self, name)
        executor.update_parameters(**params)
        return executor


def submit(options: SlurmOptions) -> submitit.Job:
    """Check the config, then submit the job; returns submitit's handle."""
    job = options.job()
    # the exact arguments every task will run with (the checkpoint comes later, on requeue)
    check_args(job.fit_args(Path(options.folder)))
    return options.executor().submit(job)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py",
        description="Submit `localsgd fit --config CONFIG [OVERRIDES]` to SLURM through submitit.",
        epilog="Arguments after `--` are passed to `localsgd fit`, e.g. -- --trainer.max_steps=1000",
    )
    p.add_argument("--config", required=True, help="YAML config for `localsgd fit`")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 on CPU nodes)")
    p.add_argument(
        "--tasks-per-node", type=int, default=None, help="processes per node (default: one per GPU; 1 on CPU)"
    )
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the partition's)")
    p.add_argument("--time", type=int, default=60, dest="time_min", help="time limit in minutes")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument(
        "--signal-delay", type=int, default=120, dest="signal_delay_s", help="seconds of warning (USR2)"
    )
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after the warning signal")
    p.add_argument("--job-name", default="localsgd")
    p.add_argument("--folder", default="runs/slurm/%j", help="job folder; %%j is the job id")
    p.add_argument("--wait", action="store_true", help="wait for the job and print each task's summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = _parser()
    args = vars(parser.parse_args(argv[:split]))
    wait = args.pop("wait")
    try:
        options = SlurmOptions(**args, overrides=argv[split + 1 :])
    except ValueError as e:
        parser.error(str(e))  # exits 2, naming the field
    job = submit(options)
    folder = options.folder.replace("%j", str(job.job_id))
    print(f"submitted job {job.job_id} ({options.num_tasks} tasks); files in {folder}", flush=True)
    if not wait:
        return 0
    try:
        results = job.results()
    except submitit.core.utils.FailedJobError as error:
        # the task's traceback is in its log; here, as for a bad value before submitting, one line
        reason = error_reason(str(error))
        print(f"slurm.py: error: job {job.job_id} failed: {reason} (its log: {folder})", file=sys.stderr)
        return 1
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
