"""GPU checks (marker ``gpu``: skipped without CUDA; CI has none)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from common import ToyModule, max_diff, snapshot

from localsgd import LocalSGDStrategy

pytestmark = pytest.mark.gpu


def _fit(path: str) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = ToyModule(bn=True, lr=0.05, momentum=0.9)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=LocalSGDStrategy(sync_every=3, workers_per_device=4, simulation=path),
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return {k: v.cpu() for k, v in snapshot(module).items()}


def test_batched_path_equals_sequential_path_on_cuda() -> None:
    # TF32 would make the two paths differ by more than rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert max_diff(_fit("batched"), _fit("sequential")) <= 1e-4
