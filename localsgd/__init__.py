"""localsgd: Local SGD for PyTorch Lightning.

Importing the package registers the strategies ``"localsgd"`` and ``"sgd_baseline"``
with Lightning, so ``Trainer(strategy="localsgd")`` works.
"""

from localsgd.averaging import Averager
from localsgd.baseline import SGDBaselineStrategy
from localsgd.comm import Communicator, InProcessCommunicator, ProcessGroupCommunicator
from localsgd.outer import DiLoCo, OuterOptimizer, SlowMo
from localsgd.scaling import (
    WarmupDecayLR,
    intrinsic_lr,
    linear_scaling_rule,
    sgdm_effective_lr,
    sgdm_lr_for_effective,
    sqrt_scaling_rule,
)
from localsgd.schedules import QSR, Constant, FunctionSchedule, Hierarchical, PostLocal, SyncSchedule
from localsgd.strategy import LocalSGDStrategy

__all__ = [
    "QSR",
    "Averager",
    "Communicator",
    "Constant",
    "DiLoCo",
    "FunctionSchedule",
    "Hierarchical",
    "InProcessCommunicator",
    "LocalSGDStrategy",
    "OuterOptimizer",
    "PostLocal",
    "ProcessGroupCommunicator",
    "SGDBaselineStrategy",
    "SlowMo",
    "SyncSchedule",
    "WarmupDecayLR",
    "intrinsic_lr",
    "linear_scaling_rule",
    "sgdm_effective_lr",
    "sgdm_lr_for_effective",
    "sqrt_scaling_rule",
]
__version__ = "0.1.0"
