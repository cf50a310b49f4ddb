"""A user's first mistakes with the `localsgd` command: each ends with ONE `error:` line on stderr
that names the key and the fix (exit code 2); `--debug` keeps the whole report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from common import newcomer_env

import localsgd

ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
_LAUNCH_VARS += ("LOCALSGD_DEBUG",)
_ENV = {k: v for k, v in newcomer_env().items() if k not in _LAUNCH_VARS}  # no rank another test left
_ENV.update(PYTHONPATH=str(ROOT))
QUICKSTART = str(ROOT / "configs/quickstart.yaml")


def _config(tmp_path: Path, old: str, new: str, name: str = "quickstart.yaml") -> Path:
    text = (ROOT / "configs" / name).read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    return path


def _localsgd(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localsgd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_ENV,
        cwd=tmp_path,
    )


@pytest.fixture
def localsgd_here(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The `localsgd` command run in this process (a mistake fails while parsing or building,
    before anything trains: a fresh interpreter per case cost 3.5 s each), its stdout and stderr
    read at the file descriptors as a subprocess's would be; ``test_the_real_command_...``
    runs one case as a subprocess to show that the two agree."""
    from localsgd.cli import main

    monkeypatch.chdir(tmp_path)
    for name in set(os.environ) - set(_ENV):
        if not name.startswith("PYTEST"):  # pytest's own, which it removes itself after the call
            monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # the CLI adds to it

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capfd.readouterr()
        monkeypatch.setattr(sys, "argv", ["localsgd", *args])  # as the command sees them
        code: int | str | None = 0
        try:
            main()  # reads sys.argv, as the command does
        except SystemExit as done:
            code = done.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(
            ["localsgd", *args], code if isinstance(code, int) else 1, out, err
        )

    return run


def _error_lines(stderr: str, prog: str = "localsgd fit") -> list[str]:
    return [line for line in stderr.splitlines() if re.match(rf"({prog}: )?error:", line)]


# (old, new) in configs/quickstart.yaml, then what the one line must say
TYPOS = [
    (
        ("sync_every: 8", "sync_evry: 8"),
        "trainer.strategy.init_args.sync_evry: no such option; did you mean sync_every?",
    ),
    (("max_epochs: 10", "max_epoch: 10"), "trainer.max_epoch: no such option; did you mean max_epochs?"),
    (
        ("buffers: average", "buffers: averag"),
        "trainer.strategy.init_args.buffers: 'averag' is not one of 'average', 'local'; "
        "did you mean average?",
    ),
    (
        ("in_channels: 1 ", "in_chanels: 1 "),
        "model.init_args.net.init_args.in_chanels: no such option; did you mean in_channels?",
    ),
    (
        ("class_path: localsgd.LocalSGDStrategy", "class_path: localsgd.LocalSGDStrategi"),
        "trainer.strategy: no class localsgd.LocalSGDStrategi; did you mean localsgd.LocalSGDStrategy?",
    ),
    (("batch_size: 16", "batch_size: sixteen"), "data.init_args.batch_size: expected int, got 'sixteen'"),
    (("seed_everything: 0", "seed_everything: zero"), "seed_everything: expected bool or int, got 'zero'"),
    (("data:", "dta:"), "dta: no such option; did you mean data?"),
]


@pytest.mark.parametrize(("change", "message"), TYPOS, ids=[t[0][1].split(":")[0] for t in TYPOS])
def test_a_config_mistake_is_one_line_naming_the_key_and_the_fix(
    tmp_path: Path, change: tuple[str, str], message: str, localsgd_here: Callable[..., Any]
) -> None:
    config = _config(tmp_path, *change)
    for how in ([], ["--print_config"]):  # the run a user starts, and the check of its config
        out = localsgd_here("fit", "--config", str(config), *how, "--trainer.max_steps=1")
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert lines == [f"localsgd fit: error: {message}"], out.stderr[-2000:]
    debug = localsgd_here("fit", "--config", str(config), "--print_config", "--debug")
    assert debug.returncode != 0
    assert len(debug.stderr.splitlines()) > len(lines)  # the usage block and jsonargparse's report


