"""Datasets for the experiments. No distributed code: Lightning's DistributedSampler
gives each worker its own shard of whatever these loaders hold."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from localsgd.schedules import check_positive_int


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download.

    Args:
        batch_size: local batch per worker.
        test_fraction: share of the images held out for testing (and validation).
        split_seed: seed of the fixed train/test split (independent of the training seed).
    """

    num_classes = 10
    in_features = 64

    def __init__(self, *, batch_size: int = 32, test_fraction: float = 0.25, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction ({test_fraction!r}) must be in (0, 1)")
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        num_test = round(self.test_fraction * len(y))
        test, train = order[:num_test], order[num_test:]
        self.train_set = TensorDataset(x[train], y[train])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
