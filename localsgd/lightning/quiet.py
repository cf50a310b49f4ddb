"""Known, harmless messages that the project's own commands would print in every run.

Installed by the ``localsgd`` command and ``localsgd compare``'s runs only (not on import), so a
user's own scripts see everything their libraries say. Each filter matches one message.
"""

from __future__ import annotations

import logging
import warnings


class _NoLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # an advertisement for a cloud logger, printed by every Trainer: no information about the run
        return not record.getMessage().startswith("💡 Tip: For seamless cloud logging")


def quiet_known_noise() -> None:
    # Lightning 2.6 builds torch pytree LeafSpec objects, which torch 2.13 deprecates: a note for
    # Lightning's maintainers, printed twice per fit; nothing a user can or needs to change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # on a machine with Slurm installed, Lightning suggests srun for every run started without it;
    # the SLURM launchers here do use srun (sbatch template) or submitit, so a run without srun is local
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_NoLoggerTip())
