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


def _active(todo: Sequence[RunSpec], running: dict[int, Any]) -> str:
    """The progress bar's note: which runs are training now."""
    return (
        "now: " + ", ".join(f"{todo[i].method} seed {todo[i].seed}" for i in sorted(running))
        if running
        else ""
    )


def run_all(config: CompareConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every unfinished run (``config.jobs`` at a time, each in a fresh process), then
    return every run's result."""
    from tqdm.auto import tqdm

    runs = config.runs()
    for run in runs:  # every method builds before anything trains: a typo fails in seconds
        build(run)
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
    bar = tqdm(
        total=sum(r.max_steps for r in todo),
        unit="step",
        desc=f"runs 0/{len(todo)}",
        disable=not progress or not todo,
        mininterval=0.5 if sys.stderr.isatty() else 10,
        dynamic_ncols=True,
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
                running[index] = process
                bar.set_postfix_str(_active(todo, running), refresh=False)
            with contextlib.suppress(Exception):
                while True:
                    index, step = queue.get(timeout=0.2)
                    bar.update(step - done_steps[index])
                    done_steps[index] = step
            for index, process in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[index]
                run = todo[index]
                if process.exitcode != 0 or not finished(run):
                    failed.append(run)
                bar.update(run.max_steps - done_steps[index])
                done_steps[index] = run.max_steps
                completed += 1
                bar.set_description(f"runs {completed}/{len(todo)}")
                bar.set_postfix_str(_active(todo, running), refresh=False)
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
