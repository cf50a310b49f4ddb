"""Models for the experiments, and a LightningModule that trains any of them.

No distributed code here: the strategy decides how workers talk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy

from localsgd.core.options import check_choice


class MLP(nn.Sequential):
    """A ReLU MLP on flattened inputs: ``depth`` hidden layers of width ``hidden``.

    Args:
        in_features: input size after flattening (64 for 8x8 digits).
        hidden: width of each hidden layer.
        num_classes: number of output logits.
        depth: number of hidden layers.
    """

    def __init__(self, *, in_features: int, hidden: int, num_classes: int, depth: int = 2) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Two conv blocks (conv, norm, ReLU, pool) and a linear head; works on 8x8 and larger inputs.

    Args:
        in_channels: input channels (1 for digits, 3 for RGB images).
        num_classes: number of output logits.
        width: channels of the first block (the second has twice as many).
        norm: ``"batch"`` for BatchNorm after each conv, ``"none"`` for none (the convs then have biases).
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, width: int = 16, norm: Literal["batch", "none"] = "batch"
    ) -> None:
        check_choice("norm", norm, ("batch", "none"))

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            norm_layer: nn.Module = nn.BatchNorm2d(c_out) if norm == "batch" else nn.Identity()
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"),
                norm_layer,
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        super().__init__(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )


# Function forms of the classes above (YAML configs name the classes: ``class_path`` needs a class).
def mlp(in_features: int, hidden: int, num_classes: int, *, depth: int = 2) -> MLP:
    """A ReLU MLP with ``depth`` hidden layers of width ``hidden`` (see :class:`MLP`)."""
    return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes, depth=depth)


def small_cnn(
    in_channels: int, num_classes: int, *, width: int = 16, norm: Literal["batch", "none"] = "batch"
) -> SmallCNN:
    """Two conv blocks and a linear head (see :class:`SmallCNN`)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width, norm=norm)


# Layers whose parameters (scales and shifts) the papers' setups exempt from weight decay
_NORM_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
)  # fmt: skip

LRScheduleFactory = Callable[[Optimizer], LRScheduler]
"""Builds an LR scheduler for an optimizer: ``functools.partial(WarmupDecayLR, total_steps=...)``, or
from YAML a ``class_path`` with ``init_args`` (the optimizer is given when it exists)."""


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``module``'s parameters as optimizer param groups: ``weight_decay`` on every parameter but
    biases (parameters named ``bias``) and the parameters of normalization layers (BatchNorm,
    GroupNorm, LayerNorm, ...), which get none. Empty groups are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:  # a shared parameter joins one group only
                seen.add(id(p))
                (no_decay if isinstance(m, _NORM_LAYERS) or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _check_sgd(lr: float, momentum: float, weight_decay: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr ({lr!r}) must be > 0")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum ({momentum!r}) must be in [0, 1)")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay ({weight_decay!r}) must be >= 0")


class Classifier(pl.LightningModule):
    """Cross-entropy classification of ``net``'s logits, trained with SGD (momentum, weight decay)
    or Adam.

    Args:
        net: the network; its output is ``(batch, num_classes)`` logits.
        num_classes: number of classes (for the accuracy metric).
        lr: learning rate (the base one when ``lr_schedule`` is given).
        momentum: SGD momentum (0 for plain SGD); must be 0 with Adam (use ``betas``).
        weight_decay: L2 weight decay, applied by the optimizer (Adam: added to the gradient,
            as ``torch.optim.Adam`` does; AdamW: decoupled).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        betas: Adam's moment decay rates (beta1, beta2), each in [0, 1).
        eps: Adam's epsilon (> 0).
        decay_norms_and_biases: ``True``: weight decay on every parameter (one param group).
            ``False``: only on conv / linear weights (every parameter but biases and
            normalization layers' parameters), as in the Local SGD papers' CIFAR setups: two
            param groups, the decayed one first (see :func:`weight_decay_groups`).
        lr_schedule: ``None`` for a constant ``lr``; else a function of the optimizer that builds
            an LR scheduler, stepped after every optimizer step (Lightning's ``interval: step``).
            From YAML: ``class_path: localsgd.WarmupDecayLR`` with its ``init_args``
            (``warmup_steps``, ``total_steps``, ``decay``, ...), which then count optimizer
            steps, not epochs. Not saved with the hyperparameters (``load_from_checkpoint``
            builds the model without it; resuming a fit restores the scheduler's state).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decay_norms_and_biases: bool = True,
        lr_schedule: LRScheduleFactory | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        _check_sgd(lr, momentum, weight_decay)
        check_choice("optimizer", optimizer, ("sgd", "adam", "adamw"))
        if optimizer != "sgd" and momentum != 0:
            raise ValueError(
                f"momentum ({momentum!r}) must be 0 with optimizer={optimizer!r}: set betas instead"
            )
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas ({betas!r}) must be two numbers in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps ({eps!r}) must be > 0")
        if not isinstance(decay_norms_and_biases, bool):
            raise ValueError(
                f"decay_norms_and_biases ({decay_norms_and_biases!r}) must be True (weight decay on "
                "every parameter) or False (not on biases and normalization layers)"
            )
        if lr_schedule is not None and not callable(lr_schedule):
            raise ValueError(
                f"lr_schedule ({lr_schedule!r}) must be None or a function optimizer -> LR scheduler. "
                "HINT: functools.partial(localsgd.WarmupDecayLR, total_steps=...), or in YAML "
                "class_path: localsgd.WarmupDecayLR with init_args"
            )
        self.save_hyperparameters(ignore=["net", "lr_schedule"])
        self.net = net
        self.lr_schedule = lr_schedule
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loss on ``batch`` (mean cross-entropy), without logging: what
        :class:`localsgd.research.metrics.SharpnessCallback` takes the Hessian of."""
        x, y = batch
        return F.cross_entropy(self(x), y)

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

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # LightningCLI's hparams are its config; one saved before this argument existed lacks it
        decay_all = hp.get("decay_norms_and_biases", True)
        params = self.parameters() if decay_all else weight_decay_groups(self, hp["weight_decay"])
        kind = hp.get("optimizer", "sgd")
        if kind == "sgd":
            optimizer: Optimizer = torch.optim.SGD(
                params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
            )
        else:
            adam = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
            optimizer = adam(
                params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"]
            )
        if self.lr_schedule is None:
            return optimizer
        scheduler = self.lr_schedule(optimizer)
        if not isinstance(scheduler, LRScheduler):
            raise ValueError(
                f"lr_schedule built {type(scheduler).__name__}, not a torch.optim.lr_scheduler.LRScheduler"
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm: 8 groups where the width allows (16, 32, 64 channels -> 2, 4, 8 per group)
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a parameter-free shortcut (subsample, zero-pad the channels: option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class ResNet(nn.Sequential):
    """ResNet for 32x32 images (He et al., CVPR 2016, section 4.2): depth 6n + 2, three stages of
    n basic blocks with 16, 32, 64 channels (ResNet-20: n = 3, 0.27M parameters; ResNet-56:
    n = 9, 0.85M).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        num_classes: output logits.
        in_channels: input channels.
        norm: ``"batch"`` (BatchNorm, as in the paper) or ``"group"`` (GroupNorm, no running
            statistics: nothing for Local SGD to average besides the parameters).
        width: channels of the first stage.
    """

    def __init__(
        self,
        *,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: Literal["batch", "group"] = "batch",
        width: int = 16,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth ({depth!r}) must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110)")
        check_choice("norm", norm, ("batch", "group"))
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            _norm(norm, width),
            nn.ReLU(),
        ]
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range(n):
                layers.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1, norm))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


