"""Stopping at a sync: SIGTERM and preemption requests agreed on in the sync's control message.

Lightning 2.6 makes every rank agree on a SIGTERM by broadcasting a flag from rank 0 at every
training batch (``_broadcast_sigterm_tensor``, then ``.item()``), and its SIGTERM handler runs a
broadcast inside the handler; ``PreemptionCheckpoint`` used to all-reduce its flag after every
batch. Under Local SGD that is a collective, and a wait for the slowest rank, at every step:
what Local SGD exists to remove (DESIGN pitfall 11). Here, a rank that is signalled only records
it; the flags travel in the control message that the workers exchange before each sync anyway,
so all ranks learn of a stop at the same step, at most H steps later, and act on it together.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)


def quiet_per_batch_broadcast(trainer: Any) -> None:
    """Turn off Lightning's per-batch SIGTERM broadcast for this fit (on this trainer's loop only).

    It relies on a private method of Lightning's training loop; where a Lightning version has
    none, a warning says that a collective may run at every step (the run is still correct)."""
    loop = trainer.fit_loop.epoch_loop
    if callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
        loop._broadcast_sigterm_tensor = lambda: None  # the sync's control message carries it instead
    else:
        rank_zero_warn(
            "LocalSGDStrategy: this Lightning version's training loop has no _broadcast_sigterm_tensor "
            "to turn off; if it synchronizes a SIGTERM flag another way, a collective may run at every "
            "step. Tested with Lightning 2.6."
        )


def install_sigterm_handler(strategy: Any) -> None:
    """Replace Lightning's SIGTERM handler (which broadcasts inside the handler) with one that
    records the request for the next sync. It does not outlive the fit: Lightning records every
    handler just before the fit's loops start (``on_train_start`` is later) and puts those back
    when the fit ends, also when it raises."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not strategy.stops.local["sigterm"]:
            log.info(f"[rank {strategy.global_rank}] SIGTERM: stopping at the next sync")
            launcher = strategy.launcher
            if launcher is not None:  # processes Lightning started get it too, as with Lightning's
                launcher.kill(signum)
        strategy.stops.request("sigterm")

    signal.signal(signal.SIGTERM, on_sigterm)


def act_on_agreed_stops(strategy: Any, trainer: Any, step: int) -> None:
    """After a sync: an agreed SIGTERM makes Lightning stop after this batch on every rank."""
    if strategy.stops.agreed["sigterm"] and not trainer.received_sigterm:
        rank_zero_info(f"LocalSGD: SIGTERM agreed at the sync after optimizer step {step}: stopping")
        trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after the batch
