"""The ``localsgd`` command.

``localsgd fit|validate|test|predict --config configs/X.yaml`` is Lightning's LightningCLI:
trainer, strategy, model and data come from YAML by ``class_path`` / ``init_args`` and every
value can be overridden on the command line (``--trainer.strategy.init_args.sync_every=16``);
``localsgd fit --config X.yaml --print_config`` shows the complete configuration.

``localsgd quickstart`` trains the same small CNN on scikit-learn's bundled digits
(no download) with the SGD baseline and with Local SGD, on several CPU processes,
and prints the two results side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from localsgd.core.scaling import WarmupDecayLR
from localsgd.lightning.baseline import SGDBaselineStrategy
from localsgd.lightning.config_errors import error_reason, parse_error_line
from localsgd.lightning.progress import StepLog, summary
from localsgd.lightning.quiet import quiet_known_noise
from localsgd.lightning.strategy import LocalSGDStrategy
from localsgd.research.data import DigitsDataModule
from localsgd.research.models import Classifier, small_cnn

# Strategy arguments the Trainer fills in itself: hidden from YAML and flags, so that a
# strategy's flags are its own (sync_every, buffers, ...) and not DDP plumbing.
_TRAINER_FILLS = (
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
)


def debug_mode() -> bool:
    """``--debug`` (``main`` turns it into ``LOCALSGD_DEBUG=1``): full reports and tracebacks."""
    return os.environ.get("LOCALSGD_DEBUG", "") not in ("", "0")


def speaks() -> bool:
    """Whether this process prints a one-line error. Under torchrun (or Lightning's own launcher)
    every rank reads the same config and hits the same error: rank 0 says it, once."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK"))


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, whose report of a bad config or flag (a usage block, then every
    subtype it tried) becomes one line naming the key and the fix; ``--debug`` keeps the report."""

    args_given: tuple[str, ...] = ()
    """The command line parsed (LocalSGDCLI sets it), to tell which subcommand's keys to suggest."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode():  # nested parsers raise; --debug: the whole report
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self._subcommand_parser()
        if speaks():
            prog = parser.prog.replace(" [options]", "")
            print(f"{prog}: error: {parse_error_line(message, parser, _TRAINER_FILLS)}", file=sys.stderr)
        raise SystemExit(2)

    def _subcommand_parser(self) -> Any:
        """The parser of the subcommand given (``fit``: ``trainer.*`` and the rest), else this one."""
        for action in self._actions:
            parsers = getattr(action, "_name_parser_map", None) or {}
            chosen = [parsers[a] for a in self.args_given if a in parsers]
            if chosen:
                return chosen[0]
        return self


class LocalSGDCLI(LightningCLI):
    """LightningCLI with the strategy's plumbing arguments hidden (see ``_TRAINER_FILLS``)."""

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's own version, plus `skip`; the model and data parts are unchanged.
        parser.add_class_arguments(
            self.trainer_class,
            "trainer",
            fail_untyped=False,
            instantiate=False,
            sub_configs=True,
            skip={f"strategy.init_args.{name}" for name in _TRAINER_FILLS},
        )
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(
            self._datamodule_class, "data", subclass_mode=self.subclass_mode_data, required=False
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        if isinstance(parser, OneLineErrorParser) and isinstance(given, list | tuple):
            parser.args_given = tuple(str(a) for a in given)
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except TypeError as error:  # a constructor refused a config value (`devices: two`)
            if debug_mode():
                raise
            raise ValueError(str(error)) from error

    def before_fit(self) -> None:
        # without Lightning's bar (off in the shipped configs: it floods logs), a line per tenth of the run
        callbacks: list[Any] = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at init
        if self.trainer.progress_bar_callback is None and not any(isinstance(c, StepLog) for c in callbacks):
            callbacks.append(StepLog())

    def after_fit(self) -> None:
        rank_zero_info(summary(self.trainer))

    @staticmethod
    def configure_optimizers(
        lightning_module: pl.LightningModule, optimizer: Optimizer, lr_scheduler: Any = None
    ) -> Any:
        # WarmupDecayLR counts optimizer steps (the papers' schedules do); LightningCLI would
        # step it once per epoch.
        if isinstance(lr_scheduler, WarmupDecayLR):
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)


