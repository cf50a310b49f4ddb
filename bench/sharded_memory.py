"""Benchmark: what one process holds when its worker is sharded over S processes (FSDP2).

K = 2 workers of S processes each (``S`` in ``--shards``, a ``("replicate", "shard")`` mesh over
2 x S gloo processes) train an MLP with AdamW under ``LocalSGD(..., mesh=mesh)`` and DiLoCo as
the outer optimizer, with an int8 wire and error feedback (so that every kind of state the sync
keeps exists), for two rounds. Then each process counts the bytes of the tensors it holds:

* ``params``: its shards of the parameters (a DTensor's local tensor);
* ``optimizer``: the AdamW state of those shards;
* ``outer``: the outer optimizer's anchor (the global model) and momentum, and the
  error-feedback residuals of the wire;
* ``bucket``: the flat copy of its shards a sharded round works on (FSDP2 owns the shards'
  storage, so they are copied in and out around a round; unsharded buckets are the parameters
  themselves).

The unsharded row is today's one-process worker (``LocalSGD(model, opt)`` over 2 processes).
Target: ``params + optimizer + outer`` at S within 1.1x of the unsharded row's / S (the largest
over a worker's processes, so uneven shards count), plus one bucket.

Run:  python bench/sharded_memory.py [--shards 1 2 4] [--quick] [--out PATH]
(about 30 s on 2 cores; JSON to bench/results/sharded_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from averaging import free_port
from torch import Tensor, nn

from localsgd import DiLoCo, LocalSGD

K, H, ROUNDS = 2, 4, 2
TARGET = 1.10
WIDTH = {"full": 512, "quick": 128}


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))  # 10 rows: uneven shards at S = 4


def local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, Tensor):
            with torch.no_grad():
                local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def held(net: nn.Module, opt: torch.optim.Optimizer, driver: LocalSGD) -> dict[str, int]:
    outer = driver.options.outer_optimizer
    assert outer is not None and outer.optimizer is not None
    wire = driver.wire
    assert wire is not None
    residuals = [t for ts in wire.residuals.values() for t in ts] + list(wire.shard_residuals.values())
    copied = driver.averager.worker_flats()[0] if driver.sharded else []
    return {
        "params": local_bytes(net.parameters()),
        "optimizer": local_bytes(v for state in opt.state.values() for v in state.values()),
        "outer": local_bytes(outer.anchors)
        + local_bytes(v for state in outer.optimizer.state.values() for v in state.values())
        + local_bytes(residuals),
        "bucket": local_bytes(copied),
    }


def worker(rank: int, world: int, shards: int, port: int, width: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = make_model(width)
    mesh = None
    if shards:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (K, shards), mesh_dim_names=("replicate", "shard"))
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["shard"])
        fully_shard(net, mesh=mesh["shard"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    options: dict[str, Any] = dict(outer_optimizer=DiLoCo(), wire="int8", error_feedback=True)
    g = torch.Generator().manual_seed(rank)
    with LocalSGD(net, opt, sync_every=H, mesh=mesh, **options) as driver:
        for _ in range(H * ROUNDS):
            x = torch.randn(8, width, generator=g)
            nn.functional.cross_entropy(net(x), torch.randint(0, 10, (8,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
        counts = held(net, opt, driver)
    every = [None] * world
    dist.all_gather_object(every, counts)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def measure(shards: int, width: int, tmp: Path) -> dict[str, int]:
    """The largest count over the processes (0 shards: unsharded, one process per worker)."""
    world = K * max(shards, 1)
    out = tmp / f"s{shards}.json"
    args = (world, shards, free_port(), width, str(out))
    mp.start_processes(worker, args=args, nprocs=world, start_method="spawn")
    every = json.loads(out.read_text())
    return {key: max(c[key] for c in every) for key in every[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="S values to measure")
    parser.add_argument("--quick", action="store_true", help="a 4x narrower model (CI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sharded_memory.json")
    args = parser.parse_args()
    width = WIDTH["quick" if args.quick else "full"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.parent
    base = measure(0, width, tmp)
    state = base["params"] + base["optimizer"] + base["outer"]
    rows = [dict(shards="unsharded", **base, ratio=1.0, ok=True)]
    for s in args.shards:
        c = measure(s, width, tmp)
        ratio = (c["params"] + c["optimizer"] + c["outer"]) / (state / s)
        rows.append(dict(shards=s, **c, ratio=ratio, ok=ratio <= TARGET))
    header = f"{'S':>9} {'params':>10} {'optimizer':>10} {'outer':>10} {'bucket':>10}  {'x (1/S)':>8}"
    print(header, "-" * len(header), sep="\n")
    for r in rows:
        print(
            f"{r['shards']!s:>9} {r['params']:>10,} {r['optimizer']:>10,} {r['outer']:>10,} "
            f"{r['bucket']:>10,}  {r['ratio']:>8.3f}{'' if r['ok'] else '  MISSED'}"
        )
    print(f"bytes per process (a worker's largest); target: params + optimizer + outer <= {TARGET}x 1/S")
    result = dict(
        torch=torch.__version__,
        command=" ".join([sys.executable, *sys.argv]),
        workers=K,
        width=width,
        options="AdamW inner, DiLoCo outer, wire int8 + error feedback",
        target=TARGET,
        rows=rows,
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
