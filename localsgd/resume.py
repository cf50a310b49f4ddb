"""Exact resume: what a checkpoint needs beyond the averaged model, per rank, written atomically.

A Local SGD checkpoint taken mid-round holds the *average* (what evaluation and users want),
but continuing as if never stopped needs every worker's own parameters, optimizer state
and RNG streams, and the data position inside the epoch. Each rank writes its part to
``<checkpoint>.ranks/rank<R>.pt`` next to the main file (all ranks save at the same step;
Lightning calls ``save_checkpoint`` on every rank), each file through a temporary name and
an atomic rename, so a crash mid-write never leaves a truncated file under the real name.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rank_file(checkpoint_path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` keeps its own state for the checkpoint at ``checkpoint_path``."""
    return Path(f"{checkpoint_path}.ranks") / f"rank{rank}.pt"


def is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load`` that says which file is unreadable instead of a deep unpickling error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"{what} {path} cannot be read (truncated, or not a checkpoint): {type(err).__name__}: {err}"
        ) from err


def rng_state() -> dict[str, Any]:
    """The process's random streams: torch (CPU and CUDA), Python, NumPy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class SkipFirst:
    """A training loader whose first pass skips the batches a resumed epoch already trained on.

    Lightning restarts a non-resumable loader from the epoch's first batch while its own
    counters go on from the checkpoint; skipping ``skip`` batches (same sampler, same epoch,
    so the same order) puts data and counters back in line.
    """

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader, self.skip = loader, skip
        self.sampler = getattr(loader, "sampler", None)  # Lightning sets the epoch through it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # Runs at the first next(): Lightning makes the iterator before it sets the sampler's
        # epoch, and may make one it never uses.
        skip, self.skip = self.skip, 0
        it = iter(self.loader)
        for _ in range(skip):
            next(it, None)
        yield from it
