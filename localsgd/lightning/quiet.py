"""Known, harmless messages that the project's own commands would print in every run.

Installed by the ``localsgd`` command and ``localsgd compare``'s runs only (not on import), so a
user's own scripts see everything their libraries say. Each filter matches one message.
"""

from __future__ import annotations

import logging
import os
import re
import warnings


class _NoLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # advertisements for a cloud logger and a model registry (litlogger, litmodels), printed by
        # every Trainer: no information about the run
        return not record.getMessage().startswith("💡 Tip: For seamless cloud")


# (message start, why): the warnings filtered in this process and, through PYTHONWARNINGS, in the
# processes it spawns (Lightning's "spawn" start method, compare's runs), which start fresh
_WARNINGS = {
    # Lightning 2.6 builds torch pytree LeafSpec objects, which torch 2.13 deprecates: a note for
    # Lightning's maintainers, printed twice per fit and rank; nothing a user can or needs to change
    "`isinstance(treespec": "LeafSpec deprecation",
    # on a machine with Slurm installed, Lightning suggests srun for every run started without it;
    # the SLURM launchers here do use srun (sbatch template) or submitit, so a run without srun is local
    "The `srun` command is available on your system but is not used": "srun hint",
    # every `localsgd fit --ckpt_path=...` logs to a new version folder, so on every resume each
    # rank said that the previous folder's best-k bookkeeping is not carried over
    "The dirpath has changed from": "new version folder on resume",
}


def quiet_known_noise() -> None:
    for start in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start))
    # PYTHONWARNINGS entries are "action:message": a message with a comma or colon cannot be one
    entries = [f"ignore:{start}" for start in _WARNINGS if not set(start) & {",", ":"}]
    current = os.environ.get("PYTHONWARNINGS", "")
    os.environ["PYTHONWARNINGS"] = ",".join(
        e for e in [current, *entries] if e and e not in current.split(",")
    )
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_NoLoggerTip())
