"""``localsgd compare --config X.yaml``: the SGD baseline and Local SGD variants side by side.

Every method of the config trains the same model on the same data, from the same
initialization (per seed), for the same number of optimizer steps, with the same K workers and
local batch; only what the config's ``methods`` entry changes differs (the sync schedule, the
outer optimizer, or an optimizer hyperparameter). The K workers run in one process through the
simulator (``LocalSGDStrategy(workers_per_device=K)``): exactly the math of K processes, and
``comm/*`` count what K processes would send.

The run folder (``out``) holds::

    config.yaml                      the comparison's config, as read
    runs/<method>/seed<S>/           one run: metrics.csv (every step), log.txt, result.json
    summary.csv                      one row per run: final metrics, communication, wall time
    report.md, report.png            per method: mean +- std over seeds; curves with seed bands

``init_from: <checkpoint>`` (for the whole config or one method) starts every run from that
Lightning checkpoint's model weights, with a fresh optimizer, lr schedule and sync state: the
papers' "from a common SGD checkpoint" comparisons. ``{seed}`` in the path is the run's seed,
so that each seed starts from its own phase 1; ``save_final: true`` makes a comparison such a
phase 1 (each run's trained weights in ``final.ckpt`` in its folder).

``sweep: {lr: [...], max_steps: [...]}`` (keys ``lr``, ``max_steps``, ``eval_every``,
``model.<arg>``, ``data.<arg>``) trains every cell of the grid x method x seed (or, with
``sweep: [{lr: .., max_steps: ..}, ...]``, the cells listed, for grids that are not a
product), each cell in ``cells/<cell>/`` with its own report, and writes ``sweep.md``,
``sweep.csv`` and ``sweep.png``: per cell the final test loss, accuracy and Hessian trace,
and each method's gain over ``baseline`` (default: the first method) with its standard error
(:mod:`localsgd.research.compare.sweep`).

A run counts as finished when its ``result.json`` exists and was written for the same run
settings; running the command again skips finished runs and only redraws the report (a
changed method, or a run that was interrupted, is trained again from the start).

The SGD baseline here is ``sync_every: 1`` with ``optimizer_state: average``: averaging the
workers after every step from a common start is synchronous SGD with total batch K x B
(tests/test_strategy_distributed.py checks it against :class:`~localsgd.SGDBaselineStrategy`
for SGD with momentum and weight decay). For Adam and the like, whose update is not linear in
the gradient, ``sync_every: 1`` all-reduces the gradients before each step instead
(``h1_sync="auto"``), which is synchronous Adam (tested against the baseline too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from localsgd.research.compare.config import CompareConfig, RunSpec, load_config, slug
from localsgd.research.compare.report import print_table, read_metrics, report
from localsgd.research.compare.run import build, finished, run_all, train
from localsgd.research.compare.sweep import sweep_report

__all__ = [
    "CompareConfig",
    "RunSpec",
    "build",
    "finished",
    "load_config",
    "main",
    "read_metrics",
    "report",
    "run_all",
    "slug",
    "sweep_report",
    "train",
]


def main(argv: Sequence[str]) -> None:
    """``localsgd compare --config X.yaml [--out DIR] [--jobs N] [--report-only]``"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="localsgd compare",
        description="SGD baseline vs Local SGD variants over several seeds; writes a run folder "
        "with metrics CSVs, report.md and report.png (finished runs are skipped when re-run)",
    )
    parser.add_argument("--config", required=True, help="the comparison's YAML (see configs/compare_*.yaml)")
    parser.add_argument("--out", help="run folder (default: the config's `out`)")
    parser.add_argument("--jobs", type=int, help="runs trained at once (default: the config's `jobs`)")
    parser.add_argument("--report-only", action="store_true", help="redraw the report from finished runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, out=args.out, jobs=args.jobs)
        if args.report_only:
            missing = [r for r in config.runs() if not finished(r)]
            if missing:
                raise ValueError(
                    f"--report-only: {len(missing)} run(s) have no result yet, e.g. {missing[0].folder}"
                )
            results = [json.loads((r.folder / "result.json").read_text()) for r in config.runs()]
        else:
            results = run_all(config, progress=not args.no_progress)
    except ValueError as error:
        parser.exit(2, f"localsgd compare: error: {error}\n")
    command = f"localsgd compare --config {args.config}"  # the run folder and flags aside
    paths = sweep_report(config, results, command) if config.sweep else report(config, results, command)
    print_table(paths["markdown"])
    print(f"\nwrote {paths['markdown']}, {paths['plot']}, {paths['summary']} and runs/ under {config.out}")
