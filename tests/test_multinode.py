"""launch/torchrun.sh on two emulated nodes: two network namespaces joined by a veth pair
(bench/netns.py), one torchrun per namespace with static rendezvous, gloo on the veth. Needs
root and iproute2 (CI has both); skipped with the reason elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from netns import TwoNodes, Unavailable, check_available  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture()
def nodes() -> TwoNodes:
    try:
        check_available()
    except Unavailable as why:
        pytest.skip(f"two emulated nodes need network namespaces: {why}")
    with TwoNodes(prefix="lsgdt") as two:
        yield two


def _two_node_fit(nodes: TwoNodes, tmp_path: Path, per_node: int, extra: list[str]) -> list[dict]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT / "tests"),
        GLOO_SOCKET_IFNAME="veth0",  # gloo talks over the emulated link, not the loopback
        NNODES="2",
        NPROC_PER_NODE=str(per_node),
        MASTER_ADDR=nodes.addresses[0],
        MASTER_PORT="29531",
    )
    args = [
        "bash", str(ROOT / "launch/torchrun.sh"), str(ROOT / "configs/quickstart.yaml"),
        "--trainer.max_steps=16", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=launch_helpers.DumpState", f"--trainer.callbacks.folder={tmp_path}/state",
        *extra,
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            nodes.command(node, args),
            env={**env, "NODE_RANK": str(node)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    world = 2 * per_node
    return [torch.load(tmp_path / "state" / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _equal(ranks: list[dict]) -> None:
    first = ranks[0]["state"]
    for other in ranks[1:]:
        assert all(torch.equal(first[k], other["state"][k]) for k in first)


def test_two_nodes_of_one_process_train_as_one_job(nodes: TwoNodes, tmp_path: Path) -> None:
    ranks = _two_node_fit(nodes, tmp_path, per_node=1, extra=[])
    _equal(ranks)  # quickstart.yaml: H = 8, so step 16 is a sync
    for r in ranks:
        assert r["step"] == 16 and r["metrics"]["comm/rounds"] == 16 // 8


def test_two_nodes_of_two_processes_average_inside_a_node_often_and_across_rarely(
    nodes: TwoNodes, tmp_path: Path
) -> None:
    hierarchical = [
        "--trainer.strategy.init_args.sync_every=localsgd.Hierarchical",
        "--trainer.strategy.init_args.sync_every.inner=2",
        "--trainer.strategy.init_args.sync_every.outer=8",
    ]
    ranks = _two_node_fit(nodes, tmp_path, per_node=2, extra=hierarchical)
    _equal(ranks)  # step 16 is an outer sync
    for r in ranks:
        # steps 2, 4, 6, 10, 12, 14 inside each node; 8 and 16 across both
        assert r["metrics"]["comm/inner_rounds"] == 6 and r["metrics"]["comm/outer_rounds"] == 2
