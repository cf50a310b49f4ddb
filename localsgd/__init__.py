"""localsgd: Local SGD for PyTorch Lightning.

Importing the package registers the strategies ``"localsgd"`` and ``"sgd_baseline"``
with Lightning, so ``Trainer(strategy="localsgd")`` works.
"""

from localsgd.averaging import Averager
from localsgd.comm import Communicator, InProcessCommunicator, ProcessGroupCommunicator
from localsgd.schedules import Constant, SyncSchedule
from localsgd.strategy import LocalSGDStrategy, SGDBaselineStrategy

__all__ = [
    "Averager",
    "Communicator",
    "Constant",
    "InProcessCommunicator",
    "LocalSGDStrategy",
    "ProcessGroupCommunicator",
    "SGDBaselineStrategy",
    "SyncSchedule",
]
__version__ = "0.1.0"
