"""Sharded workers (``shards_per_worker=S`` of the Trainer's and Fabric's strategies, a plain
loop's ``LocalSGD(..., mesh=mesh)``): the check that the model sharded itself, and their
checkpoints (:func:`save_checkpoint` and :func:`load_checkpoint` for plain loops and Fabric).

A sharded run's checkpoint is a folder that ``torch.distributed.checkpoint`` (DCP) writes, as
Lightning's ``ModelParallelStrategy`` writes one, in which every process writes its own shards:

- the global model (the same on every worker: DCP writes each shard once), under the key the
  front end gives it (``"state_dict"`` for the Trainer);
- ``worker<k>``: worker k's own model and optimizer states (its S processes write a shard each);
- ``rank<r>``: process r's own part of the sync state (error-feedback residuals, its part of the
  outer optimizer's state, a round in flight, RNG streams);
- ``meta.pt``: everything else (loop progress, callbacks, the sync schedule), by rank 0.

A resume on the same (K, S) continues bitwise. On another layout DCP reshards what has a global
meaning (the global model, and worker 0's optimizer state for every worker) and every worker
restarts a round from them. Full tensors (gathered by ``torch.distributed.checkpoint.state_dict``)
load a checkpoint of whole workers into sharded ones.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from localsgd.core.buckets import sharded
from localsgd.core.files import rng_state, set_rng_state


def check_sharded(module: nn.Module, shards_per_worker: int) -> None:
    """A ValueError if ``module`` did not shard itself (no DTensor parameter after configure_model)."""
    if not sharded(list(module.parameters())):
        raise ValueError(
            f"shards_per_worker ({shards_per_worker}) > 1 needs a model that is sharded: no parameter is "
            "an FSDP2 shard. HINT: in LightningModule.configure_model() (or Fabric's parallelize_fn), "
            "fully_shard(block, mesh=device_mesh['shard']) for each block, then the same for the root"
        )


def _options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors: gathered inside each worker on saving, on the CPU and kept on global rank 0
    # only; on loading, every rank reads them and takes its shards
    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def full_model_state(module: nn.Module) -> dict[str, Any]:
    """``module``'s state as full tensors on global rank 0 (collective over each worker's processes)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_full_model_state(module: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Full tensors (a checkpoint's, read on every rank) into ``module``'s shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, dict(state), options=_options(strict))


def full_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as full tensors on global rank 0 (collective over each worker's processes)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_full_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Full tensors (a checkpoint's, read on every rank) into ``optimizer``'s state of the shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options())


# ---------------------------------------------------------------------- DCP checkpoints
META = "meta.pt"
"""The non-tensor part of a sharded checkpoint, written by rank 0 (Lightning's name for it)."""


def is_dcp_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a folder that ``torch.distributed.checkpoint`` completed."""
    folder = Path(path)
    return folder.is_dir() and (folder / ".metadata").is_file()


def sharded_model_state(module: nn.Module) -> dict[str, Any]:
    """``module``'s state as this process's shards (DTensors), copied: saving may come after the
    module's values have changed back (the average swapped out)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module)
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def sharded_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as this process's shards, keyed by parameter name (DCP's layout)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def save_dcp(
    path: Any, state: dict[str, Any], meta: dict[str, Any], rank: int, barrier: Callable[[], None]
) -> None:
    """Every process writes its part of ``state`` to the folder ``path`` (collective); rank 0 adds
    ``meta``. Written to ``<path>.partial`` and renamed into place when complete: a crash while
    writing leaves the previous checkpoint under ``path``, never a mix of two."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    old = final.with_name(final.name + ".old")
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a crash
    if rank == 0 and not (final.exists() or final.is_symlink()) and old.exists():
        os.replace(old, final)  # a crash between swap_in's two renames: the previous one is back
    barrier()
    dcp.save(state, checkpoint_id=partial)  # returns once every process has written its part
    if rank == 0:
        torch.save(meta, partial / META)
        swap_in(partial, final)
    barrier()


def swap_in(new: Path, final: Path) -> None:
    """Put the finished folder ``new`` at ``final`` and delete what was there, so that ``final``
    always holds one whole checkpoint: on Linux by exchanging the two in one step
    (``renameat2(RENAME_EXCHANGE)``); elsewhere, or where the file system refuses it, by two
    renames, with a crash between them undone by the next save (the old one is at ``.old``)."""
    old = final.with_name(final.name + ".old")
    if not (final.exists() or final.is_symlink()):
        os.replace(new, final)
    elif _exchange(new, final):
        _remove(new)  # now the previous checkpoint
        return
    else:
        os.replace(final, old)
        os.replace(new, final)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_meta(path: Any) -> dict[str, Any]:
    meta = torch.load(Path(path) / META, map_location="cpu", weights_only=False)
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path}: its {META} holds a {type(meta).__name__}, not a dict")
    return meta


def load_dcp(path: Any, template: dict[str, Any]) -> None:
    """Load ``template``'s keys from the folder ``path`` into its tensors, in place (collective);
    DCP reshards DTensors saved on another layout."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=Path(path))


