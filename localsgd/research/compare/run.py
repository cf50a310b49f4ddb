"""Building and training the runs of a comparison, each in its own process."""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from localsgd.lightning.config_errors import parse_error_line
from localsgd.lightning.quiet import quiet_known_noise
from localsgd.research.compare.config import _SHARPNESS_FIXED, _STRATEGY_FIXED, CompareConfig, RunSpec
from localsgd.research.compare.report import x_scale


def _parser() -> Any:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    from localsgd.lightning.strategy import LocalSGDStrategy
    from localsgd.research.metrics import SharpnessCallback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    parser.add_class_arguments(
        LocalSGDStrategy, "strategy", skip=_STRATEGY_FIXED - {"workers_per_device"}, fail_untyped=False
    )
    parser.add_class_arguments(SharpnessCallback, "sharpness", skip=_SHARPNESS_FIXED, fail_untyped=False)
    return parser


def build(run: RunSpec) -> dict[str, Any]:
    """The run's model, datamodule, strategy and sharpness callback (``None`` when off), built
    and type-checked as LightningCLI would (a bad key or value raises ``ValueError`` naming the
    method and the field)."""
    import warnings

    parser = _parser()
    sharpness = (
        None
        if run.sharpness is None
        else {"every_n_steps": run.eval_every, "seed": run.seed, **run.sharpness}
    )
    config = {
        "model": run.model,
        "data": run.data,
        "strategy": {**run.strategy, "workers_per_device": run.workers},
        "sharpness": sharpness or {"every_n_steps": 1},
    }
    where = f"method {run.method!r} (seed {run.seed})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = parser.parse_object(copy.deepcopy(config))
            built = (
                parser.instantiate(parsed)
                if hasattr(parser, "instantiate")
                else parser.instantiate_classes(parsed)
            )
    except Exception as error:  # a ValueError, jsonargparse's ArgumentError, a TypeError from a constructor
        raise ValueError(f"{where}: {parse_error_line(str(error), parser)}") from None
    return {
        "model": built.model,
        "data": built.data,
        "strategy": built.strategy,
        "sharpness": None if sharpness is None else built.sharpness,
    }


def _progress_callback(queue: Any, index: int) -> Any:
    import lightning.pytorch as pl

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            queue.put((index, trainer.global_step))

    return Progress()


