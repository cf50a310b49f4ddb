"""Every Python block of README.md and the docs pages (docs/**/*.md) runs as written, or is marked
as a template by an HTML comment ``<!-- template: why -->`` on the line before its fence.

Each unmarked block runs in a fresh interpreter (this one's ``sys.executable``) from an empty
folder, with the worktree's package first on the path: a block that calls
``init_process_group`` under ``python -m torch.distributed.run --standalone --nproc_per_node 2``
(gloo, CPU), any other as a script (the Trainer and Fabric start their own 2 processes). Training
is cut short by writing ``max_steps=4`` for any ``max_steps=N``. A block that appears on several
pages (README repeats getting-started's) runs once. The bash blocks are test_readme.py's: it runs
every line of the same pages' unmarked blocks, so this file only checks that nothing runnable hides
under another fence tag or behind a stray marker.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from common import newcomer_env
from test_readme import bash_blocks, doc_pages

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(<!-- template:([^>]*)-->\n)?```(\w*)\n(.*?)^```", re.S | re.M)
RUNNERS = {"python", "bash"}  # fence tags that a test runs (or that must be marked)
SHORT = "max_steps=4"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass(frozen=True)
class Block:
    where: str  # page:line of the fence
    lang: str
    code: str
    template: str | None  # the marker's reason, None when the block runs


def blocks() -> list[Block]:
    found = []
    for page in doc_pages():
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start(3)) + 1
            reason = m.group(2).strip() if m.group(1) else None
            found.append(Block(f"{page.relative_to(ROOT)}:{line}", m.group(3), m.group(4), reason))
    return found


def python_blocks() -> dict[str, list[str]]:
    """Each unmarked Python block's code, with the places it appears."""
    runs: dict[str, list[str]] = {}
    for b in blocks():
        if b.lang == "python" and b.template is None:
            runs.setdefault(b.code, []).append(b.where)
    return runs


def run_block(code: str, folder: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``code`` as a fresh script in ``folder`` (under torchrun with 2 processes if it starts a
    process group), training cut to a few steps."""
    script = folder / "block.py"
    script.write_text(re.sub(r"\bmax_steps=\d+", SHORT, code))
    if "init_process_group" in code:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [sys.executable]
    env = {**newcomer_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*command, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )


PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize("code", list(PYTHON_BLOCKS), ids=[w[0] for w in PYTHON_BLOCKS.values()])
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    out = run_block(code, tmp_path)
    where = ", ".join(PYTHON_BLOCKS[code])
    assert out.returncode == 0, f"{where}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_the_runner_fails_a_block_that_uses_torch_without_importing_it(tmp_path: Path) -> None:
    # README's plain-loop snippet once did exactly this (fixed in bad88f6): the runner must catch it
    code = 'import torch.distributed as dist, localsgd\n\ndist.init_process_group("gloo")\n'
    code += "opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)\n"
    out = run_block(code, tmp_path)
    assert out.returncode != 0
    assert "NameError: name 'torch' is not defined" in out.stdout + out.stderr, out.stderr[-3000:]


def test_every_block_is_run_or_marked_as_a_template() -> None:
    found = blocks()
    by_lang = {lang: [b for b in found if b.lang == lang] for lang in RUNNERS}
    # the three front ends at least (the Trainer, the plain loop, Fabric) run here
    assert len(PYTHON_BLOCKS) >= 3, PYTHON_BLOCKS
    assert any("init_process_group" in code for code in PYTHON_BLOCKS)
    # a marker says why; a marker must sit right before a fence (else it marks nothing)
    assert all(b.template for b in found if b.template is not None), [b.where for b in found]
    for page in doc_pages():
        text = page.read_text()
        for m in re.finditer(r"<!-- template:[^>]*-->\n(.*)", text):
            assert m.group(1).startswith("```"), f"{page}: a template marker not before a fence"
    # what runs Python or shell hides under no other tag (test_readme runs ```bash, this ```python)
    hidden = [b.where for b in found if b.lang in {"py", "python3", "sh", "shell", "console", "zsh"}]
    assert not hidden, f"use ```python or ```bash (so that a test runs them), or mark them: {hidden}"
    # test_readme reads each unmarked bash block of these same pages; a marked one it skips
    unmarked = [b for b in by_lang["bash"] if b.template is None]
    read = [block for page in doc_pages() for block in bash_blocks(page.read_text())]
    assert len(read) == len(unmarked) and unmarked, (len(read), [b.where for b in unmarked])
