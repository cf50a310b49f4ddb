"""Claim C1 of arXiv 2303.01215 on the theory's toy: with a small lr and long training, Local SGD
lowers the Hessian trace faster than SGD at the same total batch, and the effect grows with lr * H.

Diagonal linear network f(x) = <x, u*u - v*v> on sparse regression with Rademacher label noise,
K = 8 workers, local batch 4 (total batch 32), plain SGD, H in {1, 10, 100}; H = 1 is synchronous
SGD with batch 32. Runs the fast vectorized path (localsgd.research.toy), writes metrics.csv and report.png
next to this file, and prints markdown tables.

    .venv/bin/python experiments/c1_diagonal.py --steps 300000 --seeds 3 --lr 0.01 0.02
    .venv/bin/python experiments/c1_diagonal.py --from-csv   # tables and plot again, no training

lr 0.01 is the issue's setting; 0.02 is the largest power-of-two step of it that stays stable
(0.04 diverged for H = 10 and 100 in a pilot: see ALPHA).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch

from localsgd.research.data import SparseRegressionDataModule
from localsgd.research.toy import train

OUT = Path(__file__).with_suffix("")  # experiments/c1_diagonal/
METRICS = ("hessian_trace", "train_loss", "test_loss", "w_error")

# The problem: the data module's defaults, the usual sparse-recovery toy of the label-noise analyses
# (HaoChen et al. 2021; Pesme et al. 2021). d = 100 > n = 50: many interpolators; w* is 5-sparse
# (||w*||^2 = 5, the test loss of w = 0). sigma = 0.5: label noise well below the signal (|y| ~ 2.2).
DIM, NUM_NONZERO, NUM_TRAIN, NUM_TEST, LABEL_NOISE = 100, 5, 50, 1000, 0.5
# alpha = 0.5. The Hessian trace at init is 16 alpha^2 sum_j ||X_j||^2 / n ~ 1600 alpha^2 = 400, and
# gradient flow keeps u_j * v_j = alpha^2 fixed, so only noise can bring the trace down to the
# sparse interpolator's ~8 * k = 40: a large range for the drift to act on. With a small alpha
# (0.1) plain GD already finds the sparse w* and there is nothing to show. alpha = 1 is too large
# for the lr: one worker's 4-sample Hessian has top eigenvalue ~ 8 alpha^2 |x|^2 / 4 ~ 200
# alpha^2, so lr * lambda ~ 2 at alpha = 1, and a pilot with alpha = 1 diverged (NaN) for H = 10
# and 100 within 2,000 steps. alpha = 0.5 puts lr * lambda near 0.5.
ALPHA = 0.5
NUM_WORKERS, LOCAL_BATCH = 8, 4
CHECKPOINTS = (1_000, 10_000, 100_000)  # early steps at which the table also reports the trace


def load(seed: int) -> tuple[torch.Tensor, ...]:
    """Train/test tensors and w* of dataset ``seed`` in float64 (long runs: keep rounding out)."""
    data = SparseRegressionDataModule(
        dim=DIM, num_nonzero=NUM_NONZERO, num_train=NUM_TRAIN, num_test=NUM_TEST, data_seed=seed
    )
    tensors = data._load(torch.device("cpu"))
    assert data.w_star is not None
    return (*(t.double() for t in tensors), data.w_star.double())


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for lr in args.lr:
        for seed in range(args.seeds):
            # seed s: dataset s (w*, X) and draws s (batches, label noise); the H runs of one seed
            # share both, so their differences are the algorithm's, not the draws'
            tx, ty, vx, vy, w_star = load(seed)
            start = time.perf_counter()
            result = train(
                tx, ty, vx, vy, w_star,
                sync_every=args.sync_every, num_workers=NUM_WORKERS, local_batch=LOCAL_BATCH,
                lr=lr, alpha=ALPHA, label_noise=LABEL_NOISE, num_steps=args.steps,
                log_every=args.log_every, seed=seed,
            )  # fmt: skip
            print(f"lr {lr} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            for i, step in enumerate(result.steps):
                for r, h in enumerate(result.sync_every):
                    row = {"lr": lr, "seed": seed, "H": h, "step": step}
                    row.update({m: float(getattr(result, m)[i, r]) for m in METRICS})
                    rows.append(row)
    return rows


def _mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return f"{float(t.mean()):.3g} ± {std:.2g}"


def table(rows: list[dict[str, float]], lr: float, steps: int, seeds: int, hs: list[int]) -> str:
    """Final metrics per H, then trace and test loss at CHECKPOINTS with per-seed ordering counts."""
    at = {(r["H"], r["seed"], r["step"]): r for r in rows if r["lr"] == lr}
    lines = [
        f"lr {lr}, {steps} steps, {seeds} seed(s), mean ± std over seeds, at the averaged model:",
        "",
        "| H | rounds | Hessian trace | test loss | train loss (clean) | ‖w - w*‖ |",
        "|---|---|---|---|---|---|",
    ]
    for h in hs:
        final = [at[(h, s, steps)] for s in range(seeds)]
        cells = [
            _mean_std([r[m] for r in final]) for m in ("hessian_trace", "test_loss", "train_loss", "w_error")
        ]
        lines.append(f"| {h} | {steps // h} | " + " | ".join(cells) + " |")
    checkpoints = [c for c in CHECKPOINTS if c < steps] + [steps]
    for metric in ("hessian_trace", "test_loss"):
        name = metric.replace("_", " ")
        lines += ["", "| step | " + " | ".join(f"{name} H={h}" for h in hs) + " | seeds ordered H=1 > ... |"]
        lines.append("|---" * (len(hs) + 2) + "|")
        for c in checkpoints:
            if (hs[0], 0, c) not in at:
                continue
            values = [[at[(h, s, c)][metric] for h in hs] for s in range(seeds)]
            # how many seeds have this metric strictly decreasing with H (the claimed ordering)
            ordered = sum(all(a > b for a, b in pairwise(t)) for t in values)
            cells = [_mean_std([t[j] for t in values]) for j in range(len(hs))]
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {ordered}/{seeds} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], lrs: list[float], hs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(lrs), 2, figsize=(9, 3.3 * len(lrs)), squeeze=False)
    for row_axes, lr in zip(axes, lrs):
        for ax, metric in zip(row_axes, ("hessian_trace", "test_loss")):
            for h in hs:
                mine = [r for r in rows if r["lr"] == lr and r["H"] == h]
                steps = sorted({r["step"] for r in mine if r["step"] > 0})  # log x: init is step 0
                values = torch.tensor([[r[metric] for r in mine if r["step"] == s] for s in steps])
                label = "SGD (H=1)" if h == 1 else f"Local SGD H={h}"
                (line,) = ax.plot(steps, values.mean(1), label=label)
                ax.fill_between(
                    steps, values.min(1).values, values.max(1).values, color=line.get_color(), alpha=0.25
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{metric.replace('_', ' ')}, lr {lr}", fontsize=10)
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.suptitle(
        f"K={NUM_WORKERS}, B={LOCAL_BATCH}, alpha={ALPHA}, sigma={LABEL_NOISE}; band: min-max over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def read_csv(path: Path) -> list[dict[str, float]]:
    """The rows :func:`run` wrote, typed back (int for seed, H, step)."""
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k in ("seed", "H", "step") else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300_000, help="optimizer steps per worker")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (dataset and draws)")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.02], help="one setting per lr")
    parser.add_argument("--sync-every", type=int, nargs="+", default=[1, 10, 100], help="H values")
    parser.add_argument(
        "--log-every", type=int, default=1000, help="a multiple of every H: logs the synced model"
    )
    parser.add_argument(
        "--from-csv", action="store_true", help="no training: redraw the plot and tables from metrics.csv"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("$ " + shlex.join([".venv/bin/python", *sys.argv]), flush=True)
    start = time.perf_counter()
    if args.from_csv:
        rows = read_csv(OUT / "metrics.csv")
        args.lr = sorted({r["lr"] for r in rows})
        args.sync_every = sorted({int(r["H"]) for r in rows})
        args.steps = int(max(r["step"] for r in rows))
        args.seeds = len({r["seed"] for r in rows})
    else:
        rows = run(args)
        OUT.mkdir(exist_ok=True)
        with open(OUT / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, args.lr, args.sync_every, OUT / "report.png")
    for lr in args.lr:
        print("\n" + table(rows, lr, args.steps, args.seeds, args.sync_every))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; wrote {OUT}/metrics.csv and report.png")


if __name__ == "__main__":
    main()
