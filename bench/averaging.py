"""Benchmark: one parameter-averaging round over gloo, against the raw all-reduce limit.

Two processes on CPU (gloo, ``torch.set_num_threads(1)`` each) hold the same model
initialised from different seeds, and time one averaging round of:

* ``localsgd``: one exact round (``localsgd.core.rounds.ExactRound``) of ``Averager([model],
  ProcessGroupCommunicator(), buffers="local", optimizer_state="local")``, parameters only, so
  its payload is the raw limit's; ``localsgd buffers=average`` also averages the BatchNorm running stats;
* ``raw all_reduce``: one ``dist.all_reduce`` (SUM) of a preallocated flat float32
  buffer with as many bytes as the parameters, the floor for any averaging round;
  ``raw + divide`` adds the in-place division that turns the sum into a mean (gloo has
  no native mean: its ``ReduceOp.AVG`` is SUM then the same division), so it is the
  floor for a mean over gloo;
* ``torch average_parameters``: ``torch.distributed.algorithms.model_averaging.utils``
  (a fresh ``torch.cat`` of the parameters every round);
* ``per-tensor all_reduce``: one ``dist.all_reduce`` and division per parameter tensor.

Models: a CIFAR ResNet-56 (0.85M parameters in 167 tensors, BatchNorm, option-A
shortcuts) and the same network 3.5x wider (10.4M parameters, same 167 tensors).
Every timed round starts after a ``dist.barrier``; its time is the slower rank's.
The table shows the median over the timed rounds (after warmup rounds) and the ratio
to the raw limit. Methods are interleaved round by round, in alternating order, so
a slow spell of the machine hits all of them alike. Before timing, the bench checks
that one localsgd round leaves both ranks with the mean of their pre-round
parameters (and buffers under ``buffers="average"``, untouched buffers under
``"local"``).

Target: one localsgd round <= 1.10x ``raw + divide`` (the floor for a mean over gloo), the
median over ``--runs`` whole measurements. On NCCL the mean is the backend's fused
``ReduceOp.AVG`` (no division pass; measured by bench/gpu_check.sh where a GPU is lent).

Run:  python bench/averaging.py [--repeats N] [--warmup N] [--runs N] [--quick] [--out PATH]
(default: 3 runs of 80 timed rounds, 3-5 minutes on 2 cores; JSON to bench/results/averaging.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from localsgd.core.averager import Averager
from localsgd.core.comm import ProcessGroupCommunicator
from localsgd.core.rounds import ExactRound, Round, run_round

WORLD_SIZE = 2
# one localsgd round / (a raw SUM all-reduce of the same bytes + the division): the floor for a mean
# over gloo, whose ReduceOp.AVG is the same SUM and division; the median of --runs runs
TARGET = 1.10
MODELS: dict[str, int] = {"resnet56": 16, "resnet56-wide": 56}  # name -> width of the first stage


class Block(nn.Module):
    """Basic residual block; the option-A shortcut (subsample, zero-pad channels) has no parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad)))


