"""Things users try first, each with the answer README gives, checked: torch.compile, loggers
other than CSV. (bf16-mixed: tests/test_real_configs.py; GPUs: tests/test_gpu.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import ToyModule, make_trainer, max_diff, snapshot

from localsgd import LocalSGDStrategy


class _Compiled(ToyModule):
    def __init__(self, compiled: bool) -> None:
        super().__init__(lr=0.1, momentum=0.9)
        if compiled:  # the inner network, not the LightningModule (README: torch.compile)
            self.model.net = torch.compile(self.model.net)


def _fit(compiled: bool, workers: int) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = _Compiled(compiled)
    make_trainer(LocalSGDStrategy(sync_every=3, workers_per_device=workers), max_steps=8).fit(module)
    # a compiled module keeps its parameters under _orig_mod
    return {k.replace("_orig_mod.", ""): v for k, v in snapshot(module).items()}


@pytest.mark.slow
def test_a_compiled_inner_network_trains_as_the_uncompiled_one() -> None:
    # the buckets re-point parameters into flat storage, and simulated workers swap them per
    # worker: the compiled code must follow both
    for workers in (1, 2):
        assert max_diff(_fit(True, workers), _fit(False, workers)) <= 1e-6, workers


def test_comm_metrics_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    strategy = LocalSGDStrategy(sync_every=2, workers_per_device=2)
    make_trainer(strategy, max_steps=6, logger=logger, log_every_n_steps=1).fit(ToyModule())
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    rounds: list[Any] = acc.Scalars("comm/rounds")
    assert [int(e.value) for e in rounds] == [0, 1, 1, 2, 2, 3]
    assert [e.step for e in rounds] == list(range(6))
    assert acc.Scalars("comm/bytes")[-1].value == 3 * strategy.driver.averager.num_bytes
