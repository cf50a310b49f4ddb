"""``localsgd compare --config X.yaml``: the SGD baseline and Local SGD variants side by side.

Every method of the config trains the same model on the same data, from the same
initialization (per seed), for the same number of optimizer steps, with the same K workers and
local batch; only what the config's ``methods`` entry changes differs (the sync schedule, the
outer optimizer, or an optimizer hyperparameter). The K workers run in one process through the
simulator (``LocalSGDStrategy(workers_per_device=K)``): exactly the math of K processes, and
``comm/*`` count what K processes would send.

The run folder (``out``) holds::

    config.yaml                      the comparison's config, as read
    runs/<method>/seed<S>/           one run: metrics.csv (every step), log.txt, result.json
    summary.csv                      one row per run: final metrics, communication, wall time
    report.md, report.png            per method: mean +- std over seeds; curves with seed bands

``init_from: <checkpoint>`` (for the whole config or one method) starts every run from that
Lightning checkpoint's model weights, with a fresh optimizer, lr schedule and sync state: the
papers' "from a common SGD checkpoint" comparisons.

A run counts as finished when its ``result.json`` exists and was written for the same run
settings; running the command again skips finished runs and only redraws the report (a
changed method, or a run that was interrupted, is trained again from the start).

The SGD baseline here is ``sync_every: 1`` with ``optimizer_state: average``: averaging the
workers after every step from a common start is synchronous SGD with total batch K x B
(tests/test_strategy_distributed.py checks it against :class:`~localsgd.SGDBaselineStrategy`
for SGD with momentum and weight decay). With Adam it is not (averaging Adam updates is not
averaging gradients): compare Adam runs at K = 1.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# What a method may change, and the top-level keys; anything else is a typo.
_METHOD_KEYS = {"strategy", "model", "data", "max_steps", "eval_every", "workers", "init_from"}
_TOP_KEYS = {
    "out",
    "seeds",
    "workers",
    "max_steps",
    "eval_every",
    "jobs",
    "accelerator",
    "x_axis",
    "title",
    "model",
    "data",
    "strategy",
    "sharpness",
    "methods",
    "init_from",
}
# LocalSGDStrategy arguments the runner sets itself (or the Trainer fills in)
_STRATEGY_FIXED = {
    "workers_per_device",
    "start_method",
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
}
_SHARPNESS_FIXED = {"loss_fn"}  # dataset: "train" or null


@dataclass(kw_only=True)
class RunSpec:
    """One training run: a method at a seed, with everything it needs to be built."""

    method: str
    seed: int
    folder: Path
    workers: int
    max_steps: int
    eval_every: int
    accelerator: str
    model: dict[str, Any]
    data: dict[str, Any]
    strategy: dict[str, Any]
    sharpness: dict[str, Any] | None
    init_from: str | None = None
    """A Lightning checkpoint whose model weights (``state_dict``) the run starts from."""

    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (the folder aside)."""
        keys = ("method", "seed", "workers", "max_steps", "eval_every", "accelerator", "init_from")
        out = {k: getattr(self, k) for k in keys}
        return {
            **out,
            "model": self.model,
            "data": self.data,
            "strategy": self.strategy,
            "sharpness": self.sharpness,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]


@dataclass(kw_only=True)
class CompareConfig:
    """A comparison, as read from YAML (see configs/compare_quickstart.yaml for every field)."""

    out: Path
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    workers: int
    max_steps: int
    eval_every: int
    jobs: int = 1
    accelerator: str = "cpu"
    x_axis: str = "step"
    title: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    sharpness: dict[str, Any] | None = None
    init_from: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    """The YAML as read, copied into the run folder."""

    def runs(self) -> list[RunSpec]:
        """Every (method, seed) run, method-major in the config's order."""
        specs = []
        for name, method in self.methods.items():
            model = _merge_init_args(self.model, method.get("model", {}), f"methods.{name}.model")
            data = _merge_init_args(self.data, method.get("data", {}), f"methods.{name}.data")
            strategy = {"log_divergence": True, **self.strategy, **method.get("strategy", {})}
            for seed in self.seeds:
                specs.append(
                    RunSpec(
                        method=name,
                        seed=seed,
                        folder=self.out / "runs" / slug(name) / f"seed{seed}",
                        workers=method.get("workers", self.workers),
                        max_steps=method.get("max_steps", self.max_steps),
                        eval_every=method.get("eval_every", self.eval_every),
                        accelerator=self.accelerator,
                        model=model,
                        data=data,
                        strategy=strategy,
                        sharpness=self.sharpness,
                        init_from=method.get("init_from", self.init_from),
                    )
                )
        return specs


# ------------------------------------------------------------------------------ reading the config
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