def load_global_model(path: Any, module: nn.Module, key: str) -> None:
    """The global model saved under ``key`` in the folder ``path``, into ``module``'s shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    load_dcp(path, {key: get_model_state_dict(module)})  # the parameters themselves: in place


def packed(state: Any) -> io.BytesIO:
    """``state`` as one value of a DCP checkpoint, written as it is by the process that holds it:
    for a process's own state (nested, keyed by anything), which has no global layout to reshard."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def load_packed(path: Any, key: str) -> Any:
    """What :func:`packed` saved under ``key`` in the folder ``path`` (collective)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    value = _load_state_dict_from_keys({key}, checkpoint_id=Path(path))[key]
    if isinstance(value, io.BytesIO):  # the bytes as written (torch versions differ in this)
        value.seek(0)
        value = torch.load(value, map_location="cpu", weights_only=False)
    return value


def load_worker_state(
    path: Any, module: nn.Module, optimizers: Mapping[str, Optimizer], worker: int, model_key: str | None
) -> dict[str, Any] | None:
    """Worker ``worker``'s optimizer states from the folder ``path`` into ``optimizers`` (in place,
    resharded where the layout changed), and its own model (saved under ``model_key``), returned;
    ``model_key=None``: not read."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    key = f"worker{worker}"
    part: dict[str, Any] = {name: sharded_optimizer_state(module, o) for name, o in optimizers.items()}
    if model_key is not None:
        part[model_key] = sharded_model_state(module)
    load_dcp(path, {key: part})
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(module, optimizer, part[name])
    return part[model_key] if model_key is not None else None


# ---------------------------------------------------------------------- plain loops and Fabric
SYNC_KEY = "localsgd"
"""Where a checkpoint's ``meta.pt`` holds the sync schedule and the layout it was saved on."""


def save_checkpoint(
    path: Any, state: dict[str, Any], driver: Any, *, barrier: Callable[[], None] | None = None
) -> None:
    """Save sharded workers' state to the DCP folder ``path`` (collective: every process calls it).

    ``state`` maps names to the driver's model (the global model goes under its name, each
    worker's own under ``worker<k>``), its optimizers (each worker's own, sharded) and anything
    else (into ``meta.pt``, from rank 0). ``driver`` is the :class:`~localsgd.LocalSGD` made with
    ``mesh=``. Mid-round and with a round in flight, :func:`load_checkpoint` continues bitwise.
    """
    import torch.distributed as dist

    module, mesh = driver.models[0], driver.mesh
    if mesh is None:
        raise ValueError("save_checkpoint is for sharded workers: the driver has no mesh (pass mesh=)")
    barrier = barrier or dist.barrier
    rank, worker = dist.get_rank(), mesh.get_coordinate()[0]
    layout = {"world_size": mesh.size(), "shards_per_worker": mesh["shard"].size()}
    meta: dict[str, Any] = {SYNC_KEY: {**driver.sync_state_dict(), **layout}}
    shards: dict[str, Any] = {}
    own: dict[str, Any] = {}
    with driver.averager.own_models():
        for name, obj in state.items():
            if obj is module:
                with driver.averaged("checkpoint"):  # the global model: the same on every worker
                    shards[name] = sharded_model_state(module)
                own[name] = sharded_model_state(module)
            elif isinstance(obj, nn.Module):
                raise ValueError(
                    f"save_checkpoint: {name!r} is not the driver's model; sharded workers run one"
                )
            elif isinstance(obj, Optimizer):
                own[name] = sharded_optimizer_state(module, obj)
            else:
                meta[name] = obj.state_dict() if hasattr(obj, "state_dict") else obj
        if not shards:
            raise ValueError(
                "save_checkpoint of sharded workers: pass the model in state, e.g. {'model': model}"
            )
        shards[f"worker{worker}"] = own
        shards[f"rank{rank}"] = packed({"own": driver.own_state_dict(), "rng": rng_state()})
        save_dcp(path, shards, meta, rank, barrier)


def load_checkpoint(
    path: Any, state: dict[str, Any], driver: Any = None, *, mesh: Any = None, strict: bool = True
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` saved into ``state``'s model and optimizers (in place)
    and ``driver`` (collective); returns what is left of the checkpoint's other entries, with
    ``state``'s plain values replaced by the saved ones.

    On the layout it was saved on, every worker continues from its own model and optimizer
    state, mid-round (bitwise). On another (K, S) DCP reshards the global model into every
    worker and worker 0's optimizer state into every worker's optimizer. ``mesh``: when there
    is no driver yet (only the model is loaded); otherwise the driver's.
    """
    import torch.distributed as dist

    mesh = mesh if mesh is not None else getattr(driver, "mesh", None)
    if mesh is None:
        raise ValueError("load_checkpoint of sharded workers needs the driver (made with mesh=) or mesh=")
    modules = [(name, obj) for name, obj in state.items() if isinstance(obj, nn.Module)]
    if len(modules) != 1:
        raise ValueError(
            "load_checkpoint of sharded workers: pass the one model in state, e.g. {'model': model}"
        )
    name, module = modules[0]
    load_global_model(path, module, name)
    meta = load_meta(path)
    sync = meta.pop(SYNC_KEY, None)
    optimizers = {k: o for k, o in state.items() if isinstance(o, Optimizer)}
    layout = (mesh.size(), mesh["shard"].size())
    same = sync is not None and (sync.get("world_size"), sync.get("shards_per_worker")) == layout
    worker = mesh.get_coordinate()[0] if same else 0  # another layout: worker 0's
    own_model = load_worker_state(path, module, optimizers, worker, name if same else None)
    if sync is not None and driver is not None:
        driver.load_sync_state_dict(sync)
        if own_model is not None:  # this worker's own model and this rank's state, mid-round
            own = load_packed(path, f"rank{dist.get_rank()}")
            module.load_state_dict(own_model)
            driver.load_own_state_dict(own["own"])
            set_rng_state(own["rng"])
    for key, obj in state.items():
        if obj is module or key in optimizers:
            continue
        if key not in meta:
            if strict:
                raise KeyError(f"load_checkpoint: {key!r} is not in checkpoint {path}")
            continue
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(meta.pop(key))
        else:
            state[key] = meta.pop(key)
    return meta
