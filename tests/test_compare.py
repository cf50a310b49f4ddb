"""`localsgd compare`: a tiny comparison end to end, skipping finished runs, and bad configs."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localsgd.research.compare import build, load_config, read_metrics, run_all, slug

_TINY: dict[str, Any] = {
    "title": "tiny",
    "seeds": [0, 1],
    "workers": 2,
    "max_steps": 8,
    "eval_every": 4,
    "jobs": 2,
    "model": {
        "class_path": "localsgd.research.models.Classifier",
        "init_args": {
            "net": {
                "class_path": "localsgd.research.models.MLP",
                "init_args": {"in_features": 64, "hidden": 16, "num_classes": 10},
            },
            "num_classes": 10,
            "lr": 0.1,
        },
    },
    "data": {
        "class_path": "localsgd.research.data.DigitsDataModule",
        "init_args": {"batch_size": 8, "label_noise": 0.1},
    },
    "sharpness": {
        "dataset": "train",
        "num_batches": 1,
        "batch_size": 64,
        "num_probes": 2,
        "compute_eigenvalue": False,
    },
    "methods": {
        "SGD": {"strategy": {"sync_every": 1, "optimizer_state": "average"}},
        "Local SGD (H=4)": {"strategy": {"sync_every": 4}},
    },
}


def _write(tmp_path: Path, config: dict[str, Any], name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), **config}, sort_keys=False))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK")
    }
    return subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "compare", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def _cli_timed(*args: str) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """``_cli(*args)`` with its progress line on (every 0.5 s), timing each line as it arrives:
    the run, the first 'time left' it printed (s), and how long the job really took from then."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK")
    }
    command = [sys.executable, "-m", "localsgd.cli", "compare", *args]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "LOCALSGD_PROGRESS_INTERVAL": "0.5"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[tuple[float, str]] = []
    while chunk := os.read(proc.stderr.fileno(), 65536):  # tqdm ends its updates with \r
        now = time.monotonic() - start
        lines += [(now, part) for part in re.split(r"[\r\n]", chunk.decode()) if part.strip()]
    stdout = proc.stdout.read().decode()
    code = proc.wait(timeout=240)
    end = time.monotonic() - start
    stderr = "\n".join(line for _, line in lines)
    done = subprocess.CompletedProcess(command, code, stdout, stderr)
    first = next(((t, m) for t, line in lines if (m := re.search(r"about (\d+):(\d\d) left", line))), None)
    assert first is not None, stderr[-3000:]
    t, match = first
    return done, 60 * int(match[1]) + int(match[2]), end - t


