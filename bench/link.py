"""Benchmark: Local SGD against synchronous SGD on two emulated nodes joined by a slow link.

Two network namespaces joined by a veth pair (bench/netns.py), the link limited with
``tc tbf`` on both ends; one worker process per namespace, launched as a 2-node job (Lightning's
environment variables, ``num_nodes=2``), gloo bound to the veth (``GLOO_SOCKET_IFNAME``). The
workload is what users run: the project's CIFAR ResNet-56 (0.85M parameters) on synthetic
3x32x32 inputs, local batch 16, one thread per process, trained through the real
``LocalSGDStrategy`` / ``SGDBaselineStrategy`` under Lightning (its per-step overhead included).

Rows: no communication (the limit: the same strategy with no sync in the run), the SGD baseline
(DDP), Local SGD H = 1, 4, 16, 64, DiLoCo H = 16, and H = 16 with a compressed wire (bf16,
int8, int8 with error feedback), overlapped (``sync_delay``), streamed in 4 fragments
(``num_fragments=4``) and combinations of them, and H = 16 over sharded workers (``H=16 sharded
S=2``: each node runs one worker as 2 processes sharding the model with FSDP2,
``shards_per_worker=2``; the cell is that worker's samples/s); ``--rows H=16`` runs those with the
limit. Columns:
unthrottled, 1 Gbit/s, 100 Mbit/s, 10 Mbit/s. A cell is samples/s per worker: the median, over
windows of whole rounds after the first ones, of the window's throughput, and its ratio to the
column's limit. Beside it, the cost
model of blocking Local SGD, ``t_step / (t_step + t_allreduce / H)``, with ``t_step`` the limit's
step time and ``t_allreduce`` a raw all-reduce of the model's bytes across the same link, both
measured in this run. The rows of a column run one after another, so that the machine's drift
hits them alike. ``--straggler``: one worker's step also sleeps a seeded random 0 to 1x its
compute time, unthrottled: DDP pays every step's worst case, Local SGD each round's.

Run as root:  python bench/link.py            (about 35 minutes on 2 cores; --quick: 1 minute)
Writes bench/results/link.json: one record per cell (method, H, rate_mbit, samples_per_s,
ratio_to_limit, predicted_ratio, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from netns import IFNAME, TwoNodes, Unavailable, check_available  # noqa: E402

BATCH = 16
RATES: list[float | None] = [None, 1000, 100, 10]
# (name, H: None for the baseline, variant: a key of VARIANTS)
ROWS: list[tuple[str, int | None, str | None]] = [
    ("no communication", 0, None),
    ("SGD baseline (DDP)", None, None),
    ("Local SGD H=1", 1, None),
    ("Local SGD H=4", 4, None),
    ("Local SGD H=16", 16, None),
    ("Local SGD H=64", 64, None),
    ("DiLoCo H=16", 16, "diloco"),
    ("H=16 wire=bf16", 16, "bf16"),
    ("H=16 wire=int8", 16, "int8"),
    ("H=16 int8 + EF", 16, "int8+ef"),
    ("H=16 sync_delay=8", 16, "delay8"),
    ("H=16 sync_delay=15", 16, "delay15"),
    ("H=16 F=4", 16, "F4"),
    ("H=16 F=4 sync_delay=3", 16, "F4+delay3"),
    ("H=16 int8+EF delay=8", 16, "int8+ef+delay8"),
    ("H=16 int8+EF delay=15", 16, "int8+ef+delay15"),
    ("H=16 int8+EF F=4 delay=3", 16, "int8+ef+F4+delay3"),
    ("H=16 sharded S=2", 16, "sharded2"),
]
_INT8_EF = {"wire": "int8", "error_feedback": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": {"wire": "bf16"},
    "int8": {"wire": "int8"},
    "int8+ef": _INT8_EF,
    "delay8": {"sync_delay": 8},
    "delay15": {"sync_delay": 15},
    "F4": {"num_fragments": 4},
    "sharded2": {"shards_per_worker": 2},  # 2 processes per node shard one worker's model
    "F4+delay3": {"num_fragments": 4, "sync_delay": 3},
    "int8+ef+delay8": _INT8_EF | {"sync_delay": 8},
    "int8+ef+delay15": _INT8_EF | {"sync_delay": 15},
    "int8+ef+F4+delay3": _INT8_EF | {"num_fragments": 4, "sync_delay": 3},
}
"""The strategy's arguments of each variant (DiLoCo's outer optimizer is built in the worker)."""


# ---------------------------------------------------------------------------- one worker
def _worker(spec: dict[str, Any]) -> None:
    """One rank of a 2-node job: train, time every step, then time a raw all-reduce of the model."""
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from localsgd import DiLoCo, LocalSGDStrategy, SGDBaselineStrategy
    from localsgd.core.schedules import Constant
    from localsgd.research.models import resnet

    torch.set_num_threads(1)
    rank = spec["rank"]

    class Synthetic(Dataset):
        """Images made from their index: no data to load, and each rank its own (sampler shards)."""

        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int) -> tuple[Any, int]:
            g = torch.Generator().manual_seed(i)
            return torch.randn(3, 32, 32, generator=g), i % 10

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = resnet(56, num_classes=10)

        def configure_model(self) -> None:
            if self.device_mesh is None:  # one process per worker
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["shard"]
            for child in self.net.children():  # each stage its own FSDP unit, then the root
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)

        def train_dataloader(self) -> Any:
            return DataLoader(Synthetic(), batch_size=BATCH, shuffle=False)

    times: list[float] = []
    straggle = random.Random(1234 + rank)

    class Timer(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter())

        def on_before_optimizer_step(self, *args: Any) -> None:
            if spec["straggler"] and rank == 1:  # the slow worker: up to 1x its compute time more
                time.sleep(straggle.random() * spec["t_compute"])

    H = spec["H"]
    if H is None:
        strategy: Any = SGDBaselineStrategy(process_group_backend="gloo")
    else:
        paired = spec["paired"]  # blocks of steps: no sync in the even ones, every H in the odd ones

        def block_of(step: int) -> int:
            return (step - 1 - paired["first"]) // paired["block"]

        def sync_every(step: int, lr: float) -> bool:
            return H > 0 and step > paired["first"] and block_of(step) % 2 == 1 and step % H == 0

        class Paired(Constant):
            """H steps per round in the odd blocks only; fragment f is asked at step + f * H / F,
            so a round counts only where every fragment's own step lies in the same odd block."""

            def should_sync(self, step: int, lr: float) -> bool:
                return sync_every(step, lr) and block_of(step - (H - H // 4)) == block_of(step)

        variant = VARIANTS.get(spec["outer"] or "", {})
        strategy = LocalSGDStrategy(
            sync_every=Paired(H) if "num_fragments" in variant else sync_every,
            outer_optimizer=DiLoCo() if spec["outer"] == "diloco" else None,
            process_group_backend="gloo",
            **variant,
        )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=spec["per_node"],
        num_nodes=2,
        strategy=strategy,
        max_steps=spec["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    module = Net()
    # how a sync's time splits: the control message (waiting for the peer), blocking rounds,
    # and an overlapped round's start (snapshot, collective started) and landing (wait, apply)
    # the round's stages (localsgd.core.rounds): agree, reduce (an overlapped round: its start),
    # wait (its landing), outer_step, and the background collectives
    parts = ("agree", "reduce", "wait", "outer_step", "comm.all_reduce_start_")
    sync_parts: dict[str, list[float]] = {name: [] for name in parts}
    if H:

        class Timed(pl.Callback):
            def on_train_start(self, trainer: Any, *args: Any) -> None:
                kind = trainer.strategy.driver.rounds  # the kind of round this run's syncs take
                for name in sync_parts:
                    owner = kind.comm if name.startswith("comm.") else kind
                    inner = getattr(owner, name.removeprefix("comm."))

                    def timed(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
                        start = time.perf_counter()
                        try:
                            return _inner(*a, **k)
                        finally:
                            sync_parts[_name].append(time.perf_counter() - start)

                    setattr(owner, name.removeprefix("comm."), timed)

        trainer.callbacks.append(Timed())
    trainer.fit(module)
    numel = sum(t.numel() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())
    flat = torch.zeros(numel)
    allreduce = []
    for i in range(6):  # the raw limit: one all-reduce of the model's bytes over the same link
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        if i:
            allreduce.append(time.perf_counter() - start)
    driver = getattr(trainer.strategy, "driver", None)
    rounds = driver.comm.rounds("sync") if driver is not None else 0
    sent = driver.comm.bytes("sync") / rounds if rounds else None  # this process's share, per sync
    out = {"times": times, "allreduce": allreduce, "bytes": 4 * numel, "sync_parts": sync_parts, "sent": sent}
    Path(spec["out"]).write_text(json.dumps(out))
    dist.barrier()  # leave together: a peer's gloo threads must not outlive this process's
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- the grid
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(H: int | None, quick: bool, pairs: int = 2) -> tuple[int, int, int]:
    """(first timed step, block, pairs of blocks). Local SGD runs alternate a block without syncs
    (the limit, in the same processes a moment apart: the machine's drift cancels) with a block
    that syncs every H steps (whole rounds); the baseline times blocks of its own."""
    if H in (None, 1):  # a collective every step: slow on a slow link, steady from the start
        return 8, 8, 2
    if quick:  # checks that it runs: two short pairs
        return 16, max(32, H or 32), 2
    return 32, 32 if H == 4 else max(64, H or 64), pairs


def run_cell(
    nodes: TwoNodes,
    H: int | None,
    outer: str | None,
    *,
    quick: bool,
    straggler: bool,
    t_compute: float,
    pairs: int = 2,
) -> dict[str, Any]:
    first, block, pairs = _plan(H, quick, pairs)
    steps = first + 2 * block * pairs
    port = _free_port()
    per_node = VARIANTS.get(outer or "", {}).get("shards_per_worker", 1)  # processes per node (worker)
    ranks = range(2 * per_node)
    with tempfile.TemporaryDirectory() as folder:
        procs = []
        for rank in ranks:
            node = rank // per_node
            spec = {"rank": rank, "H": H, "outer": outer, "steps": steps, "straggler": straggler}
            spec |= {"t_compute": t_compute, "out": f"{folder}/rank{rank}.json", "per_node": per_node}
            spec |= {"paired": {"first": first, "block": block}}
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TORCHELASTIC"))}
            env.update(
                MASTER_ADDR=nodes.addresses[0], MASTER_PORT=str(port), WORLD_SIZE=str(len(ranks)),
                RANK=str(rank), LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node),
                NODE_RANK=str(node), GROUP_RANK=str(node),
                GLOO_SOCKET_IFNAME=IFNAME, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
            )  # fmt: skip
            argv = [sys.executable, str(BENCH / "link.py"), "--worker", json.dumps(spec)]
            command = nodes.command(node, argv)
            procs.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        logs = [p.communicate(timeout=3600)[0] for p in procs]
        for p, log in zip(procs, logs):
            if p.returncode != 0:
                raise RuntimeError(f"a worker failed (H={H}, rate {nodes.rate_mbit}):\n{log[-3000:]}")
        results = [json.loads(Path(f"{folder}/rank{r}.json").read_text()) for r in ranks]
    rates: dict[str, list[float]] = {"alone": [], "synced": []}
    steps_ms: dict[str, list[float]] = {"alone": [], "synced": []}  # rank 0's median step, per block
    for k in range(2 * pairs):
        start, end = first + k * block, first + (k + 1) * block
        # the job's pace: a block runs from the moment both workers finished the previous one to
        # the moment both finished it (perf_counter is the machine's monotonic clock in every
        # process), so one worker's lead, or its wait at a sync, never counts for either
        began = max(r["times"][start - 1] for r in results)
        ended = max(r["times"][end - 1] for r in results)
        rate = BATCH * per_node * block / (ended - began)  # a worker's samples: all its processes' batches
        kind = "synced" if H is None or (H and k % 2 == 1) else "alone"
        rates[kind].append(rate)
        ticks = results[0]["times"][start - 1 : end]
        steps_ms[kind].append(1e3 * statistics.median(b - a for a, b in itertools.pairwise(ticks)))
    parts = {
        f"rank{r}_{name}_ms": 1e3 * statistics.median(v)
        for r, res in enumerate(results)
        for name, v in res["sync_parts"].items()
        if v
    }
    return {
        "samples_per_s": statistics.median(rates["alone"] if H == 0 else rates["synced"]),
        "alone_samples_per_s": statistics.median(rates["alone"]) if rates["alone"] else None,
        "block_samples_per_s": rates,
        "t_allreduce": statistics.median(results[0]["allreduce"]),
        "bytes": results[0]["bytes"],
        "sent_per_process": results[0]["sent"],
        "processes_per_worker": per_node,
        "steps": steps,
        "sync_parts_ms": parts,
        "median_step_ms": steps_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="2 rows, unthrottled and 100 Mbit/s, short windows"
    )
    parser.add_argument("--straggler", action="store_true", help="also the straggler rows (unthrottled)")
    parser.add_argument("--rates", type=float, nargs="*", help="Mbit/s columns (0 = unthrottled)")
    parser.add_argument(
        "--rows", nargs="*", help="only the rows whose name contains one of these (the limit always runs)"
    )
    parser.add_argument(
        "--pairs", type=int, default=2, help="pairs of blocks (without, with syncs) per Local SGD row"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/link.json")
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    try:
        check_available()
    except Unavailable as why:
        sys.exit(f"bench/link.py: cannot emulate two nodes here: {why}")
    rates = RATES if args.rates is None else [r or None for r in args.rates]
    rows = ROWS
    if args.rows:
        rows = [ROWS[0]] + [r for r in ROWS[1:] if any(part in r[0] for part in args.rows)]
    if args.quick:
        rows = [ROWS[0], ROWS[4]]
        rates = [None, 100] if args.rates is None else rates
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with TwoNodes(prefix="lsgdb") as nodes:
        # each column: the limit (for the baseline, which cannot pause its all-reduce), then its rows;
        # each Local SGD row measures its own limit in alternating blocks of the same run
        grid = [(rate, row, False) for rate in rates for row in rows]
        if args.straggler:  # the limit, the baseline and H = 16, side by side
            grid += [(None, row, True) for row in (ROWS[0], ROWS[1], ROWS[4])]
        limits: dict[tuple[float | None, bool], dict[str, Any]] = {}
        t_compute = 0.13
        for rate, (name, H, outer), straggler in grid:
            if nodes.rate_mbit != rate:
                nodes.set_rate(rate)
            cell = run_cell(
                nodes, H, outer, quick=args.quick, straggler=straggler, t_compute=t_compute, pairs=args.pairs
            )
            if H == 0:
                limits[(rate, straggler)] = cell
                if rate is None and not straggler:
                    t_compute = BATCH / cell["samples_per_s"]  # the straggler's extra: up to this
            # the limit: this run's own blocks without syncs (the baseline: the column's limit run)
            alone = cell["alone_samples_per_s"] or limits[(rate, straggler)]["samples_per_s"]
            t_allreduce = limits[(rate, straggler)]["t_allreduce"]
            t_step = BATCH / alone
            h = H if H is not None else 1
            predicted = 1.0 if H == 0 else t_step / (t_step + t_allreduce / h)
            samples = cell["samples_per_s"]
            record = {
                "method": name,
                "H": H if H != 0 else None,
                "rate_mbit": rate,
                "straggler": straggler,
                "samples_per_s": samples,
                "limit_samples_per_s": alone,
                "ratio_to_limit": samples / alone,
                "predicted_ratio": predicted,
                "of_ceiling": samples / alone / predicted,
                "t_step": t_step,
                "t_allreduce": t_allreduce,
                "model_bytes": cell["bytes"],
                "sent_per_process_per_sync": cell["sent_per_process"],
                "processes_per_worker": cell["processes_per_worker"],
                "steps": cell["steps"],
                "block_samples_per_s": cell["block_samples_per_s"],
                "sync_parts_ms": cell["sync_parts_ms"],
                "median_step_ms": cell["median_step_ms"],
            }
            mode = "straggler " if straggler else ""
            ratio = record["ratio_to_limit"]
            print(
                f"{mode}{_rate(rate):>11} {name:<20} {samples:7.1f} samples/s  x{ratio:.3f} of the limit, "
                f"cost model x{predicted:.3f} ({record['of_ceiling']:.3f} of it)",
                flush=True,
            )
            records.append(record)
    _print_table(records, rates, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}",
        "seconds": round(time.perf_counter() - started),
        "records": records,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


def _rate(rate: float | None) -> str:
    return "unthrottled" if rate is None else f"{rate:g} Mbit/s"


def _print_table(records: list[dict[str, Any]], rates: list[float | None], rows: list[Any]) -> None:
    print("\nsamples/s per worker (ratio to no communication; cost model of blocking Local SGD)")
    header = f"| {'method':<20} | " + " | ".join(f"{_rate(r):<24}" for r in rates) + " |"
    print(header)
    print("|" + "---|" * (len(rates) + 1))
    for name, _, _ in rows:
        cells = []
        for rate in rates:
            match = [
                r for r in records if r["method"] == name and r["rate_mbit"] == rate and not r["straggler"]
            ]
            if not match:
                cells.append(" " * 24)
                continue
            r = match[0]
            cells.append(
                f"{r['samples_per_s']:6.1f} (x{r['ratio_to_limit']:.3f}; x{r['predicted_ratio']:.3f})"
            )
        print(f"| {name:<20} | " + " | ".join(f"{c:<24}" for c in cells) + " |")
    stragglers = [r for r in records if r["straggler"]]
    if stragglers:
        print("\nstraggler mode, unthrottled (one worker sleeps 0 to 1x its compute time per step):")
        for r in stragglers:
            ratio = r["ratio_to_limit"]
            print(f"  {r['method']:<20} {r['samples_per_s']:6.1f} samples/s  x{ratio:.3f} of its limit")


if __name__ == "__main__":
    main()
