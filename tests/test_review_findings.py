"""Code-review findings (items 4.3, 4.6, 4.7, 4.8, 4.9, 4.12 of the review), one test each; every
test failed before its fix."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    TIMEOUT,
    ToyModule,
    ToyNet,
    make_trainer,
    max_diff,
    rank_file_of,
    snapshot,
    toy_batches,
    train_step,
)
from distributed import free_port, run
from torch import nn

from localsgd import Averager, InProcessCommunicator, LocalSGD, LocalSGDStrategy, ProcessGroupCommunicator
from localsgd.core import files
from localsgd.core.optim_state import fresh_optimizer_state
from localsgd.core.rounds import average
from localsgd.lightning.preemption import Preempted, PreemptionCheckpoint

K = 2


# ---------------------------------------------------------------- 4.6: reset builds no user optimizer
class _CountedAdam(torch.optim.Adam):
    """A user's optimizer whose constructor has a side effect."""

    built = 0

    def __init__(self, params: Any, tag: str = "", **kwargs: Any) -> None:
        type(self).built += 1
        super().__init__(params, **kwargs)


class _TaggedAdagrad(torch.optim.Adagrad):
    """A user's optimizer whose constructor has a required argument of its own (Adagrad fills
    its state in ``__init__``)."""

    built = 0

    def __init__(self, params: Any, tag: str, **kwargs: Any) -> None:
        type(self).built += 1
        super().__init__(params, **kwargs)


def test_reset_never_constructs_the_users_optimizer_and_leaves_a_fresh_ones_state() -> None:
    for cls, kwargs in ((_CountedAdam, {}), (_TaggedAdagrad, {"initial_accumulator_value": 0.1})):
        nets = []
        for k in range(K):
            torch.manual_seed(k)
            nets.append(ToyNet())
        opts = [cls(n.parameters(), "user", lr=0.01, **kwargs) for n in nets]
        for step in range(3):
            for k, (n, o) in enumerate(zip(nets, opts)):
                torch.manual_seed(100 * step + k)
                o.zero_grad()
                n(torch.randn(4, 8)).square().mean().backward()
                o.step()
        built = cls.built
        average(
            Averager(nets, InProcessCommunicator(K), optimizers=[[o] for o in opts]), optimizer_state="reset"
        )
        assert cls.built == built, f"reset constructed {cls.__name__} {cls.built - built} times"
        for k in range(K):
            twin = ToyNet()
            twin.load_state_dict(nets[k].state_dict())
            fresh = cls(twin.parameters(), "user", lr=0.01, **kwargs)
            for p, q in zip(nets[k].parameters(), twin.parameters()):
                mine, theirs = opts[k].state.get(p, {}), fresh.state.get(q, {})
                assert sorted(mine) == sorted(theirs), cls.__name__
                assert all(torch.equal(mine[key], theirs[key]) for key in mine), cls.__name__
            for model, opt in ((nets[k], opts[k]), (twin, fresh)):
                torch.manual_seed(7)
                opt.zero_grad()
                model(torch.randn(4, 8)).square().mean().backward()
                opt.step()
            assert max_diff(snapshot(nets[k]), snapshot(twin)) == 0.0, cls.__name__
    # a torch base that cannot be built over the groups is an error that names the user's class
    net = ToyNet()
    odd = torch.optim.SGD(net.parameters(), lr=0.01)
    odd.defaults["momentum"] = -1.0  # as a subclass's own bookkeeping might leave it
    with pytest.raises(ValueError, match=r"cannot tell what a fresh SGD holds: .*HINT: use optimizer_state="):
        fresh_optimizer_state([odd])


