"""The post-local "when" sweeps (configs/compare_when_postlocal*.yaml) read on the seed paper's
time scale: is Local SGD's gain over SGD a function of lr^2 x steps (the slow SDE's drift time,
Gu et al., ICLR 2023, arXiv 2303.01215) better than of lr x steps?

Reads each sweep's ``sweep.csv`` (the paired gains it already computed), writes ``timescale.md``
(the gain at equal lr^2 x steps and at equal lr x steps, side by side, with the paired standard
errors, and how well each variable collapses the cells) and ``timescale.png`` next to the csv.

    .venv/bin/python experiments/when_timescale.py experiments/compare_when_postlocal_hard

How well a variable x collapses the gains: the cells come in sets of three lrs at one value of x;
within a set, chi^2 = sum (g_i - g_w)^2 / se_i^2 around the inverse-variance weighted mean g_w,
summed over the sets (2 degrees of freedom each). If the gain were a function of x alone, chi^2 /
dof would be about 1 (the seeds' noise); the variable with the smaller one collapses better.
For comparison the same for the lr alone: every length at one lr in one set (a gain that does not
depend on the length).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

METHODS = ("Local SGD (H=8)", "Local SGD (H=32)")


def read(folder: Path) -> dict[tuple[float, int], dict[str, Any]]:
    """(lr, steps) -> {method: (paired gain, se, acc gain, acc se, Hessian trace)}."""
    cells: dict[tuple[float, int], dict[str, Any]] = defaultdict(dict)
    with open(folder / "sweep.csv") as f:
        for row in csv.DictReader(f):
            key = (float(row["lr"]), int(row["max_steps"]))
            cells[key][row["method"]] = {
                "gain": float(row["paired_gain"]) if row["paired_gain"] else math.nan,
                "se": float(row["paired_gain_se"]) if row["paired_gain_se"] else math.nan,
                "acc": float(row["acc_gain"]) if row["acc_gain"] else math.nan,
                "acc_se": float(row["acc_gain_se"]) if row["acc_gain_se"] else math.nan,
                "trace": float(row["sharpness/hessian_trace_mean"]),
                "loss": float(row["val/loss_mean"]),
                "better": row["seeds_better"],
                "seeds": row["seeds"],
            }
    return dict(cells)


def sets(cells: dict[tuple[float, int], Any], power: int) -> dict[float, list[tuple[float, int]]]:
    """The cells grouped by lr^power x steps, sets of more than one lr only."""
    groups: dict[float, list[tuple[float, int]]] = defaultdict(list)
    for lr, steps in cells:
        groups[round(lr**power * steps, 6)].append((lr, steps))
    return {x: sorted(g, reverse=True) for x, g in sorted(groups.items()) if len({lr for lr, _ in g}) > 1}


def chi2(
    cells: dict[tuple[float, int], Any], groups: dict[float, list[tuple[float, int]]], method: str
) -> tuple[float, int]:
    total, dof = 0.0, 0
    for members in groups.values():
        g = [cells[c][method]["gain"] for c in members]
        w = [1 / cells[c][method]["se"] ** 2 for c in members]
        mean = sum(a * b for a, b in zip(g, w)) / sum(w)
        total += sum((a - mean) ** 2 * b for a, b in zip(g, w))
        dof += len(members) - 1
    return total, dof


def table(
    cells: dict[tuple[float, int], Any], groups: dict[float, list[tuple[float, int]]], label: str
) -> list[str]:
    lrs = sorted({lr for members in groups.values() for lr, _ in members}, reverse=True)
    lines = [
        f"| {label} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for x, members in groups.items():
        by_lr = {lr: (lr, steps) for lr, steps in members}
        row = [f"{x:g}"]
        for lr in lrs:
            if lr not in by_lr:
                row.append("")
                continue
            c = cells[by_lr[lr]]
            row.append(
                f"{by_lr[lr][1]} steps: "
                + " / ".join(f"{c[m]['gain']:+.4f} ± {c[m]['se']:.4f}" for m in METHODS)
            )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report(folder: Path) -> Path:
    cells = read(folder)
    by_sq, by_lin = sets(cells, 2), sets(cells, 1)
    by_lr: dict[float, list[tuple[float, int]]] = defaultdict(list)  # the length left out
    for lr, steps in cells:
        by_lr[lr].append((lr, steps))
    lines = [
        f"# {folder.name}: the gain against lr^2 x steps and against lr x steps",
        "",
        f"`python experiments/when_timescale.py {folder}` (from `sweep.csv`). The gain is SGD's final "
        "test loss minus Local SGD's, H = 8 / H = 32, ± its standard error paired by seed.",
        "",
        "At equal lr^2 x steps (the slow SDE's time):",
        "",
        *table(cells, by_sq, "lr^2 x steps"),
        "",
        "At equal lr x steps:",
        "",
        *table(cells, by_lin, "lr x steps"),
        "",
        "How well each collapses the gains (chi^2 of the cells around their set's weighted mean, "
        "over its degrees of freedom; about 1 if the gain is a function of that variable alone):",
        "",
        "| method | lr^2 x steps | lr x steps | lr alone (every length at one lr) |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        fits = [chi2(cells, groups, m) for groups in (by_sq, by_lin, by_lr)]
        lines.append(f"| {m} | " + " | ".join(f"{a / d:.2f} ({a:.1f} / {d})" for a, d in fits) + " |")
    lines += ["", "![time scale](timescale.png)", ""]
    path = folder / "timescale.md"
    path.write_text("\n".join(lines))
    plot(cells, folder)
    return path


def _gains(ax: Any, points: list[tuple[float, dict[str, Any]]], i: int, label: str) -> None:
    """One line of (x, a cell's gain ± its paired SE)."""
    points = sorted(points, key=lambda p: p[0])
    ax.errorbar(
        [x for x, _ in points],
        [v["gain"] for _, v in points],
        yerr=[v["se"] for _, v in points],
        marker="osd^v"[i % 5],
        capsize=3,
        label=label,
    )


def plot(cells: dict[tuple[float, int], Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({lr for lr, _ in cells}, reverse=True)
    fig, axes = plt.subplots(len(METHODS), 3, figsize=(16, 4.2 * len(METHODS)), squeeze=False)
    axis = {"xscale": "log", "ylabel": "test-loss gain over SGD (± paired SE)"}
    for r, method in enumerate(METHODS):
        for c, (power, name) in enumerate(((2, "lr^2 x steps"), (1, "lr x steps"))):
            for i, lr in enumerate(lrs):
                line = [(lr**power * s, cells[(lr, s)][method]) for l2, s in cells if l2 == lr]
                _gains(axes[r][c], line, i, f"lr {lr:g}")
            axes[r][c].set(xlabel=name, title=f"{method}: gain vs {name}", **axis)
        for j, (x, members) in enumerate(sets(cells, 2).items()):
            _gains(
                axes[r][2], [(lr, cells[(lr, s)][method]) for lr, s in members], j, f"lr^2 x steps = {x:g}"
            )
        axes[r][2].set(xlabel="lr", title=f"{method}: gain vs lr at equal lr^2 x steps", **axis)
        for ax in axes[r][:2]:  # readable ticks: 5, 10, 20, 50, ...
            ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[r][2].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        axes[r][2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for ax in axes[r]:
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{folder.name}: if the gain is a function of x, the lrs' lines fall on one curve against x")
    fig.tight_layout()
    fig.savefig(folder / "timescale.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding a sweep.csv")
    for folder in parser.parse_args().folders:
        print(report(folder).read_text())


if __name__ == "__main__":
    main()
