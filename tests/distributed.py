"""Run a function on several gloo processes on CPU, as Lightning's external launchers do.

Each process gets the environment torchrun would give it (so Lightning sees an externally
launched job and creates no processes of its own), runs ``fn(rank, *args)`` and saves the
result; the parent returns the results in rank order. A failing rank fails the test with
its traceback.

The processes come from a fork server that has imported torch, Lightning and localsgd once
(multiprocessing's ``forkserver`` start method with a preload list), so a test pays a fork,
not a fresh interpreter importing them again: the distributed tests ran about 8x faster than
with ``spawn``. A forked child starts from the server's state, not the test's, so the test's
environment and working directory travel with each call.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# imported once by the fork server; nothing in them starts a thread or a process group at import
PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning.fabric", "localsgd", "common"]
multiprocessing.set_forkserver_preload(PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    nodes: int,
    port: int,
    out: str,
    env: dict[str, str],
    cwd: str,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    per_node = world_size // nodes
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_WORLD_SIZE=str(per_node),
        NODE_RANK=str(rank // per_node),
        GROUP_RANK=str(rank // per_node),
        TEST_NUM_NODES=str(nodes),
        # Lightning deletes WORLD_SIZE when a fit tears down; tests read this one
        TEST_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    result = fn(rank, *args)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # leave together, with the process group torn down: a rank that exits while its peer's gloo
    # threads still talk to it can abort the peer ("terminate called without an active exception")
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
            dist.destroy_process_group()


def run(fn: Callable[..., Any], world_size: int, *args: Any, nodes: int = 1) -> list[Any]:
    """``[fn(0, *args), ..., fn(world_size - 1, *args)]``, each computed in its own process;
    ``nodes`` > 1 splits the ranks into that many simulated nodes (consecutive ranks)."""
    assert world_size % nodes == 0
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry,
            args=(world_size, nodes, free_port(), out, dict(os.environ), os.getcwd(), fn, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