@pytest.mark.integration
def test_compare_writes_csvs_plot_and_report_then_skips_finished_runs(tmp_path: Path) -> None:
    config = _write(tmp_path, _TINY)
    first, promised, real = _cli_timed("--config", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    # the progress line's first 'about MM:SS left' against the time the job then really took:
    # tqdm's step-rate ETA once promised 70 hours for a 17-minute job (250x); within 10x leaves
    # room for a loaded machine (3x failed once with a sweep beside it: 32 s promised, 10.6 s taken)
    assert real / 10 <= max(promised, 1) <= 10 * real, (promised, real, first.stderr[-2000:])
    out = tmp_path / "out"
    for method in ("sgd", "local-sgd-h-4"):
        for seed in (0, 1):
            metrics = read_metrics(out / "runs" / method / f"seed{seed}")
            # evaluations and sharpness at steps 4 and 8, communication after every step
            assert [s for s, _ in metrics["val/acc"]] == [4, 8]
            assert [s for s, _ in metrics["sharpness/hessian_trace"]] == [4, 8]
            rounds = dict(metrics["comm/rounds"])
            assert rounds[8] == (8 if method == "sgd" else 2)
            # divergence is logged at every sync (before it): steps 4 and 8 for H = 4
            assert [s for s, _ in metrics["localsgd/divergence"]] == (
                [*range(1, 9)] if method == "sgd" else [4, 8]
            )
            assert all(v > 0 for _, v in metrics["localsgd/divergence"])
    # the seeds differ (init and data order), the methods share each seed's start
    a, b = (read_metrics(out / "runs" / "sgd" / f"seed{s}")["train/loss"][0][1] for s in (0, 1))
    assert a != b
    assert (
        read_metrics(out / "runs" / "local-sgd-h-4" / "seed0")["train/loss"][0]
        == (read_metrics(out / "runs" / "sgd" / "seed0")["train/loss"][0])
    )
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("SGD", "0"),
        ("SGD", "1"),
        ("Local SGD (H=4)", "0"),
        ("Local SGD (H=4)", "1"),
    ]
    report = (out / "report.md").read_text()
    assert "| SGD | " in report and "| Local SGD (H=4) | " in report and "![report](report.png)" in report
    assert "Hessian trace" in report and "val/acc" in report
    # one name for a metric: the report's columns are summary.csv's
    assert "| val/acc | val/loss |" in report and {"val/acc", "val/loss"} <= set(rows[0])
    # and the Hessian trace the report shows is a column of summary.csv too, per run
    assert "`sharpness/hessian_trace`" in report
    for row in rows:
        run = "sgd" if row["method"] == "SGD" else "local-sgd-h-4"
        trace = read_metrics(out / "runs" / run / f"seed{row['seed']}")["sharpness/hessian_trace"][-1][1]
        assert float(row["sharpness/hessian_trace"]) == trace
    assert "runs/<method slug>/seed<S>/" in report
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| SGD |" in first.stdout  # the table is printed too

    # again: nothing trains, the report is redrawn
    results = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    config_obj = load_config(config)
    again = run_all(config_obj, progress=False)
    assert len(again) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == results

    # a changed method trains again; the other one is kept
    changed = json.loads(json.dumps(_TINY))
    changed["methods"]["Local SGD (H=4)"]["strategy"]["sync_every"] = 2
    config_obj = load_config(_write(tmp_path, changed, "changed.yaml"))
    run_all(config_obj, progress=False)
    for seed in (0, 1):
        sgd = out / "runs" / "sgd" / f"seed{seed}" / "result.json"
        assert sgd.stat().st_mtime_ns == results[sgd]
        local = out / "runs" / "local-sgd-h-4" / f"seed{seed}" / "result.json"
        assert local.stat().st_mtime_ns != results[local]
        assert json.loads(local.read_text())["final"]["comm/rounds"] == 4