def _path_or_none(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} ({value!r}) must be the path of a checkpoint, or null")
    return value


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be a mapping (key: value lines), got {type(value).__name__}: {value!r}"
        )
    return value


def _class_spec(name: str, value: Any) -> dict[str, Any]:
    spec = _mapping(name, value)
    if "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise ValueError(f"{name} must have a class_path and, optionally, init_args; got keys {sorted(spec)}")
    return spec


def _merge_init_args(base: dict[str, Any], overrides: dict[str, Any], name: str) -> dict[str, Any]:
    """``base`` (class_path + init_args) with ``overrides`` merged into its init_args; an override
    that is itself a class_path spec replaces the whole entry."""
    if "class_path" in overrides:
        return copy.deepcopy(_class_spec(name, overrides))
    merged = copy.deepcopy(base)
    merged.setdefault("init_args", {}).update(copy.deepcopy(overrides))
    return merged


def slug(name: str) -> str:
    """A method name as a folder name: ``"Local SGD (H=8)"`` -> ``"local-sgd-h-8"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "method"


def load_config(path: str | Path, *, out: str | Path | None = None, jobs: int | None = None) -> CompareConfig:
    """Read and check a comparison config; ``out`` and ``jobs`` override the file's values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config ({str(path)!r}) is not a file")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw = _mapping(f"the config {path}", raw)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {path}; the keys are {sorted(_TOP_KEYS)}")
    for key in ("model", "data", "methods", "max_steps", "eval_every", "workers"):
        if key not in raw:
            raise ValueError(f"{key} is missing from {path}")
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"seeds ({seeds!r}) must be a non-empty list of distinct integers")
    methods = _mapping("methods", raw["methods"])
    if not methods:
        raise ValueError("methods is empty: list at least one method")
    slugs: dict[str, str] = {}
    for name, method in methods.items():
        method = _mapping(f"methods.{name}", method if method is not None else {})
        methods[name] = method
        bad = set(method) - _METHOD_KEYS
        if bad:
            raise ValueError(
                f"methods.{name} has unknown key(s) {sorted(bad)}; a method may set {sorted(_METHOD_KEYS)}"
            )
        for key in ("strategy", "model", "data"):
            _mapping(f"methods.{name}.{key}", method.get(key, {}))
        if "init_from" in method:
            _path_or_none(f"methods.{name}.init_from", method["init_from"])
        for key in ("max_steps", "eval_every", "workers"):
            if key in method:
                _positive_int(f"methods.{name}.{key}", method[key])
        fixed = _STRATEGY_FIXED & set(method.get("strategy", {}))
        if fixed:
            raise ValueError(f"methods.{name}.strategy cannot set {sorted(fixed)}: the runner sets them")
        other = slugs.setdefault(slug(str(name)), str(name))
        if other != name:
            raise ValueError(
                f"methods {other!r} and {name!r} would share the folder {slug(str(name))!r}: rename one"
            )
    strategy = _mapping("strategy", raw.get("strategy", {}))
    if _STRATEGY_FIXED & set(strategy):
        raise ValueError(
            f"strategy cannot set {sorted(_STRATEGY_FIXED & set(strategy))}: the runner sets them"
        )
    sharpness = raw.get("sharpness")
    if sharpness is not None:
        sharpness = _mapping("sharpness", sharpness)
        if _SHARPNESS_FIXED & set(sharpness):
            raise ValueError(f"sharpness cannot set {sorted(_SHARPNESS_FIXED & set(sharpness))}")
    x_axis = raw.get("x_axis", "step")
    if x_axis not in ("step", "samples"):
        raise ValueError(
            f"x_axis ({x_axis!r}) must be 'step' or 'samples' (per worker x workers x local batch)"
        )
    config = CompareConfig(
        out=Path(out if out is not None else raw.get("out", Path("runs") / path.stem)),
        seeds=seeds,
        methods={str(k): v for k, v in methods.items()},
        workers=_positive_int("workers", raw["workers"]),
        max_steps=_positive_int("max_steps", raw["max_steps"]),
        eval_every=_positive_int("eval_every", raw["eval_every"]),
        jobs=_positive_int("jobs", jobs if jobs is not None else raw.get("jobs", 1)),
        accelerator=str(raw.get("accelerator", "cpu")),
        x_axis=x_axis,
        title=str(raw.get("title", path.stem)),
        model=_class_spec("model", raw["model"]),
        data=_class_spec("data", raw["data"]),
        strategy=strategy,
        sharpness=sharpness,
        init_from=_path_or_none("init_from", raw.get("init_from")),
        source=raw,
    )
    for run in config.runs():
        if run.max_steps % run.eval_every:
            raise ValueError(
                f"eval_every ({run.eval_every}) must divide max_steps ({run.max_steps}, method "
                f"{run.method!r}): the last evaluation is the final result"
            )
    return config