@pytest.mark.slow
def test_the_real_command_prints_the_same_one_line(tmp_path: Path) -> None:
    message, config = TYPOS[0][1], _config(tmp_path, *TYPOS[0][0])
    for how in ([], ["--print_config"]):
        out = _localsgd(tmp_path, "fit", "--config", str(config), *how, "--trainer.max_steps=1")
        assert out.returncode == 2, out.stderr[-2000:]
        assert [line for line in out.stderr.splitlines() if line.strip()] == [
            f"localsgd fit: error: {message}"
        ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("sync_every: 8", "sync_every: localsgd.QSR"),  # a class where an instance is expected
            "trainer.strategy.init_args.sync_every: localsgd.QSR needs init_args: base, alpha",
        ),
        (("devices: 2 ", "devices: two "), "`devices` selected with `CPUAccelerator` should be an int > 0"),
    ],
    ids=["class-without-args", "devices-text"],
)
def test_a_value_the_constructor_refuses_is_one_line(
    tmp_path: Path, change: tuple[str, str], message: str, localsgd_here: Callable[..., Any]
) -> None:
    # parses; the class refuses it when the CLI builds it, before anything trains
    flags = ["--trainer.max_steps=1", "--trainer.logger=false", "--trainer.callbacks=[]"]
    out = localsgd_here("fit", "--config", str(_config(tmp_path, *change)), *flags)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1 and lines[0].startswith(f"localsgd fit: error: {message}"), out.stderr[-2000:]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--trainer.max_stepz=5", "--trainer.max_stepz: no such option; did you mean --trainer.max_steps?"),
        ("--trainer.max_steps=abc", "trainer.max_steps: expected int, got 'abc'"),
        ("--dta.batch_size=8", "--dta: no such option; did you mean data?"),
        (
            "--trainer.strategy.init_args.sync_evry=4",
            "trainer.strategy.init_args.sync_evry: no such option; did you mean sync_every?",
        ),
        (
            "--trainer.strategy.init_args.accelerator=cpu",
            "trainer.strategy.init_args.accelerator: no such option; set trainer.accelerator",
        ),
    ],
)
def test_a_flag_mistake_is_one_line_naming_the_key(
    flag: str, message: str, localsgd_here: Callable[..., Any]
) -> None:
    out = localsgd_here("fit", "--config", QUICKSTART, flag, "--print_config")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"localsgd fit: error: {message}"), out.stderr[-2000:]


def test_the_help_names_debug(localsgd_here: Callable[..., Any]) -> None:
    out = localsgd_here("--help")
    assert out.returncode == 0
    assert "--debug" in out.stdout and "LOCALSGD_DEBUG=1" in out.stdout


# ---------------------------------------------------------------- outer_optimizer: class vs instance
def test_outer_optimizer_class_in_python_says_how_to_pass_an_instance() -> None:
    with pytest.raises(ValueError) as error:
        localsgd.LocalSGDStrategy(outer_optimizer=localsgd.DiLoCo)  # type: ignore[arg-type]
    message = str(error.value)
    assert "HINT: pass an instance: outer_optimizer=localsgd.DiLoCo()" in message
    assert "localsgd.outer." not in message  # no such module
    # every name the message offers can be imported as written
    for name in re.findall(r"\blocalsgd\.[\w.]*[A-Z]\w*", message):
        module, _, attr = name.rpartition(".")
        assert hasattr(__import__(module, fromlist=[attr]), attr), name


