"""The ``localsgd`` command.

``localsgd quickstart`` trains the same small CNN on scikit-learn's bundled digits
(no download) with the SGD baseline and with Local SGD, on several CPU processes,
and prints the two results side by side.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from localsgd.data import DigitsDataModule
from localsgd.models import Classifier, small_cnn
from localsgd.strategy import LocalSGDStrategy, SGDBaselineStrategy


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def quickstart(
    *, workers: int, sync_every: int, epochs: int, batch_size: int, lr: float, seed: int
) -> list[dict[str, Any]]:
    """Fit the baseline and Local SGD with the same data, model init and step budget."""
    rows = []
    strategies: list[tuple[str, pl.strategies.Strategy]] = [
        ("SGD baseline", SGDBaselineStrategy(start_method="spawn")),
        (f"Local SGD, H={sync_every}", LocalSGDStrategy(sync_every=sync_every, start_method="spawn")),
    ]
    for name, strategy in strategies:
        pl.seed_everything(seed, verbose=False)
        data = DigitsDataModule(batch_size=batch_size)
        model = Classifier(small_cnn(1, data.num_classes), num_classes=data.num_classes, lr=lr)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=workers,
            strategy=strategy,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=epochs,
        )
        start = time.perf_counter()
        trainer.fit(model, data)
        metrics = trainer.callback_metrics
        rows.append(
            {
                "method": name,
                "test_acc": float(metrics["val/acc"]),
                "test_loss": float(metrics["val/loss"]),
                "comm_rounds": int(metrics["comm/rounds"]),
                "comm_mb": float(metrics["comm/bytes"]) / 1e6,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def _print_table(rows: Sequence[dict[str, Any]], workers: int, batch_size: int) -> None:
    # the baseline all-reduces gradients once per step, so its round count is the step count
    steps = rows[0]["comm_rounds"]
    print(
        f"\ndigits (8x8, 10 classes), small CNN, {workers} workers x local batch {batch_size} "
        f"= {workers * batch_size} total batch, {steps} optimizer steps each"
    )
    header = f"{'method':<18} {'test acc':>9} {'test loss':>10} {'comm rounds':>12} {'MB/worker':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<18} {r['test_acc']:>9.4f} {r['test_loss']:>10.4f} "
            f"{r['comm_rounds']:>12} {r['comm_mb']:>10.2f}"
        )
    print(f"(wall time {sum(r['seconds'] for r in rows):.0f} s, process start-up included)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="localsgd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    qs = sub.add_parser("quickstart", help="SGD baseline vs Local SGD on the bundled digits")
    qs.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default 2)")
    qs.add_argument("--sync-every", type=_positive_int, default=8, help="H, steps between averagings")
    qs.add_argument("--epochs", type=_positive_int, default=10)
    qs.add_argument("--batch-size", type=_positive_int, default=16, help="local batch per worker")
    qs.add_argument("--lr", type=_positive_float, default=0.05)
    qs.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        rows = quickstart(
            workers=args.workers,
            sync_every=args.sync_every,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        _print_table(rows, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