def _bad(tmp_path: Path, **changes: Any) -> Path:
    config = json.loads(json.dumps(_TINY))
    for key, value in changes.items():
        target = config
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    return _write(tmp_path, config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
        ({"eval_every": 3}, r"eval_every \(3\) must divide max_steps \(8"),
        ({"seeds": [0, 0]}, r"seeds \(\[0, 0\]\) must be a non-empty list of distinct integers"),
        ({"workers": 0}, r"workers \(0\) must be an integer >= 1"),
        ({"x_axis": "epoch"}, r"x_axis \('epoch'\) must be 'step', 'samples'"),
        ({"methods": {}}, r"methods is empty"),
        ({"methods.SGD": {"sync_every": 1}}, r"methods.SGD has unknown key\(s\) \['sync_every'\]"),
        ({"methods.SGD": {"strategy": {"workers_per_device": 2}}}, r"methods.SGD.strategy cannot set"),
        ({"methods.sgd": {}}, r"methods 'SGD' and 'sgd' would share the folder 'sgd'"),
        ({"model": {"init_args": {}}}, r"model must have a class_path"),
        ({"init_from": 3}, r"init_from \(3\) must be the path of a checkpoint, or null"),
        ({"methods.SGD.init_from": ""}, r"methods.SGD.init_from \(''\) must be the path of a checkpoint"),
        ({"save_final": "yes"}, r"save_final \('yes'\) must be true or false"),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_bad(tmp_path, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods.SGD.strategy.sync_every": 0}, r"(?s)method 'SGD' \(seed 0\): .*sync_every"),
        ({"methods.SGD.strategy.buffers": "mean"}, r"(?s)method 'SGD' \(seed 0\): .*buffers"),
        ({"methods.SGD.model": {"lr": -1.0}}, r"(?s)method 'SGD' \(seed 0\): .*lr \(-1.0\) must be > 0"),
        ({"methods.SGD.data": {"batch_sise": 8}}, r"(?s)method 'SGD' \(seed 0\): .*batch_sise"),
    ],
)
def test_a_bad_method_fails_before_anything_trains(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    config = load_config(_bad(tmp_path, **changes))
    with pytest.raises(ValueError, match=message):
        run_all(config, progress=False)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    done = _cli("--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert "localsgd compare: error: config" in done.stderr and "is not a file" in done.stderr
    assert "Traceback" not in done.stderr


def test_slug_keeps_names_apart() -> None:
    assert slug("Local SGD (H=8)") == "local-sgd-h-8"
    assert slug("QSR (H_base=4)") == "qsr-h-base-4"


_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("compare_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", _CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_comparison_builds(path: Path) -> None:
    config = load_config(path)
    for run in config.runs():
        parts = build(run)
        assert parts["strategy"].workers_per_device == run.workers
        assert run.max_steps % run.eval_every == 0
    assert len(_CONFIGS) >= 5


@pytest.mark.integration
def test_init_from_starts_every_run_from_the_checkpoints_weights(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F

    from localsgd.research.data import DigitsDataModule
    from localsgd.research.models import MLP, Classifier

    torch.manual_seed(123)  # weights no seed of the comparison would draw
    start = Classifier(MLP(in_features=64, hidden=16, num_classes=10), num_classes=10)
    torch.save({"state_dict": start.state_dict()}, tmp_path / "start.ckpt")
    data = DigitsDataModule(batch_size=8)
    data.setup()
    x, y = data.test_set.tensors
    with torch.no_grad():
        expected = float(F.cross_entropy(start(x), y))

    config = json.loads(json.dumps(_TINY))
    config.update(
        seeds=[0], max_steps=2, eval_every=2, jobs=1, sharpness=None, init_from=str(tmp_path / "start.ckpt")
    )
    config["model"]["init_args"]["lr"] = 1e-9  # two steps that do not move the weights
    config["methods"] = {"Local SGD (H=2)": {"strategy": {"sync_every": 2}}}
    results = run_all(load_config(_write(tmp_path, config)), progress=False)
    assert results[0]["final"]["val/loss"] == pytest.approx(expected, abs=1e-5)

    config["init_from"] = str(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"init_from \('.*missing.ckpt'\) is not a file"):
        run_all(load_config(_write(tmp_path, config)), progress=False)


@pytest.mark.integration
def test_a_phase_1_per_seed_is_what_phase_2_starts_from(tmp_path: Path) -> None:
    """save_final writes each run's trained weights; init_from with {seed} starts each seed's
    runs from its own: with an lr that does not move the weights, phase 2 ends where phase 1 did."""
    config = json.loads(json.dumps(_TINY))
    config.update(seeds=[0, 1], max_steps=4, eval_every=4, jobs=1, sharpness=None, save_final=True)
    config["methods"] = {"SGD": {"strategy": {"sync_every": 1, "optimizer_state": "average"}}}
    first = run_all(load_config(_write(tmp_path, config, "phase1.yaml"), out=tmp_path / "p1"), progress=False)
    assert first[0]["final"]["val/loss"] != first[1]["final"]["val/loss"]  # the seeds differ
    phase2 = json.loads(json.dumps(_TINY))
    start = str(tmp_path / "p1" / "runs" / "sgd" / "seed{seed}" / "final.ckpt")
    phase2.update(seeds=[0, 1], max_steps=2, eval_every=2, jobs=1, sharpness=None, init_from=start)
    phase2["model"]["init_args"]["lr"] = 1e-9
    phase2["methods"] = {"Local SGD (H=2)": {"strategy": {"sync_every": 2}}}
    second = run_all(
        load_config(_write(tmp_path, phase2, "phase2.yaml"), out=tmp_path / "p2"), progress=False
    )
    for a, b in zip(first, second):
        assert b["final"]["val/loss"] == pytest.approx(a["final"]["val/loss"], abs=1e-5)


def test_every_method_gets_its_own_line_style_and_marker() -> None:
    from localsgd.research.compare.report import line_style

    styles = [line_style(m) for m in range(8)]
    assert len(set(styles)) == 8  # two equal curves in two colours still show both (dashes, markers)
    assert len({s for s, _ in styles[:4]}) == 4 and len({m for _, m in styles}) == 8


@pytest.mark.slow
def test_a_run_that_fails_while_training_leaves_its_traceback_in_its_log(tmp_path: Path) -> None:
    config = json.loads(json.dumps(_TINY))
    config.update(seeds=[0], max_steps=2, eval_every=2, jobs=1, sharpness=None)
    # builds (the strategy's arguments are valid), fails in fit: the MLP has 4 tensors, not 8
    config["methods"] = {"too many fragments": {"strategy": {"sync_every": 8, "num_fragments": 8}}}
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed; their output is in"):
        run_all(load_config(_write(tmp_path, config)), progress=False)
    log = (tmp_path / "out" / "runs" / "too-many-fragments" / "seed0" / "log.txt").read_text()
    assert "Traceback" in log and "ValueError: num_fragments (8) must be at most the number" in log, log[
        -2000:
    ]


def test_a_language_model_comparison_reports_bits_per_byte_paired_differences_and_bytes_sent(
    tmp_path: Path,
) -> None:
    import importlib

    compare_report = importlib.import_module("localsgd.research.compare.report")  # (not the function)

    raw = {
        **{k: v for k, v in _TINY.items() if k not in ("model", "data", "sharpness")},
        "model": {"class_path": "localsgd.research.lm.LanguageModel", "init_args": {"size": "nano"}},
        "data": {
            "class_path": "localsgd.research.lm.TextDataModule",
            "init_args": {"context": 32, "batch_size": 4},
        },
        "x_axis": "tokens",
        "baseline": "SGD",
    }
    config = load_config(_write(tmp_path, {"out": str(tmp_path / "out"), **raw}))
    # val/bpb at the end: SGD 2.0 / 2.2 (seeds 0, 1); Local SGD 2.1 / 2.4 -> paired +0.1, +0.2
    bpb = {("SGD", 0): 2.0, ("SGD", 1): 2.2, ("Local SGD (H=4)", 0): 2.1, ("Local SGD (H=4)", 1): 2.4}
    per_step = {"SGD": 1000.0, "Local SGD (H=4)": 250.0}  # bytes per optimizer step
    results = []
    for run in config.runs():
        run.folder.mkdir(parents=True)
        with open(run.folder / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "comm/bytes", "val/bpb", "val/loss"])
            for step in (3, 7):  # the evaluations after 4 and 8 steps
                final = bpb[run.method, run.seed] + (step == 3)
                writer.writerow([step, 0, per_step[run.method] * (step + 1), final, final * math.log(2)])
        results.append({"method": run.method, "seed": run.seed, "steps": 8, "seconds": 1.0, "final": {}})
    assert compare_report.x_scale(config, config.runs()[0]) == 2 * 4 * 32  # workers x batch x context
    # a tokens axis needs the data's context, said before anything trains
    no_context = {
        **raw,
        "data": {**raw["data"], "init_args": {"batch_size": 4}},
        "out": str(tmp_path / "none"),
    }
    with pytest.raises(ValueError, match=r"x_axis: tokens needs data.init_args.context in the config"):
        run_all(load_config(_write(tmp_path, no_context, "no_context.yaml")), progress=False)
    assert not (tmp_path / "none" / "runs").exists()
    paths = compare_report.report(config, results, "localsgd compare --config tiny.yaml")
    text = paths["markdown"].read_text()
    assert "| method | val/bpb | val/loss | val/bpb - SGD's, paired by seed |" in text
    # differences 0.1 and 0.2: mean 0.15, std 0.0707, standard error 0.05; both seeds above
    assert (
        "| Local SGD (H=4) | 2.2500 ± 0.2121 |" in text and "| +0.1500 ± 0.0500 (2/2 seeds above) |" in text
    )
    assert "| SGD | 2.1000 ± 0.1414 |" in text and "(baseline)" in text
    seen: list[str] = []
    import matplotlib.axes

    set_title, set_xlabel = matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.set_xlabel
    try:
        matplotlib.axes.Axes.set_title = lambda ax, label, **kw: seen.append(label)  # type: ignore[method-assign]
        matplotlib.axes.Axes.set_xlabel = lambda ax, label, **kw: seen.append(label)  # type: ignore[method-assign]
        compare_report.plot(config, tmp_path / "plot.png")
    finally:
        matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.set_xlabel = set_title, set_xlabel
    # bits per byte replaces the same curve in nats; the bytes panel has its own x axis
    assert "val/bpb (held-out split, bits per byte)" in seen and "val/loss (held-out split)" not in seen
    assert "val/bpb against MB sent per worker (log scale)" in seen and "MB sent per worker" in seen
    assert "tokens (all workers)" in seen
    # one worker sends nothing, whatever its counters say: no bytes panel
    seen.clear()
    single = load_config(_write(tmp_path, {"out": str(tmp_path / "out"), **raw, "workers": 1}, "single.yaml"))
    try:
        matplotlib.axes.Axes.set_title = lambda ax, label, **kw: seen.append(label)  # type: ignore[method-assign]
        compare_report.plot(single, tmp_path / "single.png")
    finally:
        matplotlib.axes.Axes.set_title = set_title
    assert "val/bpb (held-out split, bits per byte)" in seen
    assert not [t for t in seen if "MB sent" in t]