@pytest.mark.slow
def test_outer_optimizer_class_path_in_yaml_is_made_into_an_instance(tmp_path: Path) -> None:
    # the YAML form the hint offers: a class path alone parses, and the strategy gets a DiLoCo()
    outer = "optimizer_state: local\n      outer_optimizer: localsgd.DiLoCo\n#"
    config = _config(tmp_path, "optimizer_state: local ", outer)
    flags = ["--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false"]
    flags += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    flags += ["--trainer.limit_val_batches=0"]
    out = _localsgd(tmp_path, "fit", "--config", str(config), *flags, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "outer_optimizer=DiLoCo(" in out.stdout + out.stderr
    assert not _error_lines(out.stderr)


# ---------------------------------------------------------------- `localsgd compare`: its own schema
COMPARE_TYPOS = [
    (("eval_every: 100", "eval_evry: 100"), "unknown key(s) ['eval_evry'] in "),
    (
        ("strategy: {sync_every: 4}", "strategy: {sync_evry: 4}"),
        "method 'Local SGD (H=4)' (seed 0): strategy.sync_evry: no such option; did you mean sync_every?",
    ),
    (
        ("strategy: {sync_every: 16}", "strategy: {sync_every: 16, buffers: averag}"),
        "method 'Local SGD (H=16)' (seed 0): strategy.buffers: 'averag' is not one of 'average', 'local'; "
        "did you mean average?",
    ),
    (
        ("num_probes: 8", "num_probe: 8"),
        "method 'SGD' (seed 0): sharpness.num_probe: no such option; did you mean num_probes?",
    ),
]


@pytest.mark.parametrize(("change", "message"), COMPARE_TYPOS, ids=[t[0][1][:12] for t in COMPARE_TYPOS])
def test_a_compare_config_mistake_is_one_line_naming_the_key_and_the_fix(
    tmp_path: Path, change: tuple[str, str], message: str, localsgd_here: Callable[..., Any]
) -> None:
    config = _config(tmp_path, *change, name="compare_quickstart.yaml")
    out = localsgd_here("compare", "--config", str(config), "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"localsgd compare: error: {message}"), out.stderr[-2000:]
    if "eval_evry" in change[1]:
        assert "bad.yaml (did you mean eval_every?); the keys are" in lines[0]
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


# ---------------------------------------------------------------- under torchrun: once, then a summary
def _nonempty(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


@pytest.mark.integration
def test_torchrun_a_wrong_device_count_is_said_once(tmp_path: Path) -> None:
    # two processes, four devices asked for: every rank fails alike; only rank 0 says it
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    out = subprocess.run(
        [*run, "localsgd", "fit", "--config", QUICKSTART, "--trainer.max_steps=2", "--trainer.devices=4"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_ENV,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    errors = _error_lines(out.stderr)
    assert len(errors) == 1, out.stderr[-3000:]
    assert "devices=4" in errors[0] and "world size (2)" in errors[0]
    assert "HINT: under torchrun, devices x num_nodes must be --nproc-per-node x --nnodes" in errors[0]


def _torchrun_sh(tmp_path: Path, config: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), config, *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env={**_ENV, "NPROC_PER_NODE": "2", "PYTHON": sys.executable},
        cwd=tmp_path,
    )


@pytest.mark.integration
def test_torchrun_script_ends_with_the_error_line(tmp_path: Path) -> None:
    config = _config(tmp_path, "sync_every: 8", "sync_evry: 8")
    out = _torchrun_sh(tmp_path, str(config), "--trainer.max_steps=2")
    assert out.returncode == 2, out.stderr[-3000:]
    message = "localsgd fit: error: " + TYPOS[0][1]
    assert _error_lines(out.stderr) == [message], out.stderr[-3000:]
    assert _nonempty(out)[-1] == message


@pytest.mark.integration
def test_torchrun_resume_with_another_schedule_is_one_error_line(tmp_path: Path) -> None:
    first = _torchrun_sh(tmp_path, QUICKSTART, "--trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("runs/quickstart/localsgd/version_*/checkpoints/last.ckpt")
    qsr = "--trainer.strategy.init_args.sync_every="
    qsr += "{class_path: localsgd.QSR, init_args: {base: 4, alpha: 0.02}}"
    out = _torchrun_sh(tmp_path, QUICKSTART, "--trainer.max_steps=8", f"--ckpt_path={checkpoint}", qsr)
    assert out.returncode == 2, out.stderr[-3000:]
    (error,) = _error_lines(out.stderr)
    assert "was written with sync schedule Constant, this run uses QSR" in error
    assert "HINT: resume with the same sync_every" in error
    assert _nonempty(out)[-1] == error
    assert out.stderr.count("Traceback") <= 1  # torchrun's own report; the workers print none