def resnet(depth: int = 20, *, num_classes: int = 10, norm: Literal["batch", "group"] = "batch") -> ResNet:
    """A CIFAR ResNet of ``depth`` (see :class:`ResNet`)."""
    return ResNet(depth=depth, num_classes=num_classes, norm=norm)


# VGG-16's convolution widths, "M" a 2x2 max-pool (Simonyan & Zisserman, configuration D)
_VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16(nn.Sequential):
    """VGG-16 for 32x32 images without normalization layers: 13 3x3 convs with ReLU, five max-pools
    (32x32 -> 1x1) and one linear head (the CIFAR variant used in the Local SGD papers' VGG runs;
    15M parameters). Convs start from He (fan-out) initialization, as torchvision's VGG: without
    normalization, PyTorch's default init makes the first layers' gradients vanish.

    Args:
        num_classes: output logits.
        in_channels: input channels.
        width: channels of the first conv (64); every layer scales with it (a narrower net for tests).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width ({width!r}) must be an integer >= 1")
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in _VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c_out = int(v) * width // 64
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


def vgg16(num_classes: int = 10, *, width: int = 64) -> VGG16:
    """VGG-16 without normalization for 32x32 images (see :class:`VGG16`)."""
    return VGG16(num_classes=num_classes, width=width)


class DiagonalLinearNet(nn.Module):
    """The diagonal linear network f(x) = <x, w>, w = u * u - v * v (elementwise), of the
    implicit-bias and label-noise analyses: started at u = v = alpha (so w = 0), small alpha
    biases training towards sparse w.

    Args:
        dim: input dimension.
        alpha: initialization scale (> 0).
    """

    def __init__(self, *, dim: int, alpha: float = 0.1) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim ({dim!r}) must be an integer >= 1")
        if not alpha > 0:
            raise ValueError(f"alpha ({alpha!r}) must be > 0")
        self.u = nn.Parameter(torch.full((dim,), float(alpha)))
        self.v = nn.Parameter(torch.full((dim,), float(alpha)))

    @property
    def weight(self) -> Tensor:
        """The linear predictor w = u * u - v * v."""
        return self.u * self.u - self.v * self.v

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


class Regressor(pl.LightningModule):
    """Mean-squared-error regression of ``net``'s output, trained with SGD; logs ``train/loss``,
    ``val/loss`` and ``test/loss``.

    Args:
        net: the network; its output has one value per sample (shape ``(batch,)`` or ``(batch, 1)``).
        lr: learning rate.
        momentum: SGD momentum (0 for plain SGD).
        weight_decay: L2 weight decay, applied by the optimizer.
    """

    def __init__(
        self, net: nn.Module, *, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        _check_sgd(lr, momentum, weight_decay)
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loss on ``batch`` (mean squared error), without logging."""
        x, y = batch
        return F.mse_loss(self(x).reshape(y.shape), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), sync_dist=True, batch_size=len(batch[1]))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.loss(batch), sync_dist=True, batch_size=len(batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
        )
