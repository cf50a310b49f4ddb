"""README's and the docs pages' commands, run as written from the repository root after
`bash scripts/setup.sh`.

Each shell line of the ```bash blocks of README.md and docs/**/*.md (each command once, in the
order README then the pages) runs in bash with no virtual environment activated and
no PYTHON set, as a newcomer would paste it. To fit in CI, the training ones are cut short: an
extra `--trainer.max_steps=4` for `localsgd fit` and the launchers (the torchrun line's own 200
steps become 4), and the main job on a copy of its config with 16 steps and one seed. The test
suite's own command is this suite, so it is not run again; template lines (`configs/X.yaml`,
`node0`, `<...>`) are only checked to be marked as templates; a block after an HTML comment
`<!-- template: why -->` is not run (tests/test_doc_blocks.py checks every block is run or marked).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from common import newcomer_env
from test_slurm import slurm  # noqa: F401  (the one-node Slurm fixture, for the launcher line)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = re.compile(r"configs/X\.yaml|node0|<[^>]*>")
SHORT = "--trainer.max_steps=4"
EXAMPLE = re.compile(
    r"^\.venv/bin/python (-m torch\.distributed\.run --nproc-per-node [24] )?examples/\w+\.py$"
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def doc_pages() -> list[Path]:
    """README.md, then every page of the docs site (the commands README had moved there)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of ``text`` not marked ``<!-- template: why -->`` on the line before."""
    blocks = re.findall(r"(<!-- template:[^>]*-->\n)?```bash\n(.*?)```", text, flags=re.S)
    return [body for marker, body in blocks if not marker]


def readme_commands() -> list[str]:
    """Every shell command in the pages' bash blocks, once each: continuation lines joined,
    comments dropped."""
    commands: list[str] = []
    for page in doc_pages():
        for block in bash_blocks(page.read_text()):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#") and line not in commands:
                    commands.append(line)
    return commands


def _env() -> dict[str, str]:
    return newcomer_env()


def _bash(command: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def set_up() -> str:
    """README's setup as written, in the real root (it installs the project there): both of README's
    first commands start with it, and every test here runs what it made (.venv), so it comes from
    this fixture, not from whichever test ran first. A second run has nothing left to do."""
    setup = _bash("bash scripts/setup.sh", ROOT)
    assert setup.returncode == 0 and "localsgd ready" in setup.stdout, setup.stderr[-3000:]
    return setup.stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, set_up: str) -> Path:
    """The repository root as a newcomer's working folder, once README's setup has run: the
    project's files (linked) and a fresh place for what the commands write (runs/)."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "launch", "scripts", ".venv", "localsgd", "examples"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def _short_compare_config(folder: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs/compare_quickstart.yaml").read_text())
    config.update(seeds=[0], max_steps=16, eval_every=8)
    config["sharpness"].update(num_batches=1, num_probes=2, probes_per_pass=2)
    path = folder / "compare_quickstart_short.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_readme_commands_run_as_written(checkout: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 10, commands
    ran, templates = [], []
    for command in commands:
        if TEMPLATE.search(command):
            templates.append(command)
            continue
        if "launch/slurm.py" in command:
            continue  # needs the Slurm cluster: the next test
        if EXAMPLE.search(command):
            # test_front_ends.py runs each example by its docstring's command, checks its output,
            # and checks that this line is that command
            continue
        if command.startswith("bash scripts/setup.sh && "):
            # the setup ran as written in the set_up fixture; then the job
            command = command.removeprefix("bash scripts/setup.sh && ")
            if command.endswith("-m pytest"):
                continue  # this suite
            command = command.replace("configs/compare_quickstart.yaml", str(_short_compare_config(checkout)))
        elif "--trainer.max_steps=" in command:
            command = re.sub(r"--trainer\.max_steps=\d+", SHORT, command)
        elif command.startswith(".venv/bin/localsgd fit"):
            command += f" {SHORT}"
        out = _bash(command, checkout)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 7, ran  # the main job, five localsgd lines, torchrun
    assert templates and all(TEMPLATE.search(t) for t in templates)
    # what the runs left where README says they would
    assert (checkout / "runs/quickstart/localsgd/version_0/checkpoints/last.ckpt").is_file()
    assert (checkout / "runs/compare_quickstart/report.md").is_file()


def test_readme_slurm_command_runs_as_written(checkout: Path, slurm: dict[str, str]) -> None:  # noqa: F811
    (command,) = [c for c in readme_commands() if "launch/slurm.py" in c and not TEMPLATE.search(c)]
    env = {**_env(), **{k: v for k, v in slurm.items() if k.startswith("SLURM")}}
    out = _bash(f"{command} -- {SHORT}", checkout, env)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert '"event": "finished"' in out.stdout
