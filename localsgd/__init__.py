"""localsgd: Local SGD for PyTorch.

:class:`LocalSGD`, the driver, needs PyTorch only: it hooks a plain training loop's optimizer.
Where Lightning imports, the package also registers its front ends over the same driver:
``Trainer(strategy="localsgd")`` and ``"sgd_baseline"`` for the Trainer, and
``Fabric(strategy="localsgd")`` for Fabric.
"""

from localsgd.core.averager import Averager
from localsgd.core.comm import Communicator, InProcessCommunicator, ProcessGroupCommunicator
from localsgd.core.driver import LocalSGD
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
from localsgd.ft import FaultTolerance, FaultTolerantCommunicator  # torchft imports only when used

_FRONT_ENDS = ("LocalSGDStrategy", "SGDBaselineStrategy", "LocalSGDFabricStrategy")
try:
    import lightning.fabric
    import lightning.pytorch  # noqa: F401
except ImportError as err:  # the core works without it; the front ends say what they need
    _no_lightning: ImportError | None = err
else:
    _no_lightning = None
    from localsgd.fabric import LocalSGDFabricStrategy
    from localsgd.lightning.baseline import SGDBaselineStrategy
    from localsgd.lightning.strategy import LocalSGDStrategy


def __getattr__(name: str) -> object:
    if name in _FRONT_ENDS and _no_lightning is not None:
        raise ImportError(
            f"localsgd.{name} needs Lightning, which does not import here ({_no_lightning}). "
            "HINT: pip install lightning, or use localsgd.LocalSGD in a plain PyTorch loop"
        )
    raise AttributeError(f"module 'localsgd' has no attribute {name!r}")


__all__ = [
    "QSR",
    "Averager",
    "Communicator",
    "Constant",
    "DiLoCo",
    "FaultTolerance",
    "FaultTolerantCommunicator",
    "FunctionSchedule",
    "Hierarchical",
    "InProcessCommunicator",
    "LocalSGD",
    "LocalSGDFabricStrategy",
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
