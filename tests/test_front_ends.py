"""One driver, three front ends: a plain PyTorch loop, Fabric and the Lightning Trainer compute the
same Local SGD, bit for bit, on the same per-rank batches (2 gloo processes)."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    TIMEOUT,
    ToyNet,
    make_optimizer,
    make_trainer,
    newcomer_env,
    rank_file_of,
    snapshot,
    toy_batches,
)
from distributed import run
from test_readme import readme_commands
from torch import Tensor

from localsgd import DiLoCo, LocalSGD, LocalSGDStrategy
from localsgd.fabric import LocalSGDFabricStrategy

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3
H, ROUNDS = 4, 3


def _batches(rank: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches, the same for every front end."""
    return toy_batches(rank, H * ROUNDS)


def _net() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet()


def _outer(diloco: bool) -> DiLoCo | None:
    return DiLoCo() if diloco else None


def _plain(rank: int, diloco: bool) -> dict[str, Tensor]:
    dist.init_process_group("gloo", timeout=TIMEOUT)
    net = _net()
    opt = make_optimizer(net.parameters(), LR, MOMENTUM, WD)
    with LocalSGD(net, opt, sync_every=H, outer_optimizer=_outer(diloco)) as ls:
        for x, y in _batches(rank):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert ls.num_steps == H * ROUNDS and ls.comm.rounds("sync") == ROUNDS
    return snapshot(net)


def _fabric(rank: int, diloco: bool) -> dict[str, Tensor]:
    from lightning.fabric import Fabric

    strategy = LocalSGDFabricStrategy(sync_every=H, outer_optimizer=_outer(diloco), timeout=TIMEOUT)
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=2)
    fabric.launch()
    net = _net()
    model, opt = fabric.setup(net, make_optimizer(net.parameters(), LR, MOMENTUM, WD))
    for x, y in _batches(rank):
        opt.zero_grad()
        fabric.backward(F.cross_entropy(model(x), y))
        opt.step()
    strategy.finish()
    assert strategy.driver is not None and strategy.driver.comm.rounds("sync") == ROUNDS
    return snapshot(net)


class _Module(pl.LightningModule):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.model = _net()
        self.rank = rank

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), LR, MOMENTUM, WD)

    def train_dataloader(self) -> Any:
        # this rank's own batches, already batched, unsharded
        return torch.utils.data.DataLoader(_batches(self.rank), batch_size=None)


def _lightning(rank: int, diloco: bool) -> dict[str, Tensor]:
    module = _Module(rank)
    strategy = LocalSGDStrategy(sync_every=H, outer_optimizer=_outer(diloco), timeout=TIMEOUT)
    make_trainer(strategy, max_steps=H * ROUNDS, use_distributed_sampler=False).fit(module)
    return snapshot(module.model)


@pytest.mark.distributed
@pytest.mark.parametrize("diloco", [False, True], ids=["averaging", "diloco"])
def test_plain_loop_fabric_and_lightning_end_bitwise_equal(diloco: bool) -> None:
    plain = run(_plain, 2, diloco)
    fabric = run(_fabric, 2, diloco)
    lightning = run(_lightning, 2, diloco)
    for rank in range(2):
        for key, value in plain[0].items():
            assert torch.equal(plain[rank][key], value), f"plain: rank {rank} differs from rank 0 in {key}"
            assert torch.equal(fabric[rank][key], value), f"fabric differs from the plain loop in {key}"
            assert torch.equal(lightning[rank][key], value), f"lightning differs from the plain loop in {key}"
    assert not torch.equal(plain[0]["net.0.weight"], _net().state_dict()["net.0.weight"]), "nothing trained"


def _resume_mid_round(rank: int) -> dict[str, Any]:
    dist.init_process_group("gloo", timeout=TIMEOUT)
    batches = _batches(rank)
    half = H + H // 2  # step 6: in the middle of the second round
    out: dict[str, Any] = {}
    for diloco in (False, True):
        net = _net()
        opt = make_optimizer(net.parameters(), LR, MOMENTUM, WD)
        ls = LocalSGD(net, opt, sync_every=H, outer_optimizer=_outer(diloco))
        for i, (x, y) in enumerate(batches):
            if i == half:
                buffer = io.BytesIO()
                torch.save(ls.state_dict(), buffer)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        ls.close()
        # a new process would start from other weights: the state brings back this rank's own
        torch.manual_seed(1 + rank)
        net2 = ToyNet()
        opt2 = make_optimizer(net2.parameters(), LR, MOMENTUM, WD)
        ls2 = LocalSGD(net2, opt2, sync_every=H, outer_optimizer=_outer(diloco))
        buffer.seek(0)
        ls2.load_state_dict(torch.load(buffer, weights_only=False))
        assert ls2.num_steps == half
        for x, y in batches[half:]:
            opt2.zero_grad()
            F.cross_entropy(net2(x), y).backward()
            opt2.step()
        ls2.close()
        out[f"{diloco}"] = (snapshot(net), snapshot(net2), ls.comm.rounds("sync"), ls2.comm.rounds("sync"))
    return out


