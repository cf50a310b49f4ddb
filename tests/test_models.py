"""Models added for the experiments: VGG-16 without normalization, the diagonal linear network,
the regression module, and the classifier's loss method."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.models import VGG16, Classifier, DiagonalLinearNet, Regressor, mlp, vgg16


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
