"""A comparison's YAML: reading it, checking it, and the runs it stands for."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# What a method may change, and the top-level keys; anything else is a typo.
_METHOD_KEYS = {"strategy", "model", "data", "max_steps", "eval_every", "workers", "init_from", "save_final"}
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
    "save_final",
    "sweep",
    "baseline",
}
# What a sweep may vary: the learning rate, the training length, any model or data argument.
_SWEEP_SHORT = {"lr": "model.lr", "max_steps": "max_steps", "eval_every": "eval_every"}
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
    save_final: bool = False
    """Save the trained model's weights to ``final.ckpt`` in the run folder (a phase 1 that
    another comparison starts from with ``init_from``)."""
    cell: dict[str, Any] = field(default_factory=dict)
    """The sweep cell the run belongs to (``{}`` without a sweep); its values are in the settings."""

    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (the folder aside)."""
        keys = ("method", "seed", "workers", "max_steps", "eval_every", "accelerator", "init_from")
        out = {k: getattr(self, k) for k in keys}
        if self.save_final:  # only when set: the runs saved before it existed stay finished
            out["save_final"] = True
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
    """Every run starts from this checkpoint's weights; ``{seed}`` in it is the run's seed."""
    save_final: bool = False
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    """A grid applied to every method: ``{key: [values]}``, keys ``lr``, ``max_steps``,
    ``eval_every``, ``model.<argument>`` or ``data.<argument>``; every combination is a cell
    (with ``sweep_cells``: each key's values, in the order the cells first use them)."""
    sweep_cells: list[dict[str, Any]] | None = None
    """The cells themselves when the YAML lists them (``sweep: [{lr: .., max_steps: ..}, ...]``),
    for grids that are not a product (e.g. equal lr^2 x steps); ``None``: every combination."""
    baseline: str | None = None
    """The method the others are compared with in a sweep's report (default: the first)."""
    source: dict[str, Any] = field(default_factory=dict)
    """The YAML as read, copied into the run folder."""

    def cells(self) -> list[tuple[dict[str, Any], CompareConfig]]:
        """Each sweep cell and the comparison it stands for (its own folder ``cells/<cell>/``);
        without a sweep, this comparison alone."""
        if not self.sweep:
            return [({}, self)]
        out = []
        cells = self.sweep_cells
        if cells is None:
            cells = [dict(zip(self.sweep, values)) for values in itertools.product(*self.sweep.values())]
        for cell in cells:
            sub = dataclasses.replace(
                self, sweep={}, sweep_cells=None, out=self.out / "cells" / cell_slug(cell)
            )
            for key, value in cell.items():
                target = _SWEEP_SHORT.get(key, key)
                if target in ("max_steps", "eval_every"):
                    setattr(sub, target, value)
                else:
                    part, name = target.split(".", 1)
                    spec = copy.deepcopy(getattr(sub, part))
                    spec.setdefault("init_args", {})[name] = value
                    setattr(sub, part, spec)
            out.append((cell, sub))
        return out

    def runs(self) -> list[RunSpec]:
        """Every (method, seed) run, method-major in the config's order (with a sweep: cell by cell)."""
        if self.sweep:
            runs = []
            for cell, sub in self.cells():
                for run in sub.runs():
                    run.cell = cell
                    runs.append(run)
            return runs
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
                        init_from=_for_seed(method.get("init_from", self.init_from), seed),
                        save_final=method.get("save_final", self.save_final),
                    )
                )
        return specs


# ------------------------------------------------------------------------------ reading the config
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


def _for_seed(path: str | None, seed: int) -> str | None:
    """``path`` with ``{seed}`` replaced by ``seed`` (a phase 1 run per seed)."""
    return None if path is None else path.replace("{seed}", str(seed))


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be true or false")
    return value


def _path_or_none(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} ({value!r}) must be the path of a checkpoint, or null")
    return value


def _baseline(value: Any, methods: dict[str, Any]) -> str | None:
    if value is not None and value not in methods:
        raise ValueError(f"baseline ({value!r}) must be one of the methods: {sorted(methods)}")
    return value


def _did_you_mean(unknown: Iterable[Any], keys: Iterable[str]) -> str:
    """`` (did you mean eval_every?)`` for the unknown keys that are close to a valid one."""
    close = {str(k): difflib.get_close_matches(str(k), list(keys), n=1) for k in sorted(unknown, key=str)}
    guesses = [f"{match[0]} for {k}" if len(close) > 1 else match[0] for k, match in close.items() if match]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


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