@pytest.mark.distributed
def test_the_drivers_state_dict_mid_round_resumes_bitwise() -> None:
    for result in run(_resume_mid_round, 2):
        for diloco, (uninterrupted, resumed, rounds, resumed_rounds) in result.items():
            for key, value in uninterrupted.items():
                assert torch.equal(resumed[key], value), f"outer={diloco}: {key} differs after the resume"
            assert rounds == resumed_rounds == ROUNDS


def _fabric_resume(rank: int, folder: str) -> dict[str, Any]:
    from lightning.fabric import Fabric

    def start(seed: int) -> tuple[Any, Any, Any, LocalSGDFabricStrategy]:
        strategy = LocalSGDFabricStrategy(sync_every=H, outer_optimizer=DiLoCo(), timeout=TIMEOUT)
        fabric = Fabric(strategy=strategy, accelerator="cpu", devices=2)
        fabric.launch()
        torch.manual_seed(seed)
        net = ToyNet()
        model, opt = fabric.setup(net, make_optimizer(net.parameters(), LR, MOMENTUM, WD))
        return fabric, model, opt, strategy

    def train(fabric: Any, model: Any, opt: Any, batches: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in batches:
            opt.zero_grad()
            fabric.backward(F.cross_entropy(model(x), y))
            opt.step()

    batches, half = _batches(rank), H + H // 2  # stopped in the middle of the second round
    fabric, model, opt, strategy = start(0)
    train(fabric, model, opt, batches)
    strategy.finish()
    uninterrupted = snapshot(model)
    fabric, model, opt, strategy = start(0)
    train(fabric, model, opt, batches[:half])
    path = os.path.join(folder, "mid_round.ckpt")
    own = snapshot(model)
    fabric.save(path, {"model": model, "optimizer": opt, "epoch": 3})
    saved = torch.load(path, weights_only=False)["model"]
    rank_file = torch.load(rank_file_of(path, rank), weights_only=False)
    assert torch.equal(snapshot(model)["net.0.weight"], own["net.0.weight"]), "saving moved the model"
    fabric, model, opt, strategy = start(1 + rank)  # other weights: the checkpoint brings them back
    state: dict[str, Any] = {"model": model, "optimizer": opt, "epoch": 0}
    remainder = fabric.load(path, state)
    assert state["epoch"] == 3 and "localsgd" not in remainder
    assert strategy.driver is not None and strategy.driver.num_steps == half
    train(fabric, model, opt, batches[half:])
    strategy.finish()
    return {
        "uninterrupted": uninterrupted,
        "resumed": snapshot(model),
        "own": own["net.0.weight"],
        "saved": saved["net.0.weight"],
        "rank_file": rank_file["driver"]["workers"][0]["model"]["net.0.weight"],
    }


@pytest.mark.distributed
def test_fabric_save_mid_round_holds_the_average_and_load_resumes_bitwise(tmp_path: Path) -> None:
    results = run(_fabric_resume, 2, str(tmp_path))
    for r in results:
        for key, value in r["uninterrupted"].items():
            assert torch.equal(r["resumed"][key], value), f"{key} differs after fabric.load"
    # mid-round the workers differ: the main file holds the global model, each rank file its own
    assert not torch.equal(results[0]["own"], results[1]["own"])
    for r in results:
        assert torch.equal(r["rank_file"], r["own"]) and not torch.equal(r["saved"], r["own"])


BAD_ARGUMENTS = [
    {"sync_every": 0},
    {"sync_every": "often"},
    {"buffers": "sum"},
    {"optimizer_state": "keep"},
    {"outer_optimizer": "diloco"},
    {"nonfinite": "ignore"},
    {"log_divergence": "yes"},
    {"h1_sync": "never"},
]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=lambda b: next(iter(b)))
def test_bad_arguments_fail_alike_in_every_front_end(bad: dict[str, Any]) -> None:
    messages = []
    for make in (
        lambda: LocalSGD(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), **bad),
        lambda: LocalSGDStrategy(**bad),
        lambda: LocalSGDFabricStrategy(**bad),
    ):
        with pytest.raises(ValueError) as info:
            make()
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]
    assert next(iter(bad)) in messages[0], "the message names the argument"