# ------------------------------------------------------------------------------ building a run
def _parser() -> Any:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    from localsgd.metrics import SharpnessCallback
    from localsgd.strategy import LocalSGDStrategy

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
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    except Exception as error:  # jsonargparse's ArgumentError, a TypeError from a constructor
        raise ValueError(f"{where}: {error}") from None
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
    with open(run.folder / "log.txt", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        train(run, queue=queue, index=index, threads=threads)


def finished(run: RunSpec) -> bool:
    """Whether ``run`` already has a result for the same settings."""
    path = run.folder / "result.json"
    if not path.is_file():
        return False
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text()).get("fingerprint") == run.fingerprint()
    return False


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


# ------------------------------------------------------------------------------ the report
# (column in metrics.csv, label, lower is better); a metric no run logged is left out
_CURVES = [
    ("val/acc", "test accuracy"),
    ("val/loss", "test loss"),
    ("train/loss", "training loss (mean since the last evaluation)"),
    ("sharpness/hessian_trace", "Hessian trace"),
    ("localsgd/divergence", "worker divergence (before sync)"),
]
_TABLE = [
    ("val/acc", "test acc", "{:.4f}"),
    ("val/loss", "test loss", "{:.4f}"),
    ("sharpness/hessian_trace", "Hessian trace", "{:.3g}"),
    ("sharpness/top_eigenvalue", "top eigenvalue", "{:.3g}"),
]


