"""localsgd: Local SGD for PyTorch Lightning.

Importing the package registers the strategies ``"localsgd"`` and ``"sgd_baseline"``
with Lightning, so ``Trainer(strategy="localsgd")`` works.
"""

from localsgd.core.averager import Averager
from localsgd.core.comm import Communicator, InProcessCommunicator, ProcessGroupCommunicator
from localsgd.core.outer import DiLoCo, OuterOptimizer, SlowMo
from localsgd.core.scaling import (
    WarmupDecayLR,
    intrinsic_lr,
    linear_scaling_rule,
    sgdm_effective_lr,
    sgdm_lr_for_effective,
    sqrt_scaling_rule,
)
from localsgd.core.schedules import QSR, Constant, FunctionSchedule, Hierarchical, PostLocal, SyncSchedule
from localsgd.lightning.baseline import SGDBaselineStrategy
from localsgd.lightning.strategy import LocalSGDStrategy

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
