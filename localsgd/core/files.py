"""Checkpoint files beside the main one: each rank's own state, written atomically, local or remote.

A Local SGD checkpoint taken mid-round holds the *average* (what evaluation and users want), but
continuing as if never stopped needs every worker's own parameters, optimizer state and RNG
streams. Each rank writes its part to ``<checkpoint>.ranks/step<N>/rank<R>.pt`` next to the main
file, through a temporary name, an fsync and an atomic rename (or, on an object store, in one
write), so a crash mid-write never leaves a truncated file under the real name.

The *set* is made whole the same way, with the main file as its commit point: every rank writes
its file into the folder of this save's step, all ranks wait for each other, rank 0 writes the
main file (which names that folder) through a temporary name, an fsync and a rename, all wait
again, and only then does each rank delete its files of the sets before. A crash at any point
leaves the main file of the previous save and the set it names, or the new main file and its
whole set: a resume never sees a mix. Every front end uses these.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.core import url_to_fs


def rank_file(checkpoint_path: str | os.PathLike[str], rank: int, generation: str | bool | None) -> str:
    """Where rank ``rank`` keeps its own state for the checkpoint at ``checkpoint_path``: beside
    the file the path names, through a symlink (``ModelCheckpoint(save_last="link")``'s last.ckpt),
    in the folder of the save that wrote it (``generation``, as the main file names it; anything
    but a name, such as the ``True`` earlier versions recorded: their flat layout)."""
    folder = ranks_folder(checkpoint_path)
    if isinstance(generation, str) and generation:
        return f"{folder}/{generation}/rank{rank}.pt"
    return f"{folder}/rank{rank}.pt"


def ranks_folder(checkpoint_path: str | os.PathLike[str]) -> str:
    path = str(checkpoint_path)
    if is_local(path):
        path = os.path.realpath(path)
    return f"{path}.ranks"


def generation(step: int) -> str:
    """The name of the rank files' folder for a save at optimizer step ``step``: the same on every
    rank (they save at the same step), and a save at the same step writes the same state."""
    return f"step{step}"


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
    durable_replace(tmp, local)


def save_set(
    checkpoint_path: str | os.PathLike[str],
    rank: int,
    step: int,
    own: Any,
    write_main: Callable[[], None],
    barrier: Callable[[], None],
) -> None:
    """Save a checkpoint as a set that is whole or absent (see the module docstring): this rank's
    ``own`` state into the folder of ``step``, then (every rank's file on disk) ``write_main``,
    which writes the main file naming that folder (:func:`generation`), then (it committed)
    this rank's files of the sets before are deleted. Every rank calls it."""
    folder = generation(step)
    atomic_save(own, rank_file(checkpoint_path, rank, folder))
    barrier()
    write_main()
    barrier()
    retire(checkpoint_path, rank, keep=folder)


def write_atomically(write: Callable[[str], None], path: str | os.PathLike[str]) -> None:
    """``write(p)`` writes the file at ``p`` (on rank 0 only, as Lightning's and Fabric's
    checkpoint writers do): locally to a temporary name, fsynced and renamed into place, so a crash
    leaves the previous file; elsewhere (an object store makes one write visible whole) directly."""
    if not is_local(path):
        write(str(path))
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    if os.path.exists(tmp):  # the rank that writes
        durable_replace(tmp, path)


def durable_replace(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished file ``tmp`` to ``path`` so that a power cut cannot undo it: the file's
    bytes reach the disk before the rename, and the rename before this returns."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def exists(path: str) -> bool:
    fs, _ = url_to_fs(path)
    return bool(fs.exists(path))


def retire(checkpoint_path: str | os.PathLike[str], rank: int, keep: str | None) -> None:
    """Delete rank ``rank``'s files of every set of ``checkpoint_path`` but ``keep`` (``None``: all
    of them, with the ``.ranks`` folder once it is empty), and each folder once it is empty."""
    folder = ranks_folder(checkpoint_path)
    fs, _ = url_to_fs(folder)
    try:
        entries = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return
    for name in entries:
        if name == keep:
            continue
        if name == f"rank{rank}.pt":  # the flat layout
            _remove_file(fs, f"{folder}/{name}")
        elif not name.endswith(".pt") and not name.startswith("."):
            _remove_file(fs, f"{folder}/{name}/rank{rank}.pt")
            _remove_empty(fs, f"{folder}/{name}")  # the last rank to get here removes the folder
    if keep is None:
        _remove_empty(fs, folder)


def _remove_file(fs: Any, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def _remove_empty(fs: Any, folder: str) -> None:
    with contextlib.suppress(OSError):  # not empty (another rank's file), or gone already
        if is_local(folder):
            os.rmdir(folder)
        elif not fs.ls(folder):
            fs.rmdir(folder)


def load(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """``torch.load`` of a dict of saved state that says which file is unreadable instead of a deep
    unpickling error; any other error (a class that moved, a type ``weights_only`` refuses, no
    memory) is re-raised as it is, with a note naming the file."""
    try:
        fs, _ = url_to_fs(str(path))
        with fs.open(str(path), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:
        if unreadable(err):
            raise ValueError(
                f"{what} {path} cannot be read (truncated, or not a checkpoint): {type(err).__name__}: {err}"
            ) from err
        add_note(err, f"while loading {what} {path}")
        raise
    if not isinstance(state, dict):
        raise ValueError(
            f"{what} {path} holds a {type(state).__name__}, not a dict of saved state. "
            "HINT: is it the file this checkpoint's rank wrote?"
        )
    return state


def unreadable(err: BaseException) -> bool:
    """Whether ``torch.load``'s ``err`` means the file is cut short or is no torch file at all (its
    zip archive, its pickle stream, or the legacy format's header broken), rather than a real cause
    inside a whole file, such as a class that moved or a type ``weights_only`` refuses."""
    if isinstance(err, (EOFError, zipfile.BadZipFile)):
        return True
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        # weights_only wraps every unpickling error in one message; a refused class is named in it
        return "Unsupported global" not in text
    # torch's zip reader, and its legacy reader's header and length checks
    broken = ("PytorchStreamReader failed reading", "unexpected EOF", "corrupt file")
    return isinstance(err, RuntimeError) and any(b in text for b in broken)


def add_note(err: BaseException, note: str) -> None:
    """Add context to ``err`` without replacing it (shown under the error from Python 3.11)."""
    if hasattr(err, "add_note"):
        err.add_note(note)


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
