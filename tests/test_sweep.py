"""`localsgd compare` sweeps: the grid's cells, bad grids named, finished runs kept across a
changed grid, and the report's differences with their standard errors (no training here)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_compare import _TINY

from localsgd.research.compare import finished, load_config
from localsgd.research.compare.sweep import cell_rows, sweep_report


def _config(tmp_path: Path, **changes: Any) -> Path:
    raw = copy.deepcopy(_TINY)
    raw["sweep"] = {"lr": [0.01, 0.1], "max_steps": [8, 16]}
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), **raw}, sort_keys=False))
    return path


def test_every_cell_method_and_seed_is_a_run_with_the_cells_values(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    runs = config.runs()
    assert len(runs) == 4 * 2 * 2  # cells x methods x seeds
    cells = [cell for cell, _ in config.cells()]
    assert cells == [
        {"lr": 0.01, "max_steps": 8},
        {"lr": 0.01, "max_steps": 16},
        {"lr": 0.1, "max_steps": 8},
        {"lr": 0.1, "max_steps": 16},
    ]
    for run in runs:
        assert run.model["init_args"]["lr"] == run.cell["lr"]
        assert run.max_steps == run.cell["max_steps"]
        cell = f"lr-{run.cell['lr']}_max_steps-{run.cell['max_steps']}"
        assert (
            run.folder
            == tmp_path
            / "out"
            / "cells"
            / cell
            / "runs"
            / run.method.lower().replace(" (h=4)", "-h-4").replace(" ", "-")
            / f"seed{run.seed}"
        )
    assert len({r.fingerprint() for r in runs}) == len(runs)  # every run is its own
    # data and model arguments too, by their dotted names
    config = load_config(_config(tmp_path, sweep={"data.label_noise": [0.0, 0.4]}))
    assert [r.data["init_args"]["label_noise"] for r in config.runs()[::4]] == [0.0, 0.4]


def test_a_listed_grid_runs_its_cells_only(tmp_path: Path) -> None:
    """Cells that are not every combination (here equal lr^2 x steps), each with its eval_every;
    the report's tables leave the combinations it does not hold blank."""
    cells = [
        {"lr": 0.2, "max_steps": 8, "eval_every": 4},
        {"lr": 0.1, "max_steps": 32, "eval_every": 8},
        {"lr": 0.1, "max_steps": 16, "eval_every": 8},
    ]
    config = load_config(_config(tmp_path, sweep=cells))
    assert [cell for cell, _ in config.cells()] == cells
    assert config.sweep == {"lr": [0.2, 0.1], "max_steps": [8, 32, 16], "eval_every": [4, 8]}
    assert len(config.runs()) == 3 * 2 * 2
    for run in config.runs():
        assert (run.model["init_args"]["lr"], run.max_steps, run.eval_every) == tuple(run.cell.values())
    _pretend_trained(config.runs(), lambda run: 0.5 - 0.1 * (run.method != "SGD") + 0.01 * run.seed)
    results = [json.loads((run.folder / "result.json").read_text()) for run in config.runs()]
    text = sweep_report(config, results, "localsgd compare")["markdown"].read_text()
    assert "The 3 cells listed in the config (lr, max_steps, eval_every)" in text
    assert "| 0.1 | 16 | 8 | Local SGD (H=4) |" in text
    two = load_config(_config(tmp_path, sweep=[{"lr": c["lr"], "max_steps": c["max_steps"]} for c in cells]))
    _pretend_trained(two.runs(), lambda run: 0.5 - 0.1 * (run.method != "SGD") + 0.01 * run.seed)
    results = [json.loads((run.folder / "result.json").read_text()) for run in two.runs()]
    text = sweep_report(two, results, "localsgd compare")["markdown"].read_text()
    pivot = text[text.index("Local SGD (H=4), gain over SGD:") :]
    assert "| 0.2 | +0.1000 ± 0.0071 |  |  |" in pivot  # max_steps 8 only at lr 0.2