def read_metrics(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of one run as ``{column: [(step, value), ...]}``, ``step`` the optimizer
    steps done when the value was measured (empty cells left out)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            # the loggers' step is the index of the step being taken (0-based): the value was
            # measured after it, so step + 1 steps are done (an evaluation at step 100 logs 99)
            step = int(float(row["step"])) + 1
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _last(series: dict[str, list[tuple[int, float]]], key: str) -> float | None:
    return series[key][-1][1] if series.get(key) else None


def summarize(config: CompareConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: every table metric's mean and std over seeds, communication and wall time."""
    by_method: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {}
    for run, result in zip(config.runs(), results):
        by_method.setdefault(run.method, []).append((run, result))
    rows = []
    for method, pairs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(pairs)}
        curves = [read_metrics(run.folder) for run, _ in pairs]
        for key, _, _ in _TABLE:
            values = [v for v in (_last(c, key) for c in curves) if v is not None]
            if values:
                row[key] = _mean_std(values)
        finals = [r["final"] for _, r in pairs]
        row["steps"] = pairs[0][1]["steps"]
        row["workers"] = pairs[0][0].workers
        row["rounds"] = finals[0].get("comm/rounds", float("nan"))
        row["mb"] = finals[0].get("comm/bytes", float("nan")) / 1e6
        row["seconds"] = sum(r["seconds"] for _, r in pairs) / len(pairs)
        rows.append(row)
    return rows


def write_summary_csv(config: CompareConfig, results: Sequence[dict[str, Any]]) -> Path:
    path = config.out / "summary.csv"
    keys = sorted({k for r in results for k in r["final"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "steps", "seconds", *keys])
        for r in results:
            writer.writerow(
                [
                    r["method"],
                    r["seed"],
                    r["steps"],
                    f"{r['seconds']:.2f}",
                    *(r["final"].get(k, "") for k in keys),
                ]
            )
    return path


def write_markdown(config: CompareConfig, rows: Sequence[dict[str, Any]], command: str) -> Path:
    metrics = [(k, label, fmt) for k, label, fmt in _TABLE if any(k in r for r in rows)]
    header = ["method", *(label for _, label, _ in metrics), "comm rounds", "MB sent / worker", "s / run"]
    lines = [
        f"# {config.title}",
        "",
        f"`{command}`",
        "",
        f"{config.workers} worker(s) (simulated in one process) x local batch "
        f"{_local_batch(config.data)}, {config.max_steps} optimizer steps, unless a method sets "
        f"its own; seeds {config.seeds}; metrics at the last step, mean ± std over seeds "
        "(test = the held-out split).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["method"]]
        for key, _, fmt in metrics:
            if key in row:
                mean, std = row[key]
                cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
            else:
                cells.append("")
        if row["workers"] == 1:  # one worker talks to nobody
            cells += ["none (1 worker)", "0", f"{row['seconds']:.0f}"]
        else:
            cells += [f"{row['rounds']:.0f}", f"{row['mb']:.2f}", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![report](report.png)", ""]
    path = config.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _local_batch(data: dict[str, Any]) -> Any:
    return data.get("init_args", {}).get("batch_size", "(the data module's default)")


def plot(config: CompareConfig, path: Path | None = None) -> Path:
    """``report.png``: one panel per curve, one line per method (mean over seeds), the band
    between the seeds' min and max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = config.runs()
    series = {(r.method, r.seed): read_metrics(r.folder) for r in runs}
    points = {
        (r.method, r.seed, key): _curve(series[(r.method, r.seed)], key, r.eval_every)
        for r in runs
        for key, _ in _CURVES
    }
    # a panel needs values; a log-scaled one positive values (one worker never diverges)
    curves = [
        (k, label)
        for k, label in _CURVES
        if any(
            v > 0 if k == "localsgd/divergence" else True
            for (_, _, key), c in points.items()
            if key == k
            for v in c.values()
        )
    ]
    columns = min(2, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    methods = list(config.methods)
    colors = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes.flat, curves):
        for m, method in enumerate(methods):
            method_runs = [r for r in runs if r.method == method]
            scale = _x_scale(config, method_runs[0])
            per_seed = [points[(r.method, r.seed, key)] for r in method_runs]
            steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
            if not steps:
                continue
            values = [[s[step] for s in per_seed] for step in steps]
            x = [step * scale for step in steps]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(x, mean, label=method, color=colors(m % 10), lw=1.4)
            if len(per_seed) > 1:
                ax.fill_between(
                    x, [min(v) for v in values], [max(v) for v in values], color=colors(m % 10), alpha=0.2
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("samples (all workers)" if config.x_axis == "samples" else "optimizer step")
        drawn = [y for line in ax.get_lines() for y in line.get_ydata()]
        if key == "localsgd/divergence" or (key == "sharpness/hessian_trace" and drawn and min(drawn) > 0):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(curves) :]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(config.title, fontsize=11)
    if spare:  # the legend in the empty panel
        spare[0].legend(handles, labels, loc="center", fontsize=9, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    path = path or config.out / "report.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    # a 256-colour palette: a third of the size, small enough to commit beside the results
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
        path, optimize=True
    )
    return path


def _curve(series: dict[str, list[tuple[int, float]]], key: str, eval_every: int) -> dict[int, float]:
    """``{step: value}`` of one run's ``key``; the per-step training loss is averaged over each
    interval between evaluations (reported at its end)."""
    values = series.get(key, [])
    if key != "train/loss":
        return dict(values)
    windows: dict[int, list[float]] = {}
    for step, value in values:
        windows.setdefault(math.ceil(step / eval_every) * eval_every, []).append(value)
    return {step: sum(v) / len(v) for step, v in windows.items()}


def _x_scale(config: CompareConfig, run: RunSpec) -> float:
    if config.x_axis == "step":
        return 1.0
    batch = _local_batch(run.data)
    if not isinstance(batch, int):
        raise ValueError("x_axis: samples needs data.init_args.batch_size in the config")
    return float(run.workers * batch)


def report(config: CompareConfig, results: Sequence[dict[str, Any]], command: str) -> dict[str, Path]:
    rows = summarize(config, results)
    return {
        "summary": write_summary_csv(config, results),
        "markdown": write_markdown(config, rows, command),
        "plot": plot(config),
    }


def print_table(path: Path) -> None:
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            print(line)


def main(argv: Sequence[str]) -> None:
    """``localsgd compare --config X.yaml [--out DIR] [--jobs N] [--report-only]``"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="localsgd compare",
        description="SGD baseline vs Local SGD variants over several seeds; writes a run folder "
        "with metrics CSVs, report.md and report.png (finished runs are skipped when re-run)",
    )
    parser.add_argument("--config", required=True, help="the comparison's YAML (see configs/compare_*.yaml)")
    parser.add_argument("--out", help="run folder (default: the config's `out`)")
    parser.add_argument("--jobs", type=int, help="runs trained at once (default: the config's `jobs`)")
    parser.add_argument("--report-only", action="store_true", help="redraw the report from finished runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, out=args.out, jobs=args.jobs)
        if args.report_only:
            missing = [r for r in config.runs() if not finished(r)]
            if missing:
                raise ValueError(
                    f"--report-only: {len(missing)} run(s) have no result yet, e.g. {missing[0].folder}"
                )
            results = [json.loads((r.folder / "result.json").read_text()) for r in config.runs()]
        else:
            results = run_all(config, progress=not args.no_progress)
    except ValueError as error:
        parser.exit(2, f"localsgd compare: error: {error}\n")
    command = f"localsgd compare --config {args.config}"  # the run folder and flags aside
    paths = report(config, results, command)
    print_table(paths["markdown"])
    print(f"\nwrote {paths['markdown']}, {paths['plot']}, {paths['summary']} and runs/ under {config.out}")
