"""A comparison's report: summary.csv, report.md and report.png from the runs' metrics."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localsgd.research.compare.config import CompareConfig, RunSpec

# (column in metrics.csv, label, lower is better); a metric no run logged is left out
# val/* is measured on the held-out split; the report calls it by that one name, as summary.csv does
_CURVES = [
    ("val/acc", "val/acc (held-out split)"),
    ("val/bpb", "val/bpb (held-out split, bits per byte)"),
    ("val/loss", "val/loss (held-out split)"),
    ("train/loss", "training loss (mean since the last evaluation)"),
    ("sharpness/hessian_trace", "Hessian trace"),
    ("localsgd/divergence", "worker divergence (before sync)"),
]
_TABLE = [
    ("val/acc", "val/acc", "{:.4f}"),
    ("val/bpb", "val/bpb", "{:.4f}"),
    ("val/loss", "val/loss", "{:.4f}"),
    ("sharpness/hessian_trace", "Hessian trace", "{:.3g}"),
    ("sharpness/top_eigenvalue", "top eigenvalue", "{:.3g}"),
]


def read_metrics(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of one run as ``{column: [(step, value), ...]}``, ``step`` the optimizer
    steps done when the value was measured (empty cells left out)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            # the loggers' step is the index of the step being taken (0-based): the value was
            # measured after it, so step + 1 steps are done (an evaluation at step 100 logs 99)
            step = int(float(row["step"])) + 1
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _last(series: dict[str, list[tuple[int, float]]], key: str) -> float | None:
    return series[key][-1][1] if series.get(key) else None


def summarize(config: CompareConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: every table metric's mean and std over seeds, communication and wall time."""
    by_method: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {}
    for run, result in zip(config.runs(), results):
        by_method.setdefault(run.method, []).append((run, result))
    rows = []
    for method, pairs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(pairs)}
        curves = {run.seed: read_metrics(run.folder) for run, _ in pairs}
        row["per_seed"] = {}
        for key, _, _ in _TABLE:
            per_seed = {seed: v for seed, c in curves.items() if (v := _last(c, key)) is not None}
            if per_seed:
                row[key] = _mean_std(list(per_seed.values()))
                row["per_seed"][key] = per_seed
        finals = [r["final"] for _, r in pairs]
        row["steps"] = pairs[0][1]["steps"]
        row["workers"] = pairs[0][0].workers
        row["rounds"] = finals[0].get("comm/rounds", float("nan"))
        row["mb"] = finals[0].get("comm/bytes", float("nan")) / 1e6
        row["seconds"] = sum(r["seconds"] for _, r in pairs) / len(pairs)
        rows.append(row)
    if config.baseline is not None and not config.sweep:
        base = next(r for r in rows if r["method"] == config.baseline)
        paired = next((k for k in _PAIRED if k in base["per_seed"]), None)
        for row in rows:
            if paired is not None and row is not base and paired in row["per_seed"]:
                row["paired"] = (paired, *_paired(row["per_seed"][paired], base["per_seed"][paired]))
    return rows


# the metric a method's difference from the baseline is taken in: the first one the runs logged
_PAIRED = ("val/bpb", "val/loss")


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[tuple[float, float], int]:
    """The mean over common seeds of a - b, its standard error (std / sqrt(n)) and how many seeds
    have a > b. A seed gives every method the same initialization, data order and label noise,
    so the per-seed differences are the tighter measure: they leave out what the seeds share."""
    diffs = [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]
    if not diffs:
        return (math.nan, math.nan), 0
    mean, std = _mean_std(diffs)
    se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return (mean, se), sum(d > 0 for d in diffs)


