"""A sweep's report: per cell and method the final test loss, test accuracy and Hessian trace
(mean ± std over seeds), each method's difference from the baseline with its standard error,
and the plots a reader of the "when" question expects (``sweep.md``, ``sweep.csv``,
``sweep.png``). Each cell also gets the ordinary report of its own comparison in its folder.

The difference of two methods' means over independent seeds has the standard error
``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (s: the seeds' standard deviation); a *gain* is the
baseline's test loss minus the method's, so a positive gain means the method generalizes better.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localsgd.research.compare.config import CompareConfig
from localsgd.research.compare.report import _last, _mean_std, _paired, line_style, read_metrics, report

METRICS = (("val/loss", "test loss"), ("val/acc", "test acc"), ("sharpness/hessian_trace", "Hessian trace"))


def cell_rows(config: CompareConfig) -> list[dict[str, Any]]:
    """One row per (cell, method): each metric's seeds, mean and std, and the gain over the
    baseline (its test loss minus the method's) with its standard error, also paired by seed."""
    baseline = config.baseline or next(iter(config.methods))
    rows = []
    for cell, sub in config.cells():
        per_method: dict[str, dict[str, dict[int, float]]] = {}
        for run in sub.runs():
            series = read_metrics(run.folder)
            values = per_method.setdefault(run.method, {key: {} for key, _ in METRICS})
            for key, _ in METRICS:
                value = _last(series, key)
                if value is not None:
                    values[key][run.seed] = value
        base = per_method[baseline]
        for method, values in per_method.items():
            row: dict[str, Any] = {"cell": cell, "method": method, "seeds": len(values["val/loss"])}
            for key, _ in METRICS:
                seeds = list(values[key].values())
                row[key] = _mean_std(seeds) if seeds else (math.nan, math.nan)
            if method != baseline and base["val/loss"] and values["val/loss"]:
                row["gain"] = _difference(list(base["val/loss"].values()), list(values["val/loss"].values()))
                row["paired_gain"], row["seeds_better"] = _paired(base["val/loss"], values["val/loss"])
            if method != baseline and base["val/acc"] and values["val/acc"]:
                row["acc_gain"] = _difference(
                    list(values["val/acc"].values()), list(base["val/acc"].values())
                )
            rows.append(row)
    return rows


def _difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and its standard error over independent seeds."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    return ma - mb, math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def write_markdown(config: CompareConfig, rows: Sequence[dict[str, Any]], command: str) -> Path:
    keys = list(config.sweep)
    baseline = config.baseline or next(iter(config.methods))
    header = [
        *keys,
        "method",
        *(label for _, label in METRICS),
        f"gain over {baseline} (test loss)",
        "paired by seed (seeds better)",
        "gain in test acc",
    ]
    lines = [
        f"# {config.title}: sweep",
        "",
        f"`{command}`",
        "",
        f"{_grid(config)} x {len(config.methods)} methods x seeds {config.seeds}. Final "
        "values, mean ± std over seeds; the gain is the baseline's test loss minus the method's "
        "(positive: the method generalizes better) ± its standard error over independent seeds, and "
        "paired by seed: the mean of the per-seed differences ± their standard error (a seed gives "
        "every method the same initialization, data order and noise), with how many seeds are better; "
        "the gain in test accuracy is "
        "the method's minus the baseline's, ± its standard error. Each cell's runs and report "
        "are in `cells/<cell>/`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [str(row["cell"][k]) for k in keys] + [row["method"]]
        for key, _ in METRICS:
            mean, std = row[key]
            fmt = "{:.3g}" if key.startswith("sharpness") else "{:.4f}"
            cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
        gain = row.get("gain")
        cells.append(f"{gain[0]:+.4f} ± {gain[1]:.4f}" if gain else "")
        paired = row.get("paired_gain")
        cells.append(
            f"{paired[0]:+.4f} ± {paired[1]:.4f} ({row['seeds_better']}/{row['seeds']})" if paired else ""
        )
        gain = row.get("acc_gain")
        cells.append(f"{gain[0]:+.4f} ± {gain[1]:.4f}" if gain else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _pivots(config, rows, baseline)
    lines += ["", "![sweep](sweep.png)", ""]
    path = config.out / "sweep.md"
    path.write_text("\n".join(lines))
    return path


def _grid(config: CompareConfig) -> str:
    if config.sweep_cells is None:
        return f"The grid {dict(config.sweep)}"
    return f"The {len(config.sweep_cells)} cells listed in the config ({', '.join(config.sweep)})"


def _pivots(config: CompareConfig, rows: Sequence[dict[str, Any]], baseline: str) -> list[str]:
    """Per method, its gains in test loss and accuracy (and the Hessian trace, the baseline's too)
    as tables: the first sweep key down, the second across."""
    keys = list(config.sweep)
    if len(keys) != 2:
        return []
    first, second = keys
    lines: list[str] = []
    for method in config.methods:
        labels = {
            "gain": f"gain over {baseline}",
            "paired_gain": f"gain over {baseline}, paired by seed",
            "acc_gain": f"gain in test accuracy over {baseline}",
            "sharpness/hessian_trace": "Hessian trace",
        }
        for what, label in labels.items():
            if what != "sharpness/hessian_trace" and method == baseline:
                continue
            lines += [
                "",
                f"{method}, {label}:",
                "",
                f"| {first} \\ {second} | " + " | ".join(str(v) for v in config.sweep[second]) + " |",
                "|" + "---|" * (1 + len(config.sweep[second])),
            ]
            for a in config.sweep[first]:
                cells = []
                for b in config.sweep[second]:
                    found = [r for r in rows if r["method"] == method and r["cell"] == {first: a, second: b}]
                    if not found:  # a listed grid need not hold every combination
                        cells.append("")
                        continue
                    mean, err = found[0].get(what, (math.nan, math.nan))
                    gain = what != "sharpness/hessian_trace"
                    cells.append(f"{mean:+.4f} ± {err:.4f}" if gain else f"{mean:.3g} ± {err:.2g}")
                lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def write_csv(config: CompareConfig, rows: Sequence[dict[str, Any]]) -> Path:
    path = config.out / "sweep.csv"
    keys = list(config.sweep)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        metric_columns = [f"{k}_{stat}" for k, _ in METRICS for stat in ("mean", "std")]
        gains = [
            "gain",
            "gain_se",
            "paired_gain",
            "paired_gain_se",
            "seeds_better",
            "acc_gain",
            "acc_gain_se",
        ]
        writer.writerow([*keys, "method", "seeds", *metric_columns, *gains])
        for row in rows:
            values = [v for key, _ in METRICS for v in row[key]]
            paired = [*row.get("paired_gain", ("", "")), row.get("seeds_better", "")]
            values += [*row.get("gain", ("", "")), *paired, *row.get("acc_gain", ("", ""))]
            writer.writerow([*(row["cell"][k] for k in keys), row["method"], row["seeds"], *values])
    return path


def _errorbars(ax: Any, line: Sequence[dict[str, Any]], x: str, y: str, **style: Any) -> None:
    """One line of mean ± spread: ``y`` is "paired_gain" or a metric of METRICS, each a (mean, spread)."""
    line = sorted(line, key=lambda r: r["cell"][x])
    ax.errorbar(
        [r["cell"][x] for r in line],
        [r[y][0] for r in line],
        yerr=[r[y][1] for r in line],
        capsize=3,
        **style,
    )


def _outliers_compressed(ax: Any, gains: Sequence[float]) -> None:
    """A cell where one method diverged has a gain tens of times the others': a linear axis
    would show it alone. Then the axis is linear up to the typical gain and logarithmic beyond."""
    typical = sorted(gains)[len(gains) // 2] if gains else 0.0
    if typical > 0 and max(gains) > 10 * typical:
        lo, hi = ax.get_ylim()
        ax.set_yscale("symlog", linthresh=typical)
        ax.set_ylabel(f"{ax.get_ylabel()} (linear within ±{typical:.2g})")
        # ticks at 0 and the decades past the linear part (the ones inside it would overlap 0)
        decades = range(math.ceil(math.log10(typical)), math.floor(math.log10(max(-lo, hi))) + 1)
        ticks = [0.0, *(sign * 10.0**k for k in decades for sign in (-1, 1))]
        ax.set_yticks(sorted(t for t in ticks if lo <= t <= hi))
        ax.set_ylim(lo, hi)


def plot(config: CompareConfig, rows: Sequence[dict[str, Any]]) -> Path:
    """Column 0: the gain (top; error bars: its standard error paired by seed) and the Hessian
    trace (bottom, the baseline dashed; error bars: the seeds' std) against the
    first sweep key, one line per method, at the last value of the second key. With a second key,
    one more column per method but the baseline: the same against the second key, one line per
    value of the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(config.sweep)
    first, second = keys[0], (keys[1] if len(keys) > 1 else None)
    baseline = config.baseline or next(iter(config.methods))
    methods = list(config.methods)
    others = [m for m in methods if m != baseline] if second else []
    columns = 1 + len(others)
    fig, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 8), squeeze=False)

    def pick(method: str, **fixed: Any) -> list[dict[str, Any]]:
        return [
            r for r in rows if r["method"] == method and all(r["cell"].get(k) == v for k, v in fixed.items())
        ]

    fixed = {second: config.sweep[second][-1]} if second else {}
    for i, method in enumerate(methods):
        (style, marker), color = line_style(i), f"C{i}"
        line = pick(method, **fixed)
        if method != baseline:
            _errorbars(
                axes[0][0],
                line,
                first,
                "paired_gain",
                color=color,
                linestyle=style,
                marker=marker,
                label=method,
            )
        dashed = "--" if method == baseline else style
        _errorbars(
            axes[1][0],
            line,
            first,
            "sharpness/hessian_trace",
            color=color,
            linestyle=dashed,
            marker=marker,
            label=method,
        )
    where = f" ({second} = {fixed[second]})" if second else ""
    axes[0][0].set(
        xlabel=first, ylabel=f"test-loss gain over {baseline} (± paired SE)", title=f"gain vs {first}{where}"
    )
    axes[1][0].set(xlabel=first, ylabel="Hessian trace", title=f"Hessian trace vs {first}{where}")
    for c, method in enumerate(others, start=1):
        assert second is not None  # others is empty without a second key
        for j, value in enumerate(config.sweep[first]):
            (style, marker), color = line_style(j), f"C{j}"
            line = pick(method, **{first: value})
            for r, y in ((0, "paired_gain"), (1, "sharpness/hessian_trace")):
                label = f"{first} = {value}"
                _errorbars(
                    axes[r][c], line, second, y, color=color, linestyle=style, marker=marker, label=label
                )
        axes[0][c].set(
            xlabel=second,
            ylabel=f"test-loss gain over {baseline} (± paired SE)",
            title=f"{method}: gain vs {second}",
        )
        axes[1][c].set(xlabel=second, ylabel="Hessian trace", title=f"{method}: Hessian trace vs {second}")
    for ax in axes.flat:
        key = ax.get_xlabel()
        if key in ("lr", "max_steps"):  # factors apart, as sweeps space them
            ax.set_xscale("log")
            ax.set_xticks(config.sweep[key], [f"{v:g}" for v in config.sweep[key]])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    traces = [r["sharpness/hessian_trace"][0] for r in rows]
    if traces and all(t > 0 for t in traces) and max(traces) > 30 * min(traces):
        for ax in axes[1]:  # traces of flat and sharp cells, factors apart
            ax.set_yscale("log")
    gains = [abs(r["gain"][0]) for r in rows if "gain" in r and math.isfinite(r["gain"][0])]
    for ax in axes[0]:
        ax.axhline(0.0, color="black", linewidth=0.8)
        _outliers_compressed(ax, gains)
        ax.set_visible(len(methods) > 1)  # a baseline alone has no gain to show
    fig.suptitle(f"{config.title}: sweep")
    fig.tight_layout()
    path = config.out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_report(config: CompareConfig, results: Sequence[dict[str, Any]], command: str) -> dict[str, Path]:
    """Each cell's ordinary report in its folder, then the sweep's own files in ``config.out``."""
    by_folder = {str(run.folder): result for run, result in zip(config.runs(), results)}
    for _, sub in config.cells():
        sub.out.mkdir(parents=True, exist_ok=True)
        report(sub, [by_folder[str(run.folder)] for run in sub.runs()], command)
    rows = cell_rows(config)
    config.out.mkdir(parents=True, exist_ok=True)
    return {
        "summary": write_csv(config, rows),
        "markdown": write_markdown(config, rows, command),
        "plot": plot(config, rows),
    }
