"""Fault tolerance through torchft: a lost replica group is restarted by its launcher and heals
from a live one; the others never stop (localsgd.ft, localsgd.core.elastic)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import localsgd
from localsgd.core.comm import InProcessCommunicator, RoundFailed
from localsgd.core.control import ControlMessage
from localsgd.ft import FaultTolerance

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "examples")]
from lost_worker import lighthouse, read_records, run_groups  # noqa: E402
from problem import model as example_model  # noqa: E402

STEPS, H, KILL_AT = 160, 4, 38  # 40 rounds; the kill is mid-round 10 (steps 37..40)
needs_torchft = pytest.mark.skipif(importlib.util.find_spec("torchft") is None, reason="needs localsgd[ft]")


# ---------------------------------------------------------------------- the configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replica_group": -1, "num_replica_groups": 2}, r"replica_group \(-1\) must be an integer >= 0"),
        ({"replica_group": 2, "num_replica_groups": 2}, r"replica_group \(2\) must be < num_replica_groups"),
        ({"replica_group": 0, "num_replica_groups": 0}, r"num_replica_groups \(0\) must be an integer >= 1"),
        ({"replica_group": 0, "num_replica_groups": 2, "min_replicas": 3}, r"min_replicas \(3\) must be <="),
        ({"replica_group": 0, "num_replica_groups": 2, "timeout": 0}, r"timeout \(0\) must be a number of"),
        ({"replica_group": 0, "num_replica_groups": 2, "lighthouse": ""}, r"lighthouse \(''\) must be an"),
    ],
)
def test_bad_fault_tolerance_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultTolerance(**kwargs)


def test_from_env_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    monkeypatch.setenv("NUM_REPLICA_GROUPS", "3")
    with pytest.raises(ValueError, match=r"replica_group: not given, and \$REPLICA_GROUP_ID is not set"):
        FaultTolerance.from_env()
    monkeypatch.setenv("REPLICA_GROUP_ID", "two")
    with pytest.raises(ValueError, match=r"\$REPLICA_GROUP_ID \('two'\) must be an integer"):
        FaultTolerance.from_env()
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    assert FaultTolerance.from_env(min_replicas=2) == FaultTolerance(
        replica_group=2, num_replica_groups=3, min_replicas=2
    )


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchft" else real(name, *a)
    )
    ft = FaultTolerance(replica_group=0, num_replica_groups=2)
    with pytest.raises(ImportError, match=r"fault_tolerance needs torchft.*pip install 'localsgd\[ft\]'"):
        localsgd.LocalSGDStrategy(fault_tolerance=ft)


@needs_torchft
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sync_delay": 2}, "sync_delay"),
        ({"num_fragments": 2}, "num_fragments"),
        ({"wire": "int8", "outer_optimizer": localsgd.DiLoCo()}, "wire"),
        ({"workers_per_device": 2}, "workers_per_device"),
        ({"optimizer_state": "average"}, "optimizer_state"),
        ({"h1_sync": "gradients"}, "h1_sync"),
        ({"sync_every": localsgd.Hierarchical(inner=2, outer=4)}, "Hierarchical"),
        ({"sync_every": localsgd.PostLocal(8, switch_step=16)}, "PostLocal"),
    ],
)
def test_unsupported_options_are_named(kwargs: dict[str, Any], name: str) -> None:
    ft = FaultTolerance(replica_group=0, num_replica_groups=2)
    with pytest.raises(ValueError, match=rf"fault tolerance with .*{name}"):
        localsgd.LocalSGDStrategy(fault_tolerance=ft, **kwargs)
    with pytest.raises(ValueError, match="fault_tolerance"):
        localsgd.LocalSGDStrategy(fault_tolerance={"replica_group": 0})


# ---------------------------------------------------------------------- the rounds, in one process
def test_control_message_marks_absent_workers_apart_from_nonfinite() -> None:
    comm = InProcessCommunicator(2)
    nan = [torch.tensor([float("nan")]), torch.zeros(1)]
    message = ControlMessage(comm, [[nan[0]], [nan[1]]], 5, nonfinite="raise")
    message.start()
    assert message.read()[0] == [0] and message.absent == []
    message = ControlMessage(comm, [[nan[0]], [nan[1]]], 5, nonfinite="raise", absent=True)
    message.start()
    assert message.read()[0] == [] and message.absent == [0, 1]


class FlakyElastic(InProcessCommunicator):
    """One worker behind an elastic interface whose collectives fail in the rounds named."""

    elastic = True

    def __init__(self, failing: set[int]) -> None:
        super().__init__(1)
        self.failing, self.begun = failing, 0

    def begin_round(self) -> None:
        self.begun += 1  # the driver's join is round 1

    def _all_reduce(self, tensors: Any, op: Any) -> None:
        if self.begun in self.failing and op != "max":
            raise RoundFailed("a peer was lost")
        super()._all_reduce(tensors, op)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("fails", [True, False])
def test_a_failed_round_keeps_every_model_and_the_outer_state(fails: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = FlakyElastic({3} if fails else set())  # round 3: the sync at step 4
    driver = localsgd.LocalSGD(
        model, opt, sync_every=2, outer_optimizer=localsgd.DiLoCo(), comm=comm, hook=False
    )
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for step in range(1, 7):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        before, anchors = _flat(model), [a.clone() for a in driver.averager.outer.anchors]
        driver.after_step()
        if step == 4:
            kept = torch.equal(_flat(model), before)
            assert kept == fails  # skipped: the worker's own model, not the outer step's result
            assert all(torch.equal(a, b) for a, b in zip(anchors, driver.averager.outer.anchors)) == fails
            assert driver.dirty == fails
            assert driver.metrics()["ft/skipped_rounds"] == int(fails)
    assert not driver.dirty  # the round at step 6 committed
    assert driver.metrics()["comm/rounds"] == 3  # a skipped round counts too: it sent what it could


# ---------------------------------------------------------------------- replica groups, with a fault
def _check_fault_run(records: dict[str, Any], groups: int, nproc: int, kill_at: int, in_sync: bool) -> None:
    logs = records["logs"]
    loss = -(-kill_at // H) * H  # the first sync after the kill (in_sync: the one it interrupted)
    for g in range(groups):
        for r in range(nproc):
            name = f"g{g}.r{r}"
            steps = lambda rows: [row["step"] for row in rows if row["event"] == "step"]  # noqa: E731
            if g == 1:  # killed in its first incarnation, restarted once by torchrun
                assert steps(logs[f"{name}.a0"])[-1] == kill_at - in_sync
                joined, *rows = logs[f"{name}.a1"]
                assert joined["event"] == "joined" and joined["healed_at"] == joined["step"] > kill_at
                assert steps(rows) == list(range(joined["step"] + 1, STEPS + 1))
                assert f"{name}.a2" not in logs
                continue
            assert f"{name}.a1" not in logs  # never restarted
            rows = [row for row in logs[f"{name}.a0"] if row["event"] == "step"]
            assert steps(rows) == list(range(1, STEPS + 1))  # a continuous step counter
            assert len({row["pid"] for row in rows}) == 1
            first = loss + H * in_sync  # a failed round still had the lost group in its quorum
            during = {row["participants"] for row in rows if first <= row["step"] < first + 2 * H}
            assert during == {groups - 1}, during  # the rounds after the loss, without the lost group
            assert rows[-1]["participants"] == groups  # the restarted group is back
            # a group lost inside a sync's all-reduce fails that round everywhere: skipped, not fatal
            assert {row["skipped"] for row in rows if row["step"] >= loss} == {int(in_sync)}
    finals = list(records["final"].items())
    assert len(finals) == groups * nproc
    for name, state in finals[1:]:
        for key, value in state.items():
            assert torch.equal(value, finals[0][1][key]), (name, key)


@pytest.mark.slow
@needs_torchft
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("groups", "nproc", "extra"),
    [(3, 1, []), (3, 1, ["--diloco"]), (2, 2, []), (3, 1, ["--kill-in-sync"])],
    ids=["avg", "diloco", "2x2", "in-sync"],
)
def test_a_lost_group_heals_and_every_group_ends_bitwise_equal(
    tmp_path: Path, groups: int, nproc: int, extra: list[str]
) -> None:
    in_sync = "--kill-in-sync" in extra
    kill_at = 40 if in_sync else KILL_AT  # in_sync: inside the sync at the end of round 10
    args = [
        "--steps",
        str(STEPS),
        "--sync-every",
        str(H),
        "--kill-at",
        str(kill_at),
        "--sleep",
        "0.1",
        *extra,
    ]
    records = run_groups(tmp_path, groups=groups, nproc=nproc, args=args)
    _check_fault_run(records, groups, nproc, kill_at, in_sync)


@pytest.mark.slow
@needs_torchft
@pytest.mark.distributed
def test_without_faults_equals_ordinary_processes(tmp_path: Path) -> None:
    args = ["--steps", str(STEPS), "--sync-every", str(H)]
    ft = run_groups(tmp_path / "ft", groups=3, args=args)["final"]
    env = {k: v for k, v in os.environ.items() if k not in ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    command += [str(ROOT / "examples" / "fault_tolerant.py"), "--record", str(tmp_path / "plain"), *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, initial = read_records(tmp_path / "plain")["final"], example_model().state_dict()
    assert sorted(plain) == ["r0", "r1", "r2"] and sorted(ft) == ["g0.r0", "g1.r0", "g2.r0"]
    for key, value in plain["r0"].items():
        assert not torch.equal(value, initial[key])  # it trained
        for name in ft:
            assert torch.allclose(ft[name][key], value, rtol=0, atol=1e-6), (name, key)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "usage: .*lighthouse .* group NPROC SCRIPT"),
        (["group", "1", "examples/fault_tolerant.py"], {}, r"group: set REPLICA_GROUP_ID"),
        (
            ["group", "0", "examples/fault_tolerant.py"],
            {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "2", "TORCHFT_LIGHTHOUSE": "http://x:1"},
            r"NPROC \(0\) must be an integer >= 1",
        ),
        (
            ["group", "1", "missing.py"],
            {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "2", "TORCHFT_LIGHTHOUSE": "http://x:1"},
            r"SCRIPT \(missing.py\) is not a file",
        ),
        (["lighthouse"], {"MIN_REPLICAS": "none"}, r"MIN_REPLICAS \(none\) must be an integer >= 1"),
        (["demo", "zero", "examples/fault_tolerant.py"], {}, r"K \(zero\) must be an integer >= 1"),
    ],
)
def test_launch_script_names_what_is_wrong(args: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS")}
    clean.pop("TORCHFT_LIGHTHOUSE", None)
    clean["PYTHON"] = sys.executable  # this interpreter, not whatever ./.venv holds
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "ft.sh"), *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


_PLAIN_GROUP = """
import os, sys, torch
from torch import nn
import localsgd
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
comm = localsgd.FaultTolerantCommunicator(localsgd.FaultTolerance.from_env(timeout=30.0))
schedule = localsgd.QSR(4, 0.2)  # H = max(4, (0.2 / 0.1)^2) = 4 at this lr
with localsgd.LocalSGD(model, opt, sync_every=schedule, outer_optimizer=localsgd.DiLoCo(), comm=comm) as ls:
    group = comm.config.replica_group
    for step in range(32):
        g = torch.Generator().manual_seed(1000 * group + step)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