def _finals(config: CompareConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Each run's final metrics: the Trainer's last values, and the last value of every report
    metric in its metrics.csv (the sharpness callback logs there only), so that summary.csv has
    every column the report shows."""
    finals = []
    for run, result in zip(config.runs(), results):
        curves = read_metrics(run.folder) if (run.folder / "metrics.csv").is_file() else {}
        extra = {key: value for key, _, _ in _TABLE if (value := _last(curves, key)) is not None}
        finals.append({**extra, **result["final"]})
    return finals


def write_summary_csv(config: CompareConfig, results: Sequence[dict[str, Any]]) -> Path:
    path = config.out / "summary.csv"
    finals = _finals(config, results)
    keys = sorted({k for final in finals for k in final})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "steps", "seconds", *keys])
        for r, final in zip(results, finals):
            writer.writerow(
                [r["method"], r["seed"], r["steps"], f"{r['seconds']:.2f}", *(final.get(k, "") for k in keys)]
            )
    return path


def write_markdown(config: CompareConfig, rows: Sequence[dict[str, Any]], command: str) -> Path:
    metrics = [(k, label, fmt) for k, label, fmt in _TABLE if any(k in r for r in rows)]
    paired = next((r["paired"][0] for r in rows if "paired" in r), None)
    header = ["method", *(label for _, label, _ in metrics)]
    if paired is not None:
        header.append(f"{paired} - {config.baseline}'s, paired by seed")
    header += ["comm rounds", "MB sent / worker", "s / run"]
    lines = [
        f"# {config.title}",
        "",
        f"`{command}`",
        "",
        f"{config.workers} worker(s) (simulated in one process) x local batch "
        f"{_local_batch(config.data)}, {config.max_steps} optimizer steps, unless a method sets "
        f"its own; seeds {config.seeds}; metrics at the last step, mean ± std over seeds "
        "(`val/*`: the held-out split, never trained on; summary.csv has every column per run, "
        "Hessian trace as `sharpness/hessian_trace`). "
        + (
            f"The difference from `{config.baseline}` is the mean over seeds of each seed's "
            "difference ± its standard error (std / sqrt(seeds)): a seed gives every method the same "
            "initialization and data order. "
            if config.baseline is not None and not config.sweep
            else ""
        )
        + "Each run's files are in `runs/<method slug>/seed<S>/` (the method's name in lower case, "
        "dashes for the rest: `Local SGD (H=4)` -> `local-sgd-h-4`).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["method"]]
        for key, _, fmt in metrics:
            if key in row:
                mean, std = row[key]
                cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
            else:
                cells.append("")
        if paired is not None:
            if "paired" in row:
                _, (mean, se), above = row["paired"]
                cells.append(f"{mean:+.4f} ± {se:.4f} ({above}/{row['seeds']} seeds above)")
            else:
                cells.append("(baseline)" if row["method"] == config.baseline else "")
        if row["workers"] == 1:  # one worker talks to nobody
            cells += ["none (1 worker)", "0", f"{row['seconds']:.0f}"]
        else:
            cells += [f"{row['rounds']:.0f}", f"{row['mb']:.2f}", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![report](report.png)", ""]
    path = config.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _local_batch(data: dict[str, Any]) -> Any:
    return data.get("init_args", {}).get("batch_size", "(the data module's default)")


def plot(config: CompareConfig, path: Path | None = None) -> Path:
    """``report.png``: one panel per curve, one line per method (mean over seeds), the band
    between the seeds' min and max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = config.runs()
    series = {(r.method, r.seed): read_metrics(r.folder) for r in runs}
    points = {
        (r.method, r.seed, key): _curve(series[(r.method, r.seed)], key, r.eval_every)
        for r in runs
        for key, _ in _CURVES
    }
    # a panel needs values; a log-scaled one positive values (one worker never diverges)
    curves = [
        (k, label)
        for k, label in _CURVES
        if any(
            v > 0 if k == "localsgd/divergence" else True
            for (_, _, key), c in points.items()
            if key == k
            for v in c.values()
        )
    ]
    if any(key == "val/bpb" for key, _ in curves):  # the same curve in other units
        curves = [(key, label) for key, label in curves if key != "val/loss"]
    # the quality a sync buys: the first loss the runs logged against the bytes each worker sent
    sent = [k for k in _PAIRED if any(k == key for key, _ in curves)][:1]
    talk = any(r.workers > 1 for r in runs)  # one worker sends nothing, whatever it counts
    if sent and talk and any(v > 0 for s in series.values() for _, v in s.get("comm/bytes", [])):
        curves.append((_SENT + sent[0], f"{sent[0]} against MB sent per worker (log scale)"))
    columns = min(2, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    methods = list(config.methods)
    colors = plt.get_cmap("tab10")
    for ax, (panel, label) in zip(axes.flat, curves):
        key = panel.removeprefix(_SENT)
        for m, method in enumerate(methods):
            method_runs = [r for r in runs if r.method == method]
            scale = x_scale(config, method_runs[0])
            per_seed = [points[(r.method, r.seed, key)] for r in method_runs]
            steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
            if panel != key:  # bytes are the same for every seed: the first seed's count
                sent_at = dict(series[(method, method_runs[0].seed)].get("comm/bytes", []))
                steps = [step for step in steps if sent_at.get(step, 0) > 0]
            if not steps:
                continue
            values = [[s[step] for s in per_seed] for step in steps]
            x = [sent_at[step] / 1e6 if panel != key else step * scale for step in steps]
            mean = [sum(v) / len(v) for v in values]
            linestyle, marker = line_style(m)
            # dashes and markers at staggered points: a curve that equals another still shows
            ax.plot(
                x,
                mean,
                label=method,
                color=colors(m % 10),
                lw=1.4,
                linestyle=linestyle,
                marker=marker,
                markersize=4,
                markevery=(m % 4, 4) if len(x) > 4 else None,
            )
            if len(per_seed) > 1:
                ax.fill_between(
                    x, [min(v) for v in values], [max(v) for v in values], color=colors(m % 10), alpha=0.2
                )
        ax.set_title(label, fontsize=10)
        if panel != key:
            ax.set_xlabel("MB sent per worker")
            ax.set_xscale("log")
        else:
            ax.set_xlabel(_X_LABELS[config.x_axis])
        drawn = [y for line in ax.get_lines() for y in line.get_ydata()]
        if key == "localsgd/divergence" or (key == "sharpness/hessian_trace" and drawn and min(drawn) > 0):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(curves) :]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(config.title, fontsize=11)
    if spare:  # the legend in the empty panel
        spare[0].legend(handles, labels, loc="center", fontsize=9, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    path = path or config.out / "report.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    # a 256-colour palette: a third of the size, small enough to commit beside the results
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
        path, optimize=True
    )
    return path


_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def line_style(index: int) -> tuple[str, str]:
    """Method ``index``'s (line style, marker): distinct for the first 8 methods (and beyond
    that, with the colour, for 40)."""
    return _LINESTYLES[index % len(_LINESTYLES)], _MARKERS[index % len(_MARKERS)]


def _curve(series: dict[str, list[tuple[int, float]]], key: str, eval_every: int) -> dict[int, float]:
    """``{step: value}`` of one run's ``key``; the per-step training loss is averaged over each
    interval between evaluations (reported at its end)."""
    values = series.get(key, [])
    if key != "train/loss":
        return dict(values)
    windows: dict[int, list[float]] = {}
    for step, value in values:
        windows.setdefault(math.ceil(step / eval_every) * eval_every, []).append(value)
    return {step: sum(v) / len(v) for step, v in windows.items()}


_SENT = "sent:"  # a panel against the bytes sent rather than the x axis
_X_LABELS = {"step": "optimizer step", "samples": "samples (all workers)", "tokens": "tokens (all workers)"}


def x_scale(config: CompareConfig, run: RunSpec) -> float:
    """What one optimizer step of ``run`` is on the plot's x axis (steps, samples or tokens)."""
    if config.x_axis == "step":
        return 1.0
    batch = _local_batch(run.data)
    if not isinstance(batch, int):
        raise ValueError(f"x_axis: {config.x_axis} needs data.init_args.batch_size in the config")
    if config.x_axis == "tokens":
        context = run.data.get("init_args", {}).get("context")
        if not isinstance(context, int):
            raise ValueError("x_axis: tokens needs data.init_args.context in the config")
        return float(run.workers * batch * context)
    return float(run.workers * batch)


def report(config: CompareConfig, results: Sequence[dict[str, Any]], command: str) -> dict[str, Path]:
    rows = summarize(config, results)
    return {
        "summary": write_summary_csv(config, results),
        "markdown": write_markdown(config, rows, command),
        "plot": plot(config),
    }


def print_table(path: Path) -> None:
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            print(line)
