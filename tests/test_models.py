"""Models added for the experiments: VGG-16 without normalization, the diagonal linear network,
the regression module, and the classifier's loss method."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.core.scaling import WarmupDecayLR
from localsgd.research.models import (
    MLP,
    VGG16,
    Classifier,
    DiagonalLinearNet,
    Regressor,
    ResNet,
    SmallCNN,
    mlp,
    vgg16,
    weight_decay_groups,
)


def test_vgg16_has_13_convs_5_pools_and_no_normalization() -> None:
    model = vgg16(num_classes=7, width=8)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nn.Conv2d) == 13 and kinds.count(nn.MaxPool2d) == 5 and kinds.count(nn.Linear) == 1
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # full width: VGG-16 configuration D on CIFAR without BatchNorm, 14.72M parameters
    assert sum(p.numel() for p in VGG16().parameters()) == 14_719_818
    with pytest.raises(ValueError, match=r"width \(0\) must be an integer >= 1"):
        VGG16(width=0)


def test_vgg16_init_keeps_the_first_gradients_alive_without_normalization() -> None:
    def first_conv_grad(model: VGG16) -> float:
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        weight = model[0].weight
        assert weight.grad is not None
        return weight.grad.square().mean().sqrt().item()

    torch.manual_seed(0)
    he = first_conv_grad(VGG16())
    default = VGG16()
    for m in default.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()  # PyTorch's default init
    assert he > 100 * first_conv_grad(default)


def test_diagonal_linear_net() -> None:
    net = DiagonalLinearNet(dim=6, alpha=0.3)
    x = torch.randn(5, 6)
    assert torch.equal(net.weight, torch.zeros(6)) and torch.equal(net(x), torch.zeros(5))
    with torch.no_grad():
        net.u.normal_()
        net.v.normal_()
    torch.testing.assert_close(net(x), x @ (net.u * net.u - net.v * net.v))
    net(x).sum().backward()
    assert net.u.grad is not None and net.v.grad is not None
    torch.testing.assert_close(net.u.grad, 2 * net.u.detach() * x.sum(0))
    torch.testing.assert_close(net.v.grad, -2 * net.v.detach() * x.sum(0))
    with pytest.raises(ValueError, match=r"alpha \(0\) must be > 0"):
        DiagonalLinearNet(dim=3, alpha=0)
    with pytest.raises(ValueError, match=r"dim \(0\) must be an integer >= 1"):
        DiagonalLinearNet(dim=0)


def test_loss_methods_are_the_training_losses() -> None:
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    classifier = Classifier(mlp(8, 5, 3), num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        step_loss = classifier.training_step((x, y), 0)
    torch.testing.assert_close(classifier.loss((x, y)), F.cross_entropy(classifier(x), y))
    torch.testing.assert_close(classifier.loss((x, y)), step_loss)
    regressor = Regressor(nn.Linear(8, 1))
    target = torch.randn(4)
    torch.testing.assert_close(regressor.loss((x, target)), F.mse_loss(regressor(x).squeeze(1), target))
    with pytest.raises(ValueError, match=r"lr \(0\) must be > 0"):
        Regressor(nn.Linear(8, 1), lr=0)


def _ids(params: object) -> list[int]:
    return sorted(id(p) for p in params)  # type: ignore[attr-defined]


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_classifier_decays_conv_and_linear_weights_only_when_asked(norm: Literal["batch", "group"]) -> None:
    net = ResNet(depth=8, norm=norm)  # 7 convs (no biases), 7 norm layers, 1 linear
    model = Classifier(
        net, num_classes=10, lr=0.32, momentum=0.0, weight_decay=5e-4, decay_norms_and_biases=False
    )
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    decay, no_decay = optimizer.param_groups
    weights: list[Any] = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norm_layers = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(weights) == 8 and len(norm_layers) == 7
    exempt: list[Any] = [p for m in norm_layers for p in (m.weight, m.bias)] + [net[-1].bias]
    assert _ids(decay["params"]) == _ids(weights)
    assert _ids(no_decay["params"]) == _ids(exempt)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    for group in (decay, no_decay):  # the paper's plain SGD: lr 0.32, no momentum
        assert (group["lr"], group["momentum"]) == (0.32, 0.0)
    # with zero gradients, one step shrinks the decayed weights by lr x wd and nothing else
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in weights:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - 0.32 * 5e-4))
    for p in exempt:
        assert torch.equal(p.detach(), before[id(p)])


def test_biases_of_convs_and_linears_are_exempt_too() -> None:
    net = SmallCNN(in_channels=3, num_classes=5, norm="none")  # convs with biases, no norm layers
    groups = weight_decay_groups(net, 0.1)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert _ids(groups[0]["params"]) == _ids(m.weight for m in layers)
    assert _ids(groups[1]["params"]) == _ids(m.bias for m in layers)
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.LayerNorm(3), shared)  # a shared layer joins once
    decay, no_decay = weight_decay_groups(twice, 0.1)
    assert _ids(decay["params"]) == _ids([shared.weight])
    assert _ids(no_decay["params"]) == _ids([shared.bias, twice[1].weight, twice[1].bias])
    no_norms = weight_decay_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert len(no_norms) == 1  # an empty group is left out


def test_classifier_default_decays_everything_in_one_group_as_before() -> None:
    model = Classifier(ResNet(depth=8), num_classes=10, lr=0.05, momentum=0.9, weight_decay=1e-4)
    optimizer = model.configure_optimizers()
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    assert [p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters())] == [True] * len(
        list(model.parameters())
    )


def test_classifier_rejects_bad_weight_decay_choices_and_schedules() -> None:
    net = mlp(8, 5, 3)
    with pytest.raises(ValueError, match=r"decay_norms_and_biases \('no'\) must be True .* or False"):
        Classifier(net, num_classes=3, decay_norms_and_biases="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"decay_norms_and_biases \(0\) must be True"):
        Classifier(net, num_classes=3, decay_norms_and_biases=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lr_schedule \(3\) must be None or a function optimizer -> LR"):
        Classifier(net, num_classes=3, lr_schedule=3)  # type: ignore[arg-type]
    model = Classifier(net, num_classes=3, lr_schedule=lambda opt: opt)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"lr_schedule built SGD, not a torch\.optim\.lr_scheduler"):
        model.configure_optimizers()


def test_classifier_lr_schedule_steps_with_every_optimizer_step() -> None:
    schedule = functools.partial(WarmupDecayLR, warmup_steps=2, total_steps=6, decay="step", milestones=[4])
    model = Classifier(mlp(8, 5, 3), num_classes=3, lr=3.2, lr_schedule=schedule)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(scheduler, WarmupDecayLR) and scheduler.optimizer is optimizer
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.6, 3.2, 3.2, 3.2, 0.32, 0.32])
    assert "lr_schedule" not in model.hparams  # a function: not a hyperparameter to save


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_classifier_builds_adam_with_its_betas_and_eps(kind: str) -> None:
    model = Classifier(
        MLP(in_features=4, hidden=8, num_classes=3),
        num_classes=3,
        lr=2e-4,
        optimizer=kind,
        betas=(0.92, 0.992),
        eps=3e-9,
        weight_decay=0.01,
    )
    optimizer = model.configure_optimizers()
    assert type(optimizer) is (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        2e-4,
        (0.92, 0.992),
        3e-9,
        0.01,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "lamb"}, r"optimizer \('lamb'\) must be one of"),
        ({"optimizer": "adam", "momentum": 0.9}, r"momentum \(0.9\) must be 0 with optimizer='adam'"),
        (
            {"optimizer": "adam", "betas": (0.9, 1.0)},
            r"betas \(\(0.9, 1.0\)\) must be two numbers in \[0, 1\)",
        ),
        ({"optimizer": "adam", "eps": 0.0}, r"eps \(0.0\) must be > 0"),
    ],
)
def test_classifier_optimizer_arguments_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Classifier(MLP(in_features=4, hidden=8, num_classes=3), num_classes=3, **kwargs)