print("rounds", ls.metrics()["comm/rounds"], "participants", ls.metrics()["ft/participants"])
torch.save(model.state_dict(), sys.argv[1])
comm.close()
"""


@pytest.mark.slow
@needs_torchft
@pytest.mark.distributed
def test_a_plain_loop_runs_fault_tolerant_rounds_with_a_schedule_and_diloco(tmp_path: Path) -> None:
    with lighthouse() as address:
        procs = []
        for g in range(2):
            env = {**os.environ, "TORCHFT_LIGHTHOUSE": address, "NUM_REPLICA_GROUPS": "2"}
            env["REPLICA_GROUP_ID"] = str(g)
            for key in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
                env.pop(key, None)
            command = [sys.executable, "-c", _PLAIN_GROUP, str(tmp_path / f"g{g}.pt")]
            procs.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "rounds 8 participants 2" in out, out  # 32 steps / H = 4, both groups in every round
    finals = [torch.load(tmp_path / f"g{g}.pt") for g in range(2)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert not torch.equal(finals[0]["0.weight"], (torch.manual_seed(0), nn.Linear(8, 16))[1].weight)


def test_launch_script_refuses_an_interpreter_without_localsgd(tmp_path: Path) -> None:
    """No PYTHON, no ./.venv and a python3 without localsgd: ft.sh says so instead of starting
    groups (or a Lighthouse) that fail later with a connection timeout."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "ft.sh").write_text((ROOT / "launch" / "ft.sh").read_text())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert subprocess.run(["python3", "-c", "import localsgd"], env=env, capture_output=True).returncode != 0
    proc = subprocess.run(
        ["bash", str(tmp_path / "launch" / "ft.sh"), "lighthouse"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no interpreter with localsgd installed" in proc.stderr and "HINT: set PYTHON=" in proc.stderr


def test_a_lighthouse_that_cannot_start_fails_at_once_with_its_own_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PYTHON names an environment without torchft: the helper raises with the launch script's
    message within seconds, not a client's 30 s connection timeout later."""
    monkeypatch.setenv("PYTHON", "/usr/bin/python3")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="torchft_lighthouse is not installed"), lighthouse():
        pass
    assert time.monotonic() - start < 15