# ---------------------------------------------------------------- 4.12: a changed H is said
def test_resuming_with_another_constant_sync_every_logs_one_line_saying_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def driver(every: int) -> LocalSGD:
        torch.manual_seed(0)
        nets = [ToyNet() for _ in range(K)]
        opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
        return LocalSGD(nets, opts, sync_every=every, comm=InProcessCommunicator(K))

    first = driver(2)
    for net, opt in zip(first.models, [o[0] for o in first.optimizers]):
        train_step(net, opt, toy_batches(0, 1)[0])
    first.after_step()
    saved = first.sync_state_dict()
    with caplog.at_level(logging.INFO, logger="localsgd"):
        driver(2).load_sync_state_dict(saved)
        assert not caplog.records  # the same H: nothing to say
        driver(4).load_sync_state_dict(saved)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, caplog.text
    assert lines[0].getMessage() == (
        "resumed with sync_every=4; the checkpoint was written with 2: rounds from here have 4 steps"
    )


# ---------------------------------------------------------------- 4.9: a load error keeps its cause
class _Moved:
    """An object of a class whose module is gone by the time the file is read (code that changed
    between saving and loading)."""


def _save_with_a_moved_class(obj: dict[str, Any], path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = types.ModuleType("localsgd_gone")
    _Moved.__module__ = gone.__name__
    gone._Moved = _Moved  # type: ignore[attr-defined]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, gone.__name__, gone)
        torch.save({**obj, "moved": _Moved()}, path)


def test_a_load_error_says_truncated_only_for_a_broken_file_and_keeps_any_other_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=3)
    trainer.fit(ToyModule())
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    data = good.read_bytes()

    def resume(name: str, content: bytes | None = None, weights_only: bool | None = None) -> None:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        shutil.copytree(tmp_path / "good.ckpt.ranks", tmp_path / f"{name}.ranks", dirs_exist_ok=True)
        trainer = make_trainer(LocalSGDStrategy(sync_every=2), max_steps=4)
        trainer.fit(ToyModule(), ckpt_path=str(path), weights_only=weights_only)

    # the main file: cut short is said so; another object, or a class that moved, is said as it is
    with pytest.raises(ValueError, match=r"half.ckpt cannot be read \(truncated, or not a checkpoint\)"):
        resume("half.ckpt", data[: len(data) // 2])
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"list.ckpt holds a list, not a Lightning checkpoint .*HINT"):
        resume("list.ckpt")
    _save_with_a_moved_class(torch.load(good, weights_only=False), tmp_path / "moved.ckpt", monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="localsgd_gone") as err:
        resume("moved.ckpt", weights_only=False)
    assert err.value.__notes__ == [f"while loading checkpoint {tmp_path / 'moved.ckpt'}"]

    # a rank's own state file, the same
    rank0 = Path(rank_file_of(good, 0))
    own = torch.load(rank0, weights_only=False)
    half = tmp_path / "half.pt"
    half.write_bytes(rank0.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"rank 0's state file .*half.pt cannot be read \(truncated"):
        files.load(half, "rank 0's state file")
    torch.save([own], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt holds a list, not a dict of saved state. HINT"):
        files.load(tmp_path / "list.pt", "rank 0's state file")
    _save_with_a_moved_class(own, tmp_path / "moved.pt", monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="localsgd_gone") as err:
        files.load(tmp_path / "moved.pt", "rank 0's state file")
    assert err.value.__notes__ == [f"while loading rank 0's state file {tmp_path / 'moved.pt'}"]


# ---------------------------------------------------------------- 4.8: signal handlers put back
def _handlers_around_fits(rank: int, folder: str) -> dict[str, Any]:
    def sentinel(signum: int, frame: Any) -> None:
        """The user's own handler, set before the fits."""

    watched = (signal.SIGTERM, signal.SIGUSR2)
    for signum in watched:
        signal.signal(signum, sentinel)
    out: dict[str, Any] = {}

    class Look(pl.Callback):
        """What handles each signal during the fit; on rank 0 at ``signal_at``, SIGUSR2."""

        def __init__(self, name: str, signal_at: int | None = None) -> None:
            self.name, self.signal_at = name, signal_at

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            during = {s.name: getattr(signal.getsignal(s), "__qualname__", "?") for s in watched}
            out.setdefault(f"{self.name} during", during)
            if rank == 0 and trainer.global_step == self.signal_at:
                os.kill(os.getpid(), signal.SIGUSR2)

    def after(name: str) -> None:
        out[f"{name} after"] = {s.name: signal.getsignal(s) is sentinel for s in watched}

    for name, signal_at in (("finished", None), ("preempted", 1)):
        strategy = LocalSGDStrategy(sync_every=2, timeout=TIMEOUT)
        saver = PreemptionCheckpoint(dirpath=Path(folder) / name)
        trainer = make_trainer(strategy, max_steps=6, callbacks=[Look(name, signal_at), saver])
        try:
            trainer.fit(ToyModule())
        except Preempted:
            out[f"{name} raised"] = True
        after(name)
    return out


@pytest.mark.distributed
def test_the_users_sigterm_and_sigusr2_handlers_are_back_after_a_fit_however_it_ends(tmp_path: Path) -> None:
    for r in run(_handlers_around_fits, 2, str(tmp_path)):
        for name in ("finished", "preempted"):
            # the strategy's SIGTERM handler (2 processes) and the callback's were in during the fit
            assert r[f"{name} during"] == {
                "SIGTERM": "install_sigterm_handler.<locals>.on_sigterm",
                "SIGUSR2": "PreemptionCheckpoint._on_signal",
            }, r
            assert r[f"{name} after"] == {"SIGTERM": True, "SIGUSR2": True}, (name, r)
        assert r.get("preempted raised") and not r.get("finished raised"), r


# ---------------------------------------------------------------- 4.7: unused parameters as DDP
class _Partly(nn.Module):
    """One layer every worker uses, one that rank 0 alone uses, one that no worker uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used, self.rank0_only, self.unused = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        y = self.used(x)
        return y + self.rank0_only(x) if rank == 0 else y


def _unused_parameters(rank: int) -> dict[str, Any]:
    dist.init_process_group("gloo", timeout=TIMEOUT)
    batches = toy_batches(rank, 4)
    out: dict[str, Any] = {"init": snapshot(_Partly())}
    for name in ("localsgd", "ddp"):
        net = _Partly()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        if name == "ddp":
            model: Any = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x, rank), y).backward()
                opt.step()
        else:
            with LocalSGD(net, opt, sync_every=1, h1_sync="gradients", comm=ProcessGroupCommunicator()):
                for x, y in batches:
                    opt.zero_grad()
                    F.cross_entropy(net(x, rank), y).backward()
                    opt.step()
        out[name] = snapshot(net)
    return out


@pytest.mark.distributed
def test_a_parameter_no_worker_used_keeps_no_gradient_through_a_gradient_round_as_with_ddp() -> None:
    for r in run(_unused_parameters, 2):
        for key in ("unused.weight", "unused.bias"):
            # no gradient on any worker: weight decay and momentum must not move it (DDP leaves None)
            assert torch.equal(r["localsgd"][key], r["init"][key]), key
        # used on rank 0 only: both ranks step with the mean of rank 0's gradient and rank 1's zeros
        assert max_diff(r["localsgd"], r["ddp"]) <= 1e-6
        assert max_diff(r["localsgd"], r["init"]) > 1e-3  # it trained


# ---------------------------------------------------------------- 4.3: the user's group is theirs
_PLAIN_LOOP = """
import atexit, os, sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
dist.init_process_group("gloo")

def at_exit():  # the user's own exit code, registered first: it runs after any the library adds
    alive = dist.is_initialized()
    print("initialized at exit:", alive, flush=True)
    if alive:  # the user's group, destroyed by its user; together, as a careful user leaves: a rank
        dist.barrier()  # that destroys it while its peer's gloo threads still talk can abort the peer
        dist.destroy_process_group()

atexit.register(at_exit)
from common import ToyNet, make_optimizer, toy_batches, train_step
from localsgd import LocalSGD
rank = dist.get_rank()
torch.manual_seed(0)
net = ToyNet()
opt = make_optimizer(net.parameters(), 0.1, 0.9, 1e-3)
with LocalSGD(net, opt, sync_every=2, sync_delay=1):  # background rounds too
    for batch in toy_batches(rank, 7):
        train_step(net, opt, batch)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_process_group_the_user_created_is_still_theirs_at_exit() -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PLAIN_LOOP],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(r)},
        )
        for r in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "done" in out and "initialized at exit: True" in out, out