def resnet56(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """ResNet-56 for 32x32 inputs (He et al. 2016): 3 stages of 9 blocks, widths w, 2w, 4w."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c_in = width
    for stage in range(3):
        c_out = width * 2**stage
        for i in range(9):
            layers.append(Block(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def make_model(width: int, rank: int) -> nn.Module:
    """The model as rank ``rank`` holds it: its own seed, and rank-specific BatchNorm statistics."""
    torch.manual_seed(1000 + rank)
    model = resnet56(width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # fresh running stats are equal on all ranks, which would make the buffer check vacuous
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return model


def float_state(model: nn.Module) -> tuple[Tensor, int]:
    """Parameters then floating-point buffers, flattened; and the number of parameter elements."""
    params = [p.detach().reshape(-1) for p in model.parameters()]
    bufs = [b.reshape(-1) for b in model.buffers() if b.is_floating_point()]
    return torch.cat(params + bufs), sum(p.numel() for p in params)


def check_round(averager: Averager, model: nn.Module) -> None:
    """One round must leave the mean of the ranks' parameters, equal on every rank."""
    before, n = float_state(model)
    peers = [torch.empty_like(before) for _ in range(WORLD_SIZE)]
    dist.all_gather(peers, before)
    expected = (peers[0] + peers[1]) / 2  # exact: a sum of two does not depend on the order
    if averager.buffers == "local":
        expected[n:] = before[n:]
    run_round(ExactRound(averager), Round())
    after, _ = float_state(model)
    dist.all_gather(peers, after)
    ok = torch.equal(after, expected) and all(torch.equal(p[:n], after[:n]) for p in peers)
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        raise AssertionError(f"localsgd buffers={averager.buffers}: a round did not produce the mean")


def methods(width: int, rank: int) -> tuple[dict[str, Callable[[], object]], int, int]:
    """The averaging rounds to time, each on its own copy of the model; and (params, tensors)."""
    comm = ProcessGroupCommunicator()
    models = {name: make_model(width, rank) for name in ("local", "average", "torch", "per_tensor")}
    local = Averager([models["local"]], comm, buffers="local", optimizer_state="local")
    average = Averager([models["average"]], comm, buffers="average", optimizer_state="local")
    check_round(local, models["local"])
    check_round(average, models["average"])
    local_round, average_round = ExactRound(local), ExactRound(average)
    params = list(models["per_tensor"].parameters())
    numel = sum(p.numel() for p in params)
    assert local.num_bytes == 4 * numel, "the localsgd payload must be the parameters only"
    # zeros: repeated SUMs of anything else grow to inf; float adds cost the same on any normal value
    raw = torch.zeros(numel)
    raw_div = torch.full((numel,), float(rank))

    def raw_divide() -> None:
        dist.all_reduce(raw_div)
        raw_div.div_(WORLD_SIZE)

    def per_tensor() -> None:
        for p in params:
            dist.all_reduce(p.data)
            p.data.div_(WORLD_SIZE)

    fns: dict[str, Callable[[], object]] = {
        # one blocking round through the pipeline, its kind chosen once, as the driver runs it
        "localsgd": lambda: run_round(local_round, Round()),
        "localsgd buffers=average": lambda: run_round(average_round, Round()),
        "raw all_reduce": lambda: dist.all_reduce(raw),
        "raw + divide": raw_divide,
        "torch average_parameters": lambda: average_parameters(models["torch"].parameters(), None),
        "per-tensor all_reduce": per_tensor,
    }
    return fns, numel, len(params)


def time_rounds(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per round and method, the slower rank's, methods interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        # alternate the order, so that no method always follows the same one
        for name in list(fns)[:: -1 if i % 2 else 1]:
            dist.barrier()
            start = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    slowest = torch.tensor(list(times.values()), dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return dict(zip(times, slowest.tolist(), strict=True))


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    rows = []
    for run in range(args.runs):
        for model_name, width in MODELS.items():
            fns, numel, num_tensors = methods(width, rank)
            times = time_rounds(fns, args.warmup, args.repeats)
            raw_ms = 1e3 * statistics.median(times["raw all_reduce"])
            for method, ts in times.items():
                ms = 1e3 * statistics.median(ts)
                row = dict(run=run, model=model_name, params=numel, tensors=num_tensors, method=method)
                rows.append(row | dict(median_ms=ms, min_ms=1e3 * min(ts), ratio_to_raw=ms / raw_ms))
    if rank == 0:
        report(rows, args)
    dist.destroy_process_group()


def report(rows: list[dict], args: argparse.Namespace) -> None:
    header = f"{'model':<14} {'params':>11} {'tensors':>7}  {'method':<26} {'median ms':>9} {'x raw':>6}"
    print(header, "-" * len(header), sep="\n")
    for r in rows:
        if r["run"] != 0:
            continue  # the table shows the first run; the target line below uses every run
        print(
            f"{r['model']:<14} {r['params']:>11,} {r['tensors']:>7}  {r['method']:<26} "
            f"{r['median_ms']:>9.2f} {r['ratio_to_raw']:>6.2f}"
        )
    target = {}
    for model in MODELS:
        per_run = []
        for run in range(args.runs):
            ms = {r["method"]: r["median_ms"] for r in rows if r["model"] == model and r["run"] == run}
            per_run.append((ms["localsgd"] / ms["raw + divide"], ms["localsgd"] / ms["raw all_reduce"]))
        vs_divide = statistics.median(r[0] for r in per_run)
        ratio = statistics.median(r[1] for r in per_run)
        target[model] = dict(
            ratio_to_raw_divide=vs_divide,
            ratio_to_raw=ratio,
            per_run_ratio_to_raw_divide=[r[0] for r in per_run],
            ok=vs_divide <= TARGET,
        )
        print(
            f"{model}: localsgd / (raw SUM + divide) = {vs_divide:.3f}, median of {args.runs} runs "
            f"{[round(r[0], 3) for r in per_run]} (target <= {TARGET:.2f}: "
            f"{'ok' if vs_divide <= TARGET else 'MISSED'}); localsgd / raw SUM = {ratio:.2f}"
        )
    result = dict(
        torch=torch.__version__,
        command=" ".join([sys.executable, *sys.argv]),
        world_size=WORLD_SIZE,
        backend="gloo",
        threads_per_process=1,
        warmup=args.warmup,
        repeats=args.repeats,
        correctness="ok",  # check_round raised otherwise
        target=target,
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=80, help="timed rounds per method and model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument(
        "--runs", type=int, default=3, help="whole measurements; the target uses their median"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/averaging.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 timed rounds, 1 warmup")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.runs = 3, 1, 1
    if args.repeats < 1 or args.warmup < 0 or args.runs < 1:
        parser.error(
            f"--repeats ({args.repeats}) and --runs ({args.runs}) must be >= 1, --warmup ({args.warmup}) >= 0"
        )
    mp.spawn(worker, args=(free_port(), args), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
