"""The `localsgd` command: `quickstart` end to end at a reduced size, and `fit` (LightningCLI) configs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_quiet_output import NOISE

from localsgd import LocalSGDStrategy
from localsgd.cli import check_args, lightning_cli
from localsgd.core.outer import DiLoCo
from localsgd.core.schedules import PostLocal
from localsgd.research.models import MLP

# Single-process fits earlier in this pytest process leave their rendezvous variables behind.
_CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
}


@pytest.mark.integration
def test_quickstart_trains_both_methods_and_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "quickstart", "--epochs", "1", "--sync-every", "4"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_CLEAN_ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    baseline = next(line for line in lines if line.startswith("SGD baseline"))
    local = next(line for line in lines if line.startswith("Local SGD, H=4"))
    steps = int(baseline.split()[-2])
    assert steps > 20
    assert int(local.split()[-2]) == steps // 4  # comm rounds
    assert 0.1 < float(local.split()[-4]) <= 1.0  # a test accuracy
    # Lightning starts the ranks with "spawn": known noise is filtered in them too (test_quiet_output)
    for noise in NOISE:
        assert noise not in out.stdout + out.stderr, noise


@pytest.mark.slow
def test_quickstart_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "quickstart", "--sync-every", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--sync-every: must be an integer >= 1, got '0'" in out.stderr


# ---------------------------------------------------------------- `localsgd fit` (LightningCLI)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("compare_")
)  # compare_*: test_compare.py
_HIDDEN = ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin")


def cli_exit_code(*args: str) -> int | str | None:
    """``localsgd ARGS`` in this process, for arguments that must end in SystemExit."""
    with warnings.catch_warnings(), pytest.raises(SystemExit) as done:
        # pytest's own arguments are in sys.argv; LightningCLI warns about that and ignores them
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        lightning_cli(list(args))
    return done.value.code


def print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``localsgd fit ARGS --print_config``, in this process, as a dict."""
    code = cli_exit_code("fit", *args, "--print_config")
    out = capsys.readouterr()
    assert code in (0, None), out.err[-2000:]
    return yaml.safe_load(out.out)


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "quickstart_sgd.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = print_config(capsys, "--config", str(config))
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"].startswith("localsgd.")
    # the strategy's own arguments only: what the Trainer fills in is not configurable
    assert not set(strategy.get("init_args") or {}) & set(_HIDDEN)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]
    # every file says where its numbers come from
    assert " x " in config.read_text() and "=" in config.read_text()


def test_quickstart_config_shows_everything_and_takes_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = print_config(
        capsys,
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--trainer.strategy.init_args.sync_every=16",
        "--model.init_args.net.init_args.width=8",
    )
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "localsgd.LocalSGDStrategy"
    assert strategy["init_args"]["sync_every"] == 16
    assert strategy["init_args"]["buffers"] == "average"
    assert strategy["init_args"]["optimizer_state"] == "local"
    assert {"process_group_backend", "timeout", "start_method"} <= set(strategy["init_args"])
    net = cfg["model"]["init_args"]["net"]
    assert net == {
        "class_path": "localsgd.research.models.SmallCNN",
        "init_args": {"in_channels": 1, "num_classes": 10, "width": 8, "norm": "batch"},
    }
    # defaults the YAML leaves out are shown too
    assert cfg["trainer"]["accumulate_grad_batches"] == 1
    assert cfg["data"]["init_args"]["test_fraction"] == 0.25
    assert cfg["seed_everything"] == 0


def test_strategy_plumbing_is_not_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs/quickstart.yaml")
    assert cli_exit_code("fit", "--config", config, "--trainer.strategy.init_args.accelerator=cpu") == 2
    assert "trainer.strategy.init_args.accelerator: no such option" in capsys.readouterr().err


def _bad_config(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "configs/quickstart.yaml").read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("sync_every: 8", "sync_evry: 8", "sync_evry: no such option"),
        ("buffers: average", "buffers: avrage", "'avrage' is not one of"),
        ("lr: 0.05", "lrate: 0.05", "lrate: no such option"),
        ("max_epochs: 10", "max_epoch: 10", "max_epoch"),
        ("batch_size: 16", "batch_size: sixteen", "batch_size"),
    ],
)
def test_misspelled_key_or_bad_value_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    assert cli_exit_code("fit", "--config", str(_bad_config(tmp_path, old, new))) == 2
    assert message in capsys.readouterr().err


def test_value_rejected_by_the_strategy_is_named(tmp_path: Path) -> None:
    # parses (an int), then LocalSGDStrategy's own check rejects it when the CLI instantiates it,
    # before anything runs
    config = _bad_config(tmp_path, "sync_every: 8", "sync_every: 0")
    safety = ["--trainer.devices=1", "--trainer.max_steps=1", "--trainer.logger=false"]
    message = r"sync_every \(0\) must be an integer >= 1"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        lightning_cli(["fit", "--config", str(config), *safety])