def train(run: RunSpec, *, queue: Any = None, index: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Train one run into ``run.folder`` and write its ``result.json``; returns the result."""
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.loggers import CSVLogger

    if threads is not None:
        torch.set_num_threads(threads)
    pl.seed_everything(run.seed, verbose=False)
    parts = build(run)
    # one process with K simulated workers, whatever cluster the command runs in
    parts["strategy"].cluster_environment = LightningEnvironment()
    callbacks = [] if parts["sharpness"] is None else [parts["sharpness"]]
    if queue is not None:
        callbacks.append(_progress_callback(queue, index))
    trainer = pl.Trainer(
        accelerator=run.accelerator,
        devices=1,
        strategy=parts["strategy"],
        max_steps=run.max_steps,
        val_check_interval=run.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # divergence is logged at syncs only: keep every one
        logger=CSVLogger(run.folder, name="", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
    )
    if run.init_from is not None:
        # the weights only (a warm start): optimizer, lr schedule, step count and sync state are new
        checkpoint = torch.load(run.init_from, map_location="cpu", weights_only=False)
        parts["model"].load_state_dict(checkpoint["state_dict"])
    start = time.perf_counter()
    trainer.fit(parts["model"], parts["data"])
    seconds = time.perf_counter() - start
    if run.save_final:  # the weights only, as init_from reads them; before result.json marks it done
        weights = {"state_dict": parts["model"].state_dict(), "global_step": trainer.global_step}
        torch.save(weights, run.folder / "final.ckpt.tmp")
        os.replace(run.folder / "final.ckpt.tmp", run.folder / "final.ckpt")
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {
        "method": run.method,
        "seed": run.seed,
        "fingerprint": run.fingerprint(),
        "steps": trainer.global_step,
        "seconds": seconds,
        "local_batch": getattr(parts["data"], "batch_size", None),
        "workers": run.workers,
        "final": final,
    }
    tmp = run.folder / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, run.folder / "result.json")
    return result


# a run is one process on its own: a rendezvous of the shell it was started from (torchrun,
# srun, an earlier fit in the parent) must not make concurrent runs share a port or a world
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _child(run: RunSpec, queue: Any, index: int, threads: int) -> None:
    """A run in its own process, its output in ``log.txt`` (the parent shows a progress bar)."""
    for name in _RENDEZVOUS:
        os.environ.pop(name, None)
    run.folder.mkdir(parents=True, exist_ok=True)
    # open for the process's life: a failed run's traceback, printed on the way out, lands here too
    log = open(run.folder / "log.txt", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    quiet_known_noise()
    train(run, queue=queue, index=index, threads=threads)


def finished(run: RunSpec) -> bool:
    """Whether ``run`` already has a result for the same settings."""
    path = run.folder / "result.json"
    if not path.is_file():
        return False
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text()).get("fingerprint") == run.fingerprint()
    return False


class _Clock:
    """How long the runs left will take, ``jobs`` at a time, from the runs' own timing.

    A run takes ``a + b * steps``: ``b`` (seconds per step) from the step reports of the runs that
    trained, ``a`` (start-up in a fresh process, the final evaluation) from the finished runs, or
    twice the start-up seen so far before any finished. Step rate alone (tqdm's own ETA) counted a
    run's start-up as one step and promised 70 hours for a 17-minute job."""

    def __init__(self, steps: Sequence[int], jobs: int) -> None:
        self.steps, self.jobs = list(steps), jobs
        self.start: dict[int, float] = {}
        self.first: dict[int, tuple[float, int]] = {}  # the first step report: (time, step)
        self.last: dict[int, tuple[float, int]] = {}
        self.took: dict[int, float] = {}

    def started(self, index: int) -> None:
        self.start[index] = time.monotonic()

    def stepped(self, index: int, step: int) -> None:
        now = time.monotonic()
        self.first.setdefault(index, (now, step))
        self.last[index] = (now, step)

    def finished(self, index: int) -> None:
        self.took[index] = time.monotonic() - self.start[index]

    def left(self) -> float | None:
        """Seconds until every run is done, or None before there is a step rate to go by."""
        rates = [
            (self.last[i][0] - t) / (self.last[i][1] - k)
            for i, (t, k) in self.first.items()
            if self.last[i][1] > k
        ]
        if not rates:
            return None
        per_step = sum(rates) / len(rates)
        if self.took:
            fixed = sum(self.took[i] - per_step * self.steps[i] for i in self.took) / len(self.took)
        else:
            fixed = 2 * sum(t - self.start[i] for i, (t, _) in self.first.items()) / len(self.first)
        now = time.monotonic()
        work = [
            max(0.0, fixed + per_step * n - (now - self.start[i] if i in self.start else 0.0))
            for i, n in enumerate(self.steps)
            if i not in self.took
        ]
        return max(max(work, default=0.0), sum(work) / self.jobs)


def _note(todo: Sequence[RunSpec], running: dict[int, Any], clock: _Clock) -> str:
    """The progress bar's note: the time left and which runs are training now."""
    from tqdm import tqdm

    left = clock.left()
    notes = [] if left is None else [f"about {tqdm.format_interval(left)} left"]
    if running:
        notes.append("now: " + ", ".join(f"{todo[i].method} seed {todo[i].seed}" for i in sorted(running)))
    return ", ".join(notes)


def run_all(config: CompareConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every unfinished run (``config.jobs`` at a time, each in a fresh process), then
    return every run's result."""
    from tqdm.auto import tqdm

    runs = config.runs()
    for run in runs:  # every method builds before anything trains: a typo fails in seconds
        build(run)
        x_scale(config, run)  # and the plot's x axis can be drawn from its settings
        if run.init_from is not None and not Path(run.init_from).is_file():
            raise ValueError(
                f"method {run.method!r}: init_from ({run.init_from!r}) is not a file. HINT: train the "
                "common starting point first (see the config's comments), or fix the path"
            )
    todo = [r for r in runs if not finished(r)]
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.yaml").write_text(yaml.safe_dump(config.source, sort_keys=False))
    skipped = len(runs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(runs)} runs already finished in {config.out}: skipped")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    done_steps = [0] * len(todo)
    clock = _Clock([r.max_steps for r in todo], config.jobs)
    bar = tqdm(
        total=sum(r.max_steps for r in todo),
        unit="step",
        desc=f"runs 0/{len(todo)}",
        disable=not progress or not todo,
        mininterval=float(os.environ.get("LOCALSGD_PROGRESS_INTERVAL", 0.5 if sys.stderr.isatty() else 10)),
        dynamic_ncols=True,
        # tqdm's own rate and ETA count steps only (see _Clock); the note says the time left
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    )
    # a child's OpenMP pool must be sized before torch loads: torch.set_num_threads alone left
    # two concurrent runs 30x slower than one (idle OpenMP threads spinning on a shared core)
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    waiting = list(enumerate(todo))
    running: dict[int, Any] = {}
    failed: list[RunSpec] = []
    completed = 0
    try:
        while waiting or running:
            while waiting and len(running) < config.jobs:
                index, run = waiting.pop(0)
                if run.folder.exists():  # an interrupted or outdated run starts over
                    shutil.rmtree(run.folder)
                process = ctx.Process(target=_child, args=(run, queue, index, threads), daemon=True)
                process.start()
                clock.started(index)
                running[index] = process
                bar.set_postfix_str(_note(todo, running, clock), refresh=False)
            with contextlib.suppress(Exception):
                while True:
                    index, step = queue.get(timeout=0.2)
                    clock.stepped(index, step)
                    bar.set_postfix_str(_note(todo, running, clock), refresh=False)
                    bar.update(step - done_steps[index])
                    done_steps[index] = step
            for index, process in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[index]
                clock.finished(index)
                run = todo[index]
                if process.exitcode != 0 or not finished(run):
                    failed.append(run)
                bar.update(run.max_steps - done_steps[index])
                done_steps[index] = run.max_steps
                completed += 1
                bar.set_description(f"runs {completed}/{len(todo)}")
                bar.set_postfix_str(_note(todo, running, clock), refresh=False)
    finally:
        bar.close()
        for process in running.values():
            process.kill()
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    if failed:
        logs = "\n".join(f"  {r.method} seed {r.seed}: {r.folder / 'log.txt'}" for r in failed)
        raise RuntimeError(f"{len(failed)} run(s) failed; their output is in\n{logs}")
    return [json.loads((r.folder / "result.json").read_text()) for r in runs]
