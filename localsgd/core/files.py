"""Checkpoint files beside the main one: each rank's own state, written atomically, local or remote.

A Local SGD checkpoint taken mid-round holds the *average* (what evaluation and users want), but
continuing as if never stopped needs every worker's own parameters, optimizer state and RNG
streams. Each rank writes its part to ``<checkpoint>.ranks/rank<R>.pt`` next to the main file,
through a temporary name and an atomic rename (or, on an object store, in one write), so a crash
mid-write never leaves a truncated file under the real name. Every front end uses these.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.core import url_to_fs


def rank_file(checkpoint_path: str | os.PathLike[str], rank: int) -> str:
    """Where rank ``rank`` keeps its own state for the checkpoint at ``checkpoint_path``: beside
    the file the path names, through a symlink (``ModelCheckpoint(save_last="link")``'s last.ckpt)."""
    path = str(checkpoint_path)
    if is_local(path):
        path = os.path.realpath(path)
    return f"{path}.ranks/rank{rank}.pt"


def is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a truncated file under ``path``: locally to a temporary
    file beside it, then renamed into place; elsewhere (``s3://``, any fsspec URL) in one write of
    the whole file, which object stores make visible only when complete."""
    if not is_local(path):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        fs, _ = url_to_fs(path)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    local = Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, local)


def exists(path: str) -> bool:
    fs, _ = url_to_fs(path)
    return bool(fs.exists(path))


def remove(path: str) -> None:
    """Remove a rank file and, once it is empty, its ``.ranks`` folder."""
    fs, _ = url_to_fs(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
    with contextlib.suppress(OSError):  # the last rank to get here removes the folder
        if is_local(path):
            os.rmdir(os.path.dirname(path))
        elif not fs.ls(fs._parent(path)):
            fs.rmdir(fs._parent(path))


def load(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load`` that says which file is unreadable instead of a deep unpickling error."""
    try:
        fs, _ = url_to_fs(str(path))
        with fs.open(str(path), "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False)
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