def test_fabric_finds_the_strategy_by_name() -> None:
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    assert STRATEGY_REGISTRY.get("localsgd") is not None
    assert isinstance(STRATEGY_REGISTRY.get("localsgd"), LocalSGDFabricStrategy)


def test_one_process_driver_hooks_count_every_optimizer_step_and_close_removes_them() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ls = LocalSGD(net, opt, sync_every=3)  # no process group: this process's workers alone
    for x, y in _batches(0)[:7]:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert ls.num_steps == 7 and ls.comm.rounds("sync") == 2
    ls.close()
    opt.step()
    assert ls.num_steps == 7, "a closed driver counts nothing"


def test_simulated_workers_in_a_plain_loop_average_their_models() -> None:
    nets = [_net() for _ in range(3)]
    with torch.no_grad():
        for k, n in enumerate(nets):
            for p in n.parameters():
                p.add_(k)  # the broadcast must make them equal first
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    with LocalSGD(nets, opts, sync_every=2) as ls:
        for step, (x, y) in enumerate(_batches(0)[:4]):
            for k, (n, o) in enumerate(zip(nets, opts)):
                o.zero_grad()
                F.cross_entropy(n(x + k), y).backward()
                o.step()
            gap = (nets[0].net[0].weight - nets[1].net[0].weight).abs().max()
            assert (gap == 0) == (step % 2 == 1), f"models equal exactly after each sync (step {step + 1})"
    assert ls.num_steps == 4 and ls.comm.rounds("sync") == 2


BLOCK_LIGHTNING = """
import importlib.abc, sys

class _NoLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoLightning())
"""


@pytest.mark.slow
def test_without_lightning_the_core_and_a_two_process_plain_run_work(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_LIGHTNING)
    env = newcomer_env()  # no stale MASTER_PORT or rank from earlier tests
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    check = textwrap.dedent(
        """
        import sys
        import localsgd, localsgd.core
        from localsgd import LocalSGD, DiLoCo, QSR
        assert not any(m.split(".")[0] == "lightning" for m in sys.modules), "lightning was imported"
        try:
            localsgd.LocalSGDStrategy
        except ImportError as err:
            print("strategy:", err)
        else:
            raise SystemExit("LocalSGDStrategy imported without Lightning")
        """
    )
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs Lightning" in done.stdout
    example = ROOT / "examples" / "plain_torch.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(example)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain_torch: 128 steps, 8 syncs" in done.stdout, done.stdout


def _run_example(example: str, tmp_path: Path) -> str:
    """Runs the command the example's docstring gives, as written (it once named a file that does
    not exist), and returns the line it prints about itself."""
    env = newcomer_env()  # no stale MASTER_PORT or rank from earlier tests
    path = ROOT / "examples" / f"{example}.py"
    (line,) = [
        line.strip()
        for line in path.read_text().split('"""')[1].splitlines()
        if line.startswith("    python")
    ]
    cmd = [sys.executable if word == "python" else word for word in shlex.split(line)]
    assert f"examples/{example}.py" in cmd, line
    # README and the docs give the same command (test_readme.py leaves it to this test)
    assert f".venv/bin/{line}" in readme_commands(), line
    cmd[cmd.index(f"examples/{example}.py")] = str(path)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(line for line in done.stdout.splitlines() if line.startswith(f"{example}:"))


@pytest.mark.slow
@pytest.mark.parametrize("example", ["plain_torch", "fabric", "lightning_trainer"])
def test_examples_run_on_two_processes(example: str, tmp_path: Path) -> None:
    line = _run_example(example, tmp_path)
    assert "128 steps, 8 syncs" in line, line
    assert float(line.rsplit(" ", 1)[1]) > 0.8, f"the example did not learn: {line}"


@pytest.mark.slow
def test_the_sharded_example_runs_two_workers_of_two_processes(tmp_path: Path) -> None:
    line = _run_example("sharded", tmp_path)
    # 2048 points over 4 processes, batches of 32, 4 epochs: 64 steps; a sync every 16
    assert "2 workers x 2 shards, 64 steps, 4 syncs" in line, line
    model_bytes = 4 * (16 * 64 + 64 + 64 * 4 + 4)
    assert f"{model_bytes // 2} bytes per process per sync" in line, line  # each process: its half
    assert float(line.rsplit(" ", 1)[1]) > 0.8, f"the example did not learn: {line}"


@pytest.mark.slow
def test_the_lm_example_trains_diloco_on_the_embedded_corpus(tmp_path: Path) -> None:
    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed (scripts/setup.sh installs it as root)")
    line = _run_example("lm", tmp_path)
    assert "200 steps, 10 syncs" in line, line
    assert float(line.split("validation ")[1].split()[0]) < 4.5, f"the example did not learn: {line}"
