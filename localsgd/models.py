"""Models for the experiments, and a LightningModule that trains any of them.

No distributed code here: the strategy decides how workers talk.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from localsgd.averaging import check_choice


def mlp(in_features: int, hidden: int, num_classes: int, *, depth: int = 2) -> nn.Sequential:
    """A ReLU MLP with ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(
    in_channels: int, num_classes: int, *, width: int = 16, norm: Literal["batch", "none"] = "batch"
) -> nn.Sequential:
    """Two conv blocks (conv, norm, ReLU, pool) and a linear head; works on 8x8 and larger inputs."""
    check_choice("norm", norm, ("batch", "none"))

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        norm_layer: nn.Module = nn.BatchNorm2d(c_out) if norm == "batch" else nn.Identity()
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"),
            norm_layer,
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(in_channels, width),
        *block(width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class Classifier(pl.LightningModule):
    """Cross-entropy classification of ``net``'s logits, trained with SGD (momentum, weight decay).

    Args:
        net: the network; its output is ``(batch, num_classes)`` logits.
        num_classes: number of classes (for the accuracy metric).
        lr: learning rate.
        momentum: SGD momentum (0 for plain SGD).
        weight_decay: L2 weight decay, applied by the optimizer.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr ({lr!r}) must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum ({momentum!r}) must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay ({weight_decay!r}) must be >= 0")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        acc.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", acc, batch_size=len(y))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