@pytest.mark.parametrize(
    ("sweep", "extra", "message"),
    [
        ({"momentum": [0.9]}, {}, r"sweep key 'momentum' is not one a sweep can vary: lr, max_steps"),
        ({"trainer.lr": [0.1]}, {}, r"sweep key 'trainer.lr' is not one a sweep can vary"),
        ({"lr": []}, {}, r"sweep.lr \(\[\]\) must be a non-empty list of distinct values"),
        ({"lr": [0.1, 0.1]}, {}, r"sweep.lr \(\[0.1, 0.1\]\) must be a non-empty list of distinct"),
        ({"lr": [0.1, -1]}, {}, r"sweep.lr \(-1\) must hold numbers > 0"),
        ({"max_steps": [8, 0]}, {}, r"sweep.max_steps \(0\) must be an integer >= 1"),
        ({"max_steps": [8, 10]}, {}, r"eval_every \(4\) must divide max_steps \(10"),
        (
            {"lr": [0.1]},
            {"methods": {"SGD": {"model": {"lr": 0.2}}}},
            r"methods.SGD sets model.lr, which sweep.lr sets for every method",
        ),
        ({"lr": [0.1]}, {"baseline": "Adam"}, r"baseline \('Adam'\) must be one of the methods"),
        (
            [0.1],
            {},
            r"sweep must be a mapping \(key: \[values\], every combination a cell\) or a list of cells",
        ),
        ([{"lr": 0.1}, {"max_steps": 8}], {}, r"sweep\[1\] \(\{'max_steps': 8\}\) must set the same keys"),
        ([{"lr": 0.1}, {"lr": 0.1}], {}, r"sweep lists a cell twice"),
        ([{"eval_every": 3}], {}, r"eval_every \(3\) must divide max_steps \(8"),
    ],
)
def test_a_bad_grid_is_named(tmp_path: Path, sweep: Any, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_config(tmp_path, sweep=sweep, **extra))


def _pretend_trained(runs: list[Any], loss: Any) -> None:
    """What ``train`` leaves in a run folder: metrics.csv and a result.json for these settings."""
    for run in runs:
        run.folder.mkdir(parents=True, exist_ok=True)
        value = loss(run)
        with open(run.folder / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "val/loss", "val/acc", "sharpness/hessian_trace"])
            writer.writerow([run.max_steps - 1, 0, value, 1 - value, 10 * value])
        result = {
            "method": run.method,
            "seed": run.seed,
            "fingerprint": run.fingerprint(),
            "steps": run.max_steps,
            "seconds": 1.0,
            "workers": run.workers,
            "final": {"val/loss": value},
        }
        (run.folder / "result.json").write_text(json.dumps(result))


def test_a_grown_grid_keeps_every_finished_cell(tmp_path: Path) -> None:
    small = load_config(_config(tmp_path))
    _pretend_trained(small.runs(), lambda run: 0.5)
    assert all(finished(run) for run in small.runs())
    grown = load_config(_config(tmp_path, sweep={"lr": [0.01, 0.1, 0.3], "max_steps": [8, 16]}))
    done = [run for run in grown.runs() if finished(run)]
    assert len(done) == len(small.runs())  # the old cells' runs are found where they were
    assert {run.cell["lr"] for run in grown.runs() if not finished(run)} == {0.3}
    # a changed setting of every run (here the data) makes every run unfinished
    changed = copy.deepcopy(_TINY["data"])
    changed["init_args"]["label_noise"] = 0.3
    assert not any(finished(run) for run in load_config(_config(tmp_path, data=changed)).runs())