def lightning_cli(args: Sequence[str] | None = None, **kwargs: Any) -> LocalSGDCLI:
    """Parse ``args`` (``sys.argv[1:]`` when None) and run the subcommand they name.

    Any LightningModule and LightningDataModule can be named by ``class_path``. The seed defaults
    to 0, so that two runs of one config draw the same data order and initialization.
    ``kwargs`` go to :class:`~lightning.pytorch.cli.LightningCLI` (``trainer_defaults``, ``run``, ...).
    """
    kwargs.setdefault("seed_everything_default", 0)
    # a requeued or restarted run writes its config again into the same folder
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault(
        "parser_kwargs",
        {
            "prog": "localsgd",
            "description": "Lightning's fit/validate/test/predict driven by YAML "
            "(`localsgd quickstart --help` for the built-in comparison). A mistake in the config "
            "or a flag ends with one `error:` line; --debug (or LOCALSGD_DEBUG=1) shows the full "
            "report or traceback instead.",
        },
    )
    kwargs.setdefault("parser_class", OneLineErrorParser)
    return LocalSGDCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        **kwargs,
    )


def check_args(args: Sequence[str]) -> None:
    """Parse ``localsgd`` arguments (``["fit", "--config", ...]``) without instantiating or running
    anything. On a bad key or value the parser prints the error, naming it, and exits (code 2)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            lightning_cli([*args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise


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


def quickstart_main(argv: Sequence[str]) -> None:
    """``localsgd quickstart [--workers N] [--sync-every H] ...``"""
    parser = argparse.ArgumentParser(
        prog="localsgd quickstart", description="SGD baseline vs Local SGD on the bundled digits"
    )
    parser.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default 2)")
    parser.add_argument("--sync-every", type=_positive_int, default=8, help="H, steps between averagings")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="local batch per worker")
    parser.add_argument("--lr", type=_positive_float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = quickstart(
        workers=args.workers,
        sync_every=args.sync_every,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    _print_table(rows, args.workers, args.batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    """``localsgd quickstart ...``, ``localsgd compare --config X.yaml`` (:mod:`localsgd.research.compare`),
    or ``localsgd {fit,validate,test,predict} ...`` (LightningCLI)."""
    args = sys.argv[1:] if argv is None else list(argv)
    quiet_known_noise()
    if args[:1] == ["quickstart"]:
        quickstart_main(args[1:])
    elif args[:1] == ["compare"]:
        from localsgd.research.compare import main as compare_main

        compare_main(args[1:])
    else:
        with one_line_errors(f"localsgd {args[0] if args else ''}".strip(), args):
            # None lets LightningCLI read sys.argv itself (it warns when given both)
            lightning_cli(None if argv is None else [a for a in argv if a != "--debug"])


@contextlib.contextmanager
def one_line_errors(prog: str, args: Sequence[str]) -> Iterator[None]:
    """A ValueError (a bad value the library names) ends the command with one ``error:`` line, as
    a misspelled key does, instead of a traceback; ``--debug`` or ``LOCALSGD_DEBUG=1`` keeps it."""
    if "--debug" in args:
        os.environ["LOCALSGD_DEBUG"] = "1"  # the parser reads it; so do Lightning's workers
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")  # LightningCLI reads sys.argv, and re-runs it for Lightning's workers
    try:
        yield
    except ValueError as error:
        if debug_mode():
            raise
        if speaks():  # every rank of a launch fails alike: rank 0 says it
            reason = error_reason(str(error))
            if "does not match the world size" in reason:  # Lightning's check under torchrun
                reason += (
                    " HINT: under torchrun, devices x num_nodes must be --nproc-per-node x --nnodes "
                    "(launch/torchrun.sh sets both)"
                )
            print(f"{prog}: error: {reason} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
