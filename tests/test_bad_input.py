"""Bad input across the public API and the CLI: each fails with a message that names the field
and the rule (never a deep traceback, a hang or silently wrong training)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from common import ToyNet

from localsgd import (
    QSR,
    Averager,
    DiLoCo,
    Hierarchical,
    InProcessCommunicator,
    LocalSGDStrategy,
    PostLocal,
    SGDBaselineStrategy,
    SlowMo,
    WarmupDecayLR,
    linear_scaling_rule,
    sqrt_scaling_rule,
)
from localsgd.research.data import DigitsDataModule
from localsgd.research.models import Classifier, ResNet

API: list[tuple[str, Callable[[], object], str]] = [
    ("sync_every zero", lambda: LocalSGDStrategy(sync_every=0), r"sync_every \(0\) must be an integer >= 1"),
    ("sync_every text", lambda: LocalSGDStrategy(sync_every="x"), r"sync_every \('x'\) must be an integer"),
    (
        "buffers",
        lambda: LocalSGDStrategy(buffers="all"),
        r"buffers \('all'\) must be one of 'average', 'local'",
    ),
    ("optimizer_state", lambda: LocalSGDStrategy(optimizer_state="keep"), r"optimizer_state \('keep'\)"),
    ("outer_optimizer", lambda: LocalSGDStrategy(outer_optimizer=torch.optim.SGD), r"outer_optimizer \("),
    ("workers_per_device", lambda: LocalSGDStrategy(workers_per_device=0), r"workers_per_device \(0\)"),
    ("simulation", lambda: LocalSGDStrategy(simulation="gpu"), r"simulation \('gpu'\) must be one of"),
    ("nonfinite", lambda: LocalSGDStrategy(nonfinite="ignore"), r"nonfinite \('ignore'\) must be one of"),
    ("log_divergence", lambda: LocalSGDStrategy(log_divergence="yes"), r"log_divergence \('yes'\)"),
    ("h1_sync", lambda: LocalSGDStrategy(h1_sync="grads"), r"h1_sync \('grads'\) must be one of 'auto'"),
    ("start_method", lambda: LocalSGDStrategy(start_method="thread"), r"start_method \('thread'\)"),
    ("baseline flag", lambda: SGDBaselineStrategy(find_unused_parameters=1), r"find_unused_parameters \(1\)"),
    ("QSR base", lambda: QSR(0, 0.1), r"base \(0\) must be an integer >= 1"),
    ("QSR alpha", lambda: QSR(2, -0.1), r"alpha \(-0.1\) must be a finite number > 0"),
    ("Hierarchical", lambda: Hierarchical(4, 10), r"inner \(4\) must divide outer \(10\)"),
    ("PostLocal switch", lambda: PostLocal(4), r"exactly one of switch_step \(None\) and switch_epoch"),
    ("SlowMo lr", lambda: SlowMo(lr=0.0), r"lr \(0.0\) must be a number > 0"),
    ("DiLoCo momentum", lambda: DiLoCo(momentum=1.5), r"momentum \(1.5\) must be a number in \[0, 1\)"),
    ("linear rule batch", lambda: linear_scaling_rule(0.1, base_batch=0, batch=8), r"base_batch \(0\)"),
    ("sqrt rule kappa", lambda: sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=0), r"kappa"),
    (
        "sqrt rule beta",
        lambda: sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=11),
        r"betas\[0\] \(0.9\) rescaled by kappa \(11\)",
    ),
    (
        "lr schedule",
        lambda: WarmupDecayLR(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)]), warmup_steps=5, total_steps=2
        ),
        r"warmup_steps",
    ),
    ("classifier lr", lambda: Classifier(ToyNet(), num_classes=4, lr=-1.0), r"lr \(-1.0\) must be > 0"),
    ("resnet depth", lambda: ResNet(depth=21), r"depth \(21\) must be 6n \+ 2"),
    ("digits batch", lambda: DigitsDataModule(batch_size=0), r"batch_size \(0\) must be an integer >= 1"),
    (
        "averager workers",
        lambda: Averager([ToyNet()], InProcessCommunicator(2)),
        r"modules \(1\) must hold one",
    ),
    ("communicator", lambda: InProcessCommunicator(num_workers=-3), r"num_workers \(-3\) must be an integer"),
]


@pytest.mark.parametrize(("case", "build", "match"), API, ids=[c[0] for c in API])
def test_api_rejects_bad_input_naming_the_field(case: str, build: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localsgd.cli", *args], capture_output=True, text=True, timeout=120
    )


CLI = [
    (("quickstart", "--workers", "0"), "--workers: must be an integer >= 1, got '0'"),
    (("quickstart", "--lr", "-1"), "--lr: must be a number > 0, got '-1'"),
    (("fit", "--config", "configs/quickstart.yaml", "--trainer.strategy.init_args.sync_evry=4"), "sync_evry"),
    (("fit", "--config", "configs/quickstart.yaml", "--trainer.strategy.init_args.buffers=both"), "buffers"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needle"), CLI, ids=[" ".join(a[:2]) + " " + n for a, n in CLI])
def test_cli_rejects_bad_input_naming_the_field(args: tuple[str, ...], needle: str) -> None:
    out = _cli(*args, *(["--print_config"] if args[0] == "fit" else []))
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr  # a message, not a stack