def cell_slug(cell: dict[str, Any]) -> str:
    """A sweep cell as a folder name: ``{"lr": 0.05, "max_steps": 800}`` -> ``"lr-0.05_max_steps-800"``."""
    return "_".join(f"{slug(k.replace('.', '-')).replace('-', '_')}-{v}" for k, v in cell.items())


def check_sweep(
    raw: Any, methods: dict[str, dict[str, Any]]
) -> tuple[dict[str, list[Any]], list[dict[str, Any]] | None]:
    """A sweep as ``{key: [distinct values]}`` and, when the YAML lists the cells themselves,
    that list (``None``: every combination); or a ValueError naming the key and the rule."""
    if raw is None:
        return {}, None
    cells: list[dict[str, Any]] | None = None
    if isinstance(raw, list) and raw and all(isinstance(c, dict) for c in raw):
        keys = list(raw[0])
        for i, cell in enumerate(raw):
            if not cell or list(cell) != keys:
                raise ValueError(
                    f"sweep[{i}] ({cell!r}) must set the same keys, in the same order, as sweep[0] ({keys})"
                )
        if len({json.dumps(c, sort_keys=True, default=str) for c in raw}) != len(raw):
            raise ValueError("sweep lists a cell twice: every cell must differ")
        cells = [dict(c) for c in raw]
        sweep = {k: list(dict.fromkeys(c[k] for c in cells)) for k in keys}
    elif isinstance(raw, dict):
        sweep = raw
    else:
        raise ValueError(
            f"sweep must be a mapping (key: [values], every combination a cell) or a list of cells "
            f"(each a mapping key: value), got {type(raw).__name__}: {raw!r}"
        )
    for key, values in sweep.items():
        target = _SWEEP_SHORT.get(key, key)
        part, _, name = target.partition(".")
        if target not in ("max_steps", "eval_every") and (part not in ("model", "data") or not name):
            raise ValueError(
                f"sweep key {key!r} is not one a sweep can vary: lr, max_steps, eval_every, "
                "model.<argument> or data.<argument> (an init_arg of the model or data class)"
            )
        if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
            raise ValueError(f"sweep.{key} ({values!r}) must be a non-empty list of distinct values")
        for value in values:
            if target in ("max_steps", "eval_every"):
                _positive_int(f"sweep.{key}", value)
            elif key == "lr" and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ValueError(f"sweep.lr ({value!r}) must hold numbers > 0")
        for method_name, method in methods.items():
            sets = target in ("max_steps", "eval_every") and target in method
            sets = sets or bool(name and name in method.get(part, {}))
            if sets:
                raise ValueError(
                    f"methods.{method_name} sets {target}, which sweep.{key} sets for every method: "
                    "drop one of them"
                )
    return {str(k): list(v) for k, v in sweep.items()}, cells


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
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in {path}{_did_you_mean(unknown, _TOP_KEYS)}; "
            f"the keys are {sorted(_TOP_KEYS)}"
        )
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
                f"methods.{name} has unknown key(s) {sorted(bad)}{_did_you_mean(bad, _METHOD_KEYS)}; "
                f"a method may set {sorted(_METHOD_KEYS)}"
            )
        for key in ("strategy", "model", "data"):
            _mapping(f"methods.{name}.{key}", method.get(key, {}))
        if "init_from" in method:
            _path_or_none(f"methods.{name}.init_from", method["init_from"])
        if "save_final" in method:
            _flag(f"methods.{name}.save_final", method["save_final"])
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
    if x_axis not in ("step", "samples", "tokens"):
        raise ValueError(
            f"x_axis ({x_axis!r}) must be 'step', 'samples' (per worker x workers x local batch) "
            "or 'tokens' (samples x the data's context)"
        )
    sweep, sweep_cells = check_sweep(raw.get("sweep"), methods)
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
        save_final=_flag("save_final", raw.get("save_final", False)),
        sweep=sweep,
        sweep_cells=sweep_cells,
        baseline=_baseline(raw.get("baseline"), methods),
        source=raw,
    )
    for run in config.runs():
        if run.max_steps % run.eval_every:
            raise ValueError(
                f"eval_every ({run.eval_every}) must divide max_steps ({run.max_steps}, method "
                f"{run.method!r}): the last evaluation is the final result"
            )
    return config