def test_the_report_gives_each_methods_gain_over_the_baseline_with_its_standard_error(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    # test loss: SGD 0.50 / 0.54 (seeds 0, 1); Local SGD 0.40 / 0.46; + 0.1 in the lr = 0.1 cells
    values = {("SGD", 0): 0.50, ("SGD", 1): 0.54, ("Local SGD (H=4)", 0): 0.40, ("Local SGD (H=4)", 1): 0.46}
    _pretend_trained(config.runs(), lambda run: values[run.method, run.seed] + (run.cell["lr"] == 0.1) * 0.1)
    rows = cell_rows(config)
    assert len(rows) == 8 and all("gain" not in r for r in rows if r["method"] == "SGD")
    local = [r for r in rows if r["method"] != "SGD"]
    for row in local:
        gain, se = row["gain"]
        assert gain == pytest.approx(0.52 - 0.43)
        assert se == pytest.approx(math.sqrt(0.04**2 / 2 / 2 + 0.06**2 / 2 / 2))  # std^2 / n, sample std
        assert row["val/loss"][0] == pytest.approx(0.43 + (row["cell"]["lr"] == 0.1) * 0.1)
        assert row["acc_gain"] == pytest.approx((0.09, se))  # test accuracy here is 1 - test loss
        # paired by seed: differences 0.10 (seed 0) and 0.08 (seed 1): std 0.01414 / sqrt(2)
        assert row["paired_gain"] == pytest.approx((0.09, 0.01)) and row["seeds_better"] == 2
    results = [json.loads((run.folder / "result.json").read_text()) for run in config.runs()]
    paths = sweep_report(config, results, "localsgd compare --config sweep.yaml")
    text = paths["markdown"].read_text()
    assert "| 0.01 | 8 | Local SGD (H=4) |" in text and "+0.0900 ±" in text
    pivot = text[text.index("Local SGD (H=4), gain over SGD:") :]
    assert "| 0.1 | +0.0900 ± 0.0361 | +0.0900 ± 0.0361 |" in pivot  # lr down, max_steps 8, 16 across
    accuracy = text[text.index("Local SGD (H=4), gain in test accuracy over SGD:") :]
    assert "| 0.01 | +0.0900 ± 0.0361 | +0.0900 ± 0.0361 |" in accuracy
    assert paths["plot"].stat().st_size > 10_000
    header = paths["summary"].read_text().splitlines()[0]
    assert header.startswith("lr,max_steps,method,seeds,val/loss_mean")
    assert header.endswith("gain,gain_se,paired_gain,paired_gain_se,seeds_better,acc_gain,acc_gain_se")
    assert "| +0.0900 ± 0.0361 | +0.0900 ± 0.0100 (2/2) |" in text  # independent, then paired
    assert (tmp_path / "out" / "cells" / "lr-0.1_max_steps-16" / "report.md").is_file()


def test_a_diverged_cell_does_not_flatten_the_other_gains() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from localsgd.research.compare.sweep import _outliers_compressed

    fig, (typical, diverged) = plt.subplots(1, 2)
    _outliers_compressed(typical, [0.01, 0.03, 0.05, 0.2])  # within 10x of the median: linear
    _outliers_compressed(diverged, [0.01, 0.03, 0.05, 1.6])  # one cell 32x the median
    assert typical.get_yscale() == "linear"
    assert diverged.get_yscale() == "symlog" and "linear within ±0.05" in diverged.get_ylabel()
    ticks = list(diverged.get_yticks())
    assert 0.0 in ticks and not any(0 < abs(t) < 0.05 for t in ticks)  # none crowding the 0 label
    plt.close(fig)


def test_the_time_scale_report_finds_the_variable_that_sets_the_gain(tmp_path: Path) -> None:
    """experiments/when_timescale.py on gains that are a function of lr^2 x steps (plus noise the
    size of their standard errors): that variable collapses them, lr x steps does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("when_timescale", Path("experiments/when_timescale.py"))
    assert spec is not None and spec.loader is not None
    timescale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timescale)
    cells = [(0.4, 128), (0.4, 256), (0.4, 512), (0.2, 512), (0.2, 1024), (0.2, 2048)]
    cells += [(0.1, 2048), (0.1, 4096), (0.1, 8192), (0.2, 256), (0.1, 512), (0.1, 1024)]
    columns = ["lr", "max_steps", "method", "seeds", "val/loss_mean", "sharpness/hessian_trace_mean"]
    columns += ["paired_gain", "paired_gain_se", "seeds_better", "acc_gain", "acc_gain_se"]
    with open(tmp_path / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (lr, steps) in enumerate(cells):
            gain = 0.01 * math.log2(lr * lr * steps) + 0.001 * (-1) ** i
            writer.writerow([lr, steps, "SGD", 3, 0.5, 100, "", "", "", "", ""])
            for method in timescale.METHODS:
                writer.writerow([lr, steps, method, 3, 0.5 - gain, 80, gain, 0.001, 3, 0.0, 0.01])
    text = timescale.report(tmp_path).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| Local SGD")}
    squared, linear = (float(v.split(" (")[0]) for v in rows["| Local SGD (H=8)"].split(" | ")[1:3])
    assert squared < 3 < 30 < linear, text
    assert "| 20.48 | 128 steps: " in text and (tmp_path / "timescale.png").stat().st_size > 10_000