def test_check_args_names_the_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    check_args(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps=5"])
    with pytest.raises(SystemExit) as done:
        check_args(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_stepz=5"])
    assert done.value.code == 2
    assert "--trainer.max_stepz" in capsys.readouterr().err


@pytest.mark.integration
def test_fit_runs_a_config_on_two_cpu_processes(tmp_path: Path) -> None:
    # Lightning starts the second process itself (it re-runs this command line)
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "fit", "--config", str(ROOT / "configs/quickstart_sgd.yaml")]
        + ["--trainer.max_steps=12", "--trainer.check_val_every_n_epoch=100"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**_CLEAN_ENV, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs/quickstart/sgd").iterdir()
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 12
    assert checkpoint["localsgd"] == {"strategy": "sgd_baseline", "num_steps": 12, "world_size": 2}
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("comm/rounds")]
    assert rows  # logged every 10 steps
    for row in rows:  # the baseline all-reduces once per step
        assert float(row["comm/rounds"]) == int(row["step"]) + 1
    assert (run / "config.yaml").is_file()
    # what a user sees: a line per tenth of the run, one summary line, none of the known noise
    shown = out.stdout + out.stderr
    assert "step 12/12 | epoch 0 |" in shown
    assert "done: 12 optimizer steps, 12 sync rounds" in shown and "no validation metrics" in shown
    assert f"checkpoint {(run / 'checkpoints' / 'last.ckpt').relative_to(tmp_path)}" in shown
    for noise in ("💡 Tip", "LeafSpec", "The `srun` command is available"):
        assert noise not in shown, noise


SCHEDULE_AND_OUTER = """
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  strategy:
    class_path: localsgd.LocalSGDStrategy
    init_args:
      sync_every:
        class_path: localsgd.core.schedules.PostLocal
        init_args: {every: 2, switch_step: 2}
      outer_optimizer:
        class_path: localsgd.core.outer.DiLoCo
        init_args: {lr: 0.5}
model:
  class_path: localsgd.research.models.Classifier
  init_args:
    net:
      class_path: localsgd.research.models.MLP
      init_args: {in_features: 64, hidden: 16, num_classes: 10}
    num_classes: 10
data:
  class_path: localsgd.research.data.DigitsDataModule
  init_args: {batch_size: 8}
"""


def test_schedule_outer_optimizer_model_and_data_come_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(SCHEDULE_AND_OUTER)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # one process: fits right here; the config is saved under default_root_dir
        cli = lightning_cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, LocalSGDStrategy)
    assert isinstance(strategy.options.schedule, PostLocal) and strategy.options.schedule.every == 2
    assert isinstance(strategy.options.outer_optimizer, DiLoCo) and strategy.options.outer_optimizer.lr == 0.5
    assert isinstance(cli.model.net, MLP)
    assert cli.trainer.global_step == 4
    assert (tmp_path / "config.yaml").is_file()


def test_warmup_decay_lr_from_yaml_counts_optimizer_steps(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(SCHEDULE_AND_OUTER)
    args = [
        "fit",
        "--config",
        str(config),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=6",
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.1",
        "--lr_scheduler=localsgd.WarmupDecayLR",
        "--lr_scheduler.warmup_steps=4",
        "--lr_scheduler.total_steps=8",
        "--lr_scheduler.decay=linear",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = lightning_cli(args)
    assert cli.trainer.global_step == 6
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    # 4 warmup steps, then linear decay to 0 at step 8: after 6 steps the lr is half the peak
    assert lr == pytest.approx(0.1 * (8 - 6) / (8 - 4))


BAD_VALUE = """
trainer:
  strategy:
    class_path: localsgd.LocalSGDStrategy
    init_args: {sync_every: 0}
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["yaml", "flag"])
def test_a_bad_value_ends_fit_with_one_error_line_naming_the_field(tmp_path: Path, where: str) -> None:
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps=2"]
    if where == "yaml":
        (tmp_path / "bad.yaml").write_text(BAD_VALUE)
        args += ["--config", str(tmp_path / "bad.yaml")]
    else:
        args += ["--trainer.strategy.init_args.sync_every=0"]

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localsgd.cli", *args, *extra],
            capture_output=True,
            text=True,
            timeout=240,
            env={**_CLEAN_ENV, "OMP_NUM_THREADS": "1"},
            cwd=tmp_path,
        )

    out = cli()
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("localsgd fit: error: sync_every (0) must be an integer >= 1"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    debug = cli("--debug")  # the whole story, for a bug report
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "sync_every (0)" in debug.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "flags", "needle"),
    [
        (("strategy: {sync_every: 4}", "strategy: {sync_every: 0}"), [], "sync_every (0) must be an integer"),
        (None, ["--jobs", "0"], "jobs (0) must be an integer >= 1"),
    ],
    ids=["yaml", "flag"],
)
def test_a_bad_value_ends_compare_with_one_error_line_naming_the_field(
    tmp_path: Path, change: tuple[str, str] | None, flags: list[str], needle: str
) -> None:
    text = (ROOT / "configs/compare_quickstart.yaml").read_text()
    if change:
        assert change[0] in text
        text = text.replace(change[0], change[1])
    (tmp_path / "c.yaml").write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "compare", "--config", str(tmp_path / "c.yaml"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("localsgd compare: error:") and needle in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
